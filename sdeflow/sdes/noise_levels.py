r"""Variance-preserving SDEs for the noise schedules of other libraries.

Every SDE here is VP, :math:`dY = -\tfrac12\beta(t)Y\,dt + \sqrt{\beta(t)}\,dB`, given by its integrated
rate :math:`B(t) = \int_0^t\beta = -\log\bar\alpha(t)`, so that

.. math::  m = e^{-B/2},\quad v = 1 - e^{-B},\quad \lambda = \log\frac{\bar\alpha}{1-\bar\alpha}
           = -\log(e^{B} - 1),\quad f = -\tfrac12\beta,\quad g^2 = \beta = -\lambda'\,v,

and prior N(0, I). B increases strictly, so the log-SNR λ decreases strictly and has an inverse:
:math:`B = \operatorname{softplus}(-\lambda)`, then t from B.

* :class:`CosineVPSDE` (``"cosine"``): improved DDPM's schedule (Nichol & Dhariwal 2021; diffusers'
  ``squaredcos_cap_v2``) in closed form, :math:`\bar\alpha(t) = \cos^2\theta(t)/\cos^2\theta_0` with
  :math:`\theta(t) = \frac\pi2\,\frac{u + s}{1 + s}`, u = ``end``·t/T.
* :class:`DiscreteVPSDE` (``"discrete"``): a discrete schedule's table ᾱ_1..ᾱ_N (DDPM's linear
  β, Stable Diffusion's scaled-linear, the cosine's clipped table, or given), exact at the training
  steps and a monotone cubic in B between them (Fritsch–Butland), so β is continuous and the
  probability-flow ODE smooth enough for adaptive solvers (with B piecewise linear, β jumps at
  every step: on a 40-step table and a 3-D Gaussian oracle, dopri5 at rtol = atol = 10⁻⁵ took 716
  evaluations for an error of 10⁻² nats, against 92 evaluations and 5·10⁻⁵ nats with the cubic).

**The time map.** Discrete step n = 1..N (DDPM's numbering; diffusers' ``timesteps`` index n − 1,
which holds ᾱ_n in ``alphas_cumprod[n - 1]``) sits at :math:`t_n = nT/N`; t = 0 is the data
(ᾱ_0 = 1). A network that takes diffusers' index is called at the fractional index
:math:`Nt/T - 1` (:meth:`DiscreteVPSDE.timestep`). The first training step is at
:math:`t_1 = T/N` (:meth:`DiscreteVPSDE.first_step_time`): such a model never saw noise below it,
so its ELBO and ODE likelihood should start there and decode (see :mod:`sdeflow.adapters`).
"""

from __future__ import annotations

import math

import torch

from .linear import IntegratedRateVPSDE, register_sde
from ..utils import check_choice, check_positive_float, check_positive_int

__all__ = ["CosineVPSDE", "DiscreteVPSDE", "BETA_SCHEDULES", "discrete_alphas_cumprod"]

#: The β tables :class:`DiscreteVPSDE` rebuilds by name, as diffusers names them, plus "given".
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "given")
#: improved DDPM's cap on each step's β in the cosine table (the last steps would reach β = 1).
COSINE_MAX_BETA = 0.999
_NEWTON_STEPS = 40


class CosineVPSDE(IntegratedRateVPSDE):
    r"""Improved DDPM's cosine schedule in closed form: with u = ``end``·t/T and
    :math:`\theta(u) = \frac\pi2\frac{u + s}{1+s}`,

    .. math::  \bar\alpha = \frac{\cos^2\theta}{\cos^2\theta_0},\quad
               B = -2\log\frac{\cos\theta}{\cos\theta_0},\quad
               \beta = 2\tan\theta\cdot\frac{d\theta}{dt} = \tan\theta\;\frac{\pi\,\mathrm{end}}{(1+s)\,T}.

    ``end`` < 1 stops short of u = 1, where ᾱ = 0 and β = ∞ (improved DDPM caps β at 0.999 instead,
    which its discrete table :class:`DiscreteVPSDE` ``("squaredcos_cap_v2")`` keeps); the default
    0.999 ends at ᾱ(T) ≈ 2.4·10⁻⁶ (λ(T) ≈ −13).
    """

    def __init__(self, s: float = 0.008, end: float = 0.999, T: float = 1.0):
        super().__init__(T)
        self.s = check_positive_float("s", s)
        self.end = float(end)
        if not 0.0 < self.end < 1.0:
            raise ValueError(f"end must lie in (0, 1) (at 1 the cosine schedule reaches ᾱ = 0); got {end}")
        self._theta0 = 0.5 * math.pi * self.s / (1 + self.s)
        self._rate = 0.5 * math.pi * self.end / ((1 + self.s) * self.T)  # dθ/dt

    def beta(self, t):
        return 2 * self._rate * torch.tan(self._theta0 + self._rate * self._t(t))

    def beta_integral(self, t):
        # cos(θ₀ + δ)/cos θ₀ = 1 − 2 sin²(δ/2) − tan θ₀ sin δ, so B = −2 log1p(·) keeps its digits at small t.
        delta = self._rate * self._t(t)
        return -2 * torch.log1p(-2 * torch.sin(0.5 * delta) ** 2 - math.tan(self._theta0) * torch.sin(delta))

    def t_from_beta_integral(self, B):
        # cos²θ = ᾱ cos²θ₀ and sin²θ = (1 − ᾱ) + ᾱ sin²θ₀, with ᾱ = e^{−B}: θ by atan2, no cancellation.
        B = torch.as_tensor(B)
        alpha_bar = torch.exp(-B)
        sin2 = -torch.expm1(-B) + alpha_bar * math.sin(self._theta0) ** 2
        theta = torch.atan2(sin2.sqrt(), (alpha_bar * math.cos(self._theta0) ** 2).sqrt())
        return ((theta - self._theta0) / self._rate).clamp(0.0, self.T)


