r"""Log-likelihoods over a data set: the ELBO or the probability-flow ODE, in nats or bits/dim,
with the mean and its standard error. Used by ``sdeflow eval``, the toy example and the benchmarks.
What to estimate travels as one :class:`LikelihoodSettings` (bound, slices, time proposal,
divergence, t_min, dequantization, tolerances), shared by the Python API and the command line.

For examples x₁…x_N and per-example estimates ℓᵢ (an unbiased ELBO of
:func:`sdeflow.likelihood.elbo.elbo`, or :func:`sdeflow.likelihood.ode.log_prob_ode`), the result is the mean
ℓ̄ = (1/N)Σᵢℓᵢ with standard error sd(ℓ)/√N, which covers both the spread between examples and the
estimator's own noise. With ``time_sampling="fitted"`` the ELBO's time proposal is first fitted on a
pilot batch of the first examples, with its own seed, and handed to every batch's estimate. Every batch draws its noise from a generator
seeded by (seed, position of its first example), so results do not depend on the batch order or on
the number of processes a run is split over (under torch.distributed each rank scores a contiguous
shard and the results are gathered).

What the standard error covers. Each example gets its own draws (its own dequantization noise, and
for the ELBO its own times, noises and probes; for the ODE its own Hutchinson probe, its own slice
of the (B, ...) probe tensor drawn with the batch, held fixed over its solve), so the ℓᵢ are
independent given the model and sd(ℓ)/√N includes the estimator's noise as well as the spread
between examples. Two things it does not include: the fitted time proposal, fitted once on the
pilot batch (the ELBO is unbiased under any proposal, so this changes the variance, not the mean),
and the ODE solver's error, a bias of the order of ``rtol``/``atol`` rather than noise; an
adaptive solver steps the whole batch on one grid, so that error is shared by the examples of a
batch. Rerun at a tighter tolerance to bound it.

Whether the standard error can be trusted: sd/√N assumes the sample variance is a stable estimate,
which fails when a few examples carry most of it (a heavy tail: near t → 0 an ε network's ELBO
integrand grows like ‖ε̂‖²/(2t), and single draws can be huge, which is why the estimators stop
at t_min > 0 by default). :func:`sdeflow.likelihood.statistics.tail_diagnostics` measures it and every result carries its
"tail_share", "tail_count", "kurtosis" and "heavy_tailed".

Split of the variance. Scoring the same examples twice with two seeds gives ℓ¹, ℓ² whose
covariance is the spread between examples and whose variance minus it is the estimator's own
(``benchmarks/likelihoods.py`` reports both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable

import numpy as np
import torch

from .estimators import (ESTIMATORS, DiscreteEstimator, ElboEstimator, EvaluationError, OdeEstimator,
                         make_estimator)
from .plans import EstimatorPlan
from ..engine.distributed import all_gather_objects, world_info
from ..engine.state import STREAM_EVAL, STREAM_PILOT, make_generator, step_seed
from .settings import BOUNDS, DEQUANTIZATIONS, LikelihoodSettings
from .statistics import mean_se, tail_diagnostics
from ..sdes.linear import noise_level_time
from ..utils import check_positive_int, model_device_dtype

__all__ = ["LikelihoodSettings", "BOUNDS", "DEQUANTIZATIONS", "quantization_time", "EvaluationError",
           "log_likelihood", "evaluate_bpd", "analytic_variance", "ImageSpace", "ESTIMATORS", "ElboEstimator",
           "OdeEstimator", "DiscreteEstimator"]



# ---- the one loop -------------------------------------------------------------------------------------
def _evaluate(model, n: int, batch: Callable, estimator, batch_size: int, seed: int, device,
              progress: bool) -> dict:
    """Score examples [0, n) given by ``batch(start, stop, generator) -> (y, logdet or None)`` with
    ``estimator``: the model in eval mode without a graph through its weights (and without any graph
    unless the estimator needs one), this rank's contiguous shard, each batch with a generator seeded
    by (seed, its first example), the results gathered from every rank. Returns {"log_prob" (N,),
    "logdet" (N,) or None, "nfe" (list), "seconds"}; EvaluationError if any is not finite."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise EvaluationError("the model has non-finite parameters: training diverged")
    was_training, needs_grad = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)  # no graph through the weights; divergences still differentiate in y
    rank, world = world_info()
    bounds = np.linspace(0, n, world + 1).astype(int)
    log_probs, logdets, nfes = [], [], []

    def pilot():  # the first examples, with a seed of their own
        generator = make_generator(device, step_seed(seed, 0, 0, stream=STREAM_PILOT))
        return batch(0, min(n, estimator.settings.fit_examples), generator)[0], generator

    try:
        with contextlib.nullcontext() if estimator.needs_grad else torch.no_grad():
            estimator.prepare(pilot)
            starts = range(bounds[rank], bounds[rank + 1], batch_size)
            for start in tqdm(starts, desc="eval", disable=(not progress) or rank != 0, dynamic_ncols=True):
                stop = min(start + batch_size, bounds[rank + 1])
                generator = make_generator(device, step_seed(seed, start, 0, stream=STREAM_EVAL))
                y, logdet = batch(start, stop, generator)
                log_prob, nfe = estimator.estimate(y, generator)
                log_probs.append(log_prob.detach().double().cpu())
                logdets.append(None if logdet is None else logdet.double().cpu())
                if nfe is not None:
                    nfes.append(nfe)
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), needs_grad):
            p.requires_grad_(flag)
    with_logdet = any(d is not None for d in logdets)
    local = (torch.cat(log_probs) if log_probs else torch.zeros(0, dtype=torch.float64),
             torch.cat(logdets) if with_logdet else None, nfes)
    gathered = all_gather_objects(local)
    log_prob = torch.cat([part[0] for part in gathered])
    logdet = torch.cat([part[1] for part in gathered]) if with_logdet else None
    total = log_prob if logdet is None else log_prob + logdet
    if not torch.isfinite(total).all():
        raise EvaluationError(f"{int((~torch.isfinite(total)).sum())} of {n} examples got a non-finite "
                              f"log-likelihood; the model has diverged")
    return {"log_prob": log_prob, "logdet": logdet, "nfe": [x for part in gathered for x in part[2]],
            "seconds": time.perf_counter() - started}


