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
at t_min > 0 by default). :func:`tail_diagnostics` measures it and every result carries its
"tail_share", "tail_count", "kurtosis" and "heavy_tailed".

Split of the variance. Scoring the same examples twice with two seeds gives ℓ¹, ℓ² whose
covariance is the spread between examples and whose variance minus it is the estimator's own
(``benchmarks/likelihoods.py`` reports both).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import numpy as np
import torch

from .divergence import ESTIMATORS as DIVERGENCES, PROBES
from .engine.distributed import all_gather_objects, world_info
from .engine.state import STREAM_EVAL, STREAM_PILOT, make_generator, step_seed
from .model import TIME_SAMPLINGS
from .ode import ADAPTIVE_SOLVERS
from .utils import check_choice, check_positive_int, model_device_dtype

__all__ = ["ESTIMATORS", "DEQUANTIZATIONS", "noise_level_time", "quantization_time", "EvaluationError", "mean_se", "tail_diagnostics", "describe_estimator", "log_likelihood",
           "evaluate_bpd", "TAIL_FRACTION", "HEAVY_TAIL_SHARE", "HEAVY_TAIL_MIN_N"]

ESTIMATORS = ("elbo", "ode")

# The rule of :func:`tail_diagnostics`, calibrated by simulation (2,000 samples of each kind and size):
# for Gaussian values the top 1 % carry ≈ 8.5 % of the squared deviation (n → ∞; its 99th percentile
# is under 25 % from n = 50 on; over 50 % in 0.6 % of samples at n = 20, in none from n = 50 on),
# for Student-t with 5 degrees of freedom a median ≈ 16 %, with 3 (infinite kurtosis) ≈ 28 %
# (n = 846; 6 % of samples flagged). For infinite-variance values, whose standard error means
# nothing, the share grows with n: t₂ is flagged in 54 % of samples of 846 and
# 90 % of 5,000, Pareto(1.5) in 73 % of 200 and all of 5,000. Below 20 values a single Gaussian value
# carries half the squared deviation too often (8 % of samples at n = 12) to tell.
TAIL_FRACTION = 0.01
HEAVY_TAIL_SHARE = 0.5
HEAVY_TAIL_MIN_N = 20


