r"""Samplers: integrate the generative λ-family of a model from t = T down to t_min.

A run is described by a :class:`SamplerSettings` (method, steps, λ, time grid, t_min, the method's
options) and drawn by :func:`sample` (:mod:`~sdeflow.samplers.loop`), which returns the samples. What happens along the way (the
state after each step, the network evaluations so far) reaches a ``callback``; :class:`Trace` is
one that keeps it. :func:`sdeflow.likelihood.ode.sample_ode` solves the probability-flow ODE with an adaptive
torchdiffeq solver instead.

The layout: :mod:`~sdeflow.samplers.registry` says what a method is and holds ``METHODS``;
:mod:`~sdeflow.samplers.methods` holds the built-in methods and the equations each step
implements; :mod:`~sdeflow.samplers.settings` holds the rules a run must satisfy;
:mod:`~sdeflow.samplers.clipping` keeps x̂₀ in the data's range for every method; the time grids
are :mod:`~sdeflow.samplers.grids`; DDPM's ancestral sampler on its N-step chain is
:mod:`~sdeflow.samplers.ddpm`; posterior sampling (denoising, inpainting, linear inverse problems)
is :mod:`~sdeflow.samplers.conditional`; classifier-free guidance of class-conditional models is
:mod:`~sdeflow.samplers.guidance`.
"""

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .clipping import ClippedModel, clip_prediction
from .registry import METHODS, Method, Option, register_method
from .settings import SamplerSettings
from .loop import Trace, sample
from .ddpm import ancestral_sample
from .guidance import GuidedNet, guided

__all__ = ["sample", "ancestral_sample", "SamplerSettings", "Trace", "register_method", "METHODS", "Method", "Option",
           "ClippedModel", "clip_prediction", "guided", "GuidedNet"]