def _summary(values: torch.Tensor, evaluated: dict, estimator: str) -> dict:
    """mean, se and the tail diagnostics of ``values``, with what every result carries."""
    mean, se = mean_se(values)
    out = {"mean": mean, "se": se, "n": values.numel(), "seconds": evaluated["seconds"], "estimator": estimator,
           **tail_diagnostics(values)}
    if evaluated["nfe"]:
        out["nfe"] = float(np.mean(evaluated["nfe"]))
    return out


def _examples(x, n, batch, device):
    """(n, batch) from either examples ``x`` or ``n`` and ``batch``; ValueError unless exactly one is given."""
    if (x is None) == (batch is None):
        raise ValueError("pass either x (examples in model space) or n and batch (a function giving them)")
    if x is None:
        return check_positive_int("n", n), batch
    if x.shape[0] == 0:
        raise ValueError("x is empty")
    return x.shape[0], (lambda start, stop, generator: (x[start:stop].to(device), None))


def log_likelihood(model, x: torch.Tensor | None = None, *, n: int | None = None, batch: Callable | None = None,
                   settings: LikelihoodSettings | None = None, batch_size: int = 64, seed: int = 0, device=None,
                   progress: bool = False) -> dict:
    """Log-likelihood in nats of every example of ``x`` (N, ...) in model space, or of ``n`` examples
    given by ``batch(start, stop, generator) -> (y, logdet)`` (``logdet`` added to each estimate, or
    None), estimated as ``settings`` say (default :class:`LikelihoodSettings`: the ELBO with a fitted
    time proposal, 4 slices; the discrete bound decodes continuous data with a Gaussian here, images with
    their pixel bins in :func:`evaluate_bpd`). ``settings.t_min`` None: the estimators' default,
    10⁻⁵·T. Pass the model unwrapped (not DDP); it is evaluated in eval mode, without a graph through
    its weights, and left as it was.

    Returns {"mean", "se", "per_example" (N,) float64, "n", "seconds", "estimator" (the line of
    :meth:`LikelihoodSettings.describe`), "tail_share", "tail_count", "kurtosis", "heavy_tailed" (of
    :func:`~sdeflow.likelihood.statistics.tail_diagnostics`: whether "se" can be trusted)} and, for the ODE and the
    discrete bound, "nfe" (mean network evaluations per batch). The ODE's "se" includes the Hutchinson
    probe's noise (each example has its own probe), not the solver's error (see the module's notes).
    Raises :class:`EvaluationError` if any estimate is not finite.
    """
    settings = (settings or LikelihoodSettings()).validate(model.T)
    check_positive_int("batch_size", batch_size)
    device = torch.device(model_device_dtype(model, device, None)[0] or "cpu")
    n, batch = _examples(x, n, batch, device)
    estimator = ESTIMATORS[settings.bound](model, settings)
    evaluated = _evaluate(model, n, batch, estimator, batch_size, seed, device, progress)
    values = evaluated["log_prob"] if evaluated["logdet"] is None else evaluated["log_prob"] + evaluated["logdet"]
    return {"per_example": values,
            **_summary(values, evaluated, settings.describe(model.T, fit_examples=min(n, settings.fit_examples)))}


