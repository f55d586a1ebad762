r"""Reverse variances σ_n² of the model's steps :math:`p(y_{n-1}\mid y_n) = N(\mu_\theta(y_n, n), \sigma_n^2 I)`.

Four choices, each accepted wherever a ``variance`` is taken (:func:`reverse_variance`):

* ``"posterior"``: :math:`\sigma_n^2 = \tilde\beta_n` (DDPM's "fixedsmall"), the variance of
  q(y_{n−1} | y_n, x), the right one when x is known exactly;
* ``"step"``: :math:`\sigma_n^2 = \beta_n` (DDPM's "fixedlarge"), right when x is pure noise.
  At n = 1 (the decoder) β̃_1 = 0, and both use :math:`\tilde\beta_2`, as DDPM's code does
  (β_1 when N = 1);
* :class:`AnalyticVariance` (Analytic-DPM, Bao et al. 2022): the variance that maximizes the bound
  for the model's own mean,

  .. math::  \sigma_n^{*2} = \tilde\beta_n + (c^x_n)^2\,\frac{v_n}{m_n^2}\,(1 - \Gamma_n),\qquad
             \Gamma_n = \frac{E_{q(y_n)}\|\hat\varepsilon(y_n, t_n)\|^2}{D},

  since :math:`\tilde\mu_n - \mu_\theta = c^x_n (x - \hat x_0)` and
  :math:`E\|x - \hat x_0\|^2/D = (v_n/m_n^2)(1 - \Gamma_n)` for the optimal ε̂ (Bao et al., Thm 1,
  written for any linear SDE; c^x_n of :mod:`sdeflow.discrete.chain`). Γ_n is estimated once per step
  on a batch of training data by :func:`estimate_analytic_variance` and clipped to [0, 1] (Bao et
  al.'s bounds on σ*², Thm 2). The value keeps Γ(t) at its times and serves any grid (linear
  interpolation in t, exact at its own times), and it is stored as plain lists (:meth:`to_state`);
* :class:`LearnedVariance` (improved DDPM, Nichol & Dhariwal 2021): a network outputs v per
  element and :math:`\log\sigma_n^2 = v\log\beta_n + (1 - v)\log\tilde\beta_n` (β̃_1 → β̃_2 as above,
  β_1 at n = 1 as improved DDPM's code), either a network of its own or the variance head of the
  model's network (:class:`sdeflow.nets.MeanAndVariance`, :meth:`LearnedVariance.of`), whose ε̂ and
  σ² then come from one evaluation (:func:`noise_and_variance`). Trained by
  :func:`sdeflow.discrete.hybrid_loss` or, beside any mean loss, :func:`sdeflow.discrete.variance_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nets.heads import has_variance_head
from ..utils import append_dims, check_choice, check_positive_int, sum_except_batch
from .chain import ForwardChain

__all__ = ["FIXED_VARIANCES", "VARIANCES", "fixed_variances", "AnalyticVariance", "estimate_analytic_variance",
           "LearnedVariance", "noise_and_variance", "reverse_variance", "check_variance"]

FIXED_VARIANCES = ("posterior", "step")
#: Every reverse variance by name: DDPM's β̃ ("posterior") and β ("step"), Analytic-DPM's ("analytic":
#: its :class:`AnalyticVariance` value stands in for the name wherever one is computed) and the model's
#: learned head ("learned", improved DDPM's; a network built with ``learned_variance=True``). The rules
#: for these names are :func:`check_variance`'s, and no one else's.
VARIANCES = ("posterior", "step", "analytic", "learned")


def _decoder_posterior_var(chain: ForwardChain) -> float:
    # β̃_2 stands in for the decoder's β̃_1 = 0 (DDPM); with one step there is only β_1.
    return float(chain.posterior_var[2] if chain.chain_steps >= 2 else chain.step_var[1])


def _log_variance_range(chain: ForwardChain) -> tuple[torch.Tensor, torch.Tensor]:
    """(log β̃_n with β̃_1 → β̃_2, log β_n), each (N + 1,): the ends of the learned interpolation."""
    low = chain.posterior_var.clone()
    low[0], low[1] = 1.0, _decoder_posterior_var(chain)
    high = chain.step_var.clone()
    high[0] = 1.0
    return low.log(), high.log()


def fixed_variances(chain: ForwardChain, choice: str) -> torch.Tensor:
    """σ_n² of ``choice`` ("posterior": β̃_n, "step": β_n; both β̃_2 at n = 1), float64 (N + 1,)
    indexed by n (entry 0 unused)."""
    check_choice("variance", choice, FIXED_VARIANCES)
    table = (chain.posterior_var if choice == "posterior" else chain.step_var).clone()
    table[1] = _decoder_posterior_var(chain)
    return table


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, held constant beyond the ends."""
    if xp.numel() == 1:
        return fp.expand_as(x).clone()
    index = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[index - 1], xp[index], fp[index - 1], fp[index]
    weight = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return f0 + weight * (f1 - f0)


