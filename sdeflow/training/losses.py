r"""Training losses: denoising score matching (first and second order) and its weightings.

With :math:`y_t = m(t)\,x + std(t)\,\varepsilon`, the loss at time t is
:math:`\lambda(t)\,\ell(t)`, :math:`\ell(t) = \tfrac12\|std\cdot s(y_t, t) + \varepsilon\|^2`, and the
objective is :math:`\tfrac1T\int_{t_{min}}^T \lambda\,\ell\,dt`, estimated with times drawn from a time
proposal (:mod:`sdeflow.likelihood.time_proposals`). ``WEIGHTINGS`` holds the λ(t): 1 (``"noise"``, the DDPM
ε-loss) or :math:`T g^2/v` (``"likelihood"``, the DSM form of the ELBO's path term,
:math:`\int\tfrac12\|a + g\varepsilon/std\|^2 dt`).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..sdes.linear import SDE
from ..likelihood.time_proposals import make_proposal, truncation_time
from ..utils import as_time, check_choice, check_finite, check_new_name, check_nonneg_float, check_t_min, sum_except_batch

__all__ = ["dsm", "WEIGHTINGS", "register_weighting", "noise_weighting", "likelihood_weighting",
           "MAX_SECOND_ORDER_DIM"]

#: Largest data dimension for which ``dsm(order=2)`` forms the exact Jacobian of the score.
MAX_SECOND_ORDER_DIM = 64


def noise_weighting(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    r""":math:`\lambda(t) = 1`: the DDPM ε-loss :math:`\tfrac12\|std\cdot s + \varepsilon\|^2` unweighted.
    (B,) -> (B,)."""
    return torch.ones_like(t)


def likelihood_weighting(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    r""":math:`\lambda(t) = T\,g(t)^2 / v(t)`: the DSM form of the ELBO's path term,
    :math:`\tfrac1T\int \lambda\,\ell\,dt = \int \tfrac12\|a + g\varepsilon/std\|^2 dt`. It diverges
    like 1/t at 0; :func:`dsm` evaluates every weighting at max(t, t_ε). It is T·Z times the density of
    :class:`~sdeflow.likelihood.time_proposals.ImportanceTime` with the same t_ε, so with
    ``time_sampling="importance"`` the estimate's time weight is the constant Z. (B,) -> (B,)."""
    return sde.T * sde.g2(t) / sde.var(t)


#: name → λ(sde, t): the per-time weight of the DSM loss (see :func:`dsm`, which evaluates it at
#: max(t, t_ε)). Add entries with :func:`register_weighting`.
WEIGHTINGS: dict[str, Callable[[SDE, torch.Tensor], torch.Tensor]] = {
    "noise": noise_weighting,
    "likelihood": likelihood_weighting,
}


def register_weighting(name: str, fn: Callable[[SDE, torch.Tensor], torch.Tensor]) -> Callable:
    """Add the loss weighting ``fn(sde, t) -> λ(t)`` (times (B,) -> weights (B,), positive) to
    :data:`WEIGHTINGS` under ``name`` and return it. ValueError if ``name`` is taken or ``fn`` is
    not callable."""
    check_new_name(name, WEIGHTINGS, "weighting")
    if not callable(fn):
        raise ValueError(f"fn must be a callable fn(sde, t) -> weights; got {fn!r}")
    WEIGHTINGS[name] = fn
    return fn


