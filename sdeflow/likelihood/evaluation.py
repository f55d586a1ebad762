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

from .elbo import elbo, fit_time_proposal
from ..engine.distributed import all_gather_objects, world_info
from ..engine.state import STREAM_EVAL, STREAM_PILOT, make_generator, step_seed
from .settings import BOUNDS, DEQUANTIZATIONS, LikelihoodSettings
from .ode import log_prob_ode
from .statistics import mean_se, tail_diagnostics
from ..sdes.linear import noise_level_time
from ..utils import check_positive_int, model_device_dtype

__all__ = ["LikelihoodSettings", "BOUNDS", "DEQUANTIZATIONS", "quantization_time",
           "EvaluationError", "log_likelihood", "evaluate_bpd", "analytic_variance"]

class EvaluationError(RuntimeError):
    """The model gave non-finite likelihoods (it has diverged)."""


def _pilot(n: int, batch: Callable, settings: LikelihoodSettings, seed: int, device):
    """(the first ``fit_examples`` examples, their generator): the pilot batch a proposal is fitted on,
    drawn with a seed of its own."""
    pilot_gen = make_generator(device, step_seed(seed, 0, 0, stream=STREAM_PILOT))
    return batch(0, min(n, settings.fit_examples), pilot_gen)[0], pilot_gen


def _fitted_proposal(model, n: int, batch: Callable, settings: LikelihoodSettings, seed: int, device):
    """The ELBO's time proposal for ``settings``: fitted once on the first examples, with its own seed."""
    if settings.time_sampling != "fitted":
        return settings.time_sampling
    pilot, pilot_gen = _pilot(n, batch, settings, seed, device)
    try:
        return fit_time_proposal(model, pilot, max_examples=pilot.shape[0], t_min=settings.t_min,
                                 divergence=settings.divergence, generator=pilot_gen)
    except ValueError as err:  # the pilot's integrands were not finite: not the caller's input
        raise EvaluationError(f"the ELBO's time proposal could not be fitted ({err}); the model gives "
                              f"non-finite values and has probably diverged") from None


def _estimator(model, n: int, batch: Callable, settings: LikelihoodSettings, seed: int, device, bins):
    """``estimate(y, generator) -> (per-example log-likelihoods (B,), [network evaluations])`` of one batch
    in model space, for ``settings``' bound (the ELBO's proposal fitted first; the discrete bound's chain
    built once, decoding with ``bins`` or, when None, a Gaussian)."""
    s = settings
    if s.bound == "elbo":
        proposal = _fitted_proposal(model, n, batch, settings, seed, device)
        return lambda y, gen: (elbo(model, y, n_slices=s.n_slices, time_sampling=proposal, divergence=s.divergence,
                                    probe=s.probe, generator=gen, t_min=s.t_min), [])
    if s.bound == "discrete":
        return _discrete_estimator(model, n, batch, settings, seed, device, bins)

    def ode(y, gen):
        # The probe is drawn here per example (shape of y), so the examples' errors are independent.
        try:
            logp, info = log_prob_ode(model, y, rtol=s.rtol, atol=s.atol, solver=s.solver, divergence=s.divergence,
                                      probe=s.probe, t_min=s.t_min, generator=gen)
        except AssertionError as err:  # torchdiffeq's step-size underflow: the dynamics are too stiff
            raise EvaluationError(f"the ODE solver failed ({err}); the model's probability flow is too stiff "
                                  f"for rtol={s.rtol}, atol={s.atol}") from None
        return logp, [info["nfe"]]
    return ode


