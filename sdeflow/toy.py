r"""The 2-D toy example as library functions: train a plug-in reverse SDE on a toy data set,
measure it, and draw it. The ``sdeflow swissroll`` command and ``examples/swissroll.py`` only
parse arguments and call :func:`run_toy`.

Training minimises the denoising score matching loss :meth:`PluginReverseSDE.dsm` on fresh data
each step; by default with the likelihood weighting g²/v and times drawn ∝ g²/v (uniform in
log-SNR), which makes the loss the ELBO's own DSM form and so keeps the bound tight (Adam,
warm-up then cosine decay of the learning rate, an exponential moving average (EMA) of the
weights, which is the model that is evaluated). The last ``second_order_fraction`` of the steps add
second-order score matching (``dsm(order=2)``, Lu et al. 2022), which fits the Jacobian of the
score as well: the probability-flow ODE's likelihood depends on it, and without it the ODE
model ends up worse than the SDE model whose ELBO is reported (0.016 nats below it on the
checkerboard; with it the two agree). Every ``elbo_every`` steps the EMA model's ELBO is
estimated on a fresh batch, so the progress bar and ``training.png`` show the bound improving.

Evaluation (:func:`evaluate_toy`), all on fresh data:

- ``elbo_nats``/``elbo_se``: the test ELBO per point, :meth:`PluginReverseSDE.elbo` with the exact
  divergence (cheap in 2-D) and the fitted time proposal, averaged over ``n_likelihood`` points and
  ``elbo_slices`` time draws each; its standard error over points.
- ``ode_logp_nats``/``ode_logp_se``: the probability-flow ODE log-likelihood
  :meth:`PluginReverseSDE.log_prob_ode` (exact divergence, dopri5) on the same points.
- ``true_logp_nats``: the exact log-density on the same points, where the data set has one;
  ``elbo_gap_nats`` = E[log p − ELBO] and ``ode_gap_nats`` = E[log p − log p_ODE] with paired
  standard errors.
- ``swd_lmbd<λ>``: sliced Wasserstein-1 distance (200 projections) between ``n_samples`` samples
  of the λ-process (Euler, ``sample_steps`` steps) and as many fresh data points; ``swd_floor``:
  the same between two independent data sets (mean over five pairs), the value a perfect sampler
  would reach on average. All use the same projections.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .checkpoint import atomic_write_bytes, save_figure
from .data.toy import DATASETS, LOG_DENSITIES, sample_toy
from .metrics import sliced_wasserstein
from .model import PARAMETERIZATIONS, TIME_SAMPLINGS, WEIGHTINGS, PluginReverseSDE
from .nets.mlp import MLP
from .samplers import sample
from .sdes import VPSDE
from .training import EMA
from .utils import check_choice

__all__ = ["ToyConfig", "make_toy_model", "train_toy", "evaluate_toy", "run_toy",
           "plot_samples", "plot_trajectories", "plot_training", "lmbd_key", "second_order_steps", "OUTPUT_FILES"]

#: Files :func:`run_toy` writes for the default λ = 0, 1.
OUTPUT_FILES = ("samples.png", "trajectories_lmbd0.png", "trajectories_lmbd1.png", "training.png",
                "metrics.json")


#: Independent pairs of data sets averaged into ``swd_floor``.
SWD_FLOOR_PAIRS = 5


def lmbd_key(lmbd: float) -> str:
    """The suffix naming λ in files and metrics: 0 -> "0", 1 -> "1", 0.5 -> "0.5"."""
    return f"{float(lmbd):g}"


@dataclass
class ToyConfig:
    """Every setting of the toy example; the defaults are the tuned ones (see the README)."""

    dataset: str = "swissroll"
    steps: int = 8000
    batch_size: int = 512
    lr: float = 3e-3
    warmup_steps: int = 200
    final_lr_fraction: float = 0.02
    ema_decay: float = 0.998
    hidden: int = 128
    n_blocks: int = 2
    fourier_features: int = 16
    fourier_scale: float = 0.25
    parameterization: str = "score"
    weighting: str = "likelihood"
    time_sampling: str = "importance"
    second_order_fraction: float = 0.125
    second_order_weight: float = 0.3
    beta_min: float = 0.1
    beta_max: float = 20.0
    seed: int = 0
    device: str = "cpu"
    lmbds: tuple[float, ...] = (0.0, 1.0)
    sample_steps: int = 500
    n_samples: int = 5000
    n_trajectories: int = 150
    n_likelihood: int = 1000
    elbo_slices: int = 128
    elbo_every: int = 200
    elbo_batch: int = 256
    elbo_train_slices: int = 4
    swd_projections: int = 200
    ode_rtol: float = 1e-5
    ode_atol: float = 1e-5

    def validate(self) -> "ToyConfig":
        """Raise ``ValueError`` naming the first bad setting; return self."""
        check_choice("dataset", self.dataset, tuple(DATASETS))
        check_choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("time_sampling", self.time_sampling, TIME_SAMPLINGS)
        if isinstance(self.fourier_features, bool) or int(self.fourier_features) != self.fourier_features \
                or self.fourier_features < 0:
            raise ValueError(f"fourier_features must be an integer >= 0; got {self.fourier_features!r}")
        for name in ("steps", "batch_size", "hidden", "n_blocks", "sample_steps", "n_samples",
                     "n_trajectories", "n_likelihood", "elbo_slices", "elbo_every", "elbo_batch", "elbo_train_slices",
                     "swd_projections"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if isinstance(self.warmup_steps, bool) or int(self.warmup_steps) != self.warmup_steps or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {self.warmup_steps!r}")
        if not 0 <= float(self.second_order_fraction) <= 1:
            raise ValueError(f"second_order_fraction must lie in [0, 1]; got {self.second_order_fraction!r}")
        if not 0 <= float(self.second_order_weight) < math.inf:
            raise ValueError(f"second_order_weight must be a finite number >= 0; got {self.second_order_weight!r}")
        for name in ("lr", "beta_min", "beta_max", "ode_rtol", "ode_atol", "fourier_scale"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number; got {getattr(self, name)!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1); got {self.ema_decay!r}")
        if not 0 < self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must lie in (0, 1]; got {self.final_lr_fraction!r}")
        if not self.lmbds:
            raise ValueError("lmbds must hold at least one value in [0, 1]")
        for lmbd in self.lmbds:
            if not 0 <= float(lmbd) <= 1:
                raise ValueError(f"lmbd must lie in [0, 1] (0: reverse SDE, 1: probability-flow ODE); got {lmbd}")
        try:
            torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda'; got {self.device!r}") from err
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for but CUDA is not available; use --device cpu")
        return self


def make_toy_model(config: ToyConfig) -> PluginReverseSDE:
    """A VP SDE (β from ``beta_min`` to ``beta_max``) and an :class:`~sdeflow.nets.mlp.MLP` of
    width ``hidden`` and ``n_blocks`` residual blocks, as a :class:`PluginReverseSDE` on ``device``."""
    sde = VPSDE(config.beta_min, config.beta_max)
    net = MLP(dim=2, hidden=config.hidden, n_blocks=config.n_blocks, T=sde.T,
              fourier_features=config.fourier_features, fourier_scale=config.fourier_scale)
    return PluginReverseSDE(sde, net, parameterization=config.parameterization).to(config.device)


def second_order_steps(config: ToyConfig) -> int:
    """How many of the last training steps use second-order DSM: round(fraction × steps)."""
    return round(config.second_order_fraction * config.steps)


def _lr_factor(step: int, config: ToyConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``final_lr_fraction``·lr."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.final_lr_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_toy(model: PluginReverseSDE, config: ToyConfig, generator: torch.Generator,
              callback: Callable[[dict], None] | None = None,
              data_generator: torch.Generator | None = None) -> tuple[PluginReverseSDE, dict]:
    r"""Train ``model`` for ``config.steps`` steps of Adam on the mean DSM loss
    :math:`\frac1B\sum_i \ell_{dsm}(x_i)` over fresh batches x ~ data (second-order DSM in the last
    :func:`second_order_steps`), keeping an EMA of its weights
    :math:`\bar\theta \leftarrow d\,\bar\theta + (1-d)\,\theta` with d = min(``ema_decay``,
    (1 + n)/(10 + n)) after n updates (:class:`sdeflow.training.EMA`, as for images).

    Every ``elbo_every`` steps (and at the last) the EMA model's mean ELBO on ``elbo_batch`` fresh
    points (``elbo_train_slices`` times each; exact divergence, a time proposal fitted to those
    points) is estimated and folded
    into a running average. ``callback`` gets {"step", "loss", "elbo", "running_elbo"} after every
    step (elbo None between estimates).

    ``generator`` draws the model's noise and times (on the model's device); ``data_generator``
    (a CPU generator, default ``generator``) draws the data.

    Returns (EMA model, history) with history = {"step", "loss", "elbo_step", "elbo",
    "running_elbo"} as lists of floats.
    """
    config.validate()
    data_generator = generator if data_generator is None else data_generator
    device = torch.device(config.device)
    ema = EMA(model, config.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    history = {"step": [], "loss": [], "elbo_step": [], "elbo": [], "running_elbo": []}
    second_order = second_order_steps(config)
    running_elbo = None
    model.train()
    for step in range(1, config.steps + 1):
        x = sample_toy(config.dataset, config.batch_size, generator=data_generator).to(device)
        order = 2 if step > config.steps - second_order else 1
        loss = model.dsm(x, time_sampling=config.time_sampling, weighting=config.weighting,
                         generator=generator, order=order,
                         second_order_weight=config.second_order_weight).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update(model, num_updates=step - 1)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the training loss became {loss_value} at step {step}; "
                                     f"lower the learning rate (lr={config.lr})")
        history["step"].append(step)
        history["loss"].append(loss_value)
        elbo_value = None
        if step % config.elbo_every == 0 or step == config.steps:
            x_eval = sample_toy(config.dataset, config.elbo_batch, generator=data_generator).to(device)
            with torch.no_grad():
                # Refit the time proposal to this batch (its sharp-edged points dominate the variance
                # otherwise: on the checkerboard ~4× less noise than q ∝ g²/v for ~0.1 s per estimate).
                ema.model.fit_time_proposal(x_eval, max_examples=x_eval.shape[0], divergence="exact",
                                             generator=generator)
                elbo_value = float(ema.model.elbo(x_eval, n_slices=config.elbo_train_slices,
                                                   time_sampling="fitted", divergence="exact",
                                                   generator=generator).mean())
            # An EMA of the estimates, so that the displayed ELBO is stable but still follows training.
            running_elbo = elbo_value if running_elbo is None else 0.7 * running_elbo + 0.3 * elbo_value
            history["elbo_step"].append(step)
            history["elbo"].append(elbo_value)
            history["running_elbo"].append(running_elbo)
        if callback is not None:
            callback({"step": step, "loss": loss_value, "elbo": elbo_value, "running_elbo": running_elbo})
    ema_model = ema.model
    ema_model.eval()
    return ema_model, history


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(values.numel()))


def evaluate_toy(model: PluginReverseSDE, config: ToyConfig, generator: torch.Generator,
                 data_generator: torch.Generator | None = None) -> tuple[dict, dict]:
    """Measure ``model`` on fresh data (see the module docstring for each metric). ``generator``
    draws the model's noise on its device, ``data_generator`` (CPU, default ``generator``) the data.

    Returns (metrics, artefacts): metrics is a flat dict of floats; artefacts holds the tensors the
    figures need: "data" (n_samples, 2), "samples" {λ: (n_samples, 2)}, "trajectories"
    {λ: (sample_steps + 1, n_trajectories, 2)}, "times" (sample_steps + 1,).
    """
    config.validate()
    data_generator = generator if data_generator is None else data_generator
    device = torch.device(config.device)
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    # -- likelihoods on n_likelihood fresh points -------------------------------------------------
    x = sample_toy(config.dataset, config.n_likelihood, generator=data_generator).to(device)
    with torch.no_grad():
        # In 2-D a pilot pass over every point costs well under a second, and the fit then sees
        # the rare points near a sharp edge whose integrand dominates the variance.
        model.fit_time_proposal(x, max_examples=x.shape[0], divergence="exact", generator=generator)
        # Chunks of ~16k rows (points × slices) bound the memory of the divergence's graph.
        chunk = max(1, 16384 // config.elbo_slices)
        elbo = torch.cat([model.elbo(x[i:i + chunk], n_slices=config.elbo_slices, time_sampling="fitted",
                                     divergence="exact", generator=generator)
                          for i in range(0, x.shape[0], chunk)])
    ode_logp, info = model.log_prob_ode(x, rtol=config.ode_rtol, atol=config.ode_atol, divergence="exact",
                                        return_info=True)
    metrics["elbo_nats"], metrics["elbo_se"] = _mean_se(elbo)
    metrics["ode_logp_nats"], metrics["ode_logp_se"] = _mean_se(ode_logp)
    metrics["ode_nfe"] = float(info["nfe"])
    metrics["elbo_minus_ode_nats"], metrics["elbo_minus_ode_se"] = _mean_se(elbo - ode_logp)
    log_density = LOG_DENSITIES.get(config.dataset)
    if log_density is not None:
        true_logp = log_density(x.cpu()).to(device)
        metrics["true_logp_nats"], metrics["true_logp_se"] = _mean_se(true_logp)
        metrics["elbo_gap_nats"], metrics["elbo_gap_se"] = _mean_se(true_logp - elbo.double())
        metrics["ode_gap_nats"], metrics["ode_gap_se"] = _mean_se(true_logp - ode_logp.double())
    metrics["likelihood_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    # -- samples of every λ and the sliced Wasserstein distance to fresh data -----------------------
    # Every distance uses the same projections (common random numbers), so their differences
    # reflect the point sets rather than the directions drawn.
    projection_seed = int(torch.randint(0, 2 ** 62, (1,), generator=data_generator))

    def swd(a: torch.Tensor, b: torch.Tensor) -> float:
        return sliced_wasserstein(a, b, config.swd_projections,
                                  generator=torch.Generator().manual_seed(projection_seed))

    data = sample_toy(config.dataset, config.n_samples, generator=data_generator).to(device)
    # The floor is itself a noisy distance between two finite sets: average it over a few pairs.
    metrics["swd_floor"] = sum(swd(sample_toy(config.dataset, config.n_samples, generator=data_generator),
                                   sample_toy(config.dataset, config.n_samples, generator=data_generator))
                               for _ in range(SWD_FLOOR_PAIRS)) / SWD_FLOOR_PAIRS
    artefacts = {"data": data.cpu(), "samples": {}, "trajectories": {}}
    for lmbd in config.lmbds:
        samples = sample(model, (config.n_samples, 2), n_steps=config.sample_steps, lmbd=lmbd,
                         generator=generator, device=device)
        metrics[f"swd_lmbd{lmbd_key(lmbd)}"] = swd(samples, data)
        _, trajectory = sample(model, (config.n_trajectories, 2), n_steps=config.sample_steps, lmbd=lmbd,
                               generator=generator, device=device, return_trajectory=True)
        artefacts["samples"][float(lmbd)] = samples.cpu()
        artefacts["trajectories"][float(lmbd)] = trajectory.cpu()
    artefacts["times"] = torch.linspace(model.T, 0.0, config.sample_steps + 1)
    metrics["sampling_seconds"] = time.perf_counter() - start
    return metrics, artefacts


# ---- files ----------------------------------------------------------------------------------------

def write_metrics(metrics: dict, path: str) -> None:
    """Write ``metrics`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _limits(*point_sets: torch.Tensor, quantile: float = 0.999, margin: float = 0.15):
    """Square plot limits enclosing the central ``quantile`` of each point set (outliers stay off-plot)."""
    lo = torch.stack([torch.quantile(p.double(), 1 - quantile, dim=0) for p in point_sets]).min(dim=0).values
    hi = torch.stack([torch.quantile(p.double(), quantile, dim=0) for p in point_sets]).max(dim=0).values
    centre, half = (lo + hi) / 2, float((hi - lo).max()) / 2 * (1 + margin)
    return (float(centre[0]) - half, float(centre[0]) + half), (float(centre[1]) - half, float(centre[1]) + half)


def plot_samples(data: torch.Tensor, samples: dict, metrics: dict, path: str, title: str) -> None:
    """Data beside samples of each λ, one square panel each, same limits; SWD in each title."""
    plt = _pyplot()
    panels = [("data", data, f"swd floor {metrics['swd_floor']:.4f}")]
    for lmbd, points in samples.items():
        kind = {0.0: "reverse SDE", 1.0: "probability-flow ODE"}.get(lmbd, "λ-process")
        panels.append((f"λ = {lmbd_key(lmbd)} ({kind})", points, f"swd {metrics[f'swd_lmbd{lmbd_key(lmbd)}']:.4f}"))
    xlim, ylim = _limits(data)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.9), squeeze=False)
    for ax, (name, points, note) in zip(axes[0], panels):
        ax.scatter(points[:, 0], points[:, 1], s=1.0, alpha=0.5, color="black" if name == "data" else "tab:blue",
                   rasterized=True, linewidths=0)
        ax.set_title(f"{name}\n{note}", fontsize=10)
        ax.set_xlim(xlim)
        ax.set_ylim(ylim)
        ax.set_aspect("equal")
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=130, bbox_inches="tight")


def plot_trajectories(trajectory: torch.Tensor, times: torch.Tensor, data: torch.Tensor, lmbd: float,
                      path: str, title: str) -> None:
    """Particle paths (n_steps + 1, N, 2) from the prior (t = T) to the data (t = 0), each segment
    coloured by its time, under a faint cloud of data; as Figure 5 of Song et al. (2021)."""
    plt = _pyplot()
    from matplotlib.collections import LineCollection

    # Stochastic paths (λ < 1) criss-cross, so fewer of them are drawn, on a coarser time grid:
    # 45 paths of 50 segments for λ < 1, 150 smooth paths of 100 segments for the ODE (λ = 1).
    lmbd = float(lmbd)
    stochastic = lmbd < 1
    n = max(1, min(trajectory.shape[1], 45 if stochastic else 150))
    trajectory = trajectory[:, :n]
    steps = trajectory.shape[0]
    stride = max(1, (steps - 1) // (50 if stochastic else 100))
    index = torch.arange(0, steps, stride)
    if index[-1] != steps - 1:
        index = torch.cat([index, torch.tensor([steps - 1])])
    path_points = trajectory[index].numpy()
    segment_times = times[index][:-1].numpy()
    segments = [path_points[i:i + 2, j] for j in range(n) for i in range(len(index) - 1)]
    colours = [segment_times[i] for j in range(n) for i in range(len(index) - 1)]
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    lines = LineCollection(segments, cmap="viridis", linewidths=0.6, alpha=0.75, rasterized=True, zorder=1)
    lines.set_array(colours)
    lines.set_clim(float(times.min()), float(times.max()))
    ax.add_collection(lines)
    # The data on top of the paths, faint, so that where the paths end can be compared with it.
    ax.scatter(data[:, 0], data[:, 1], s=0.6, color="0.35", alpha=0.35, rasterized=True, linewidths=0,
               label="data", zorder=2)
    ax.scatter(path_points[0, :, 0], path_points[0, :, 1], s=3, color="gold", edgecolors="none",
               label="start: prior sample (t = T)", zorder=3)
    ax.scatter(path_points[-1, :, 0], path_points[-1, :, 1], s=3, color="crimson", edgecolors="none",
               label="end: generated point (t = 0)", zorder=4)
    xlim, ylim = _limits(data, trajectory[0], quantile=0.98)
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    kind = {0.0: "reverse SDE", 1.0: "probability-flow ODE"}.get(float(lmbd), "λ-process")
    ax.set_title(f"{title}\nλ = {lmbd_key(lmbd)} ({kind}), {n} particles", fontsize=10)
    fig.colorbar(lines, ax=ax, label="time t (T = prior, 0 = data)", fraction=0.046, pad=0.03)
    ax.legend(loc="upper right", fontsize=7, markerscale=3, framealpha=0.8)
    fig.tight_layout()
    save_figure(fig, path, dpi=130, bbox_inches="tight")


def plot_training(history: dict, metrics: dict, path: str, title: str, weighting: str = "noise",
                  second_order_from: int | None = None) -> None:
    """Two panels against step: the DSM loss (raw and smoothed, log scale) and the ELBO estimates
    with their running average, the final test ELBO and ODE likelihood, and the true log-density.
    ``second_order_from``: the first step of second-order DSM, marked in both panels."""
    plt = _pyplot()
    fig, (ax_loss, ax_elbo) = plt.subplots(1, 2, figsize=(11, 4))
    steps = torch.tensor(history["step"], dtype=torch.float64)
    loss = torch.tensor(history["loss"], dtype=torch.float64)
    ax_loss.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.5, label="per step")
    window = max(1, len(loss) // 100)
    if len(loss) >= window:
        smooth = torch.nn.functional.avg_pool1d(loss[None, None], window, stride=1)[0, 0]
        ax_loss.plot(steps[window - 1:], smooth, color="tab:blue", linewidth=1.5, label=f"mean of {window} steps")
    ax_loss.set_yscale("log")
    if second_order_from is not None:
        for ax in (ax_loss, ax_elbo):
            ax.axvline(second_order_from, color="0.5", linestyle="-.", linewidth=1,
                       label="+ second-order DSM from here")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"DSM loss ({weighting} weighting)")
    ax_loss.set_title("training loss")
    ax_loss.legend(fontsize=8)
    ax_elbo.plot(history["elbo_step"], history["elbo"], ".", color="tab:orange", markersize=3, alpha=0.5,
                 label="ELBO estimate (EMA model)")
    ax_elbo.plot(history["elbo_step"], history["running_elbo"], color="tab:orange", linewidth=1.5,
                 label="running ELBO")
    ax_elbo.axhline(metrics["elbo_nats"], color="tab:red", linestyle="--", linewidth=1,
                    label=f"test ELBO {metrics['elbo_nats']:.3f}")
    ax_elbo.axhline(metrics["ode_logp_nats"], color="tab:green", linestyle=":", linewidth=1.2,
                    label=f"test ODE log p {metrics['ode_logp_nats']:.3f}")
    if "true_logp_nats" in metrics:
        ax_elbo.axhline(metrics["true_logp_nats"], color="black", linewidth=1,
                        label=f"true log p {metrics['true_logp_nats']:.3f}")
    # The first estimates of an untrained model are far below; zoom on the last three quarters.
    tail = history["running_elbo"][len(history["running_elbo"]) // 4:]
    if tail:
        reference = [metrics["elbo_nats"], metrics["ode_logp_nats"], metrics.get("true_logp_nats", metrics["elbo_nats"])]
        low, high = min(tail + reference), max(tail + reference)
        pad = 0.15 * (high - low) + 0.05
        ax_elbo.set_ylim(low - 3 * pad, high + pad)
    ax_elbo.set_xlabel("step")
    ax_elbo.set_ylabel("nats per point")
    ax_elbo.set_title("ELBO (log-likelihood lower bound)")
    ax_elbo.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=130, bbox_inches="tight")


def _check_out_dir(out_dir: str) -> None:
    """Create ``out_dir`` if needed and check it can be written, before any training is spent."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out must be a directory; {out_dir!r} is a file")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe_fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
        os.close(probe_fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"out directory {out_dir!r} cannot be written: {err.strerror or err}") from err


def run_toy(config: ToyConfig, out_dir: str,
            callback: Callable[[dict], None] | None = None) -> dict:
    """Train, evaluate and draw the toy example, writing into ``out_dir``: samples.png,
    trajectories_lmbd<λ>.png for each λ, training.png and metrics.json (atomically).

    ``callback`` receives the training progress (see :func:`train_toy`). Returns the metrics,
    which also record the settings and the seconds spent training and evaluating.
    """
    config.validate()
    _check_out_dir(out_dir)
    # Data are drawn on the CPU; the model's noise where the model lives (one generator on a CPU).
    data_generator = torch.Generator().manual_seed(config.seed)
    device = torch.device(config.device)
    generator = data_generator if device.type == "cpu" else torch.Generator(device).manual_seed(config.seed)
    torch.manual_seed(config.seed)  # the network's initial weights
    model = make_toy_model(config)
    start = time.perf_counter()
    ema_model, history = train_toy(model, config, generator, callback, data_generator)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics, artefacts = evaluate_toy(ema_model, config, generator, data_generator)
    metrics["train_seconds"] = train_seconds
    metrics["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    metrics["threads"] = torch.get_num_threads()
    title = f"{config.dataset}: VP SDE, {config.steps} steps"
    plot_samples(artefacts["data"], artefacts["samples"], metrics, os.path.join(out_dir, "samples.png"), title)
    for lmbd, trajectory in artefacts["trajectories"].items():
        plot_trajectories(trajectory, artefacts["times"], artefacts["data"], lmbd,
                          os.path.join(out_dir, f"trajectories_lmbd{lmbd_key(lmbd)}.png"), title)
    second_order = second_order_steps(config)
    plot_training(history, metrics, os.path.join(out_dir, "training.png"), title, config.weighting,
                  config.steps - second_order + 1 if second_order else None)
    metrics["eval_seconds"] = time.perf_counter() - start  # likelihoods, samples and figures
    write_metrics(metrics, os.path.join(out_dir, "metrics.json"))
    return metrics
