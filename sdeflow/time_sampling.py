r"""Time proposals: densities q(t) on [t_min, T] to draw the time of a Monte-Carlo estimate from.

Any estimate of :math:`\int_{t_{min}}^T h(t)\,dt` is written :math:`h(t)/q(t)` with :math:`t \sim q`; it is
unbiased for every q that is positive where h is not, and its variance
:math:`\int h^2/q - (\int h)^2` is smallest for :math:`q \propto \sqrt{E[h(t)^2]}`.

- :class:`UniformTime`: q = 1/(T − t_min) (sdeflow-light's ``elbo_random_t_slice`` for t_min = 0).
- :class:`ImportanceTime`: q ∝ g(t)²/v(t), flat below t_ε. Because g²/v = −dλ/dt for every
  linear SDE (λ the log-SNR), this density is uniform in log-SNR above t_ε and its CDF and
  inverse CDF are closed forms of each SDE's own parameters.
- :class:`FittedTime`: a piecewise-constant density on bins equally spaced in log-SNR, fitted to
  the square root of the measured second moment of the integrand, mixed with a share of
  :class:`ImportanceTime` so that weights stay bounded. It approaches the variance-optimal proposal.
  Each bin may also carry the coefficient of a control variate (a term of known mean zero added
  to the integrand), fitted with the density.

Every proposal has ``sample(n, ...) -> (t, q(t))``, ``density(t)`` and its support's start ``t_min``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch

from .sdes import SDE
from .utils import check_positive_int

__all__ = ["TimeProposal", "UniformTime", "ImportanceTime", "FittedTime", "T_EPS_FRACTION", "T_MIN_FRACTION",
           "clamped_rate"]


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
        self.T, self.t_min = float(T), float(t_min)
        if not 0.0 <= self.t_min < self.T:
            raise ValueError(f"t_min must lie in [0, T={self.T}); got {t_min!r}")

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

    ``control`` (one float per bin, default 0) is the coefficient c_k of a control variate w of
    known mean zero that the integrand's user adds in bin k, estimating h + c_k·w instead of h
    (see :meth:`fit` and :meth:`sdeflow.model.PluginReverseSDE.elbo`): unbiased for every c_k.
    ``moments`` (2, bins), when given (:meth:`fit` records them), are the mean and second moment of
    that integrand in each bin; :meth:`strata_bounds` then places the strata where they cut the
    variance most. ``hutchinson`` (one flag per bin) marks the bins where the user estimates a third
    form of the integrand instead (for the ELBO: the Hutchinson form, chosen where it is quieter).
    """

    def __init__(self, edges: torch.Tensor, probs: torch.Tensor, control: torch.Tensor | None = None,
                 moments: torch.Tensor | None = None, hutchinson: torch.Tensor | None = None):
        edges = torch.as_tensor(edges, dtype=torch.float64)
        probs = torch.as_tensor(probs, dtype=torch.float64)
        if edges.ndim != 1 or probs.shape != (edges.numel() - 1,):
            raise ValueError("edges must be 1-D with one more entry than probs")
        if not (edges[1:] > edges[:-1]).all() or edges[0] < 0:
            raise ValueError("edges must start at t_min >= 0 and increase strictly")
        if (probs <= 0).any() or not torch.isfinite(probs).all():
            raise ValueError("probs must be positive and finite (the estimate would be biased otherwise)")
        control = torch.zeros_like(probs) if control is None else torch.as_tensor(control, dtype=torch.float64)
        if control.shape != probs.shape or not torch.isfinite(control).all():
            raise ValueError("control must be one finite coefficient per bin")
        hutchinson = torch.zeros(probs.shape, dtype=torch.bool) if hutchinson is None else torch.as_tensor(hutchinson, dtype=torch.bool)
        if hutchinson.shape != probs.shape:
            raise ValueError("hutchinson must be one flag per bin")
        if moments is not None:
            moments = torch.as_tensor(moments, dtype=torch.float64)
            if moments.shape != (2,) + probs.shape or not torch.isfinite(moments).all():
                raise ValueError("moments must be finite, of shape (2, bins): each bin's mean and second moment")
        super().__init__(float(edges[-1]), float(edges[0]))
        self.edges = edges
        self.probs = probs / probs.sum()
        self.control = control
        self.hutchinson = hutchinson
        self.moments = moments
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

    @classmethod
    def fit(cls, integrand: Callable[[torch.Tensor], torch.Tensor], sde: SDE, *, n_bins: int = 48,
            n_per_bin: int = 1, defensive: float = 0.02, t_min: float = 0.0,
            generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> "FittedTime":
        r"""Fit q ∝ √E[h(t)²] per bin on [t_min, T], mixed with ``defensive`` of :class:`ImportanceTime`.

        ``integrand(t)`` takes times of shape (n,) and returns one draw of h at each, shape (n, ...)
        (e.g. one per pilot example); it is called once with ``n_per_bin`` times per bin, each
        uniform within its bin, so the bin's second moment is estimated over the whole bin. It may
        instead return a pair (h, w) with w a control variate of mean zero at every t: each bin
        then takes the coefficient :math:`c_k = -\widehat{Cov}(h, w)/\widehat{Var}(w)` that minimises
        the variance of h + c_k·w, records it in ``control``, and is sized by the second moment of
        h + c_k·w. A triple (h, w, h′), h′ another form of the same mean at every t, flags in
        ``hutchinson`` the bins where h′ has the lower second moment, and sizes them by it.

        The defensive share bounds every weight 1/q(t) by 1/(defensive·q_importance(t)), so a bin
        the pilot under-rates cannot blow up the variance; every share it takes is spent where the
        integrand is small (on the 3072-D oracle of ``benchmarks/estimators.py``: ~100× less
        variance than uniform t at 2 %, ~30× at 10 %).
        """
        if not 0 < defensive <= 1:
            raise ValueError(f"defensive must lie in (0, 1]; got {defensive}")
        n_bins, n_per_bin = check_positive_int("n_bins", n_bins), check_positive_int("n_per_bin", n_per_bin)
        edges = cls.log_snr_edges(sde, n_bins, t_min)
        lower, width = edges[:-1], edges[1:] - edges[:-1]
        u = torch.rand(n_bins * n_per_bin, generator=generator, dtype=torch.float64, device=device)
        index = torch.arange(n_bins).repeat_interleave(n_per_bin)
        t = (lower[index] + width[index] * u.cpu()).to(dtype=dtype, device=device)
        forms = integrand(t)
        forms = forms if isinstance(forms, tuple) else (forms,)
        h, w, other = (tuple(forms) + (None, None))[:3]
        h = h.detach().double().cpu().reshape(n_bins, -1)
        control = torch.zeros(n_bins, dtype=torch.float64)
        if w is not None:
            w = w.detach().double().cpu().reshape(n_bins, -1)
            hc, wc = h - h.mean(1, keepdim=True), w - w.mean(1, keepdim=True)
            var_w = (wc ** 2).sum(1)
            control = torch.where(var_w > 0, -(hc * wc).sum(1) / var_w.clamp_min(1e-300), control)
            h = h + control[:, None] * w
        hutchinson = torch.zeros(n_bins, dtype=torch.bool)
        if other is not None:  # a third form, of the same mean: taken in the bins where it is quieter
            other = other.detach().double().cpu().reshape(n_bins, -1)
            hutchinson = (other ** 2).mean(1) < (h ** 2).mean(1)
            h = torch.where(hutchinson[:, None], other, h)
        second_moment = (h ** 2).mean(1)
        if not torch.isfinite(second_moment).all():
            raise ValueError("the integrand gave non-finite values on the pilot draws")
        moments = torch.stack([h.mean(1), second_moment])
        mass = width * second_moment.sqrt()
        fitted = mass / mass.sum() if mass.sum() > 0 else torch.full_like(mass, 1 / n_bins)
        importance = ImportanceTime(sde, t_min=t_min).cdf(edges)
        probs = (1 - defensive) * fitted + defensive * (importance[1:] - importance[:-1])
        return cls(edges, probs.clamp_min(1e-12), control=control, moments=moments, hutchinson=hutchinson)

    def strata_bounds(self, strata: int) -> torch.Tensor:
        r"""Quantile bounds of K strata at bin edges that minimise the variance Σ_g V_g of one draw per
        stratum, by dynamic programming over contiguous groups of bins, from the recorded ``moments``:
        for group g of mass w_g, :math:`V_g = w_g \sum_{k\in g} M_k \Delta_k^2/p_k - (\sum_{k\in g} m_k\Delta_k)^2`
        (Δ_k the bin's width, p_k its mass, m_k and M_k the integrand's mean and second moment).
        A group where the integrand is small but noisy (near t_min for an ε network) then gets a
        draw of its own instead of sharing one with the bulk of the integral. Equal quantiles when
        there are no moments or fewer bins than strata."""
        strata = check_positive_int("strata", strata)
        if self.moments is None or strata == 1 or strata > len(self.probs):
            return super().strata_bounds(strata)
        if strata not in self._bounds:
            self._bounds[strata] = self._optimal_bounds(strata)
        return self._bounds[strata]

    def _optimal_bounds(self, strata: int) -> torch.Tensor:
        width = self.edges[1:] - self.edges[:-1]
        mass = self._cum
        second = torch.cat([torch.zeros(1, dtype=torch.float64), (self.moments[1] * width ** 2 / self.probs).cumsum(0)])
        mean = torch.cat([torch.zeros(1, dtype=torch.float64), (self.moments[0] * width).cumsum(0)])
        n = len(self.probs)
        i, j = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
        # cost[i, j]: the variance of one draw in bins i..j-1 (inf unless i < j)
        cost = (mass[j] - mass[i]) * (second[j] - second[i]) - (mean[j] - mean[i]) ** 2
        cost = torch.where(i < j, cost.clamp_min(0.0), torch.full_like(cost, math.inf))
        best, choice = cost[0].clone(), [None]  # best[j]: least cost of bins 0..j-1 in k groups
        for _ in range(1, strata):
            total = best[:, None] + cost
            best, arg = total.min(dim=0)
            choice.append(arg)
        cuts, j = [n], n
        for k in range(strata - 1, 0, -1):
            j = int(choice[k][j])
            cuts.append(j)
        return mass[torch.tensor(sorted([0] + cuts))]  # a copy: _cum[0] = 0 and _cum[-1] = 1 exactly

    def hutchinson_at(self, t: torch.Tensor) -> torch.Tensor:
        """Whether each time's bin takes the third form (see :meth:`fit`); bool, shape of t."""
        return self.hutchinson.to(t.device)[self._bin(t)]

    def control_at(self, t: torch.Tensor) -> torch.Tensor:
        """The control-variate coefficient of each time's bin; shape of t, dtype float64."""
        return self.control.to(t.device)[self._bin(t)]

    def _bin(self, t: torch.Tensor) -> torch.Tensor:
        edges = self.edges.to(t.device, t.dtype)
        return (torch.bucketize(t, edges, right=True) - 1).clamp(0, len(self.probs) - 1)

    def density(self, t):
        k = self._bin(t)
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

    def state_dict(self) -> dict:
        return {"edges": self.edges.clone(), "probs": self.probs.clone(), "control": self.control.clone(),
                "moments": None if self.moments is None else self.moments.clone(),
                "hutchinson": self.hutchinson.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FittedTime":
        return cls(state["edges"], state["probs"], state.get("control"), state.get("moments"), state.get("hutchinson"))
