r"""Log-likelihoods over a data set: the ELBO or the probability-flow ODE, in nats or bits/dim,
with the mean and its standard error. Used by ``sdeflow eval``, the toy example and the benchmarks.

For examples x₁…x_N and per-example estimates ℓᵢ (an unbiased ELBO of
:meth:`PluginReverseSDE.elbo`, or :meth:`PluginReverseSDE.log_prob_ode`), the result is the mean
ℓ̄ = (1/N)Σᵢℓᵢ with standard error sd(ℓ)/√N, which covers both the spread between examples and the
estimator's own noise. With ``time_sampling="fitted"`` the ELBO's time proposal is first fitted on a
pilot batch of the first examples, with its own seed. Every batch draws its noise from a generator
seeded by (seed, position of its first example), so results do not depend on the batch order or on
the number of processes a run is split over (under torch.distributed each rank scores a contiguous
shard and the results are gathered).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from .engine.distributed import all_gather_objects, world_info
from .engine.state import STREAM_EVAL, STREAM_PILOT, make_generator, step_seed
from .model import TIME_SAMPLINGS
from .utils import check_choice, check_positive_int, model_device_dtype

__all__ = ["ESTIMATORS", "mean_se", "log_likelihood", "evaluate_bpd"]

ESTIMATORS = ("elbo", "ode")


class EvaluationError(RuntimeError):
    """The model gave non-finite likelihoods (it has diverged)."""


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error sd/√n) of a 1-D tensor, in float64; the error is NaN for one value."""
    values = values.double().flatten()
    n = values.numel()
    return float(values.mean()), (float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan"))


def _score(model, n: int, batch: Callable, *, estimator: str, batch_size: int, n_slices: int,
           time_sampling: str, divergence: str, rtol: float, atol: float, seed: int, device,
           fit_examples: int, progress: bool) -> tuple[torch.Tensor, list]:
    """Per-example log-likelihoods (nats, plus the batch's log-determinant where ``batch`` gives one)
    of examples [0, n) of this rank's shard; ``batch(start, stop, generator) -> (y, logdet or None)``."""
    from tqdm.auto import tqdm

    rank, world = world_info()
    bounds = np.linspace(0, n, world + 1).astype(int)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise EvaluationError("the model has non-finite parameters: training diverged")
    if estimator == "elbo" and time_sampling == "fitted":
        pilot_gen = make_generator(device, step_seed(seed, 0, 0, stream=STREAM_PILOT))
        pilot, _ = batch(0, min(n, fit_examples), pilot_gen)
        try:
            model.fit_time_proposal(pilot, max_examples=pilot.shape[0], divergence=divergence, generator=pilot_gen)
        except ValueError as err:  # the pilot's integrands were not finite: not the caller's input
            raise EvaluationError(f"the ELBO's time proposal could not be fitted ({err}); the model gives "
                                  f"non-finite values and has probably diverged") from None
    results, nfes = [], []
    starts = range(bounds[rank], bounds[rank + 1], batch_size)
    for start in tqdm(starts, desc="eval", disable=(not progress) or rank != 0, dynamic_ncols=True):
        stop = min(start + batch_size, bounds[rank + 1])
        gen = make_generator(device, step_seed(seed, start, 0, stream=STREAM_EVAL))
        y, logdet = batch(start, stop, gen)
        if estimator == "ode":
            try:
                logp, info = model.log_prob_ode(y, rtol=rtol, atol=atol, divergence=divergence, generator=gen,
                                                return_info=True)
            except AssertionError as err:  # torchdiffeq's step-size underflow: the dynamics are too stiff
                raise EvaluationError(f"the ODE solver failed on examples {start}-{stop - 1} ({err}); the "
                                      f"model's probability flow is too stiff for rtol={rtol}, atol={atol}") from None
            nfes.append(info["nfe"])
        else:
            logp = model.elbo(y, n_slices=n_slices, time_sampling=time_sampling, divergence=divergence,
                              generator=gen)
        logp = logp.detach().double()
        results.append((logp if logdet is None else logp + logdet.double()).cpu())
    local = torch.cat(results) if results else torch.zeros(0, dtype=torch.float64)
    gathered = all_gather_objects((local, nfes))
    return torch.cat([part for part, _ in gathered]), [x for _, part in gathered for x in part]


def log_likelihood(model, x: torch.Tensor | None = None, *, n: int | None = None, batch: Callable | None = None,
                   estimator: str = "elbo", batch_size: int = 64, n_slices: int = 1, time_sampling: str = "fitted",
                   divergence: str = "hutchinson", rtol: float = 1e-5, atol: float = 1e-5, seed: int = 0,
                   device=None, fit_examples: int = 32, progress: bool = False) -> dict:
    """Log-likelihood in nats of every example of ``x`` (N, ...) in model space, or of ``n`` examples
    given by ``batch(start, stop, generator) -> (y, logdet)`` (``logdet`` added to each estimate, or
    None), by ``estimator`` "elbo" (``n_slices`` draws, ``time_sampling``, ``divergence``) or "ode"
    (``rtol``, ``atol``). The proposal of ``time_sampling="fitted"`` is fitted on the first
    ``fit_examples`` examples. Pass the model unwrapped (not DDP); it is evaluated in eval mode.

    Returns {"mean", "se", "per_example" (N,) float64, "n", "seconds", "estimator"} and, for the
    ODE, "nfe" (mean network evaluations per batch). Raises :class:`EvaluationError` if any
    estimate is not finite.
    """
    check_choice("estimator", estimator, ESTIMATORS)
    check_positive_int("batch_size", batch_size)
    check_positive_int("n_slices", n_slices)
    check_positive_int("fit_examples", fit_examples)
    if estimator == "elbo":
        check_choice("time_sampling", time_sampling, TIME_SAMPLINGS)
    if (x is None) == (batch is None):
        raise ValueError("pass either x (examples in model space) or n and batch (a function giving them)")
    device = torch.device(model_device_dtype(model, device, None)[0] or "cpu")
    if x is not None:
        if x.shape[0] == 0:
            raise ValueError("x is empty")
        n = x.shape[0]
        batch = lambda start, stop, generator: (x[start:stop].to(device), None)  # noqa: E731
    else:
        check_positive_int("n", n)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        values, nfes = _score(model, n, batch, estimator=estimator, batch_size=batch_size, n_slices=n_slices,
                              time_sampling=time_sampling, divergence=divergence, rtol=rtol, atol=atol, seed=seed,
                              device=device, fit_examples=fit_examples, progress=progress)
    finally:
        model.train(was_training)
    if not torch.isfinite(values).all():
        raise EvaluationError(f"{int((~torch.isfinite(values)).sum())} of {n} examples got a non-finite "
                              f"log-likelihood; the model has diverged")
    mean, se = mean_se(values)
    out = {"mean": mean, "se": se, "per_example": values, "n": n, "seconds": time.perf_counter() - started,
           "estimator": estimator}
    if estimator == "ode":
        out["nfe"] = float(np.mean(nfes))
    return out


def evaluate_bpd(model, images: torch.Tensor, config: dict, *, batch_size: int = 64, n_slices: int = 1,
                 time_sampling: str = "fitted", ode: bool = False, rtol: float = 1e-5, atol: float = 1e-5,
                 seed: int = 0, device=None, progress: bool = False) -> dict:
    r"""Bits per dimension of uint8 ``images`` (N, C, H, W) under ``model`` of model configuration
    ``config``.

    Each image x is dequantised, u = (x + U)/256 with U ~ U[0,1)^D, mapped to model space y with
    log-determinant log|∂y/∂u|, and scored by :func:`log_likelihood` (the ELBO, or the ODE with
    ``ode=True``). Then per image bpd = −(log p(y) + log|det ∂y/∂x|)/(D ln 2) + 8, by
    :func:`sdeflow.data.transforms.bits_per_dim` (which documents why the 8 is there and nothing else).

    Returns {"bpd": mean, "bpd_se": sd/√n, "n_images", "seconds", "bpd_per_image": (N,), "nfe" (ODE)};
    the same on every rank, reproducible for a given seed and batch size.
    """
    from .data.transforms import bits_per_dim
    from .experiments.images import check_images, preprocess

    images = check_images(images, config)
    device = torch.device(model_device_dtype(model, device, None)[0] or "cpu")
    num_dims = int(np.prod(images.shape[1:]))

    def batch(start, stop, generator):
        pre = preprocess(images[start:stop].to(device), config["data"], generator)
        return pre.y, pre.logdet

    result = log_likelihood(model, n=images.shape[0], batch=batch, estimator="ode" if ode else "elbo",
                            batch_size=batch_size, n_slices=n_slices, time_sampling=time_sampling, rtol=rtol,
                            atol=atol, seed=seed, device=device, progress=progress)
    bpd = bits_per_dim(result["per_example"], torch.zeros_like(result["per_example"]), num_dims)
    mean, se = mean_se(bpd)
    out = {"bpd": mean, "bpd_se": se, "n_images": result["n"], "seconds": result["seconds"], "bpd_per_image": bpd}
    if ode:
        out["nfe"] = result["nfe"]
    return out
