"""The library calls behind tests/pin_regression.py, in one place: when the API changes, only these
lines change; the pinned figures must not."""

from __future__ import annotations

import types

import torch

import sdeflow
from sdeflow.samplers import SamplerSettings

# The adaptive solves of the pins: dopri8 at rtol = atol = ODE_TOLERANCE. Tight, so that a different
# accept/reject path (which a last-bit difference can cause) moves a figure by no more than the
# solver's global error, well below a genuine change (tests/test_regression.py derives the pins'
# tolerance from it); dopri8 because it meets that tolerance in fewer network evaluations than dopri5.
ODE_SOLVER = "dopri8"
ODE_TOLERANCE = 1e-9


def dsm(model, x, generator, time_sampling="uniform", weighting="noise"):
    return sdeflow.dsm(model, x, time_sampling=time_sampling, weighting=weighting, generator=generator)


def elbo(model, x, generator, time_sampling, n_slices=1):
    return sdeflow.elbo(model, x, n_slices=n_slices, time_sampling=time_sampling, generator=generator)


def fitted_proposal(model, x, generator):
    """(the fitted density's probs, the control coefficients) of the ELBO's fitted plan."""
    plan = sdeflow.fit_time_proposal(model, x, generator=generator)
    return types.SimpleNamespace(probs=plan.proposal.probs, control=plan.control)


def log_prob_ode(model, x, generator):
    return sdeflow.log_prob_ode(model, x, generator=generator, solver=ODE_SOLVER, rtol=ODE_TOLERANCE,
                                atol=ODE_TOLERANCE, t_min=0.0)[0]  # the pin's; the default became the ELBO's


def sample(model, method, generator):
    return sdeflow.sample(model, (8, 2), SamplerSettings(method=method, n_steps=20), generator=generator,
                          dtype=torch.float64)


def sample_ode(model, generator):
    return sdeflow.sample_ode(model, (8, 2), generator=generator, solver=ODE_SOLVER, rtol=ODE_TOLERANCE,
                              atol=ODE_TOLERANCE)


def evaluate_bpd(model, images, config, bound, generator_seed):
    """Bits/dim of 8-bit images under each bound (the discrete one on a 50-step chain)."""
    settings = {"elbo": sdeflow.LikelihoodSettings(),
                "ode": sdeflow.LikelihoodSettings(bound="ode", solver=ODE_SOLVER, rtol=ODE_TOLERANCE,
                                                  atol=ODE_TOLERANCE),
                "discrete": sdeflow.LikelihoodSettings(bound="discrete", chain_steps=50)}[bound]
    return sdeflow.evaluate_bpd(model, images, config, settings, batch_size=images.shape[0], seed=generator_seed)["bpd"]


def inpaint(model, x, mask, scheme, generator):
    return sdeflow.inpaint(model, x, mask, scheme, SamplerSettings(method="euler", n_steps=20), generator=generator)


def denoise(model, y, noise_std, generator):
    return sdeflow.denoise(model, y, noise_std, SamplerSettings(method="ddim", n_steps=20), generator=generator)


def training_loss(model, y, generator, **config):
    """The training objective of sdeflow train (the mean DSM loss, recipes as TrainConfig fields) on a batch."""
    from sdeflow.training.objectives import DSMObjective

    return DSMObjective(model, sdeflow.TrainConfig(steps=1, batch_size=y.shape[0], **config))(y, generator)