def _beta_table(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """β_1..β_N in float32, computed as diffusers' schedulers compute them (so a diffusers network is
    asked for exactly the noise levels it was trained on)."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    # squaredcos_cap_v2: β_n = min(1 − ᾱ(n/N)/ᾱ((n−1)/N), 0.999) with ᾱ(u) = cos²((u + 0.008)/1.008·π/2).
    n_total = num_train_timesteps
    alpha_bar = [math.cos((n / n_total + 0.008) / 1.008 * math.pi / 2) ** 2 for n in range(n_total + 1)]
    return torch.tensor([min(1 - alpha_bar[n + 1] / alpha_bar[n], COSINE_MAX_BETA) for n in range(num_train_timesteps)],
                        dtype=torch.float32)


def discrete_alphas_cumprod(beta_schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02,
                            num_train_timesteps: int = 1000) -> torch.Tensor:
    """ᾱ_n = Π_{i ≤ n}(1 − β_i), n = 1..N, of a named β table (float32, shape (N,)): diffusers'
    ``scheduler.alphas_cumprod`` for the same config."""
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES[:-1])
    num_train_timesteps = check_positive_int("num_train_timesteps", num_train_timesteps)
    betas = _beta_table(beta_schedule, float(beta_start), float(beta_end), num_train_timesteps)
    return torch.cumprod(1.0 - betas, dim=0)


class DiscreteVPSDE(IntegratedRateVPSDE):
    r"""The VP SDE through a discrete schedule's ᾱ_1..ᾱ_N, exact at :math:`t_n = nT/N`:
    :math:`B(t_n) = -\log\bar\alpha_n` (B(0) = 0), and between the steps the monotone piecewise cubic
    Hermite interpolant of these knots whose slopes are Fritsch & Butland's (:func:`_monotone_slopes`),
    so B increases strictly, β = B' > 0 is continuous and λ = −log(e^B − 1) decreases strictly.

    The table is rebuilt from ``(beta_schedule, beta_start, beta_end, num_train_timesteps)`` as diffusers builds it
    (:func:`discrete_alphas_cumprod`), so :func:`sdeflow.sdes.linear.sde_config` stores the SDE in a
    checkpoint; ``beta_schedule="given"`` takes ``alphas_cumprod`` (a tuple of N numbers, strictly
    decreasing in (0, 1)) instead, which works everywhere but in a checkpoint's config (sde_config
    stores plain numbers only).
    """

    def __init__(self, beta_schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02,
                 num_train_timesteps: int = 1000, alphas_cumprod: tuple | None = None, T: float = 1.0):
        super().__init__(T)
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        self.beta_schedule, self.beta_start, self.beta_end = beta_schedule, float(beta_start), float(beta_end)
        if beta_schedule == "given":
            if alphas_cumprod is None:
                raise ValueError('alphas_cumprod must be given with beta_schedule="given"')
            self.alphas_cumprod = tuple(float(a) for a in alphas_cumprod)
            self.num_train_timesteps = len(self.alphas_cumprod)
            table = torch.tensor(self.alphas_cumprod, dtype=torch.float64)
        else:
            if alphas_cumprod is not None:
                raise ValueError(f'alphas_cumprod is taken with beta_schedule="given" only; got beta_schedule='
                                 f'{beta_schedule!r}')
            self.alphas_cumprod = None
            self.num_train_timesteps = check_positive_int("num_train_timesteps", num_train_timesteps)
            table = discrete_alphas_cumprod(beta_schedule, beta_start, beta_end, self.num_train_timesteps).double()
        if not (bool(((table > 0) & (table < 1)).all()) and bool((table[1:] < table[:-1]).all())):
            raise ValueError("alphas_cumprod must decrease strictly and lie in (0, 1) (each β_n in (0, 1)); "
                             f"got a table from {float(table[0])} to {float(table[-1])}")
        self._knots = torch.cat([torch.zeros(1, dtype=torch.float64), -torch.log(table)])  # B(t_0..t_N)
        self._slopes = _monotone_slopes(self._knots)

    def first_step_time(self) -> float:
        """t_1 = T/N, the smallest noise level the network was trained on: where its bounds start."""
        return self.T / self.num_train_timesteps

    def step_time(self, step: torch.Tensor) -> torch.Tensor:
        """t_n = nT/N of DDPM's step n = 1..N (diffusers' index n − 1); any shape."""
        return torch.as_tensor(step, dtype=torch.float64) * (self.T / self.num_train_timesteps)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """diffusers' (fractional) timestep index Nt/T − 1 of time t, any shape."""
        return self._t(t) * (self.num_train_timesteps / self.T) - 1

    def _interval(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (index k of the interval [t_k, t_{k+1}] holding t, position s in it in [0, 1]).
        pos = (self._t(t).double() * (self.num_train_timesteps / self.T)).clamp(0.0, float(self.num_train_timesteps))
        k = pos.floor().clamp(max=self.num_train_timesteps - 1)
        return k.long(), pos - k

    def _hermite(self, k: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, dB/ds) of the cubic Hermite piece on interval k at s ∈ [0, 1], in units of one step."""
        knots, slopes = self._knots.to(s.device), self._slopes.to(s.device)
        b0, b1, d0, d1 = knots[k], knots[k + 1], slopes[k], slopes[k + 1]
        s2, s3 = s * s, s * s * s
        value = (2 * s3 - 3 * s2 + 1) * b0 + (s3 - 2 * s2 + s) * d0 + (3 * s2 - 2 * s3) * b1 + (s3 - s2) * d1
        rate = (6 * s2 - 6 * s) * (b0 - b1) + (3 * s2 - 4 * s + 1) * d0 + (3 * s2 - 2 * s) * d1
        return value, rate

    def beta(self, t):
        t = self._t(t)
        k, s = self._interval(t)
        return (self._hermite(k, s)[1] * (self.num_train_timesteps / self.T)).to(t.dtype)

    def beta_integral(self, t):
        t = self._t(t)
        k, s = self._interval(t)
        return self._hermite(k, s)[0].to(t.dtype)

    def t_from_beta_integral(self, B):
        """Newton's method on the monotone cubic of B's interval, kept inside a shrinking bracket
        (a step that leaves it bisects instead): converges to float64's rounding in a few steps."""
        B = torch.as_tensor(B)
        knots = self._knots.to(B.device)
        target = B.double().reshape(-1).clamp(0.0, float(knots[-1]))
        k = (torch.searchsorted(knots, target, right=True) - 1).clamp(0, self.num_train_timesteps - 1)
        low, high = torch.zeros_like(target), torch.ones_like(target)
        s = ((target - knots[k]) / (knots[k + 1] - knots[k])).clamp(0.0, 1.0)
        for _ in range(_NEWTON_STEPS):
            value, rate = self._hermite(k, s)
            above = value > target
            high, low = torch.where(above, s, high), torch.where(above, low, s)
            step = s - (value - target) / rate
            s = torch.where((step > low) & (step < high), step, 0.5 * (low + high))
        return ((k + s) * (self.T / self.num_train_timesteps)).reshape(B.shape).to(B.dtype)


def _monotone_slopes(knots: torch.Tensor) -> torch.Tensor:
    """dB/ds at the knots (s in steps) of Fritsch & Butland's monotone piecewise-cubic interpolant:
    the harmonic mean of the neighbouring secants inside, the one-sided secant at the ends. Every
    secant is positive, so every slope is, and B increases strictly with a continuous β."""
    secants = knots[1:] - knots[:-1]
    inner = 2 / (1 / secants[:-1] + 1 / secants[1:])
    return torch.cat([secants[:1], inner, secants[-1:]])


register_sde("cosine", CosineVPSDE)
register_sde("discrete", DiscreteVPSDE)
