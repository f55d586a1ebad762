r"""Samplers: integrate the generative λ-family of a model from t = T down to t_min.

A run is described by a :class:`SamplerSettings` (method, steps, λ, time grid, t_min, the method's
options) and drawn by :func:`sample`, which returns the samples. What happens along the way (the
state after each step, the network evaluations so far) reaches a ``callback``; :class:`Trace` is
one that keeps it. :func:`sdeflow.likelihood.ode.sample_ode` solves the probability-flow ODE with an adaptive
torchdiffeq solver instead.

The layout: :mod:`~sdeflow.samplers.registry` says what a method is and holds ``METHODS``;
:mod:`~sdeflow.samplers.methods` holds the built-in methods and the equations each step
implements; :mod:`~sdeflow.samplers.settings` holds the rules a run must satisfy;
:mod:`~sdeflow.samplers.clipping` keeps x̂₀ in the data's range for every method; the time grids
are :mod:`sdeflow.samplers.grids`'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .grids import time_grid
from ..utils import model_device_dtype
from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .clipping import ClippedModel, clip_prediction
from .registry import METHODS, Method, Option, register_method
from .settings import SamplerSettings

if TYPE_CHECKING:
    from ..model import PluginReverseSDE

__all__ = ["sample", "SamplerSettings", "Trace", "register_method", "METHODS", "Method", "Option", "ClippedModel",
           "clip_prediction"]


@torch.no_grad()
def sample(model: PluginReverseSDE, shape, settings: SamplerSettings | None = None, *,
           x_T: torch.Tensor | None = None, t_start: float | None = None,
           project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
           generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None,
           device=None, dtype=None) -> torch.Tensor:
    r"""Samples of shape ``shape`` (B, ...): the λ-family integrated from ``t_start`` (default T) to
    t_min by ``settings`` (default :class:`SamplerSettings`\ (): 1000 Euler–Maruyama steps of the
    reverse SDE, λ = 0, to t = 0). On the grid :math:`t_0 > \dots > t_N` of
    :func:`~sdeflow.samplers.grids.time_grid`, :math:`x_{i+1} = \mathrm{step}(x_i, t_i, t_{i+1})`, the
    step being the method's (see :mod:`sdeflow.samplers.methods`).

    Starts from ``x_T`` if given, else from a prior draw with ``generator``, which also draws every
    noise, so a seed reproduces the batch. ``project(x, t_next)``, if given, replaces the state
    after every step (inpainting re-imposes the observed values with it). ``callback`` is called
    after every step with {"i": step index, "t": t_{i+1}, "x": the state, "nfe": network
    evaluations so far}. ``device``/``dtype`` default to the model's parameters'. With
    ``settings.clip`` every step reads the model through :class:`ClippedModel` (x̂₀ clipped, or
    thresholded at ``settings.threshold``, into the range).
    Raises ``ValueError`` for settings that :meth:`SamplerSettings.validate` refuses.
    """
    settings = _settings(settings).validate(model.T, t_start)
    step = METHODS[settings.method].step
    if settings.clip is not None:
        model = ClippedModel(model, settings.clip, settings.threshold)
    device, dtype = model_device_dtype(model, device, dtype)
    ts = time_grid(model.sde, settings.n_steps, settings.schedule, settings.t_min, t_start, device=device,
                   dtype=dtype)
    x = model.sde.prior_sample(shape, generator=generator, device=device, dtype=dtype) if x_T is None else x_T
    state = dict(settings.options)
    nfe = 0
    for i in range(settings.n_steps):
        t, t_next = ts[i].expand(x.shape[0]), ts[i + 1].expand(x.shape[0])
        x, step_nfe = step(model, x, t, t_next, settings.lmbd, generator, i == settings.n_steps - 1, state)
        nfe += step_nfe
        if project is not None:
            x = project(x, t_next)
        if callback is not None:
            callback({"i": i, "t": ts[i + 1], "x": x, "nfe": nfe})
    return x


def _settings(settings) -> SamplerSettings:
    if settings is None:
        return SamplerSettings()
    if not isinstance(settings, SamplerSettings):
        raise ValueError(f"settings must be a sdeflow.samplers.SamplerSettings or None; got {type(settings).__name__}")
    return settings


class Trace:
    """A callback for :func:`sample`, :func:`sdeflow.likelihood.ode.sample_ode` and the conditional samplers
    that keeps what they report: ``nfe`` (network evaluations of the run so far), ``times`` (the
    time of each report, floats) and, with ``keep_states``, ``states`` (the state at each report,
    on its device). ``last`` is the last report as given."""

    def __init__(self, keep_states: bool = False):
        self.keep_states = keep_states
        self.nfe = 0
        self.times: list[float] = []
        self.states: list[torch.Tensor] = []
        self.last: dict = {}

    def __call__(self, report: dict) -> None:
        self.last = report
        self.nfe = report["nfe"]
        self.times.append(float(report["t"]))
        if self.keep_states:
            self.states.append(report["x"])