def quantization_time(sde, data_config: dict) -> float:
    """t_σ of images in model space ``data_config`` ({"transform", "alpha"}): the time at which the
    noise level std/m equals σ = :func:`~sdeflow.data.transforms.truncated_normal_scale` (the narrowest
    half-bin of a pixel over 3). The images' bound starts there by default (:func:`evaluate_bpd`);
    ``TrainConfig.loss_t_min`` set to it trains on that same bound."""
    from ..data.transforms import truncated_normal_scale

    return noise_level_time(sde, truncated_normal_scale(data_config["transform"], data_config["alpha"]))


def analytic_variance(model, images: torch.Tensor, config: dict, chain_steps: int, *, n_grid: int = 128,
                      seed: int = 0, batch_size: int = 64, device=None):
    """Analytic-DPM's reverse variances for the discrete bound on ``chain_steps`` steps of ``model``, from
    uint8 training ``images`` (N, C, H, W) of model configuration ``config``: Γ(t) = E‖ε̂‖²/D estimated
    by :func:`sdeflow.discrete.estimate_analytic_variance` on ``n_grid`` times equally spaced in log-SNR
    from t_1 = T/chain_steps to T (N·n_grid forward passes; Γ is smooth in log-SNR and interpolated between
    them), on the images dequantised uniformly. Returns the
    :class:`~sdeflow.discrete.AnalyticVariance` value (keep it with ``to_state``)."""
    from ..data.transforms import check_images, preprocess
    from ..discrete import estimate_analytic_variance, forward_chain

    images = check_images(images, config)
    n_grid = check_positive_int("n_grid", n_grid)
    device = torch.device(model_device_dtype(model, device, None)[0] or "cpu")
    sde, first = model.sde, model.T / check_positive_int("chain_steps", chain_steps)
    ends = sde.log_snr(torch.tensor([first, model.T], dtype=torch.float64))
    times = sde.t_from_log_snr(torch.linspace(float(ends[0]), float(ends[1]), n_grid, dtype=torch.float64))
    times[0], times[-1] = first, model.T
    gen = make_generator(device, step_seed(seed, 0, 0, stream=STREAM_PILOT))
    x = preprocess(images.to(device), config["data"], gen).y
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return estimate_analytic_variance(model, x, forward_chain(sde, times=times), generator=gen,
                                              batch_size=batch_size)
    finally:
        model.train(was_training)


