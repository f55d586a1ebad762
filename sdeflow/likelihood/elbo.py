r"""The ELBO of the plug-in reverse SDE (Huang, Lim & Courville 2021, Theorem 1), started at t_min
and decoded with a Gaussian, with its time proposals and Hutchinson's trace.

For the model that runs the reverse SDE from T down to t_min and decodes x from y = y_{t_min} with
:math:`p(x\mid y) = N(y/m, (v/m^2) I)` (m, v at t_min),

.. math::  \log p(x) \ge \int_{t_{min}}^T E_{y_t}[h(y_t, t)]\,dt + E_{q(y_T|x)}[\log p_T(y_T)]
           + D\log m(t_{min}),

with :math:`h = -\tfrac12\|a\|^2 - g\nabla\cdot a + D f` (the Hutchinson form), since
:math:`\log p(x|y) - \log q(y|x) = D\log m` for that decoder. t_min = 0 gives the bound of the SDE run
to 0 (no decoder); the default 10⁻⁵·T leaves out the times at which a network's ε prediction is
untrained and need not vanish, where h grows like ‖ε̂‖²/(2t) and every estimate is heavy-tailed.

By parts, :math:`E_y[g\nabla\cdot a] = E[g\,a\cdot\varepsilon/std]`, which gives the divergence-free
*denoising form* h₀ (:func:`denoising_terms`); a fitted time proposal (:func:`fit_time_proposal`)
pairs it with a control variate of mean zero. Every form has the same expectation at every t.
"""

from __future__ import annotations

import weakref

import torch

from .divergence import DIVERGENCES, PROBES
from .divergence import divergence as field_divergence
from .plans import EstimatorPlan, IntegrandForms, fit_proposal
from .time_proposals import T_MIN_FRACTION, TimeProposal, make_proposal
from ..utils import check_choice, check_finite, check_positive_int, check_t_min, sum_except_batch

__all__ = ["elbo", "elbo_integrand", "denoising_terms", "fit_time_proposal", "default_t_min",
           "decoder_log_weight", "chunk_size_for"]


def default_t_min(T: float) -> float:
    """The likelihood estimators' default start time, 10⁻⁵·T (``time_sampling.T_MIN_FRACTION``)."""
    return T_MIN_FRACTION * T


def decoder_log_weight(sde, dim: int, t_min: float) -> float:
    """D·log m(t_min): the closed-form term of the Gaussian decoder p(x | y) = N(y/m, v/m²) in the
    ELBO started at t_min, and of the output y/m of the ODE stopped there (0 for t_min = 0 and
    for VE)."""
    return dim * float(torch.log(sde.mean_weight(torch.tensor(t_min, dtype=torch.float64))))