@dataclass(frozen=True)
class AnalyticVariance:
    """Γ(t) = E‖ε̂(y_t, t)‖²/D of a model at increasing ``times`` (M,), with the standard error of
    each estimate, float64; see the module docstring. Build it with
    :func:`estimate_analytic_variance`; keep it with :meth:`to_state` / :meth:`from_state`."""

    times: torch.Tensor
    gamma: torch.Tensor
    gamma_se: torch.Tensor

    def variances(self, chain: ForwardChain) -> torch.Tensor:
        """σ_n*² on ``chain``, float64 (N + 1,) indexed by n (entry 0 unused)."""
        gamma = _interp(chain.times, self.times, self.gamma).clamp(0.0, 1.0)
        posterior_error = chain.var / chain.mean_weight ** 2 * (1 - gamma)
        table = chain.posterior_var + chain.posterior_data_coef ** 2 * posterior_error
        table[0] = 1.0
        return table

    def to_state(self) -> dict:
        """Plain lists {"times", "gamma", "gamma_se"}, for a checkpoint or a JSON file."""
        return {key: [float(v) for v in getattr(self, key)] for key in ("times", "gamma", "gamma_se")}

    @classmethod
    def from_state(cls, state: dict) -> "AnalyticVariance":
        """The inverse of :meth:`to_state`. ValueError for missing keys or mismatched lengths."""
        missing = [key for key in ("times", "gamma", "gamma_se") if key not in state]
        if missing:
            raise ValueError(f"state must hold times, gamma and gamma_se; missing {', '.join(missing)}")
        times, gamma, gamma_se = (torch.as_tensor(state[key], dtype=torch.float64).reshape(-1)
                                  for key in ("times", "gamma", "gamma_se"))
        if not times.numel() or times.shape != gamma.shape or gamma.shape != gamma_se.shape:
            raise ValueError("state's times, gamma and gamma_se must be non-empty and of one length")
        if not bool((times[1:] > times[:-1]).all()):
            raise ValueError("state's times must increase strictly")
        return cls(times=times, gamma=gamma, gamma_se=gamma_se)


@torch.no_grad()
def estimate_analytic_variance(model, x: torch.Tensor, chain: ForwardChain,
                               generator: torch.Generator | None = None,
                               batch_size: int | None = None) -> AnalyticVariance:
    r"""Γ_n = mean over the batch of ‖ε̂(y_n, t_n)‖²/D with :math:`y_n = m_n x + \sqrt{v_n}\,\varepsilon`,
    at every step n = 1..N of ``chain`` (N·B network evaluations, ``batch_size`` at a time), and its
    standard error sd/√B. ``x``: (B, ...) training data in the model's space, B ≥ 2; the model as it
    will be evaluated (``eval()`` mode, EMA weights)."""
    if x.shape[0] < 2:
        raise ValueError(f"x must hold at least 2 examples to estimate Γ and its error; got {x.shape[0]}")
    batch_size = x.shape[0] if batch_size is None else check_positive_int("batch_size", batch_size)
    gammas, errors = [], []
    dim = x[0].numel()
    for n in range(1, chain.chain_steps + 1):
        m, std = float(chain.mean_weight[n]), float(chain.var[n].sqrt())
        norms = []
        for chunk in x.split(batch_size):
            noise = torch.randn(chunk.shape, generator=generator, device=chunk.device, dtype=chunk.dtype)
            t = torch.full((chunk.shape[0],), float(chain.times[n]), device=chunk.device, dtype=chunk.dtype)
            eps_hat = model.predicted_noise(m * chunk + std * noise, t)
            norms.append(sum_except_batch(eps_hat.double() ** 2) / dim)
        norms = torch.cat(norms)
        gammas.append(norms.mean())
        errors.append(norms.std() / norms.numel() ** 0.5)
    return AnalyticVariance(times=chain.times[1:].clone(), gamma=torch.stack(gammas).cpu(),
                            gamma_se=torch.stack(errors).cpu())


