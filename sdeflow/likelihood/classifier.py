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

import math
import time

import torch

from ..data.transforms import check_images, preprocess
from ..engine.state import make_generator, step_seed
from ..samplers.guidance import guided
from ..utils import check_positive_int
from .elbo import elbo, fit_time_proposal
from .evaluation import evaluate_bpd
from .statistics import mean_se

__all__ = ["class_elbos", "classify", "conditional_bpd", "evaluate_classifier"]


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


def _by_class(labels: torch.Tensor, num_classes: int):
    for label in range(num_classes):
        index = (labels == label).nonzero().flatten()
        if index.numel():
            yield label, index


def conditional_bpd(model, images: torch.Tensor, labels: torch.Tensor, config: dict, settings=None, *,
                    batch_size: int = 64, seed: int = 0, device=None) -> dict:
    """Bits/dim of uint8 ``images`` under a class-conditional ``model`` at their true ``labels``,
    −log₂ p(x | y)/D, and under its null class, −log₂ p(x)/D, on the same images with the same seed
    (:func:`~sdeflow.likelihood.evaluation.evaluate_bpd` per class). Their per-image difference estimates
    the mutual information I(x; y)/D in bits, which lies in [0, log₂ C / D]: returned with its paired
    standard error. Returns {"conditional", "unconditional", "information": (mean, se) each,
    "information_bound": log₂ C / D, "n_images", "estimator"}."""
    num_classes = _num_classes(model)
    labels = torch.as_tensor(labels).long()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have one entry per image, shape ({images.shape[0]},); got {tuple(labels.shape)}")
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    per_image = {"conditional": torch.zeros(images.shape[0], dtype=torch.float64),
                 "unconditional": torch.zeros(images.shape[0], dtype=torch.float64)}
    estimator = ""
    for label, index in _by_class(labels, num_classes):
        for name, conditioned in (("conditional", guided(model, label)), ("unconditional", guided(model, None))):
            result = evaluate_bpd(conditioned, images[index], config, settings, batch_size=batch_size, seed=seed,
                                  device=device)
            per_image[name][index] = result["bpd_per_image"].double().cpu()
            estimator = result["estimator"]
    information = per_image["unconditional"] - per_image["conditional"]
    dims = int(torch.tensor(images.shape[1:]).prod())
    return {"conditional": mean_se(per_image["conditional"]), "unconditional": mean_se(per_image["unconditional"]),
            "information": mean_se(information), "information_bound": math.log2(num_classes) / dims,
            "n_images": images.shape[0], "estimator": estimator}


def evaluate_classifier(model, images: torch.Tensor, labels: torch.Tensor, config: dict, *, n_slices: int = 4,
                        batch_size: int = 16, seed: int = 0, n_bins: int = 10) -> dict:
    """The diffusion classifier of a class-conditional ``model`` on uint8 ``images`` with true ``labels``:
    each image dequantized into model space and classified by :func:`classify` (uniform prior). Returns
    {"accuracy", "nll" (mean −ln p(true label | x)), "ece" (expected calibration error over ``n_bins``
    confidence bins), "seconds_per_image", "n_images", "predictions" (N,), "log_posterior" (N, C)}."""
    images = check_images(images, config)
    labels = torch.as_tensor(labels).long()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have one entry per image, shape ({images.shape[0]},); got {tuple(labels.shape)}")
    batch_size = check_positive_int("batch_size", batch_size)
    param = next(model.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    started, parts = time.perf_counter(), []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            generator = make_generator(device, step_seed(seed, start, 0))
            y = preprocess(images[start:start + batch_size].to(device), config["data"], generator, dtype=dtype).y
            with torch.no_grad():  # the fitted plan's denoising form takes no derivative
                parts.append(classify(model, y, n_slices=n_slices, generator=generator)["log_posterior"].cpu())
    finally:
        model.train(was_training)
    log_posterior = torch.cat(parts)
    confidence, predictions = log_posterior.exp().max(dim=1)
    correct = (predictions == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    bins = torch.bucketize(confidence.double(), edges[1:-1])
    ece = sum(float((bins == b).double().mean() * (confidence.double()[bins == b].mean() - correct[bins == b].mean()).abs())
              for b in range(n_bins) if bool((bins == b).any()))
    return {"accuracy": float(correct.mean()), "nll": float(-log_posterior[torch.arange(len(labels)), labels].mean()),
            "ece": ece, "seconds_per_image": (time.perf_counter() - started) / images.shape[0],
            "n_images": images.shape[0], "predictions": predictions, "log_posterior": log_posterior}