def _discrete_estimator(model, n: int, batch: Callable, settings: LikelihoodSettings, seed: int, device, bins):
    """The discrete bound's ``estimate`` (see :func:`_estimator`), its sampled steps drawn from a proposal
    fitted once on the first examples when ``settings.step_sampling`` is "fitted"."""
    from ..discrete import discrete_bound, fit_step_proposal, forward_chain

    s = settings
    if s.variance == "analytic":
        raise ValueError("variance 'analytic' needs its value: pass the AnalyticVariance of "
                         "sdeflow.estimate_analytic_variance(model, training_examples, chain) as variance")
    chain, proposal = forward_chain(model.sde, chain_steps=s.chain_steps), None
    if s.sampled_steps is not None and s.step_sampling == "fitted" and chain.chain_steps > 1:
        pilot, pilot_gen = _pilot(n, batch, s, seed, device)
        proposal = fit_step_proposal(model, pilot, chain, s.variance, bins=bins, generator=pilot_gen)

    def discrete(y, gen):
        bound = discrete_bound(model, y, chain, s.variance, bins=bins, n_sampled_steps=s.sampled_steps,
                               step_proposal=proposal, generator=gen)
        return bound.log_prob, [bound.nfe]
    return discrete


def _score(model, n: int, batch: Callable, settings: LikelihoodSettings, batch_size: int, seed: int, device,
           progress: bool, bins=None) -> tuple[torch.Tensor, list]:
    """Per-example log-likelihoods (nats, plus the batch's log-determinant where ``batch`` gives one)
    of examples [0, n) of this rank's shard; ``batch(start, stop, generator) -> (y, logdet or None)``."""
    from tqdm.auto import tqdm

    rank, world = world_info()
    bounds = np.linspace(0, n, world + 1).astype(int)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise EvaluationError("the model has non-finite parameters: training diverged")
    estimate = _estimator(model, n, batch, settings, seed, device, bins)
    results, nfes = [], []
    starts = range(bounds[rank], bounds[rank + 1], batch_size)
    for start in tqdm(starts, desc="eval", disable=(not progress) or rank != 0, dynamic_ncols=True):
        stop = min(start + batch_size, bounds[rank + 1])
        gen = make_generator(device, step_seed(seed, start, 0, stream=STREAM_EVAL))
        y, logdet = batch(start, stop, gen)
        logp, nfe = estimate(y, gen)
        logp = logp.detach().double()
        results.append((logp if logdet is None else logp + logdet.double()).cpu())
        nfes += nfe
    local = torch.cat(results) if results else torch.zeros(0, dtype=torch.float64)
    gathered = all_gather_objects((local, nfes))
    return torch.cat([part for part, _ in gathered]), [x for _, part in gathered for x in part]


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
    their pixel bins in :func:`evaluate_bpd`). ``settings.t_min`` None: 10⁻⁵·T for the ELBO, 0 for the
    ODE. Pass the model unwrapped (not DDP); it is evaluated in eval mode, without a graph through its
    weights, and left as it was.

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
    return _likelihoods(model, n, batch, settings, batch_size, seed, device, progress)


def _likelihoods(model, n: int, batch: Callable, settings: LikelihoodSettings, batch_size: int, seed: int, device,
                 progress: bool, bins=None) -> dict:
    """The body of :func:`log_likelihood` (``bins``: the discrete bound's pixel bins, for images)."""
    started = time.perf_counter()
    was_training, needs_grad = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)  # no graph through the weights; divergences still differentiate in y
    try:
        # Neither the fitted ELBO (denoising form unless the divergence is exact) nor the discrete bound
        # takes a derivative.
        no_derivative = (settings.bound == "discrete" or (settings.bound, settings.time_sampling,
                                                          settings.divergence) == ("elbo", "fitted", "hutchinson"))
        with torch.no_grad() if no_derivative else contextlib.nullcontext():
            values, nfes = _score(model, n, batch, settings, batch_size, seed, device, progress, bins)
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), needs_grad):
            p.requires_grad_(flag)
    if not torch.isfinite(values).all():
        raise EvaluationError(f"{int((~torch.isfinite(values)).sum())} of {n} examples got a non-finite "
                              f"log-likelihood; the model has diverged")
    mean, se = mean_se(values)
    out = {"mean": mean, "se": se, "per_example": values, "n": n, "seconds": time.perf_counter() - started,
           "estimator": settings.describe(model.T, fit_examples=min(n, settings.fit_examples)),
           **tail_diagnostics(values)}
    if nfes:
        out["nfe"] = float(np.mean(nfes))
    return out


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