@dataclasses.dataclass(frozen=True)
class ImageSpace:
    """8-bit images (N, C, H, W) seen in a model's space (model configuration ``data``: transform and α):
    how a batch is mapped, in the model's ``dtype``, and how bits/dim come out of its log-likelihoods.

    - ``bins`` given (the discrete bound): the images are the pixel bins' centres, scored as they are:
      bpd = −log P(x)/(D ln 2);
    - ``dequantization="uniform"``: y = φ((x + U)/256) with its log-determinant; bpd by
      :func:`sdeflow.data.transforms.bits_per_dim` (which documents its + 8);
    - ``"truncated-normal"`` (i-DODE): y = c + z, z a normal truncated to the pixel's bin in model
      space, with the log-weight −log q(y|x) + D ln 256 in place of the log-determinant."""
    images: torch.Tensor
    data: dict
    dequantization: str = "uniform"
    bins: object = None
    dtype: torch.dtype = torch.float32
    device: object = None

    @property
    def num_dims(self) -> int:
        return int(np.prod(self.images.shape[1:]))

    def batch(self, start: int, stop: int, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y, logdet or None) of images [start, stop)."""
        from ..data.transforms import preprocess, truncated_normal_dequantize, truncated_normal_scale

        images = self.images[start:stop].to(self.device)
        if self.bins is not None:
            return self.bins.centre(images).to(self.dtype), None
        if self.dequantization == "uniform":
            pre = preprocess(images, self.data, generator, dtype=self.dtype)
            return pre.y, pre.logdet
        sigma = truncated_normal_scale(self.data["transform"], self.data["alpha"])
        return truncated_normal_dequantize(images, self.data["transform"], self.data["alpha"], sigma,
                                           generator=generator, dtype=self.dtype)

    def bits_per_dim(self, log_prob: torch.Tensor, logdet: torch.Tensor | None) -> torch.Tensor:
        """Per image: −log P(x)/(D ln 2) for the bins, else bits_per_dim(log p(y), logdet, D)."""
        from ..data.transforms import bits_per_dim

        if self.bins is not None:
            return -log_prob / (self.num_dims * math.log(2.0))
        return bits_per_dim(log_prob, logdet, self.num_dims)


def evaluate_bpd(model, images: torch.Tensor, config: dict, settings: LikelihoodSettings | None = None, *,
                 batch_size: int = 64, seed: int = 0, device=None, progress: bool = False,
                 plan: EstimatorPlan | None = None) -> dict:
    r"""Bits per dimension of uint8 ``images`` (N, C, H, W) under ``model`` of model configuration
    ``config``, estimated as ``settings`` say (default :class:`LikelihoodSettings`).

    Both bounds start at ``settings.t_min`` (default t_σ of :func:`quantization_time`: the time at which
    the noise level std/m equals σ, the narrowest half-bin of a pixel in model space over 3): the ELBO
    then decodes the image with a Gaussian of that scale, which fits inside every pixel's bin within
    ±3σ, and the ODE outputs y_{t_σ}/m; below t_σ a network's ε prediction has nothing left to denoise
    (i-DODE's choice). A model trained elsewhere on noise levels down to a first step above t_σ
    (:func:`sdeflow.adapters.bound_start`: t₁ = T/N of N discrete steps) starts there instead, so the
    result still bounds the images' discrete negative log-likelihood.

    ``dequantization="uniform"``: each image x is dequantised, u = (x + U)/256 with U ~ U[0,1)^D,
    mapped to model space y with log-determinant log|∂y/∂u|, and scored by :func:`log_likelihood`;
    per image bpd = −(log p(y) + log|det ∂y/∂x|)/(D ln 2) + 8, by
    :func:`sdeflow.data.transforms.bits_per_dim` (which documents why the 8 is there and nothing else).
    ``dequantization="truncated-normal"`` (i-DODE, training-free): y = c + z in model space, z a normal
    of scale σ truncated to the pixel's bin, with log-weight w = −log q(y|x) + D ln 256; per image
    bpd = −(log p(y) − log q(y|x))/(D ln 2), a bound on −log₂ P(x)/D by Jensen.
    ``bound="discrete"``: DDPM's discrete-time bound on ``chain_steps`` steps (:mod:`sdeflow.discrete`), which
    scores the pixels' bins themselves (no dequantization, no t_min), bpd = −log P(x)/(D ln 2); the
    "analytic" variance must be given as its value (:func:`analytic_variance`).

    ``plan``: the ELBO's fitted time plan to use instead of fitting one (``time_sampling="fitted"`` only):
    two models evaluated with one plan and one seed see the same draws (dequantization, t, ε), so the
    per-image difference of their bits/dim is paired.

    Returns {"bpd": mean, "bpd_se": sd/√n, "n_images", "seconds", "bpd_per_image": (N,), "estimator",
    "tail_share", "tail_count", "kurtosis", "heavy_tailed", "nfe" (ODE), "plan" (the fitted ELBO's
    :class:`~sdeflow.likelihood.plans.EstimatorPlan`, else None)}, "tail_share" to "nfe" as in
    :func:`log_likelihood`; the same on every rank, reproducible for a given seed and batch size.
    """
    from ..adapters import bound_start
    from ..data.transforms import check_images
    from ..discrete import PixelBins

    settings = (settings or LikelihoodSettings()).validate(model.T)
    images = check_images(images, config)
    check_positive_int("batch_size", batch_size)
    device, dtype = model_device_dtype(model, device, None)
    device = torch.device(device or "cpu")
    data = config["data"]
    if settings.t_min is None:
        settings = dataclasses.replace(settings, t_min=max(quantization_time(model.sde, data), bound_start(model)))
    bins = PixelBins(data["transform"], data["alpha"]) if settings.bound == "discrete" else None
    # a float64 model is evaluated in float64 throughout
    space = ImageSpace(images, data, settings.dequantization, bins, dtype, device)
    estimator = make_estimator(model, settings, bins, plan)
    evaluated = _evaluate(model, images.shape[0], space.batch, estimator, batch_size, seed, device, progress)
    bpd = space.bits_per_dim(evaluated["log_prob"], evaluated["logdet"])
    how = ", DDPM's discretized Gaussian decoder" if bins is not None else f", {settings.dequantization} dequantization"
    summary = _summary(bpd, evaluated, settings.describe(model.T, fit_examples=min(images.shape[0],
                                                                                  settings.fit_examples)) + how)
    plan = getattr(estimator, "proposal", None)
    return {"bpd": summary.pop("mean"), "bpd_se": summary.pop("se"), "n_images": summary.pop("n"),
            "bpd_per_image": bpd, **summary, "plan": plan if isinstance(plan, EstimatorPlan) else None}