class LearnedVariance(nn.Module):
    r"""Improved DDPM's learned variance: ``net(y, t)`` returns the interpolation v, shaped like y
    (per element) or broadcastable against it ((B, 1, ..., 1) for one value per example), and
    :math:`\log\sigma^2 = v\log\beta_n + (1 - v)\log\tilde\beta_n`. v = 0 is the posterior
    variance, v = 1 the step's; v is not clipped (improved DDPM's is not either). ``net`` may be a
    :class:`~sdeflow.nets.MeanAndVariance`, the variance head of a model's own network
    (:meth:`of`), whose v it reads."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @classmethod
    def of(cls, model) -> "LearnedVariance":
        """The variance head of ``model``'s network (one built with ``learned_variance=True``).
        ValueError for a model without one."""
        if not has_variance_head(model):
            raise ValueError("variance 'learned' needs a model whose network outputs a variance "
                             "(a net built with learned_variance=True)")
        return cls(model.net)

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net.variance(y, t) if has_variance_head(self.net) else self.net(y, t)

    def variance(self, chain: ForwardChain, n: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """σ² at the steps n (B,) and states y (B, ...) = y_n, float64, broadcastable against y."""
        return self.from_interpolation(chain, n, self(y, chain.times.to(device=y.device, dtype=y.dtype)[n]))

    @staticmethod
    def from_interpolation(chain: ForwardChain, n: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """σ² = exp(v log β_n + (1 − v) log β̃_n) at the steps n (B,) for the interpolation v, float64."""
        low, high = (append_dims(table.to(v.device)[n], v.ndim) for table in _log_variance_range(chain))
        v = v.double()
        return torch.exp(v * high + (1 - v) * low)


def noise_and_variance(model, variance, chain: ForwardChain, n: torch.Tensor, y: torch.Tensor,
                       t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂(y, t), σ_n²) for the states y = y_n (B, ...) at the steps n (B,) and times t = t_n (B,):
    one network evaluation when ``variance`` is the model's own head ("learned" or
    :meth:`LearnedVariance.of`), else the model's and the variance's own (see :func:`reverse_variance`)."""
    if variance == "learned":
        variance = LearnedVariance.of(model)
    if isinstance(variance, LearnedVariance) and variance.net is getattr(model, "net", None):
        out, v = model.net.both(y, t)
        return model.noise_from_output(out, y, t), LearnedVariance.from_interpolation(chain, n, v)
    return model.predicted_noise(y, t), reverse_variance(variance, chain, n, y)


def check_variance(variance, name: str = "variance", *, analytic_by_name: bool = False):
    """``variance`` if it is "posterior", "step", "learned" (the model's own variance head,
    :meth:`LearnedVariance.of`), an :class:`AnalyticVariance` or a :class:`LearnedVariance`; with
    ``analytic_by_name`` (settings that compute it later, e.g. ``sdeflow eval``) also "analytic".
    ValueError naming ``name`` otherwise: "analytic" by name where its value is needed says how to get it."""
    if isinstance(variance, (AnalyticVariance, LearnedVariance)):
        return variance
    if variance == "analytic" and not analytic_by_name:
        raise ValueError(f"{name} 'analytic' needs its value: pass the AnalyticVariance of "
                         "sdeflow.estimate_analytic_variance(model, training_examples, chain)")
    if not isinstance(variance, str) or variance not in VARIANCES:
        raise ValueError(f"{name} must be one of 'posterior', 'step', 'learned' (the model's variance head), "
                         f"{'analytic, ' if analytic_by_name else ''}an AnalyticVariance or a LearnedVariance; "
                         f"got {variance!r}")
    return variance


def reverse_variance(variance, chain: ForwardChain, n: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """σ_n² of ``variance`` (see :func:`check_variance`) at the steps n (B,) for the states y = y_n
    (B, ...): float64, (B, 1, ..., 1), or y's shape for a learned variance. "learned" names the
    model's head: :func:`noise_and_variance` resolves it."""
    check_variance(variance)
    if variance == "learned":
        raise ValueError("variance 'learned' is the model's own head: pass LearnedVariance.of(model), or use "
                         "noise_and_variance(model, ...)")
    if isinstance(variance, LearnedVariance):
        return variance.variance(chain, n, y)
    table = variance.variances(chain) if isinstance(variance, AnalyticVariance) else fixed_variances(chain, variance)
    return append_dims(table.to(y.device)[n], y.ndim)