def dsm(model, x: torch.Tensor, *, time_sampling="importance", weighting: str = "likelihood",
        t: torch.Tensor | None = None, generator: torch.Generator | None = None, order: int = 1,
        second_order_weight: float = 0.3, t_min: float = 0.0, stratified_time: bool = False) -> torch.Tensor:
    r"""Per-example denoising score matching loss of ``model`` on data x (B, ...), shape (B,).

    The loss at time t is :math:`w(t)\,\ell(t)`, :math:`\ell(t) = \tfrac12\|std\cdot s(y_t, t) + \varepsilon\|^2`,
    w = λ(max(t, t_ε)) with λ = ``WEIGHTINGS[weighting]``. It covers t in [t_min, T]: with ``t_min`` = 0
    (sdeflow-light's) the weighting is truncated below t_ε = 10⁻³T, where the likelihood weighting
    diverges; with ``t_min`` > 0, t_ε = t_min and the likelihood-weighted loss is exactly the path term of
    the ELBO started at t_min (:func:`sdeflow.likelihood.elbo.elbo`).
    The value estimates :math:`\tfrac1T\int_{t_{min}}^T w\,\ell\,dt` as :math:`w\ell/(T q(t))` with t ~ q
    (``time_sampling``: "importance" ∝ g²/v at max(t, t_ε), "uniform", or a
    :class:`~sdeflow.likelihood.time_proposals.TimeProposal` on [t_min, T]), unbiased for every proposal.
    ``stratified_time`` draws example k's time from the k-th of B equal quantile ranges of q (a
    low-discrepancy sampler, as VDM's): the same objective with less variance. Pass ``t`` (B,) to
    evaluate :math:`w\,\ell(t)` at given times instead. The defaults are :class:`~sdeflow.training.TrainConfig`'s
    (the likelihood recipe); DDPM's ε-loss is ``time_sampling="uniform", weighting="noise"`` on a "noise"
    model.

    ``order=2`` adds second-order score matching (Lu et al. 2022) with weight κ = ``second_order_weight``:
    with r = ε + std·ŝ (ŝ not differentiated) and J = ∇_y s,

    .. math::  \ell(t) \mathrel{+}= \kappa\big(\|std^2 J + I - r r^\top\|_F^2 + (std^2 \operatorname{tr} J + D - \|r\|^2)^2\big),

    whose minimiser is the Hessian of log p_t (E[r rᵀ | y] = std²∇²log p_t(y) + I when ŝ is exact), so that
    the probability-flow ODE's likelihood agrees with the ELBO. J is exact (D backward passes): D ≤ 64.
    """
    check_finite("x", x)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("order", order, (1, 2))
    t_min = check_t_min(t_min, model.T)
    dim = x[0].numel()
    if order == 2 and dim > MAX_SECOND_ORDER_DIM:
        raise ValueError(f"order=2 needs the exact Jacobian of the score, allowed for data of at most "
                         f"{MAX_SECOND_ORDER_DIM} dimensions; got {dim}")
    second_order_weight = check_nonneg_float("second_order_weight", second_order_weight)
    if t is None:
        proposal = make_proposal(model.sde, time_sampling, t_min)
        t, q = proposal.sample(x.shape[0], generator=generator, device=x.device, dtype=x.dtype,
                               strata=x.shape[0] if stratified_time else 1)
        time_weight = 1.0 / (model.T * q)
    else:
        t = as_time(t, x.shape[0], x)
        time_weight = torch.ones_like(t)
    y, noise, std, _ = model.sde.sample(x, t, return_noise=True, generator=generator)
    if order == 1:
        loss = 0.5 * sum_except_batch((std * model.score(y, t) + noise) ** 2)
    else:
        score, second_order = _score_and_second_order_term(model, y, t, noise, std)
        loss = 0.5 * sum_except_batch((std * score + noise) ** 2) + second_order_weight * second_order
    weight = WEIGHTINGS[weighting](model.sde, t.clamp_min(truncation_time(model.T, t_min)))
    return loss * (time_weight * weight)


def _score_and_second_order_term(model, y, t, noise, std):
    # (s, ‖std²J + I − r rᵀ‖²_F + (std² tr J + D − ‖r‖²)²) at (y, t); see dsm. J needs a graph
    # even under no_grad; the arithmetic after it follows the caller's grad mode.
    batch, dim = y.shape[0], y[0].numel()
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        score = model.score(y, t)
        flat = score.reshape(batch, dim)
        # jac[b, i, j] = ∂s_i/∂y_j, one backward pass per output coordinate i.
        jac = torch.stack([torch.autograd.grad(flat[:, i].sum(), y, create_graph=True)[0].reshape(batch, dim)
                           for i in range(dim)], dim=1)
    var = std.reshape(batch, 1, 1) ** 2
    r = noise.reshape(batch, dim) + std.reshape(batch, 1) * flat.detach()
    eye = torch.eye(dim, dtype=y.dtype, device=y.device)
    frobenius = ((var * jac + eye - r[:, :, None] * r[:, None, :]) ** 2).sum(dim=(1, 2))
    trace = (var[:, 0, 0] * torch.diagonal(jac, dim1=1, dim2=2).sum(dim=1) + dim - (r ** 2).sum(dim=1)) ** 2
    return score, frobenius + trace