class EvaluationError(RuntimeError):
    """The model gave non-finite likelihoods (it has diverged)."""


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error sd/√n) of a 1-D tensor, in float64; the error is NaN for one value."""
    values = values.double().flatten()
    n = values.numel()
    return float(values.mean()), (float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan"))


def tail_diagnostics(values: torch.Tensor) -> dict:
    r"""How far the standard error of the mean of ``values`` (1-D, e.g. per-example estimates) can be
    trusted. With dᵢ = ℓᵢ − ℓ̄ and k = max(1, ⌊n/100⌋) (the top ``TAIL_FRACTION`` of the n values):

    - "tail_count" = k;
    - "tail_share" = Σ_{top k} dᵢ² / Σᵢ dᵢ², the share of the total squared deviation (of n − 1
      times the variance) carried by the k values farthest from the mean: ≈ 0.085 for Gaussian
      values, → 1 when a few values dominate;
    - "kurtosis" = n Σᵢ dᵢ⁴ / (Σᵢ dᵢ²)², the moment estimate of E[d⁴]/E[d²]² (3 for a Gaussian;
      at most ≈ n, reached by one outlier); n/kurtosis is the effective number of values the
      variance rests on;
    - "heavy_tailed" = n ≥ ``HEAVY_TAIL_MIN_N`` (20) and tail_share > ``HEAVY_TAIL_SHARE`` (½): the
      top 1 % of the values carry more than half of the variance, so the sample variance, and with
      it the standard error, rests on a handful of draws, and unseen larger ones would move it (the
      values look like an infinite-variance distribution). Below 20 values a Gaussian sample
      meets the share too often to tell; the module's constants record the calibration.

    tail_share and kurtosis are NaN (and heavy_tailed False) for fewer than two values or constant ones.
    They do not change under ℓ ↦ aℓ + b, so nats and bits/dim give the same.
    """
    values = values.double().flatten()
    n = values.numel()
    k = max(1, int(n * TAIL_FRACTION))
    squared = (values - values.mean()) ** 2 if n else values
    total = float(squared.sum())
    if n < 2 or not total > 0:
        return {"tail_share": float("nan"), "tail_count": k, "kurtosis": float("nan"), "heavy_tailed": False}
    tail_share = float(squared.topk(k).values.sum()) / total
    kurtosis = n * float((squared ** 2).sum()) / total ** 2
    return {"tail_share": tail_share, "tail_count": k, "kurtosis": kurtosis,
            "heavy_tailed": bool(n >= HEAVY_TAIL_MIN_N and tail_share > HEAVY_TAIL_SHARE)}


def describe_estimator(estimator: str = "elbo", *, n_slices: int = 1, time_sampling: str = "fitted",
                       divergence: str = "hutchinson", probe: str = "rademacher", rtol: float = 1e-5,
                       atol: float = 1e-5, solver: str = "dopri5", fit_examples: int = 16,
                       t_min: float | None = None) -> str:
    """One line saying which estimator the arguments of :func:`log_likelihood` select, e.g.
    "ELBO from t_min 1e-05 (Gaussian decoder), time proposal fitted on 16 pilot examples (denoising
    form with a fitted control variate), 4 slices per example" or "probability-flow ODE from t_min 0,
    dopri5, rtol 1e-05, atol 1e-05, Hutchinson divergence (rademacher probe)" (:func:`evaluate_bpd`
    appends its dequantization). ``t_min`` None: the estimator's default (10⁻⁵·T for the ELBO, 0 for
    the ODE). The one place such descriptions are built."""
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("divergence", divergence, DIVERGENCES)
    div = f"Hutchinson divergence ({probe} probe)" if divergence == "hutchinson" else "exact divergence"
    if estimator == "ode":
        return f"probability-flow ODE from t_min {t_min or 0:g}, {solver}, rtol {rtol:g}, atol {atol:g}, {div}"
    check_choice("time_sampling", time_sampling, TIME_SAMPLINGS)
    start = "ELBO from t_min " + ("1e-05·T" if t_min is None else f"{t_min:g}")
    start += " (Gaussian decoder)" if t_min is None or t_min > 0 else ""
    if time_sampling == "fitted":
        how = f"time proposal fitted on {fit_examples} pilot examples (denoising form with a fitted control variate"
        how += ", Hutchinson form with the exact divergence where quieter)" if divergence == "exact" else ")"
    else:
        how = {"uniform": "uniform time", "importance": "importance time proposal q ∝ g²/v"}[time_sampling] + f", {div}"
    return f"{start}, {how}, {n_slices} slice{'s' if n_slices > 1 else ''} per example"


def _score(model, n: int, batch: Callable, *, estimator: str, batch_size: int, n_slices: int,
           time_sampling: str, divergence: str, probe: str, solver: str, rtol: float, atol: float, seed: int, device,
           fit_examples: int, t_min: float | None, progress: bool) -> tuple[torch.Tensor, list]:
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
            model.fit_time_proposal(pilot, max_examples=pilot.shape[0], t_min=t_min, divergence=divergence,
                                    generator=pilot_gen)
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
            # The probe is drawn here per example (shape of y), so the examples' errors are independent.
            try:
                logp, info = model.log_prob_ode(y, rtol=rtol, atol=atol, solver=solver, divergence=divergence,
                                                probe=probe, t_min=t_min or 0.0, generator=gen, return_info=True)
            except AssertionError as err:  # torchdiffeq's step-size underflow: the dynamics are too stiff
                raise EvaluationError(f"the ODE solver failed on examples {start}-{stop - 1} ({err}); the "
                                      f"model's probability flow is too stiff for rtol={rtol}, atol={atol}") from None
            nfes.append(info["nfe"])
        else:
            logp = model.elbo(y, n_slices=n_slices, time_sampling=time_sampling, divergence=divergence,
                              probe=probe, generator=gen, t_min=t_min)
        logp = logp.detach().double()
        results.append((logp if logdet is None else logp + logdet.double()).cpu())
    local = torch.cat(results) if results else torch.zeros(0, dtype=torch.float64)
    gathered = all_gather_objects((local, nfes))
    return torch.cat([part for part, _ in gathered]), [x for _, part in gathered for x in part]


def log_likelihood(model, x: torch.Tensor | None = None, *, n: int | None = None, batch: Callable | None = None,
                   estimator: str = "elbo", batch_size: int = 64, n_slices: int = 1, time_sampling: str = "fitted",
                   divergence: str = "hutchinson", probe: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                   solver: str = "dopri5", seed: int = 0, device=None, fit_examples: int = 16,
                   t_min: float | None = None, progress: bool = False) -> dict:
    """Log-likelihood in nats of every example of ``x`` (N, ...) in model space, or of ``n`` examples
    given by ``batch(start, stop, generator) -> (y, logdet)`` (``logdet`` added to each estimate, or
    None), by ``estimator`` "elbo" (``n_slices`` draws, ``time_sampling``) or "ode" (adaptive
    ``solver`` with ``rtol``, ``atol``), either with ``divergence`` "hutchinson" (a ``probe`` per
    example: "rademacher" or "gaussian") or "exact". The proposal of ``time_sampling="fitted"`` is
    fitted on the first ``fit_examples`` examples. ``t_min``: where the estimator starts (see
    :meth:`PluginReverseSDE.elbo` and :meth:`PluginReverseSDE.log_prob_ode`); None: 10⁻⁵·T for the
    ELBO, 0 for the ODE. Pass the model unwrapped (not DDP); it is
    evaluated in eval mode.

    Returns {"mean", "se", "per_example" (N,) float64, "n", "seconds", "estimator" (the line of
    :func:`describe_estimator`), "tail_share", "tail_count", "kurtosis", "heavy_tailed" (of
    :func:`tail_diagnostics`: whether "se" can be trusted)} and, for the ODE, "nfe" (mean network
    evaluations per batch). The ODE's "se" includes the Hutchinson probe's noise (each example has
    its own probe), not the solver's error (see the module's notes). Raises
    :class:`EvaluationError` if any estimate is not finite.
    """
    check_choice("estimator", estimator, ESTIMATORS)
    check_positive_int("batch_size", batch_size)
    check_positive_int("n_slices", n_slices)
    check_positive_int("fit_examples", fit_examples)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("probe", probe, PROBES)
    if estimator == "elbo":
        check_choice("time_sampling", time_sampling, TIME_SAMPLINGS)
    else:
        check_choice("solver", solver, ADAPTIVE_SOLVERS)
    if t_min is not None and not 0.0 <= float(t_min) < model.T:
        raise ValueError(f"t_min must lie in [0, T={model.T}); got {t_min}")
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
    was_training, needs_grad = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)  # no graph through the weights; divergences still differentiate in y
    try:
        # The fitted ELBO takes the denoising form everywhere unless the divergence is exact: no derivative.
        no_derivative = estimator == "elbo" and time_sampling == "fitted" and divergence == "hutchinson"
        with torch.no_grad() if no_derivative else contextlib.nullcontext():
            values, nfes = _score(model, n, batch, estimator=estimator, batch_size=batch_size, n_slices=n_slices,
                                  time_sampling=time_sampling, divergence=divergence, probe=probe, solver=solver,
                                  rtol=rtol, atol=atol, seed=seed, device=device, fit_examples=fit_examples,
                                  t_min=t_min, progress=progress)
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), needs_grad):
            p.requires_grad_(flag)
    if not torch.isfinite(values).all():
        raise EvaluationError(f"{int((~torch.isfinite(values)).sum())} of {n} examples got a non-finite "
                              f"log-likelihood; the model has diverged")
    mean, se = mean_se(values)
    description = describe_estimator(estimator, n_slices=n_slices, time_sampling=time_sampling,
                                     divergence=divergence, probe=probe, rtol=rtol, atol=atol, solver=solver,
                                     fit_examples=min(n, fit_examples),
                                     t_min=model.default_t_min() if t_min is None and estimator == "elbo" else t_min)
    out = {"mean": mean, "se": se, "per_example": values, "n": n, "seconds": time.perf_counter() - started,
           "estimator": description, **tail_diagnostics(values)}
    if estimator == "ode":
        out["nfe"] = float(np.mean(nfes))
    return out


#: How ``evaluate_bpd`` turns 8-bit levels into continuous data: uniform noise in each level's bin, or
#: the truncated normal of i-DODE (:func:`sdeflow.data.transforms.truncated_normal_dequantize`).
DEQUANTIZATIONS = ("uniform", "truncated-normal")


def noise_level_time(sde, sigma: float) -> float:
    """The time t at which the SDE's noise level std(t)/m(t) is ``sigma``: λ(t) = −2 log σ."""
    return float(sde.t_from_log_snr(torch.tensor(-2.0 * math.log(sigma), dtype=torch.float64)))


