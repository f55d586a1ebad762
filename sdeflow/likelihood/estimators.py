"""The estimator of each bound, one object per bound with the same two calls: ``prepare(pilot)`` once
(the fitted ELBO fits its time plan there, the discrete bound its sampled steps) and
``estimate(y, generator) -> (log-likelihood per example, network evaluations or None)`` per batch.
:mod:`sdeflow.likelihood.evaluation` runs them over a data set; :data:`ESTIMATORS` names them by
``LikelihoodSettings.bound``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .elbo import elbo, fit_time_proposal
from .ode import log_prob_ode
from .plans import EstimatorPlan
from .settings import LikelihoodSettings

__all__ = ["EvaluationError", "ElboEstimator", "OdeEstimator", "DiscreteEstimator", "ESTIMATORS", "make_estimator"]


class EvaluationError(RuntimeError):
    """The model gave non-finite likelihoods (it has diverged)."""


class ElboEstimator:
    """The ELBO of :func:`~sdeflow.likelihood.elbo.elbo` per example; with ``time_sampling="fitted"`` its
    proposal is fitted once, in :meth:`prepare`, on the pilot batch. Takes no derivative in its fitted,
    Hutchinson form (the denoising form)."""

    def __init__(self, model, settings: LikelihoodSettings, bins=None, plan: EstimatorPlan | None = None):
        self.model, self.settings = model, settings
        self.proposal = plan if plan is not None else settings.time_sampling
        self.needs_grad = (settings.time_sampling, settings.divergence) != ("fitted", "hutchinson")

    def prepare(self, pilot: Callable) -> None:
        s = self.settings
        if s.time_sampling != "fitted" or isinstance(self.proposal, EstimatorPlan):  # none, or given
            return
        y, generator = pilot()
        try:
            self.proposal = fit_time_proposal(self.model, y, max_examples=y.shape[0], t_min=s.t_min,
                                              divergence=s.divergence, generator=generator)
        except ValueError as err:  # the pilot's integrands were not finite: not the caller's input
            raise EvaluationError(f"the ELBO's time proposal could not be fitted ({err}); the model gives "
                                  f"non-finite values and has probably diverged") from None

    def estimate(self, y: torch.Tensor, generator) -> tuple[torch.Tensor, int | None]:
        s = self.settings
        return elbo(self.model, y, n_slices=s.n_slices, time_sampling=self.proposal, divergence=s.divergence,
                    probe=s.probe, generator=generator, t_min=s.t_min), None


class OdeEstimator:
    """The probability-flow ODE's log-likelihood (:func:`~sdeflow.likelihood.ode.log_prob_ode`), its
    network evaluations counted; the Hutchinson probe is drawn per example, so that the examples' errors
    are independent."""
    needs_grad = True

    def __init__(self, model, settings: LikelihoodSettings, bins=None):
        self.model, self.settings = model, settings

    def prepare(self, pilot: Callable) -> None:
        pass

    def estimate(self, y: torch.Tensor, generator) -> tuple[torch.Tensor, int | None]:
        s = self.settings
        try:
            logp, info = log_prob_ode(self.model, y, rtol=s.rtol, atol=s.atol, solver=s.solver,
                                      divergence=s.divergence, probe=s.probe, t_min=s.t_min, generator=generator)
        except AssertionError as err:  # torchdiffeq's step-size underflow: the dynamics are too stiff
            raise EvaluationError(f"the ODE solver failed ({err}); the model's probability flow is too stiff "
                                  f"for rtol={s.rtol}, atol={s.atol}") from None
        return logp, info["nfe"]


class DiscreteEstimator:
    """DDPM's discrete-time bound (:func:`sdeflow.discrete.discrete_bound`) on a ``chain_steps`` chain,
    decoding with the pixel ``bins`` (images) or a Gaussian (None); with sampled steps drawn from a
    fitted proposal, that proposal is fitted once, in :meth:`prepare`, on the pilot batch."""
    needs_grad = False

    def __init__(self, model, settings: LikelihoodSettings, bins=None):
        from ..discrete import check_variance, forward_chain

        check_variance(settings.variance)  # "analytic" by name: its value is needed here
        self.model, self.settings, self.bins, self.proposal = model, settings, bins, None
        self.chain = forward_chain(model.sde, chain_steps=settings.chain_steps)

    def prepare(self, pilot: Callable) -> None:
        from ..discrete import fit_step_proposal

        s = self.settings
        if s.sampled_steps is not None and s.step_sampling == "fitted" and self.chain.chain_steps > 1:
            y, generator = pilot()
            self.proposal = fit_step_proposal(self.model, y, self.chain, s.variance, bins=self.bins,
                                              generator=generator)

    def estimate(self, y: torch.Tensor, generator) -> tuple[torch.Tensor, int | None]:
        from ..discrete import discrete_bound

        bound = discrete_bound(self.model, y, self.chain, self.settings.variance, bins=self.bins,
                               n_sampled_steps=self.settings.sampled_steps, step_proposal=self.proposal,
                               generator=generator)
        return bound.log_prob, bound.nfe


#: bound → its estimator: ``Estimator(model, settings, bins)`` with ``needs_grad``, ``prepare(pilot)``
#: (``pilot() -> (the first fit_examples examples, their generator)``) and ``estimate(y, generator) ->
#: (per-example log-likelihoods (B,), network evaluations or None)``.
ESTIMATORS = {"elbo": ElboEstimator, "ode": OdeEstimator, "discrete": DiscreteEstimator}


def make_estimator(model, settings: LikelihoodSettings, bins=None, plan: EstimatorPlan | None = None):
    """The estimator of ``settings.bound``; with ``plan``, the fitted ELBO's on that plan (ValueError otherwise)."""
    if plan is None:
        return ESTIMATORS[settings.bound](model, settings, bins)
    if (settings.bound, settings.time_sampling) != ("elbo", "fitted") or not isinstance(plan, EstimatorPlan):
        raise ValueError(f"plan is the fitted ELBO's EstimatorPlan (fit_time_proposal): it needs bound='elbo' and "
                         f"time_sampling='fitted'; got bound={settings.bound!r}, time_sampling="
                         f"{settings.time_sampling!r}, plan {type(plan).__name__}")
    return ElboEstimator(model, settings, bins, plan)
