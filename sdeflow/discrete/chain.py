r"""The forward SDE on N steps: a Gaussian Markov chain, its posteriors, its prior term and DDPM's
discretized decoder.

The grid. Steps n = 1, …, N at times :math:`0 = t_0 < t_1 < \dots < t_N = T`, by default DDPM's
:math:`t_n = nT/N`; y_0 = x is the data. With :math:`m_n = m(t_n)`, :math:`v_n = v(t_n)` of the SDE
(``mean_weight``, ``var``; any linear SDE), the step from n − 1 to n is

.. math::  q(y_n \mid y_{n-1}) = N(a_n\,y_{n-1},\ \beta_n I),\qquad a_n = m_n/m_{n-1},\qquad
           \beta_n = v_n - a_n^2 v_{n-1},

so :math:`q(y_n\mid x) = N(m_n x, v_n I)` as in continuous time. For VP, :math:`\bar\alpha_n = m_n^2`,
:math:`a_n^2 = \alpha_n` and :math:`\beta_n = 1 - \bar\alpha_n/\bar\alpha_{n-1}` (DDPM's β); for VE, m = 1
and :math:`\beta_n = v_n - v_{n-1}`. The posterior of a step given the data is

.. math::  q(y_{n-1}\mid y_n, x) = N(\tilde\mu_n,\ \tilde\beta_n I),\quad
           \tilde\mu_n = \underbrace{\frac{m_{n-1}\beta_n}{v_n}}_{c^x_n}\,x
                        + \underbrace{\frac{a_n v_{n-1}}{v_n}}_{c^y_n}\,y_n,\quad
           \tilde\beta_n = \frac{v_{n-1}\beta_n}{v_n}.

Every coefficient is computed from the log-SNR steps :math:`\Delta_n = \lambda_n - \lambda_{n-1} < 0`
without cancellation: :math:`\beta_n = -v_n\,\mathrm{expm1}(\Delta_n)`,
:math:`\tilde\beta_n = -v_{n-1}\,\mathrm{expm1}(\Delta_n)`, :math:`c^x_n = -m_{n-1}\mathrm{expm1}(\Delta_n)`,
:math:`c^y_n = e^{\Delta_n}/a_n` (λ_0 = +∞, so β_1 = v_1, β̃_1 = 0, c^x_1 = 1, c^y_1 = 0).

The decoder (:class:`PixelBins`). Image data are 8-bit levels k mapped to the model's space by the
data transform φ (:mod:`sdeflow.data.transforms`: "logit", "centered", "identity"). Pixel level k
owns the model-space bin :math:`[\phi(k/256), \phi((k+1)/256)]` (the image of its dequantization
cell, the bins the model was trained on), with the lowest edge replaced by −∞ and the highest by +∞
so that the 256 masses sum to 1; the chain starts at the bin's centre :math:`\phi((k+\tfrac12)/256)`.
(DDPM's own [−1, 1] convention, centres 2k/255 − 1 with edges ±1/255, differs from "centered" by
less than a bin; we keep the transform's own bins so that the decoder and the continuous-time bits/dim
speak of the same cells.) Any starting point inside the image's cell gives a valid bound, since
q(y_{1:N}) is a variational distribution: :math:`\log P(k) \ge E_q[\log p(k\mid y_1) + \log
p(y_{1:N}) - \log q(y_{1:N}\mid x)]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.transforms import ALPHA, NUM_LEVELS, TRANSFORMS, _bin_geometry
from ..sdes.linear import SDE
from ..utils import check_choice, check_positive_int, log_interval_mass, sum_except_batch

__all__ = ["ForwardChain", "forward_chain", "step_chain", "prior_kl", "PixelBins", "gaussian_log_prob"]


@dataclass(frozen=True)
class ForwardChain:
    """The forward SDE at the times ``times`` = (t_0 = 0, t_1, …, t_N = T), float64 (N + 1,).

    ``mean_weight`` m_n, ``var`` v_n and ``log_snr`` λ_n (λ_0 = +∞) are the SDE's at those times;
    the step and posterior coefficients of the module docstring are properties, each (N + 1,) and
    indexed by the step n (entry 0 is the data and has no step)."""

    times: torch.Tensor
    mean_weight: torch.Tensor
    var: torch.Tensor
    log_snr: torch.Tensor

    @property
    def chain_steps(self) -> int:
        return self.times.numel() - 1

    @property
    def _log_snr_step(self) -> torch.Tensor:
        # Δ_n = λ_n − λ_{n−1}; λ_0 = +∞ gives Δ_1 = −∞, whose expm1 is −1 exactly.
        step = torch.empty_like(self.log_snr)
        step[0] = 0.0
        step[1:] = self.log_snr[1:] - self.log_snr[:-1]
        return step

    @property
    def step_mean_weight(self) -> torch.Tensor:
        """a_n = m_n/m_{n−1} (a_0 = 1)."""
        out = torch.ones_like(self.mean_weight)
        out[1:] = self.mean_weight[1:] / self.mean_weight[:-1]
        return out

    @property
    def step_var(self) -> torch.Tensor:
        """β_n = v_n − a_n² v_{n−1}, the variance of the step q(y_n | y_{n−1}) (β_0 = 0)."""
        return -self.var * torch.expm1(self._log_snr_step)

    @property
    def posterior_var(self) -> torch.Tensor:
        """β̃_n = v_{n−1} β_n / v_n, the variance of q(y_{n−1} | y_n, x) (β̃_0 = β̃_1 = 0)."""
        out = torch.zeros_like(self.var)
        out[1:] = -self.var[:-1] * torch.expm1(self._log_snr_step[1:])
        return out

    @property
    def posterior_data_coef(self) -> torch.Tensor:
        """c^x_n = m_{n−1} β_n / v_n, the weight of x in the posterior mean (c^x_0 = 0)."""
        out = torch.zeros_like(self.var)
        out[1:] = -self.mean_weight[:-1] * torch.expm1(self._log_snr_step[1:])
        return out



def forward_chain(sde: SDE, chain_steps: int | None = None, times=None) -> ForwardChain:
    r"""The N-step chain of ``sde``: either ``chain_steps`` = N at DDPM's :math:`t_n = nT/N`, or ``times``,
    an increasing sequence t_1 < … < t_N = T with t_1 > 0 (a sub-sequence of a longer grid, a grid
    uniform in log-SNR, ...). Exactly one of the two. ValueError naming the argument otherwise."""
    if not isinstance(sde, SDE):
        raise ValueError(f"sde must be an sdeflow SDE; got {type(sde).__name__}")
    if (chain_steps is None) == (times is None):
        raise ValueError("give exactly one of chain_steps (DDPM's grid t_n = n·T/N) and times (t_1 < ... < t_N = T)")
    if chain_steps is not None:
        chain_steps = check_positive_int("chain_steps", chain_steps)
        grid = torch.arange(1, chain_steps + 1, dtype=torch.float64) * (sde.T / chain_steps)
        grid[-1] = sde.T
    else:
        grid = torch.as_tensor(times, dtype=torch.float64).reshape(-1).cpu()
        if grid.numel() < 1 or not bool(torch.isfinite(grid).all()):
            raise ValueError("times must be a non-empty sequence of finite times t_1 < ... < t_N = T")
        if not (float(grid[0]) > 0 and bool((grid[1:] > grid[:-1]).all()) and math.isclose(float(grid[-1]), sde.T)):
            raise ValueError(f"times must increase strictly from t_1 > 0 to t_N = T = {sde.T}; "
                             f"got {grid[0].item():g} ... {grid[-1].item():g}")
        grid[-1] = sde.T
    chain = _chain(sde, grid)
    if not bool((chain.var[1:] > 0).all()):
        raise ValueError("times must have v(t_n) > 0 at every step; the first time is too small")
    return chain


def _chain(sde: SDE, grid: torch.Tensor) -> ForwardChain:
    """The chain at times (0, *grid), float64, with λ = +∞ wherever v = 0 (at t_0 = 0 always)."""
    times = torch.cat([torch.zeros(1, dtype=torch.float64), grid.double()])
    var = sde.var(times)
    log_snr = torch.where(var > 0, sde.log_snr(times), torch.full_like(times, math.inf))
    log_snr[0] = math.inf
    return ForwardChain(times=times, mean_weight=sde.mean_weight(times), var=var, log_snr=log_snr)


def step_chain(sde: SDE, t_next: float, t: float) -> ForwardChain:
    """The one step from t_next to t > t_next (t_next may be 0) as step n = 2 of a chain at the times
    (0, t_next, t): its β_2, β̃_2, c^x_2, c^y_2 are the step's own, for a reverse step on any grid."""
    return _chain(sde, torch.tensor([float(t_next), float(t)], dtype=torch.float64))


