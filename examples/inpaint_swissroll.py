"""Conditional generation on the Swissroll: the law of one coordinate given the other, and
denoising, from one unconditional model.

    python examples/inpaint_swissroll.py --out swissroll_conditional.png [--steps 2000]

Trains the toy model of :mod:`sdeflow.experiments.toy` (VP SDE, MLP; fewer steps than its tuned default to
stay quick), then draws
  (a) the data, with the points whose x lies in a narrow band around each conditioning value:
      a reference for p(y | x),
  (b) inpainting of y given x with the replacement method (Song et al. 2021),
  (c) inpainting with the observation-guided score (exact Jacobian covariance, cheap in 2-D),
  (d) denoising: noisy points and samples of their exact posterior (:func:`sdeflow.samplers.conditional.denoise`).
"""

from __future__ import annotations

import argparse
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from sdeflow.plotting import save_figure  # noqa: E402
from sdeflow.samplers.conditional import denoise, inpaint  # noqa: E402
from sdeflow.data import sample_toy  # noqa: E402
from sdeflow.experiments.toy import ToyConfig, make_toy_model, toy_train_config, train_toy  # noqa: E402
from sdeflow.samplers import SamplerSettings  # noqa: E402

X_VALUES = (-1.5, -0.5, 0.3, 1.0, 1.7)
COLORS = plt.get_cmap("tab10").colors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="swissroll_conditional.png")
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--sample-steps", type=int, default=500)
    parser.add_argument("--n", type=int, default=400, help="conditional samples per value")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = ToyConfig(train=toy_train_config(steps=args.steps, seed=args.seed, monitor_every=0))
    gen = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as run_dir:  # the run's checkpoints are not kept
        model, _, _ = train_toy(make_toy_model(config), config, run_dir)
    data = sample_toy("swissroll", 5000, generator=gen)

    observed = torch.tensor([True, False])  # x observed, y missing
    x = torch.tensor(X_VALUES).repeat_interleave(args.n)
    x = torch.stack([x, torch.zeros_like(x)], dim=1)
    runs = {}
    for name, kwargs in (("replacement", dict(scheme="replacement")),
                         ("guided (Jacobian covariance)", dict(scheme="guided", covariance="jacobian"))):
        runs[name] = inpaint(model, x, observed, settings=SamplerSettings(n_steps=args.sample_steps), generator=gen,
                             **kwargs)

    noise_std = 0.5
    clean = data[:4]
    noisy = clean + noise_std * torch.randn(clean.shape, generator=gen)
    posterior = denoise(model, noisy.repeat_interleave(args.n // 2, 0), noise_std,
                        SamplerSettings(n_steps=args.sample_steps), generator=gen)

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6), sharex=True, sharey=True)
    panels = [("(a) data; points with x near each value", None)] + [(f"({c}) {name}: y | x", s)
                                                                    for c, (name, s) in zip("bc", runs.items())]
    for ax, (title, samples) in zip(axes, panels):
        ax.scatter(data[:, 0], data[:, 1], s=1, c="0.8", label="data")
        for k, value in enumerate(X_VALUES):
            if samples is None:
                band = data[(data[:, 0] - value).abs() < 0.05]
                ax.scatter(band[:, 0], band[:, 1], s=4, color=COLORS[k], label=f"x ≈ {value:g}")
            else:
                part = samples[k * args.n:(k + 1) * args.n]
                jitter = 0.03 * torch.randn(part.shape[0], generator=gen)
                ax.scatter(part[:, 0] + jitter, part[:, 1], s=2, alpha=0.5, color=COLORS[k],
                           label=f"x = {value:g}")
        ax.set_title(title, fontsize=10)
    ax = axes[3]
    ax.scatter(data[:, 0], data[:, 1], s=1, c="0.8", label="data")
    m = args.n // 2
    for k in range(clean.shape[0]):
        part = posterior[k * m:(k + 1) * m]
        ax.scatter(part[:, 0], part[:, 1], s=2, alpha=0.4, color=COLORS[k])
        ax.scatter(*noisy[k], marker="x", s=60, color="k", zorder=3)
        ax.scatter(*clean[k], marker="*", s=90, color=COLORS[k], edgecolor="k", zorder=3)
    ax.scatter([], [], marker="x", color="k", label="noisy y")
    ax.scatter([], [], marker="*", color="w", edgecolor="k", label="original x")
    ax.set_title(f"(d) denoising, σ_n = {noise_std}: samples of p(x | y)", fontsize=10)
    # Fix the view to the data: a few conditional samples stray far off the roll (Euler steps are
    # stiff near t = 0 off the data manifold), and autoscaling to them hides everything else.
    low, high = data.min(0).values - 0.5, data.max(0).values + 0.5
    for ax in axes:
        ax.set_xlim(low[0].item(), high[0].item())
        ax.set_ylim(low[1].item(), high[1].item())
        ax.set_aspect("equal")
        ax.set_xlabel("x")
        ax.legend(fontsize=6, loc="lower left", markerscale=2)
    axes[0].set_ylabel("y")
    fig.suptitle(f"Swissroll conditional generation (VP, toy MLP trained {args.steps} steps, "
                 f"{args.sample_steps} Euler steps)")
    fig.tight_layout()
    save_figure(fig, args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
