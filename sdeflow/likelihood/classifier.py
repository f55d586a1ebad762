r"""The classifier a class-conditional diffusion model already is (Li et al. 2023; Clark & Jaini 2023).

With labels, the ELBO gives log p(x | y) for every class y, and Bayes gives

.. math::  \log p(y \mid x) = \mathrm{ELBO}(x \mid y) + \log p(y) - \log \sum_{y'} e^{\mathrm{ELBO}(x \mid y') + \log p(y')}.

:func:`class_elbos` estimates the ELBO of every class with the same draws (times, noises, probes) for all
classes and one time plan, fitted on the unconditional model (the null class): paired estimates, as
Li et al. do, so that the classes are compared on the same draws. (On the Gaussian-mixture oracle of
the tests the pairing did not reduce the noise of the differences: each class's ε̂ error dominates.)
With an exact score the ELBO is log p(x | y) up to the prior's mismatch at T (Huang et al. 2021), so on
a Gaussian mixture whose components are the classes :func:`classify` gives the Bayes posterior.
"""

from __future__ import annotations

import torch

from ..samplers.guidance import guided
from ..utils import check_positive_int
from .elbo import elbo, fit_time_proposal

__all__ = ["class_elbos", "classify"]


def _num_classes(model) -> int:
    num_classes = getattr(model.net, "num_classes", 0)
    if not num_classes:
        raise ValueError("the model's network is unconditional (num_classes=0): classifying needs a network "
                         "trained with classes")
    return num_classes


def class_elbos(model, x: torch.Tensor, *, n_slices: int = 4, time_sampling=None,
                generator: torch.Generator | None = None, t_min: float | None = None) -> torch.Tensor:
    """ELBO(x | y) in nats for every class y of a class-conditional ``model``, shape (B, C), float64:
    :func:`~sdeflow.likelihood.elbo.elbo` of the model at label y (w = 0), every class with the same
    draws (the generator's state at the call, restored for each class). ``time_sampling``: a time
    proposal or plan, or None for a plan fitted on the null class's model on x."""
    num_classes = _num_classes(model)
    n_slices = check_positive_int("n_slices", n_slices)
    generator = generator if generator is not None else torch.Generator(x.device).manual_seed(
        int(torch.randint(0, 2 ** 62, (1,))))
    if time_sampling is None:
        time_sampling = fit_time_proposal(guided(model, None), x, t_min=t_min, generator=generator)
    state = generator.get_state()
    columns = []
    for label in range(num_classes):
        generator.set_state(state)  # paired: the same times, noises and probes for every class
        columns.append(elbo(guided(model, label), x, n_slices=n_slices, time_sampling=time_sampling,
                            generator=generator, t_min=t_min).double())
    return torch.stack(columns, dim=1)


def classify(model, x: torch.Tensor, *, prior: torch.Tensor | None = None, n_slices: int = 4, time_sampling=None,
             generator: torch.Generator | None = None, t_min: float | None = None) -> dict:
    """p(y | x) of a class-conditional ``model`` by Bayes (module docstring) with class ``prior`` p(y)
    (C,) (default uniform). Returns {"log_posterior" (B, C), "log_likelihood" (B, C): the paired ELBOs,
    "prediction" (B,): the most probable class}. ValueError for an unconditional model or a prior that
    is not a probability vector of length C."""
    elbos = class_elbos(model, x, n_slices=n_slices, time_sampling=time_sampling, generator=generator, t_min=t_min)
    num_classes = elbos.shape[1]
    if prior is None:
        log_prior = torch.full((num_classes,), -torch.log(torch.tensor(float(num_classes))).item(), dtype=torch.float64)
    else:
        prior = torch.as_tensor(prior, dtype=torch.float64)
        if prior.shape != (num_classes,) or bool((prior < 0).any()) or abs(float(prior.sum()) - 1.0) > 1e-6:
            raise ValueError(f"prior must be {num_classes} non-negative probabilities summing to 1; got {prior.tolist()}")
        log_prior = prior.log()
    log_posterior = torch.log_softmax(elbos + log_prior.to(elbos.device), dim=1)
    return {"log_posterior": log_posterior, "log_likelihood": elbos, "prediction": log_posterior.argmax(dim=1)}
