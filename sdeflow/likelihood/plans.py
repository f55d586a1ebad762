"""Fitted time plans: :func:`fit_proposal` fits a :class:`~sdeflow.likelihood.time_proposals.FittedTime`
to an integrand's pilot draws, and the :class:`EstimatorPlan` it returns says how the integrand's
estimator runs on it (a control-variate coefficient and the form taken, per bin)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..sdes.linear import SDE
from ..utils import check_positive_int
from .time_proposals import FittedTime, ImportanceTime

__all__ = ["EstimatorPlan", "IntegrandForms", "fit_proposal"]


class EstimatorPlan:
    """How an integrand's estimator runs on a :class:`FittedTime`: the ``proposal`` its times are drawn
    from, and per bin the coefficient ``control`` c_k of a control variate w of known mean zero (the
    estimate takes h + c_k·w, unbiased for every c_k) and the flag ``alternative`` (the bin takes
    another form of the integrand, of the same mean: for the ELBO, the Hutchinson form where it is
    quieter). :func:`fit_proposal` builds one; for the ELBO,
    :func:`sdeflow.likelihood.elbo.fit_time_proposal`. A value: :meth:`to_dict` / :meth:`from_dict`."""

    def __init__(self, proposal: FittedTime, control: torch.Tensor | None = None,
                 alternative: torch.Tensor | None = None):
        if not isinstance(proposal, FittedTime):
            raise ValueError(f"proposal must be a FittedTime; got {type(proposal).__name__}")
        bins = proposal.probs.shape
        control = torch.zeros(bins, dtype=torch.float64) if control is None else torch.as_tensor(
            control, dtype=torch.float64)
        if control.shape != bins or not torch.isfinite(control).all():
            raise ValueError("control must be one finite coefficient per bin")
        alternative = (torch.zeros(bins, dtype=torch.bool) if alternative is None
                       else torch.as_tensor(alternative, dtype=torch.bool))
        if alternative.shape != bins:
            raise ValueError("alternative must be one flag per bin")
        self.proposal, self.control, self.alternative = proposal, control, alternative

    @property
    def t_min(self) -> float:
        return self.proposal.t_min

    def control_at(self, t: torch.Tensor) -> torch.Tensor:
        """The control-variate coefficient of each time's bin; shape of t, dtype float64."""
        return self.control.to(t.device)[self.proposal.bin_of(t)]

    def alternative_at(self, t: torch.Tensor) -> torch.Tensor:
        """Whether each time's bin takes the alternative form; bool, shape of t."""
        return self.alternative.to(t.device)[self.proposal.bin_of(t)]

    def to_dict(self) -> dict:
        """The proposal's :meth:`FittedTime.to_dict` with the plan's "control" and "alternative" lists."""
        return {**self.proposal.to_dict(), "control": self.control.tolist(), "alternative": self.alternative.tolist()}

    @classmethod
    def from_dict(cls, state: dict) -> "EstimatorPlan":
        """The plan of :meth:`to_dict` (also the one dict a FittedTime kept before the split, whose
        "hutchinson" flags are the alternative)."""
        proposal = FittedTime.from_dict(state)
        return cls(proposal, state.get("control"), state.get("alternative", state.get("hutchinson")))


def _control_coefficients(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per bin (row), c = −Cov(h, w)/Var(w), the coefficient of least variance of h + c·w (0 where w is constant)."""
    hc, wc = h - h.mean(1, keepdim=True), w - w.mean(1, keepdim=True)
    var_w = (wc ** 2).sum(1)
    return torch.where(var_w > 0, -(hc * wc).sum(1) / var_w.clamp_min(1e-300), torch.zeros_like(var_w))


class IntegrandForms(NamedTuple):
    """What an integrand returns to :func:`fit_proposal`, one draw per time: ``value`` h, optionally a
    ``control`` variate w of mean zero at every t, and an ``alternative`` form h′ of the same mean."""
    value: torch.Tensor
    control: torch.Tensor | None = None
    alternative: torch.Tensor | None = None


def fit_proposal(integrand: Callable[[torch.Tensor], torch.Tensor], sde: SDE, *, n_bins: int = 48,
                 n_per_bin: int = 1, defensive: float = 0.02, t_min: float = 0.0,
                 generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> EstimatorPlan:
    r"""An :class:`EstimatorPlan` on a :class:`FittedTime` on [t_min, T] with q ∝ √E[h(t)²] per bin, mixed
    with ``defensive`` of :class:`ImportanceTime`.

    ``integrand(t)`` takes times of shape (n,) and returns one draw of h at each, shape (n, ...)
    (e.g. one per pilot example), or :class:`IntegrandForms`; it is called once with ``n_per_bin`` times
    per bin, each uniform within its bin. With a ``control`` variate w each bin takes the coefficient
    :math:`c_k = -\widehat{Cov}(h, w)/\widehat{Var}(w)` that minimises the variance of h + c_k·w, records
    it in the plan's ``control``, and is sized by the second moment of h + c_k·w. With an ``alternative``
    form h′ the plan flags the bins where h′ has the lower second moment, sized by it.

    The defensive share bounds every weight 1/q(t) by 1/(defensive·q_importance(t)), so a bin the
    pilot under-rates cannot blow up the variance (on the 3072-D oracle of ``benchmarks/estimators.py``:
    ~100× less variance than uniform t at 2 %, ~30× at 10 %).
    """
    if not 0 < defensive <= 1:
        raise ValueError(f"defensive must lie in (0, 1]; got {defensive}")
    n_bins, n_per_bin = check_positive_int("n_bins", n_bins), check_positive_int("n_per_bin", n_per_bin)
    edges = FittedTime.log_snr_edges(sde, n_bins, t_min)
    lower, width = edges[:-1], edges[1:] - edges[:-1]
    u = torch.rand(n_bins * n_per_bin, generator=generator, dtype=torch.float64, device=device)
    index = torch.arange(n_bins).repeat_interleave(n_per_bin)
    t = (lower[index] + width[index] * u.cpu()).to(dtype=dtype, device=device)
    forms = integrand(t)
    forms = forms if isinstance(forms, IntegrandForms) else IntegrandForms(forms)
    h, w, other = forms.value, forms.control, forms.alternative
    h = h.detach().double().cpu().reshape(n_bins, -1)
    control = torch.zeros(n_bins, dtype=torch.float64)
    if w is not None:
        w = w.detach().double().cpu().reshape(n_bins, -1)
        control = _control_coefficients(h, w)
        h = h + control[:, None] * w
    alternative = torch.zeros(n_bins, dtype=torch.bool)
    if other is not None:  # a third form, of the same mean: taken in the bins where it is quieter
        other = other.detach().double().cpu().reshape(n_bins, -1)
        alternative = (other ** 2).mean(1) < (h ** 2).mean(1)
        h = torch.where(alternative[:, None], other, h)
    second_moment = (h ** 2).mean(1)
    if not torch.isfinite(second_moment).all():
        raise ValueError("the integrand gave non-finite values on the pilot draws")
    mass = width * second_moment.sqrt()
    fitted = mass / mass.sum() if mass.sum() > 0 else torch.full_like(mass, 1 / n_bins)
    importance = ImportanceTime(sde, t_min=t_min).cdf(edges)
    probs = (1 - defensive) * fitted + defensive * (importance[1:] - importance[:-1])
    moments = torch.stack([h.mean(1), second_moment])
    return EstimatorPlan(FittedTime(edges, probs.clamp_min(1e-12), moments=moments), control, alternative)