def prior_kl(sde: SDE, chain: ForwardChain, x: torch.Tensor) -> torch.Tensor:
    r"""KL(q(y_N | x) ‖ p_T) in closed form, per example, for q = N(m_N x, v_N I) and
    p_T = N(0, σ_p² I):
    :math:`\tfrac12\sum_i\big[(v_N + m_N^2 x_i^2)/\sigma_p^2 - 1 - \log(v_N/\sigma_p^2)\big]`.
    x: (B, ...) -> (B,) float64."""
    m, v, prior_var = float(chain.mean_weight[-1]), float(chain.var[-1]), float(sde.prior_var)
    ratio = v / prior_var
    dim = x[0].numel()
    return 0.5 * (m ** 2 * sum_except_batch(x.double() ** 2) / prior_var + dim * (ratio - 1 - math.log(ratio)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_i \log N(x_i; \mu_i, \sigma_i^2)` per example: the decoder of continuous data.
    x, mean: (B, ...); var broadcasts against them. -> (B,)."""
    return sum_except_batch(-0.5 * torch.log(2 * math.pi * var) - 0.5 * (x - mean) ** 2 / var)


class PixelBins:
    """The 256 model-space bins of 8-bit pixels under the data transform φ (see the module docstring).

    Args:
        transform: "logit", "centered" or "identity" (:mod:`sdeflow.data.transforms`).
        alpha: the logit margin.
    """

    def __init__(self, transform: str = "logit", alpha: float = ALPHA):
        check_choice("transform", transform, TRANSFORMS)
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5); got {alpha}")
        self.transform, self.alpha = transform, float(alpha)
        centres, lower, upper = _bin_geometry(transform, self.alpha, NUM_LEVELS)
        self.centres = centres
        #: edges (L + 1,): φ(k/L) for k = 0..L, the outer two replaced by ∓∞.
        self.edges = torch.cat([centres[:1] + lower[:1], centres + upper])
        self.edges[0], self.edges[-1] = -math.inf, math.inf

    def __repr__(self) -> str:
        return f"PixelBins(transform={self.transform!r}, alpha={self.alpha})"

    def centre(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 levels k (any shape) -> the bin centres φ((k + ½)/256), float64 of the same shape."""
        if not torch.is_tensor(images) or images.dtype != torch.uint8:
            raise ValueError("images must be a torch.uint8 tensor of 8-bit pixel levels 0..255")
        return self.centres.to(images.device)[images.long()]

    def level(self, x: torch.Tensor) -> torch.Tensor:
        """The level k whose bin holds each model-space value of x (a centre or a dequantized value):
        int64 of x's shape."""
        inner = self.edges[1:-1].to(device=x.device)
        return torch.bucketize(x.double().contiguous(), inner, right=True)

    def log_prob(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        r"""DDPM's discretized Gaussian decoder, per example:
        :math:`\sum_i \log\big[\Phi((u_{k_i} - \mu_i)/\sigma_i) - \Phi((l_{k_i} - \mu_i)/\sigma_i)\big]`
        with :math:`[l_k, u_k]` the bin of x_i's level k_i (outer edges ∓∞), in float64.
        x, mean: (B, ...) in model space; var broadcasts against them. -> (B,)."""
        level = self.level(x)
        # The outer edges ∓∞ stand at ∓10³⁰: the same masses, and no ∞·0 in the gradient through σ.
        edges = self.edges.to(x.device).clamp(-1e30, 1e30)
        std = var.double().sqrt()
        mean = mean.double()
        lower = (edges[level] - mean) / std
        upper = (edges[level + 1] - mean) / std
        return sum_except_batch(log_interval_mass(lower, upper))
