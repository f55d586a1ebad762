"""sdeflow: continuous-time diffusion models you can measure.

The method in three modules: forward SDEs (:mod:`sdeflow.sdes`), the plug-in reverse SDE with its
loss, ELBO and exact likelihood (:mod:`sdeflow.model`), and samplers (:mod:`sdeflow.samplers`, on the time grids of
:mod:`sdeflow.schedules`; the probability-flow ODE in :mod:`sdeflow.ode`).
Around them: :mod:`sdeflow.evaluation` (likelihoods over data sets), :mod:`sdeflow.engine` (the
training loop), :mod:`sdeflow.config` and :mod:`sdeflow.experiments` (the toy example and images).
Each kind of extension has one registry, owned by the module that defines it: ``SDES``
(:func:`register_sde`), ``WEIGHTINGS`` (:func:`register_weighting`), ``METHODS``
(:func:`register_method`), :data:`sdeflow.data.DATASETS`, :data:`sdeflow.nets.NETS` and
:data:`sdeflow.engine.HOOKS`.
"""

from .sdes import SDE, SDES, VPSDE, VESDE, SubVPSDE, make_sde, register_sde
from .model import WEIGHTINGS, PluginReverseSDE, register_weighting
from .time_sampling import FittedTime, ImportanceTime, TimeProposal, UniformTime
from .divergence import divergence
from .samplers import METHODS, Method, Option, register_method, sample
from .schedules import SCHEDULES, time_grid
from .ode import sample_ode
from .conditional import denoise, inpaint, posterior_sample
from .discrete import (AnalyticVariance, LearnedVariance, PixelBins, ancestral_sample, discrete_bound,
                       estimate_analytic_variance, forward_chain, hybrid_loss)

__version__ = "0.1.0"

__all__ = [
    "SDE", "VPSDE", "VESDE", "SubVPSDE", "SDES", "make_sde", "register_sde", "PluginReverseSDE",
    "WEIGHTINGS", "register_weighting",
    "TimeProposal", "UniformTime", "ImportanceTime", "FittedTime", "divergence",
    "sample", "sample_ode", "time_grid", "METHODS", "SCHEDULES", "Method", "Option", "register_method",
    "denoise", "inpaint", "posterior_sample",
    "forward_chain", "discrete_bound", "PixelBins", "AnalyticVariance", "estimate_analytic_variance",
    "LearnedVariance", "hybrid_loss", "ancestral_sample",
]
