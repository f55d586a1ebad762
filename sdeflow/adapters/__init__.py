r"""Models trained elsewhere as sdeflow models: every estimator (ELBO, ODE likelihood, bits/dim) and
every sampler of sdeflow on them.

* :func:`adapt_discrete` — a discrete-time network ε(x, n) / x₀(x, n) / v(x, n) on its ᾱ table
  (DDPM, improved DDPM ports); :func:`adapt_diffusers` — the same from a diffusers scheduler config;
* :func:`adapt_denoiser` — a denoiser D(x; σ) (k-diffusion, EDM) on the matching VE SDE;
* :func:`adapt_score_network` — a score network with continuous time or score_sde's labels;
* :func:`load_foreign` — ``"diffusers:DIR_OR_ID"`` → (model, image model config).

**Where a bound starts.** A network trained on noise levels down to its first step (t₁ = T/N for N
discrete steps, the time of σ_min for a denoiser) was never asked to denoise below it. Its ELBO and ODE
likelihood should run from T down to :func:`bound_start` and decode x from there with the Gaussian
decoder N(y/m, v/m²) (see :func:`sdeflow.likelihood.elbo.elbo`): the result stays a bound on the discrete data's
negative log-likelihood, paying for the decoder's blur instead of trusting untrained outputs.
:func:`sdeflow.likelihood.evaluation.evaluate_bpd` starts there by default (at the later of it and the images'
quantization time).
"""

from __future__ import annotations

from .diffusers import (DATA_CONFIG, INSTALL_HINT, PickledWeightsError, adapt_diffusers, load_diffusers,
                        sde_from_scheduler_config)
from .discrete import PREDICTION_TYPES, DiscreteTimeNet, adapt_discrete
from .kdiffusion import DenoiserNet, adapt_denoiser, denoiser_sde
from .score_sde import TIME_LABELS, LabelledScoreNet, adapt_score_network

__all__ = ["adapt_discrete", "adapt_diffusers", "adapt_denoiser", "adapt_score_network", "denoiser_sde",
           "sde_from_scheduler_config", "load_foreign", "bound_start", "FOREIGN_SOURCES", "DATA_CONFIG",
           "PREDICTION_TYPES", "TIME_LABELS", "DiscreteTimeNet", "DenoiserNet", "LabelledScoreNet",
           "PickledWeightsError"]

#: prefix → loader(location, device=, dtype=, allow_pickle=) -> (model, config) of :func:`load_foreign`.
FOREIGN_SOURCES = {"diffusers": load_diffusers}


def bound_start(model) -> float:
    """The time of the smallest noise level ``model``'s network was trained on (0.0 when its adapter does
    not know one): t₁ = T/N of a discrete-time network, the time of σ_min of a denoiser."""
    from ..nets.heads import has_variance_head

    net = model.net.net if has_variance_head(model) else model.net
    first = getattr(net, "first_trained_time", None)
    return float(first()) if callable(first) else 0.0


def load_foreign(spec: str, device=None, dtype=None, *, allow_pickle: bool = False):
    """Load ``spec`` = "SOURCE:LOCATION" (SOURCE in ``FOREIGN_SOURCES``: "diffusers:DIR_OR_ID", a folder
    written by ``save_pretrained`` or a hub id) as (model, config): an sdeflow
    :class:`~sdeflow.model.PluginReverseSDE` in eval mode and a config shaped like sdeflow's image model
    config (see :func:`load_diffusers`), ready for :func:`sdeflow.likelihood.evaluation.evaluate_bpd` and sampling.
    Weights stored pickled (which can run code when read) raise :class:`PickledWeightsError` unless
    ``allow_pickle=True``. ValueError for an unknown source or a location that does not load (in one
    line, with the loader's reason); ImportError naming the pip extra when its library is missing."""
    source, sep, location = str(spec).partition(":")
    if not sep or source not in FOREIGN_SOURCES or not location:
        raise ValueError(f"spec must be SOURCE:LOCATION with SOURCE one of {', '.join(FOREIGN_SOURCES)} "
                         f"(e.g. diffusers:google/ddpm-cifar10-32); got {spec!r}")
    return FOREIGN_SOURCES[source](location, device=device, dtype=dtype, allow_pickle=allow_pickle)
