"""Figures, written atomically as PNG with matplotlib: image grids and rows, and the toy example's
samples, trajectories and training curves."""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import torch

from .storage.files import atomic_write_bytes

__all__ = ["save_figure", "save_image_grid", "save_image_rows", "plot_points", "plot_samples", "plot_trajectories", "plot_training", "lmbd_key"]


def save_figure(fig, path, **savefig_kwargs) -> Path:
    """Render a matplotlib figure to PNG in memory, close it, and write it atomically to ``path``."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **savefig_kwargs)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def lmbd_key(lmbd: float) -> str:
    """The suffix naming λ in files and metrics: 0 -> "0", 1 -> "1", 0.5 -> "0.5"."""
    return f"{float(lmbd):g}"


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


def save_image_grid(images: torch.Tensor, path, title: str = "", ncols: int | None = None) -> Path:
    """Tile uint8 images (N, C, H, W) (C = 1 or 3) into a grid PNG written atomically with matplotlib."""
    plt = _pyplot()
    images = images.detach().cpu()
    n, c, h, w = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    pad = 1
    grid = torch.full((c, nrows * (h + pad) + pad, ncols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    array = grid.permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(max(3.0, ncols * 0.6), max(3.0, nrows * 0.6) + 0.4), dpi=150)
    ax.imshow(array[..., 0] if c == 1 else array, cmap="gray" if c == 1 else None, vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_axis_off()
    if title:  # wrapped to the grid's width (about 12 characters of 8-point text per inch)
        ax.set_title("\n".join(textwrap.wrap(title, width=max(40, int(ncols * 0.6 * 12)))), fontsize=8)
    return save_figure(fig, path, bbox_inches="tight")



def save_image_rows(rows: list[tuple[str, torch.Tensor]], path, title: str = "") -> Path:
    """Rows of uint8 images (n, C, H, W), each labelled, one figure, written atomically."""
    plt = _pyplot()
    n = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.2, 1.15 * len(rows) + 0.5), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            image = images[c].permute(1, 2, 0).cpu().numpy()
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_points(points: torch.Tensor, path, title: str = "", reference: torch.Tensor | None = None) -> Path:
    """A scatter of 2-D ``points`` (N, 2) over a faint ``reference`` cloud (e.g. the data), square axes."""
    plt = _pyplot()
    points = points.detach().cpu().float()
    fig, ax = plt.subplots(figsize=(4.2, 4.4))
    if reference is not None:
        reference = reference.detach().cpu().float()
        ax.scatter(reference[:, 0], reference[:, 1], s=1.0, color="0.75", linewidths=0, rasterized=True, label="data")
    ax.scatter(points[:, 0], points[:, 1], s=1.5, color="tab:blue", alpha=0.6, linewidths=0, rasterized=True,
               label="samples")
    xlim, ylim = _limits(points if reference is None else reference)
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7, markerscale=4)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


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


def _snapshot_row(spec, trajectory, times, data, lims, cmap, fractions=(1.0, 0.5, 0.2, 0.05, 0.0)):
    """A row of small panels under ``spec``: all N particles at t ≈ f·T for each f in ``fractions``,
    coloured like the paths at that time, over the faint data cloud, with the limits ``lims``."""
    t_max, t_min = float(times.max()), float(times.min())
    axes = spec.subgridspec(1, len(fractions), wspace=0.06).subplots()
    for ax, f in zip(axes, fractions):
        k = int(torch.argmin((times - f * t_max).abs()))
        ax.scatter(data[:, 0], data[:, 1], s=0.5, color="0.6", alpha=0.3, linewidths=0, rasterized=True)
        colour = cmap((float(times[k]) - t_min) / max(t_max - t_min, 1e-12))
        ax.scatter(trajectory[k, :, 0], trajectory[k, :, 1], s=3, color=colour, edgecolors="none", rasterized=True)
        ax.set(xlim=lims[0], ylim=lims[1], aspect="equal", xticks=[], yticks=[])
        ax.set_title(f"t = {float(times[k]):.3g}" + (" (prior)" if f == 1 else " (data)" if f == 0 else ""),
                     fontsize=8)
    axes[0].set_ylabel(f"all {trajectory.shape[1]}\nparticles", fontsize=8)


def plot_trajectories(trajectory: torch.Tensor, times: torch.Tensor, data: torch.Tensor, lmbd: float,
                      path: str, title: str) -> None:
    """Particle paths (n_steps + 1, N, 2) from the prior (t = T) to the data (t = 0), each segment
    coloured by its time, under a faint cloud of data (as Figure 5 of Song et al., 2021); below them,
    snapshots of all N particles at t = T, T/2, T/5, T/20 and 0 with the same limits."""
    plt = _pyplot()
    from matplotlib.collections import LineCollection

    # Stochastic paths (λ < 1) criss-cross, so only a few are followed, on a thinned time grid:
    # 12 paths of 24 segments for λ < 1, 150 smooth paths of 100 segments for the ODE (λ = 1).
    lmbd = float(lmbd)
    stochastic = lmbd < 1
    trajectory, times, data = trajectory.detach().cpu().float(), times.detach().cpu().float(), data.cpu()
    n = max(1, min(trajectory.shape[1], 12 if stochastic else 150))
    steps = trajectory.shape[0]
    index = torch.linspace(0, steps - 1, min(steps, 25 if stochastic else 101)).round().long().unique()
    path_points = trajectory[index, :n].numpy()
    segment_times = times[index][:-1].numpy()
    segments = [path_points[i:i + 2, j] for j in range(n) for i in range(len(index) - 1)]
    colours = [segment_times[i] for j in range(n) for i in range(len(index) - 1)]
    fig = plt.figure(figsize=(8.5, 8.6))
    top, bottom = fig.add_gridspec(2, 1, height_ratios=[3.4, 1], hspace=0.18)
    ax = fig.add_subplot(top)
    cmap = plt.get_cmap("viridis")
    # Stochastic paths thicken as t -> 0, so the late, data-seeking moves stand out from the early noise.
    widths = [0.5 + 1.7 * (1 - (t - times.min()) / (times.max() - times.min() + 1e-12)) for t in colours]
    lines = LineCollection(segments, cmap=cmap, linewidths=widths if stochastic else 0.6,
                           alpha=0.8 if stochastic else 0.75, rasterized=True, zorder=2)
    lines.set_array(colours)
    lines.set_clim(float(times.min()), float(times.max()))
    ax.add_collection(lines)
    ax.scatter(data[:, 0], data[:, 1], s=0.6, color="0.45", alpha=0.3, rasterized=True, linewidths=0,
               label="data", zorder=1)
    big = 45 if stochastic else 6
    ax.scatter(path_points[0, :, 0], path_points[0, :, 1], s=big, marker="o", color="gold",
               edgecolors="black" if stochastic else "none", linewidths=0.7,
               label="start: prior sample (t = T)", zorder=3)
    ax.scatter(path_points[-1, :, 0], path_points[-1, :, 1], s=big * (1.6 if stochastic else 1),
               marker="*" if stochastic else "o", color="crimson", edgecolors="black" if stochastic else "none",
               linewidths=0.7, label="end: generated point (t = 0)", zorder=4)
    lims = _limits(data, trajectory[0], quantile=0.98)
    ax.set(xlim=lims[0], ylim=lims[1], aspect="equal", xlabel="$x_1$", ylabel="$x_2$")
    kind = {0.0: "reverse SDE", 1.0: "probability-flow ODE"}.get(lmbd, "λ-process")
    grid = f", {len(index)} time points" if stochastic else ""
    ax.set_title(f"{title}\nλ = {lmbd_key(lmbd)} ({kind}), {n} of {trajectory.shape[1]} particles{grid}",
                 fontsize=10)
    fig.colorbar(lines, ax=ax, label="time t (T = prior, 0 = data)", fraction=0.046, pad=0.03)
    ax.legend(loc="upper right", fontsize=7, markerscale=1 if stochastic else 3, framealpha=0.8)
    _snapshot_row(bottom, trajectory, times, data, lims, cmap)
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
    ax_loss.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.5, label="per log record")
    window = max(1, len(loss) // 100)
    if len(loss) >= window:
        smooth = torch.nn.functional.avg_pool1d(loss[None, None], window, stride=1)[0, 0]
        spacing = int(steps[1] - steps[0]) if len(steps) > 1 else 1  # steps between log records
        ax_loss.plot(steps[window - 1:], smooth, color="tab:blue", linewidth=1.5,
                     label=f"mean over {window * spacing} steps")
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


def plot_metric_curve(steps, values, path, ylabel: str, title: str = "", errors=None) -> Path:
    """One metric against the training step (e.g. the FID of EMA samples), with ±``errors`` bars if
    given, on a log y-axis where every value is positive; written atomically."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(steps, values, yerr=errors, marker="o", color="tab:purple", capsize=3)
    if len(values) and min(values) > 0:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
