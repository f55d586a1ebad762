"""sdeflow: continuous-time diffusion models you can measure.

The method in a few small modules: forward SDEs (:mod:`sdeflow.sdes.linear`); the model, a network seen
through a parameterization (:mod:`sdeflow.model`); the estimators over any model: the training loss
(:mod:`sdeflow.training.losses`), the ELBO with its time proposals (:mod:`sdeflow.likelihood.elbo`,
:mod:`sdeflow.likelihood.time_proposals`) and the probability-flow ODE (:mod:`sdeflow.likelihood.ode`); samplers
(:mod:`sdeflow.samplers`, on the time grids of :mod:`sdeflow.samplers.grids`); DDPM's discrete-time bound and
reverse variances (:mod:`sdeflow.discrete`); networks trained elsewhere as models (:mod:`sdeflow.adapters`,
on the noise levels of :mod:`sdeflow.sdes.noise_levels`). Around them:
:mod:`sdeflow.likelihood.evaluation` (likelihoods over data sets, in nats or bits/dim), :mod:`sdeflow.engine`
(the training loop), :mod:`sdeflow.config` and :mod:`sdeflow.experiments` (the toy example and images),
:mod:`sdeflow.metrics` (sample quality: FID and KID in Inception or classifier features, sliced Wasserstein).
Each kind of extension has one registry, owned by the module that defines it: ``SDES``
(:func:`register_sde`), ``WEIGHTINGS`` (:func:`register_weighting`), ``METHODS``
(:func:`register_method`), :data:`sdeflow.data.DATASETS`, :data:`sdeflow.nets.NETS`,
:data:`sdeflow.engine.HOOKS` and :data:`sdeflow.metrics.FEATURES`.
"""

from .sdes.linear import SDE, SDES, VPSDE, VESDE, SubVPSDE, make_sde, register_sde
from .model import PARAMETERIZATIONS, PluginReverseSDE
from .training.losses import WEIGHTINGS, dsm, register_weighting
from .likelihood.plans import EstimatorPlan
from .likelihood.time_proposals import FittedTime, ImportanceTime, TimeProposal, UniformTime
from .likelihood.elbo import elbo, fit_time_proposal
from .likelihood.divergence import divergence
from .likelihood.ode import log_prob_ode, sample_ode
from .samplers import METHODS, Method, Option, SamplerSettings, Trace, ancestral_sample, guided, register_method, sample
from .samplers.grids import GRIDS, register_grid, time_grid
from .samplers.conditional import denoise, inpaint, posterior_sample
from .config import build_model, model_config
from .training import TrainConfig
from .likelihood.evaluation import LikelihoodSettings, evaluate_bpd, log_likelihood
from .likelihood.classifier import classify
from .storage.checkpoints import load_model
from .sdes.noise_levels import CosineVPSDE, DiscreteVPSDE
from .adapters import adapt_denoiser, adapt_diffusers, adapt_discrete, adapt_score_network, bound_start, load_foreign
from .metrics import frechet_distance, image_metrics, kid, sliced_wasserstein
from .discrete import (AnalyticVariance, LearnedVariance, PixelBins, discrete_bound,
                       estimate_analytic_variance, forward_chain, hybrid_loss, variance_loss)

__version__ = "0.1.0"


def __getattr__(name):
    # The training loop loads on first use, so that evaluating or sampling never imports it.
    if name == "fit":
        from .engine.loop import fit
        return fit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SDE", "VPSDE", "VESDE", "SubVPSDE", "SDES", "make_sde", "register_sde",
    "PluginReverseSDE", "PARAMETERIZATIONS",
    "dsm", "WEIGHTINGS", "register_weighting",
    "TimeProposal", "UniformTime", "ImportanceTime", "FittedTime", "EstimatorPlan", "elbo", "fit_time_proposal", "divergence",
    "log_prob_ode", "sample_ode", "sample", "SamplerSettings", "Trace", "time_grid", "METHODS", "GRIDS", "register_grid",
    "Method", "Option", "register_method", "guided", "denoise", "inpaint", "posterior_sample",
    "TrainConfig", "build_model", "model_config", "fit",
    "LikelihoodSettings", "log_likelihood", "evaluate_bpd", "classify", "load_model",
    "CosineVPSDE", "DiscreteVPSDE", "adapt_discrete", "adapt_diffusers", "adapt_denoiser", "adapt_score_network",
    "bound_start", "load_foreign",
    "forward_chain", "discrete_bound", "PixelBins", "AnalyticVariance", "estimate_analytic_variance",
    "LearnedVariance", "hybrid_loss", "variance_loss", "ancestral_sample",
    "frechet_distance", "kid", "image_metrics", "sliced_wasserstein",
]