def chunk_size_for(x: torch.Tensor) -> int:
    """Examples per network call: about 2¹⁷ numbers (42 CIFAR images), since larger batches of images
    run slower per image on a CPU (3× at 512)."""
    return max(1, 2 ** 17 // max(1, x[0].numel()))


def elbo_integrand(model, y: torch.Tensor, t: torch.Tensor, *, probe: str = "rademacher",
                   divergence: str = "hutchinson", generator: torch.Generator | None = None,
                   create_graph: bool = False) -> torch.Tensor:
    r"""The ELBO's integrand in its Hutchinson form at (y, t), shape (B,):
    :math:`h = -\tfrac12\|a\|^2 - g\,\nabla\cdot a + D f(t)` (g depends on t only, so
    ∇·(g a) = g ∇·a, and ∇·f = D·f(t) for the linear drift)."""
    a, div_a = field_divergence(lambda z: model.drift(z, t), y, kind=divergence, probe=probe,
                               generator=generator, create_graph=create_graph)
    g = model.sde.g2(t).sqrt().to(a.dtype)
    return -0.5 * sum_except_batch(a ** 2) - g * div_a + a[0].numel() * model.sde.f_coef(t).to(a.dtype)


def denoising_terms(model, x: torch.Tensor, t: torch.Tensor, generator=None, chunk_size: int | None = None,
                    noise: torch.Tensor | None = None):
    r"""(h₀, w), float64 of shape (B,), at y_t = m x + std ε: the ELBO's integrand in denoising form
    and its control variate,

    .. math::  h_0 = -\tfrac12\rho\,(\|\hat\varepsilon - \varepsilon\|^2 - D) + D f,\qquad
               w = \tfrac12\rho\,(\|\varepsilon\|^2 - D),\qquad \rho = g^2/v.

    w has mean zero exactly (E‖ε‖² = D). h₀ + w = −½ρ(‖ε̂‖² − 2ε̂·ε) + Df, whose noise vanishes with
    ε̂: the quiet form at small t, where the data's dequantisation noise makes ε unpredictable; h₀ is
    the quiet one at large t, where ε̂ ≈ ε. Each sum is formed on its own (no difference of large
    numbers). ``chunk_size`` examples per network call; ``noise``: the draws of ε (shaped like x), to pair
    the terms of several models on the same draws (default: drawn from ``generator``)."""
    if chunk_size is not None and x.shape[0] > chunk_size:
        parts = [denoising_terms(model, x[i:i + chunk_size], t[i:i + chunk_size], generator,
                                 noise=None if noise is None else noise[i:i + chunk_size])
                 for i in range(0, x.shape[0], chunk_size)]
        return torch.cat([h for h, _ in parts]), torch.cat([w for _, w in parts])
    y, noise, _, _ = model.sde.sample(x, t, return_noise=True, generator=generator, noise=noise)
    eps = model.predicted_noise(y, t)
    rho = (model.sde.g2(t) / model.sde.var(t)).double()
    s_eps = sum_except_batch(eps ** 2).double()
    s_cross = sum_except_batch(eps * noise).double()
    s_noise = sum_except_batch(noise ** 2 - 1).double()
    h0 = -0.5 * rho * (s_eps - 2 * s_cross + s_noise) + x[0].numel() * model.sde.f_coef(t).double()
    return h0, 0.5 * rho * s_noise


def _hutchinson_terms(model, x: torch.Tensor, t: torch.Tensor, probe: str = "rademacher",
                      divergence: str = "hutchinson", generator=None) -> torch.Tensor:
    """The Hutchinson form of the integrand at y_t = m x + std ε, in chunks; (B,)."""
    y, size = model.sde.sample(x, t, generator=generator), chunk_size_for(x)
    return torch.cat([elbo_integrand(model, y[i:i + size], t[i:i + size], probe=probe, divergence=divergence,
                                     generator=generator, create_graph=torch.is_grad_enabled())
                      for i in range(0, y.shape[0], size)])


@torch.no_grad()
def fit_time_proposal(model, x: torch.Tensor, *, n_bins: int = 32, max_examples: int = 16,
                      defensive: float = 0.02, t_min: float | None = None, chunk_size: int | None = None,
                      divergence: str = "hutchinson", generator: torch.Generator | None = None) -> EstimatorPlan:
    """The ELBO's fitted time proposal on [t_min, T] (default t_min: :func:`default_t_min`), fitted to
    the denoising integrand h₀ and its control variate w on a pilot batch (at most ``max_examples`` of
    x; one draw of t per bin and example) by :func:`~sdeflow.likelihood.plans.fit_proposal`: per bin the
    coefficient c of h₀ + c·w of least variance, and q ∝ √E[(h₀ + c w)²]. Costs n_bins × examples
    forward passes, ``chunk_size`` at a time (default :func:`chunk_size_for`). With
    ``divergence="exact"`` (low-dimensional data only) the pilot also measures the Hutchinson form with
    the exact divergence, and the bins where it is quieter take it. Returns the ELBO's plan (the
    :class:`~sdeflow.likelihood.time_proposals.FittedTime` density, the control coefficients and the
    form per bin), a value to pass to :func:`elbo` (and to keep: ``EstimatorPlan.to_dict``); the model is
    not changed.
    """
    check_choice("divergence", divergence, DIVERGENCES)
    check_finite("x", x)
    t_min = default_t_min(model.T) if t_min is None else check_t_min(t_min, model.T)
    chunk_size = chunk_size_for(x) if chunk_size is None else check_positive_int("chunk_size", chunk_size)
    pilot = x[:check_positive_int("max_examples", max_examples)]
    batch = pilot.shape[0]

    def integrands(t: torch.Tensor) -> IntegrandForms:
        xs = pilot.repeat((t.numel() // batch,) + (1,) * (pilot.ndim - 1))
        h0, w = denoising_terms(model, xs, t, generator, chunk_size=chunk_size)
        exact = (_hutchinson_terms(model, xs, t, divergence="exact", generator=generator)
                 if divergence == "exact" else None)
        return IntegrandForms(h0, control=w, alternative=exact)

    return fit_proposal(integrands, model.sde, n_bins=n_bins, n_per_bin=batch, t_min=t_min, defensive=defensive,
                        generator=generator, dtype=x.dtype, device=x.device)


#: model → (its state key, the proposal fitted for it): the one-line elbo(model, x) in a loop over batches
#: fits its proposal once, on the first batch, and again only when the model's weights change. The
#: cache holds no reference to the model (a weak key) and never changes it.
_FITTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _state_key(model, x: torch.Tensor, t_min: float, divergence: str) -> tuple:
    """What a fitted proposal depends on: every parameter and buffer (identity and in-place version: an
    optimizer step or a load changes it), train/eval mode, the example shape, dtype and device, t_min."""
    tensors = tuple((id(v), v._version) for v in (*model.parameters(), *model.buffers()))
    return tensors, model.training, tuple(x.shape[1:]), x.dtype, x.device, t_min, divergence


def _fitted_for(model, x: torch.Tensor, t_min: float, divergence: str, generator) -> EstimatorPlan:
    """The proposal of ``time_sampling="fitted"``: fitted on this batch the first time, then reused while
    the model's state is unchanged (unbiased either way: the estimate is unbiased for any fixed proposal)."""
    key = _state_key(model, x, t_min, divergence)
    try:
        cached = _FITTED.get(model)
    except TypeError:  # a model that cannot be weakly referenced: fit every call
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    proposal = fit_time_proposal(model, x, t_min=t_min, divergence=divergence, generator=generator)
    try:
        _FITTED[model] = (key, proposal)
    except TypeError:
        pass
    return proposal


def _resolve_t_min(model, t_min, time_sampling) -> float:
    if t_min is None:
        given = isinstance(time_sampling, (TimeProposal, EstimatorPlan))
        return time_sampling.t_min if given else default_t_min(model.T)
    return check_t_min(t_min, model.T)


def _plan(sde, time_sampling, t_min: float) -> EstimatorPlan | None:
    """The plan of a fitted proposal, or None for a plain one (every draw in the Hutchinson form)."""
    if isinstance(time_sampling, EstimatorPlan):
        make_proposal(sde, time_sampling.proposal, t_min)  # checks its support starts at t_min
        return time_sampling
    return None


def elbo(model, x: torch.Tensor, *, n_slices: int = 1, time_sampling="fitted", probe: str = "rademacher",
         divergence: str = "hutchinson", generator: torch.Generator | None = None,
         t_min: float | None = None) -> torch.Tensor:
    r"""Unbiased per-example estimate of the ELBO of ``model`` in nats, shape (B,), from ``t_min``
    (default: the proposal's start, or 10⁻⁵·T) with the Gaussian decoder (see the module).

    The path term is :math:`\sum_k w_k\, h(y_{t_k}, t_k)/q(t_k)` with K = ``n_slices`` draws per example,
    one in each stratum of q (quantile range of mass w_k: equal quantiles, or for a fitted proposal the
    strata that cut the variance most); unbiased, and never noisier than K independent draws. The prior
    term is in closed form. ``time_sampling``: "uniform", "importance" (q ∝ g²/v) or any
    :class:`~sdeflow.likelihood.time_proposals.TimeProposal` take h in the Hutchinson form (divergence by
    ``divergence`` = "hutchinson" with a ``probe``, or "exact"; sdeflow-light's slice); a
    :class:`~sdeflow.likelihood.plans.EstimatorPlan` of :func:`fit_time_proposal` (lowest variance, one
    forward pass per draw) draws from its fitted density and takes the denoising form h₀ + c·w with its
    bin's coefficient c (and the exact Hutchinson form in the bins it flags); "fitted" (the default) fits one on the first batch it sees for
    this model and reuses it while the model's weights are unchanged, so that a loop of ``elbo(model, x)``
    over batches costs little more than passing a proposal fitted once.
    Differentiable when grad is enabled.
    """
    check_finite("x", x)
    n_slices = check_positive_int("n_slices", n_slices)
    check_choice("probe", probe, PROBES)
    check_choice("divergence", divergence, DIVERGENCES)
    t_min = _resolve_t_min(model, t_min, time_sampling)
    if isinstance(time_sampling, str) and time_sampling == "fitted":
        time_sampling = _fitted_for(model, x, t_min, divergence, generator)
    plan = _plan(model.sde, time_sampling, t_min)
    proposal = plan.proposal if plan is not None else make_proposal(model.sde, time_sampling, t_min)
    batch = x.shape[0]
    # Slice k of every example draws its time from the k-th stratum of q; q̃ carries the stratum's weight.
    t, q = proposal.sample(n_slices * batch, generator=generator, device=x.device, dtype=x.dtype, strata=n_slices)
    xs = x.repeat((n_slices,) + (1,) * (x.ndim - 1))
    hutch = plan.alternative_at(t) if plan is not None else torch.ones_like(t, dtype=torch.bool)
    h = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
    if hutch.any():
        h = h.index_put((hutch,), _hutchinson_terms(model, xs[hutch], t[hutch], probe=probe, divergence=divergence,
                                                    generator=generator).double())
    if not hutch.all():
        den = ~hutch
        h0, w = denoising_terms(model, xs[den], t[den], generator, chunk_size=chunk_size_for(x))
        h = h.index_put((den,), h0 + plan.control_at(t[den]) * w)
    path_term = (h / q.to(h.dtype)).reshape(n_slices, batch).mean(dim=0).to(x.dtype)
    return path_term + model.sde.expected_prior_log_prob(x) + decoder_log_weight(model.sde, x[0].numel(), t_min)