def quantization_time(sde, data_config: dict) -> float:
    """t_σ of images in model space ``data_config`` ({"transform", "alpha"}): the time at which the
    noise level std/m equals σ = :func:`~sdeflow.data.transforms.truncated_normal_scale` (the narrowest
    half-bin of a pixel over 3). The images' bound starts there by default (:func:`evaluate_bpd`);
    ``TrainConfig.loss_t_min`` set to it trains on that same bound."""
    from .data.transforms import truncated_normal_scale

    return noise_level_time(sde, truncated_normal_scale(data_config["transform"], data_config["alpha"]))


def evaluate_bpd(model, images: torch.Tensor, config: dict, *, batch_size: int = 64, n_slices: int = 4,
                 time_sampling: str = "fitted", ode: bool = False, divergence: str = "hutchinson",
                 rtol: float = 1e-5, atol: float = 1e-5, t_min: float | None = None,
                 dequantization: str = "uniform", seed: int = 0, device=None, progress: bool = False) -> dict:
    r"""Bits per dimension of uint8 ``images`` (N, C, H, W) under ``model`` of model configuration
    ``config``.

    Both estimators start at ``t_min`` (default t_σ: the time at which the noise level std/m equals
    σ, the narrowest half-bin of a pixel in model space over 3, of
    :func:`~sdeflow.data.transforms.truncated_normal_scale`): the ELBO then decodes the image with a
    Gaussian of that scale, which fits inside every pixel's bin within ±3σ, and the ODE outputs
    y_{t_σ}/m; below t_σ a network's ε prediction has nothing left to denoise (i-DODE's choice).

    ``dequantization="uniform"`` (default): each image x is dequantised, u = (x + U)/256 with
    U ~ U[0,1)^D, mapped to model space y with log-determinant log|∂y/∂u|, and scored by
    :func:`log_likelihood` (the ELBO, or the ODE with ``ode=True``). Then per image
    bpd = −(log p(y) + log|det ∂y/∂x|)/(D ln 2) + 8, by :func:`sdeflow.data.transforms.bits_per_dim`
    (which documents why the 8 is there and nothing else).

    ``dequantization="truncated-normal"`` (i-DODE, training-free): y = c + z in model space, z a normal
    of scale σ truncated to the pixel's bin, with log-weight w = −log q(y|x) + D ln 256; per image
    bpd = −(log p(y) + w)/(D ln 2) + 8 = −(log p(y) − log q(y|x))/(D ln 2), a bound on −log₂ P(x)/D
    by Jensen. With the ODE from t_σ the model's marginal there is the data blurred by N(0, σ²),
    which is what these y look like.

    ``divergence``: "hutchinson" (default) or "exact" (D times the cost).

    Returns {"bpd": mean, "bpd_se": sd/√n, "n_images", "seconds", "bpd_per_image": (N,), "estimator",
    "tail_share", "tail_count", "kurtosis", "heavy_tailed", "nfe" (ODE)}, the last six as in
    :func:`log_likelihood` (heavy_tailed: the top 1 % of images carry over half the variance, so
    bpd_se is unreliable); the same on every rank, reproducible for a given seed and batch size.
    """
    from .data.transforms import bits_per_dim, truncated_normal_dequantize, truncated_normal_scale
    from .experiments.images import check_images, preprocess

    check_choice("dequantization", dequantization, DEQUANTIZATIONS)
    images = check_images(images, config)
    device = torch.device(model_device_dtype(model, device, None)[0] or "cpu")
    num_dims = int(np.prod(images.shape[1:]))
    data = config["data"]

    sigma = truncated_normal_scale(data["transform"], data["alpha"])
    if t_min is None:
        t_min = quantization_time(model.sde, data)

    def batch(start, stop, generator):
        if dequantization == "uniform":
            pre = preprocess(images[start:stop].to(device), data, generator)
            return pre.y, pre.logdet
        return truncated_normal_dequantize(images[start:stop].to(device), data["transform"], data["alpha"], sigma,
                                           generator=generator)

    result = log_likelihood(model, n=images.shape[0], batch=batch, estimator="ode" if ode else "elbo",
                            batch_size=batch_size, n_slices=n_slices, time_sampling=time_sampling,
                            divergence=divergence, rtol=rtol, atol=atol, t_min=t_min, seed=seed, device=device,
                            progress=progress)
    bpd = bits_per_dim(result["per_example"], torch.zeros_like(result["per_example"]), num_dims)
    mean, se = mean_se(bpd)
    out = {"bpd": mean, "bpd_se": se, "n_images": result["n"], "seconds": result["seconds"], "bpd_per_image": bpd,
           "estimator": result["estimator"] + f", {dequantization} dequantization", **tail_diagnostics(bpd)}
    if ode:
        out["nfe"] = result["nfe"]
    return out
