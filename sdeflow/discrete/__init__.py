"""DDPM's discrete-time bound and reverse variances for any sdeflow model (issue 21).

:mod:`~sdeflow.discrete.chain` (the forward SDE on N steps, the prior term, the pixel bins of the
decoder), :mod:`~sdeflow.discrete.variances` (β̃, β, analytic and learned reverse variances),
:mod:`~sdeflow.discrete.bound` (the bound, its estimators, the hybrid loss).
DDPM's ancestral sampler is :func:`sdeflow.samplers.ancestral_sample` (the "ancestral" method on the
chain's grid).
"""

from .chain import ForwardChain, PixelBins, forward_chain, gaussian_log_prob, prior_kl, step_chain
from .variances import (FIXED_VARIANCES, VARIANCES, AnalyticVariance, LearnedVariance, check_variance,
                        estimate_analytic_variance, fixed_variances, noise_and_variance, reverse_variance)
from .bound import (DiscreteBound, bound_bits_per_dim, discrete_bound, fit_step_proposal, hybrid_loss, step_terms,
                    variance_loss)

__all__ = ["ForwardChain", "forward_chain", "step_chain", "prior_kl", "PixelBins", "gaussian_log_prob",
           "FIXED_VARIANCES", "VARIANCES", "fixed_variances", "AnalyticVariance", "estimate_analytic_variance",
           "LearnedVariance", "noise_and_variance", "reverse_variance", "check_variance",
           "DiscreteBound", "discrete_bound", "step_terms", "fit_step_proposal", "hybrid_loss", "variance_loss",
           "bound_bits_per_dim"]