def _image_batches(model, images: torch.Tensor, data: dict, dequantization: str, bins, device) -> Callable:
    """``batch(start, stop, generator) -> (y, logdet)`` of uint8 ``images`` in model space: dequantised
    (uniformly, or by the truncated normal with its log-weight), or for the discrete bound (``bins``) the
    bins' centres with logdet D ln 256, so that bits_per_dim's 8 cancels and bpd = −log P(x)/(D ln 2)."""
    from ..data.transforms import preprocess, truncated_normal_dequantize, truncated_normal_scale

    num_dims = int(np.prod(images.shape[1:]))
    sigma = truncated_normal_scale(data["transform"], data["alpha"])
    dtype = model_device_dtype(model, None, None)[1]  # a float64 model is evaluated in float64 throughout

    def batch(start, stop, generator):
        if bins is not None:  # the discrete bound scores the pixels' bins: P(x) itself, no dequantization
            x = bins.centre(images[start:stop].to(device)).to(dtype)
            return x, torch.full((x.shape[0],), num_dims * math.log(256), dtype=torch.float64, device=device)
        if dequantization == "uniform":
            pre = preprocess(images[start:stop].to(device), data, generator, dtype=dtype)
            return pre.y, pre.logdet
        return truncated_normal_dequantize(images[start:stop].to(device), data["transform"], data["alpha"], sigma,
                                           generator=generator, dtype=dtype)
    return batch


def evaluate_bpd(model, images: torch.Tensor, config: dict, settings: LikelihoodSettings | None = None, *,
                 batch_size: int = 64, seed: int = 0, device=None, progress: bool = False) -> dict:
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

    Returns {"bpd": mean, "bpd_se": sd/√n, "n_images", "seconds", "bpd_per_image": (N,), "estimator",
    "tail_share", "tail_count", "kurtosis", "heavy_tailed", "nfe" (ODE)}, the last six as in
    :func:`log_likelihood`; the same on every rank, reproducible for a given seed and batch size.
    """
    from ..adapters import bound_start
    from ..data.transforms import bits_per_dim, check_images
    from ..discrete import PixelBins

    settings = (settings or LikelihoodSettings()).validate(model.T)
    images = check_images(images, config)
    device = torch.device(model_device_dtype(model, device, None)[0] or "cpu")
    data = config["data"]
    if settings.t_min is None:
        start = max(quantization_time(model.sde, data), bound_start(model))
        settings = dataclasses.replace(settings, t_min=start)
    bins = PixelBins(data["transform"], data["alpha"]) if settings.bound == "discrete" else None
    num_dims = int(np.prod(images.shape[1:]))
    batch = _image_batches(model, images, data, settings.dequantization, bins, device)
    check_positive_int("batch_size", batch_size)
    result = _likelihoods(model, images.shape[0], batch, settings, batch_size, seed, device, progress, bins)
    # With the discrete bound, per_example holds log P(x) + D ln 256, so that the 8 of bits_per_dim cancels.
    bpd = bits_per_dim(result["per_example"], torch.zeros_like(result["per_example"]), num_dims)
    mean, se = mean_se(bpd)
    how = ", DDPM's discretized Gaussian decoder" if bins is not None else f", {settings.dequantization} dequantization"
    out = {"bpd": mean, "bpd_se": se, "n_images": result["n"], "seconds": result["seconds"], "bpd_per_image": bpd,
           "estimator": result["estimator"] + how, **tail_diagnostics(bpd)}
    if "nfe" in result:
        out["nfe"] = result["nfe"]
    return out
