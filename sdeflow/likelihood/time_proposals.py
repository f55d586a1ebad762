r"""Time proposals: densities q(t) on [t_min, T] to draw the time of a Monte-Carlo estimate from.

Any estimate of :math:`\int_{t_{min}}^T h(t)\,dt` is written :math:`h(t)/q(t)` with :math:`t \sim q`; it is
unbiased for every q that is positive where h is not, and its variance
:math:`\int h^2/q - (\int h)^2` is smallest for :math:`q \propto \sqrt{E[h(t)^2]}`.

- :class:`UniformTime`: q = 1/(T − t_min) (sdeflow-light's ``elbo_random_t_slice`` for t_min = 0).
- :class:`ImportanceTime`: q ∝ g(t)²/v(t), flat below t_ε. Because g²/v = −dλ/dt for every
  linear SDE (λ the log-SNR), this density is uniform in log-SNR above t_ε and its CDF and
  inverse CDF are closed forms of each SDE's own parameters.
- :class:`FittedTime`: a piecewise-constant density on bins equally spaced in log-SNR, a value
  (``to_dict``/``from_dict`` keep it in a checkpoint or a JSON file). :func:`~sdeflow.likelihood.plans.fit_proposal` fits one to
  the square root of the measured second moment of an integrand, mixed with a share of
  :class:`ImportanceTime` so that weights stay bounded: it approaches the variance-optimal proposal.
  Each bin may also carry the coefficient of a control variate (a term of known mean zero added
  to the integrand), fitted with the density; :func:`optimal_strata` places the strata of a
  stratified draw where they cut the variance most.

Every proposal has ``sample(n, ...) -> (t, q(t))``, ``density(t)`` and its support's start ``t_min``;
:func:`make_proposal` builds one by name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..sdes.linear import SDE
from ..utils import check_choice, check_positive_int, check_t_min

__all__ = ["TimeProposal", "UniformTime", "ImportanceTime", "FittedTime", "T_EPS_FRACTION", "T_MIN_FRACTION",
           "TIME_SAMPLINGS", "clamped_rate", "truncation_time", "make_proposal", "optimal_strata"]

#: The names of time proposals: the two closed-form densities, and "fitted" (:func:`~sdeflow.likelihood.plans.fit_proposal`).
TIME_SAMPLINGS = ("uniform", "importance", "fitted")


def _uniform(n: int, generator, device, dtype, bounds: torch.Tensor | None = None) -> torch.Tensor:
    """n uniforms on [0, 1]; with stratum ``bounds`` 0 = b₀ < … < b_K = 1 (K dividing n), block k of
    the n/K consecutive draws is uniform in [b_k, b_{k+1}) (stratified sampling)."""
    u = torch.rand(n, generator=generator, device=device, dtype=dtype)
    if bounds is None or len(bounds) == 2:
        return u
    bounds = bounds.to(device=device, dtype=dtype)
    block = torch.arange(n, device=device).div(n // (len(bounds) - 1), rounding_mode="floor")
    return bounds[block] + u * (bounds[block + 1] - bounds[block])


class TimeProposal(ABC):
    """A probability density q(t) on [t_min, T] with an exact sampler."""

    def __init__(self, T: float, t_min: float = 0.0):
        self.T = float(T)
        self.t_min = check_t_min(t_min, self.T)

    @abstractmethod
    def density(self, t: torch.Tensor) -> torch.Tensor:
        """q(t), same shape as t."""

    @abstractmethod
    def _inverse_cdf(self, u: torch.Tensor) -> torch.Tensor:
        """Q⁻¹(u) for u in [0, 1]."""

    def strata_bounds(self, strata: int) -> torch.Tensor:
        """The quantile bounds 0 = b₀ < … < b_K = 1 of K strata: equal, b_k = k/K, here."""
        return torch.linspace(0.0, 1.0, check_positive_int("strata", strata) + 1, dtype=torch.float64)

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               device=None, dtype=None, strata: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n times t ~ q by the exact inverse CDF t = Q⁻¹(u); returns (t, q̃(t)), each (n,).

        With ``strata`` = K (dividing n), the n draws form K consecutive blocks and block k takes u
        uniform in [b_k, b_{k+1}) (:meth:`strata_bounds`): its t has density q/w_k, w_k = b_{k+1} − b_k,
        on its own quantile range, and q̃ = q/(K w_k), so that the average over the K blocks of h(t)/q̃(t)
        is Σ_k w_k h(t_k)/q(t_k), an unbiased estimate of ∫h with less variance than K independent
        draws (stratified sampling). Without strata, q̃ = q.
        """
        dtype = dtype or torch.get_default_dtype()
        strata = check_positive_int("strata", strata)
        if n % strata:
            raise ValueError(f"strata must divide n={n}; got {strata!r}")
        bounds = self.strata_bounds(strata)
        u = _uniform(n, generator, device, dtype, bounds)
        t = self._inverse_cdf(u).clamp(self.t_min, self.T)
        q = self.density(t)
        if strata > 1:
            widths = (bounds[1:] - bounds[:-1]).to(device=q.device, dtype=q.dtype)
            q = q / (strata * widths).repeat_interleave(n // strata)
        return t, q


class UniformTime(TimeProposal):
    """q(t) = 1/(T − t_min) on [t_min, T]."""

    def density(self, t):
        return torch.full_like(t, 1.0 / (self.T - self.t_min))

    def _inverse_cdf(self, u):
        return self.t_min + u * (self.T - self.t_min)

    def sample(self, n, *, generator=None, device=None, dtype=None, strata=1):
        t, q = super().sample(n, generator=generator, device=device, dtype=dtype, strata=strata)
        # t = 0 has probability zero, but rand can return it; keep the noise level positive.
        return t.clamp_min(torch.finfo(t.dtype).tiny), q


#: ImportanceTime's default t_ε, as a fraction of T (sdeflow-light's).
T_EPS_FRACTION = 1e-3
#: The likelihood estimators' default start time t_min, as a fraction of T (the ε = 10⁻⁵ of Song et
#: al. 2021 for VP likelihoods): below it a network's ε prediction is untrained and need not vanish.
T_MIN_FRACTION = 1e-5


def truncation_time(T: float, t_min: float) -> float:
    """t_ε of a loss or importance proposal on [t_min, T]: t_min itself when it is > 0, else 10⁻³T
    (sdeflow-light's), below which the likelihood weighting g²/v is held constant."""
    return t_min if t_min > 0 else T_EPS_FRACTION * T


def clamped_rate(sde: SDE, t: torch.Tensor, t_eps: float | None = None) -> torch.Tensor:
    """h(max(t, t_ε)) = g²/v at max(t, t_ε), with t_ε = 10⁻³·T by default: the unnormalised density
    of :class:`ImportanceTime` and, times T, the likelihood weighting of the DSM loss. (B,) -> (B,)."""
    t = t.clamp_min(T_EPS_FRACTION * sde.T if t_eps is None else t_eps)
    return sde.g2(t) / sde.var(t)


class ImportanceTime(TimeProposal):
    r"""q(t) ∝ h(max(t, t_ε)) on [t_min, T], with h = g²/v = −λ'(t).

    Mass below t_ε is (t_ε − t_min)·h(t_ε); above it, λ(t_ε) − λ(t). Normaliser
    :math:`Z = (t_\epsilon - t_{min}) h(t_\epsilon) + \lambda(t_\epsilon) - \lambda(T)`.
    The default t_ε = max(10⁻³·T, t_min) follows sdeflow-light; t_ε = t_min > 0 gives q ∝ g²/v on the
    whole support, uniform in log-SNR.
    """

    def __init__(self, sde: SDE, t_eps: float | None = None, t_min: float = 0.0):
        super().__init__(sde.T, t_min)
        self.sde = sde
        self.t_eps = max(T_EPS_FRACTION * sde.T, self.t_min) if t_eps is None else float(t_eps)
        if not self.t_min <= self.t_eps < sde.T or self.t_eps <= 0:
            raise ValueError(f"t_eps must lie in [t_min={self.t_min}, T={sde.T}) and be > 0; got {t_eps!r}")
        te = torch.tensor(self.t_eps, dtype=torch.float64)
        T = torch.tensor(sde.T, dtype=torch.float64)
        self._h_eps = float(sde.g2(te) / sde.var(te))
        self._lambda_eps = float(sde.log_snr(te))
        self._flat_mass = (self.t_eps - self.t_min) * self._h_eps
        self.normalizer = self._flat_mass + self._lambda_eps - float(sde.log_snr(T))

    def unnormalized(self, t: torch.Tensor) -> torch.Tensor:
        """h(max(t, t_ε)) = g²/v at max(t, t_ε)."""
        return clamped_rate(self.sde, t, self.t_eps)

    def density(self, t):
        return self.unnormalized(t) / self.normalizer

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """Q(t): linear below t_ε, ((t_ε − t_min) h(t_ε) + λ(t_ε) − λ(t)) / Z above."""
        below = (t - self.t_min) * self._h_eps
        above = self._flat_mass + self._lambda_eps - self.sde.log_snr(t.clamp_min(self.t_eps))
        return torch.where(t < self.t_eps, below, above) / self.normalizer

    def _inverse_cdf(self, u):
        mass = u * self.normalizer
        below = self.t_min + mass / self._h_eps
        log_snr = self._lambda_eps - (mass - self._flat_mass).clamp_min(0.0)
        above = self.sde.t_from_log_snr(log_snr)
        return torch.where(mass < self._flat_mass, below, above)


class FittedTime(TimeProposal):
    """Piecewise-constant density on bin edges t_min = e₀ < e₁ < … < e_K = T: q(t) = p_k / (e_{k+1} − e_k).

    A time density and nothing else, built by :func:`~sdeflow.likelihood.plans.fit_proposal` (inside an :class:`~sdeflow.likelihood.plans.EstimatorPlan`)
    and kept with :meth:`to_dict` / :meth:`from_dict`. ``moments`` (2, bins), when given, are the mean
    and second moment of the integrand in each bin; :meth:`strata_bounds` then places the strata where
    they cut the variance most (:func:`optimal_strata`).
    """

    def __init__(self, edges: torch.Tensor, probs: torch.Tensor, moments: torch.Tensor | None = None):
        edges = torch.as_tensor(edges, dtype=torch.float64)
        probs = torch.as_tensor(probs, dtype=torch.float64)
        if edges.ndim != 1 or probs.shape != (edges.numel() - 1,):
            raise ValueError("edges must be 1-D with one more entry than probs")
        if not (edges[1:] > edges[:-1]).all() or edges[0] < 0:
            raise ValueError("edges must start at t_min >= 0 and increase strictly")
        if (probs <= 0).any() or not torch.isfinite(probs).all():
            raise ValueError("probs must be positive and finite (the estimate would be biased otherwise)")
        if moments is not None:
            moments = torch.as_tensor(moments, dtype=torch.float64)
            if moments.shape != (2,) + probs.shape or not torch.isfinite(moments).all():
                raise ValueError("moments must be finite, of shape (2, bins): each bin's mean and second moment")
        super().__init__(float(edges[-1]), float(edges[0]))
        self.edges, self.moments = edges, moments
        self.probs = probs / probs.sum()
        self._bounds: dict[int, torch.Tensor] = {}
        self._cum = torch.cat([torch.zeros(1, dtype=torch.float64), self.probs.cumsum(0)])
        self._cum[-1] = 1.0

    @staticmethod
    def log_snr_edges(sde: SDE, n_bins: int, t_min: float = 0.0, t_lo: float | None = None) -> torch.Tensor:
        """Bin edges equally spaced in log-SNR from λ(t_min) to λ(T) when t_min > 0. With t_min = 0
        (where λ = ∞) the first bin is [0, t_lo] and the other n_bins − 1 are equally spaced from
        λ(t_lo) to λ(T); the default t_lo = 10⁻⁵·T puts the finest bins where the integrand of image
        data peaks (noise levels of the order of the dequantisation noise).
        """
        if check_positive_int("n_bins", n_bins) < 2:
            raise ValueError(f"n_bins must be an integer >= 2; got {n_bins!r}")
        if t_min > 0:
            lo = sde.log_snr(torch.tensor(t_min, dtype=torch.float64))
            hi = sde.log_snr(torch.tensor(sde.T, dtype=torch.float64))
            edges = sde.t_from_log_snr(torch.linspace(float(lo), float(hi), n_bins + 1, dtype=torch.float64))
            edges[0], edges[-1] = t_min, sde.T
            return edges
        t_lo = T_MIN_FRACTION * sde.T if t_lo is None else t_lo
        return torch.cat([torch.zeros(1, dtype=torch.float64), FittedTime.log_snr_edges(sde, n_bins - 1, t_lo)])

    def strata_bounds(self, strata: int) -> torch.Tensor:
        """Quantile bounds of K strata: those of :func:`optimal_strata` from the recorded ``moments``;
        equal quantiles when there are no moments or fewer bins than strata."""
        strata = check_positive_int("strata", strata)
        if self.moments is None or strata == 1 or strata > len(self.probs):
            return super().strata_bounds(strata)
        if strata not in self._bounds:
            self._bounds[strata] = optimal_strata(self.edges, self.probs, self.moments, strata)
        return self._bounds[strata]

    def bin_of(self, t: torch.Tensor) -> torch.Tensor:
        """The bin index of each time; long, shape of t."""
        edges = self.edges.to(t.device, t.dtype)
        return (torch.bucketize(t, edges, right=True) - 1).clamp(0, len(self.probs) - 1)

    def density(self, t):
        k = self.bin_of(t)
        dens = (self.probs / (self.edges[1:] - self.edges[:-1])).to(t.device, t.dtype)
        return dens[k]

    def _inverse_cdf(self, u):
        cum = self._cum.to(u.device)
        u64 = u.double()
        k = (torch.bucketize(u64, cum, right=True) - 1).clamp(0, len(self.probs) - 1)
        frac = ((u64 - cum[k]) / (cum[k + 1] - cum[k])).clamp(0, 1)
        edges = self.edges.to(u.device)
        return (edges[k] + frac * (edges[k + 1] - edges[k])).to(u.dtype)

    def sample(self, n, *, generator=None, device=None, dtype=None, strata=1):
        t, q = super().sample(n, generator=generator, device=device, dtype=dtype, strata=strata)
        return t.clamp_min(torch.finfo(t.dtype).tiny), q

    def to_dict(self) -> dict:
        """Plain lists of floats (JSON-able, and loadable by ``torch.load(weights_only=True)``);
        :meth:`from_dict` rebuilds an equal proposal."""
        return {"edges": self.edges.tolist(), "probs": self.probs.tolist(),
                "moments": None if self.moments is None else self.moments.tolist()}

    @classmethod
    def from_dict(cls, state: dict) -> "FittedTime":
        """The proposal of :meth:`to_dict` (tensors are accepted too). ValueError if ``state`` is not one."""
        if not isinstance(state, dict) or "edges" not in state or "probs" not in state:
            raise ValueError("state must be a dict of FittedTime.to_dict() with at least 'edges' and 'probs'")
        return cls(state["edges"], state["probs"], state.get("moments"))


def make_proposal(sde: SDE, time_sampling, t_min: float = 0.0) -> TimeProposal:
    """The time proposal on [t_min, T] named ``time_sampling``: "uniform", or "importance" (q ∝ g²/v at
    max(t, t_ε), t_ε of :func:`truncation_time`); a :class:`TimeProposal` is returned as it is, if its
    support starts at t_min. A "fitted" proposal is a value that :func:`~sdeflow.likelihood.plans.fit_proposal` (for the ELBO,
    :func:`sdeflow.likelihood.elbo.fit_time_proposal`) returns: pass that instead of the name."""
    if isinstance(time_sampling, TimeProposal):
        if time_sampling.t_min != t_min:
            raise ValueError(f"t_min ({t_min}) must be the start of the time proposal's support "
                             f"({time_sampling.t_min})")
        return time_sampling
    check_choice("time_sampling", time_sampling, ("uniform", "importance"))
    if time_sampling == "uniform":
        return UniformTime(sde.T, t_min)
    return ImportanceTime(sde, t_eps=truncation_time(sde.T, t_min), t_min=t_min)


def optimal_strata(edges: torch.Tensor, probs: torch.Tensor, moments: torch.Tensor, strata: int) -> torch.Tensor:
    r"""Quantile bounds (K + 1,) of K strata, at bin edges, that minimise the variance Σ_g V_g of one draw
    per stratum of a piecewise-constant proposal (bin ``edges``, bin masses ``probs`` summing to 1, the
    integrand's per-bin mean and second moment ``moments`` (2, bins)), by dynamic programming over
    contiguous groups of bins: for group g of mass w_g,
    :math:`V_g = w_g \sum_{k\in g} M_k \Delta_k^2/p_k - (\sum_{k\in g} m_k\Delta_k)^2`
    (Δ_k the bin's width, p_k its mass, m_k and M_k the mean and second moment). A group where the
    integrand is small but noisy (near t_min for an ε network) then gets a draw of its own instead of
    sharing one with the bulk of the integral."""
    width, zero = edges[1:] - edges[:-1], torch.zeros(1, dtype=torch.float64)
    cum = torch.cat([zero, probs.cumsum(0)])
    cum[-1] = 1.0
    second = torch.cat([zero, (moments[1] * width ** 2 / probs).cumsum(0)])
    mean = torch.cat([zero, (moments[0] * width).cumsum(0)])
    n = len(probs)
    i, j = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    # cost[i, j]: the variance of one draw in bins i..j-1 (inf unless i < j)
    cost = (cum[j] - cum[i]) * (second[j] - second[i]) - (mean[j] - mean[i]) ** 2
    cost = torch.where(i < j, cost.clamp_min(0.0), torch.full_like(cost, math.inf))
    best, choice = cost[0].clone(), [None]  # best[j]: least cost of bins 0..j-1 in k groups
    for _ in range(1, strata):
        best, arg = (best[:, None] + cost).min(dim=0)
        choice.append(arg)
    cuts, j = [n], n
    for k in range(strata - 1, 0, -1):
        j = int(choice[k][j])
        cuts.append(j)
    return cum[torch.tensor(sorted([0] + cuts))]  # a copy: cum[0] = 0 and cum[-1] = 1 exactly
