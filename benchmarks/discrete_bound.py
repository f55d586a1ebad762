"""DDPM's discrete-time bound and reverse variances (issue 21): sampling quality on toy oracles, and
bits/dim of an image checkpoint beside the continuous ELBO.

    python benchmarks/discrete_bound.py toy [--quick]            # (1) SW₁ at 10, 20, 50 steps
    python benchmarks/discrete_bound.py images RUN_DIR --data-root ROOT [--limit 256] [--chain-steps 1000]

(1) Toy oracles (exact-score networks, ``sdeflow.nets.oracles.ExactScoreNet``: eight 2-D Gaussians and a
64-D mixture of eight), so that only the sampler's error shows: the sliced Wasserstein-1 distance
(``sdeflow.metrics.sliced_wasserstein``) between samples and fresh true samples, the median over
``--repeats`` seeds, for DDPM's ancestral sampler (``sdeflow.samplers.ancestral_sample``) with the
reverse variances β̃ ("posterior"), β ("step"), analytic (Γ estimated on 2,000 training points on the
1000-step grid and read off at each grid's times) and learned (an MLP for the interpolation v, trained
by the hybrid loss with the exact mean on the 1000-step grid), beside the existing samplers at the
same number of network evaluations (NFE; the learned variance's own network is not counted). The
floor is the distance between two independent true sets.

(2) Images: held-out bits/dim of a checkpoint (the newest of RUN_DIR, EMA weights) by the continuous
ELBO (``sdeflow.likelihood.evaluation.evaluate_bpd``, its defaults) and by the discrete bound at N steps with β̃,
β, the analytic variance (Γ estimated on ``--train-images`` dequantized training images) and, for a
model trained with ``sdeflow train --learned-variance``, its learned variance, each
with its standard error over images and its seconds. The discrete bound is a bound on −log₂ P(x)/D of
the 8-bit images (the decoder integrates each pixel's bin), exact over the steps unless
``--n-sampled-steps`` is given.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sdeflow
from sdeflow.discrete import LearnedVariance, estimate_analytic_variance, forward_chain, hybrid_loss
from sdeflow.samplers import ancestral_sample
from sdeflow.nets import MeanAndVariance
from sdeflow.metrics import sliced_wasserstein
from sdeflow.nets.mlp import MLP
from sdeflow.nets.oracles import ExactScoreNet, GaussianMixture

STEPS = (10, 20, 50)
TRAIN_GRID = 1000
# (label, method, λ, NFE per step) of the existing samplers, at their default schedules and t_min.
BASELINES = [("euler λ=0", "euler", 0.0, 1), ("ddim η=1", "ddim", 0.0, 1), ("ddim η=0", "ddim", 1.0, 1),
             ("dpm++2m", "dpm++2m", 1.0, 1), ("heun λ=1", "heun", 1.0, 2)]


def toy_problems(quick: bool) -> dict:
    from sdeflow.data.toy import EIGHT_GAUSSIANS

    gen = torch.Generator().manual_seed(0)
    means = torch.randn(8, 64, generator=gen, dtype=torch.float64)
    stds = 0.1 + 0.4 * torch.rand(8, 64, generator=gen, dtype=torch.float64)
    problems = {"eight gaussians (2-D)": EIGHT_GAUSSIANS}
    if not quick:
        problems["mixture of eight (64-D)"] = GaussianMixture(means, stds)
    return problems


def train_learned_variance(model, data: GaussianMixture, iterations: int, seed: int) -> LearnedVariance:
    """v(y, t) by an MLP, trained by the hybrid loss on the 1000-step grid with the exact mean."""
    torch.manual_seed(seed)
    net = LearnedVariance(MLP(dim=data.dim, hidden=128, n_blocks=2, T=model.T))
    chain = forward_chain(model.sde, chain_steps=TRAIN_GRID)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        loss = hybrid_loss(model, net, data.sample(512, gen), chain, generator=gen).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def variances(model, data, iterations: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    chain = forward_chain(model.sde, chain_steps=TRAIN_GRID)
    analytic = estimate_analytic_variance(model, data.sample(2000, gen), chain, generator=gen)
    start = time.perf_counter()
    learned = train_learned_variance(model, data, iterations, seed)
    print(f"  learned variance: {iterations} hybrid-loss steps in {time.perf_counter() - start:.0f} s")
    return {"DDPM β̃ (posterior)": "posterior", "DDPM β (step)": "step", "analytic": analytic, "learned": learned}


def toy_table(name: str, data: GaussianMixture, n_samples: int, repeats: int, iterations: int) -> None:
    sde = sdeflow.VPSDE()
    model = sdeflow.PluginReverseSDE(sde, ExactScoreNet(sde, data, "noise"), "noise")
    print(f"\n== {name}: SW₁ to the data (median of {repeats}; {n_samples} samples) ==")
    choices = variances(model, data, iterations, seed=1)
    rows: dict[str, list] = {}
    floors = []
    for repeat in range(repeats):
        gen = torch.Generator().manual_seed(100 + repeat)
        truth, other = data.sample(n_samples, gen), data.sample(n_samples, gen)

        def distance(x):
            return sliced_wasserstein(x, truth, generator=torch.Generator().manual_seed(repeat))

        floors.append(distance(other))
        for n_steps in STEPS:
            for label, variance in choices.items():
                x = ancestral_sample(model, variance, n_steps, (n_samples, data.dim), generator=gen)
                rows.setdefault(label, {}).setdefault(n_steps, []).append(distance(x))
            for label, method, lmbd, per_step in BASELINES:
                settings = sdeflow.SamplerSettings(method=method, n_steps=n_steps // per_step, lmbd=lmbd)
                x = sdeflow.sample(model, (n_samples, data.dim), settings, generator=gen)
                rows.setdefault(label, {}).setdefault(n_steps, []).append(distance(x))
    print(f"floor (two true sets): {torch.tensor(floors).median():.4f}")
    print(f"{'sampler':<22}" + "".join(f"{'NFE ' + str(n):>11}" for n in STEPS))
    for label, cells in rows.items():
        print(f"{label:<22}" + "".join(f"{float(torch.tensor(cells[n]).median()):>11.4f}" for n in STEPS))


def run_toy(args) -> None:
    for name, data in toy_problems(args.quick).items():
        toy_table(name, data, args.n_samples, args.repeats, args.iterations)


# ---- (2) images -------------------------------------------------------------------------------------
def run_images(args) -> None:
    """(2): held-out bits/dim of a checkpoint by the continuous ELBO, the discrete bound at N steps with
    β̃, β and analytic variances (sampled steps, and every step on the first images as a check), and the
    ODE on the first images; each row with its standard error and seconds per 100 images."""
    from sdeflow.storage.checkpoints import load_model
    from sdeflow.data.images import load_cifar10
    from sdeflow.likelihood.evaluation import LikelihoodSettings, analytic_variance, evaluate_bpd

    device = torch.device(args.device)
    model, config, step = load_model(args.run, device=device)
    test = load_cifar10(args.data_root, "test")[: args.limit]
    train = load_cifar10(args.data_root, "train")[: args.train_images]
    print(f"checkpoint {args.run} step {step}; {test.shape[0]} held-out images; N = {args.chain_steps}")
    print(f"{'estimator':<58}{'images':>7}{'bits/dim':>10}{'':>9}{'s/100 images':>14}")
    start = time.perf_counter()
    analytic = analytic_variance(model, train, config, args.chain_steps, seed=args.seed, batch_size=args.batch_size)
    print(f"(analytic variance: Γ on {train.shape[0]} training images, 128 log-SNR times, "
          f"{time.perf_counter() - start:.0f} s)")
    discrete = dict(bound="discrete", chain_steps=args.chain_steps)
    choices = [("β̃ (posterior)", "posterior"), ("β (step)", "step"), ("analytic", analytic)]
    exact_choices = [("β̃ (posterior)", "posterior"), ("analytic", analytic)]
    if isinstance(model.net, MeanAndVariance):  # trained with sdeflow train --learned-variance
        choices.append(("learned", "learned"))
        exact_choices.append(("learned", "learned"))
    rows = [("continuous ELBO (sdeflow eval's default)", LikelihoodSettings(), test)]
    for label, variance in choices:
        rows.append((f"discrete, {label}, {args.n_sampled_steps} sampled steps",
                     LikelihoodSettings(variance=variance, sampled_steps=args.n_sampled_steps, **discrete), test))
    for label, variance in exact_choices:
        rows.append((f"discrete, {label}, every step", LikelihoodSettings(variance=variance, **discrete),
                     test[:args.exact_images]))
    rows.append(("probability-flow ODE (tol 1e-5)", LikelihoodSettings(bound="ode"), test[:args.exact_images]))
    results, baseline = {}, {}
    for label, settings, images in rows:
        r = evaluate_bpd(model, images, config, settings, batch_size=args.batch_size, seed=args.seed, device=device)
        per_100 = 100 * r["seconds"] / images.shape[0]
        results[label] = {"bpd": r["bpd"], "bpd_se": r["bpd_se"], "n_images": images.shape[0],
                          "seconds_per_100": per_100, "estimator": r["estimator"],
                          "bpd_per_image": r["bpd_per_image"].tolist()}
        # Against β̃ on the same images: the paired difference, its error free of the spread between images.
        paired = ""
        if settings.bound == "discrete":
            key = (images.shape[0], settings.sampled_steps)
            if key in baseline:
                diff = r["bpd_per_image"] - baseline[key]
                results[label]["vs_posterior"] = [float(diff.mean()), float(diff.std() / diff.numel() ** 0.5)]
                paired = f"   Δ vs β̃ {float(diff.mean()):+.4f} ± {float(diff.std() / diff.numel() ** 0.5):.4f}"
            else:
                baseline[key] = r["bpd_per_image"]
        print(f"{label:<58}{images.shape[0]:>7}{r['bpd']:>10.4f} ± {r['bpd_se']:.4f}{per_100:>14.1f}{paired}",
              flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps({"step": step, "rows": results, "analytic": analytic.to_state()}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    toy = sub.add_parser("toy", help="(1) SW₁ on the toy oracles")
    toy.add_argument("--quick", action="store_true", help="the 2-D oracle only, 2 repeats, 1000 samples")
    toy.add_argument("--n-samples", type=int, default=None)
    toy.add_argument("--repeats", type=int, default=None)
    toy.add_argument("--iterations", type=int, default=None, help="hybrid-loss steps of the learned variance")
    images = sub.add_parser("images", help="(2) bits/dim of an image checkpoint")
    images.add_argument("run", help="a run directory (its newest checkpoint) or a checkpoint file")
    images.add_argument("--data-root", required=True, help="the folder holding cifar-10-batches-py/")
    images.add_argument("--limit", type=int, default=256, help="held-out images scored")
    images.add_argument("--train-images", type=int, default=64, help="training images for Γ of the analytic variance")
    images.add_argument("--chain-steps", type=int, default=1000)
    images.add_argument("--n-sampled-steps", type=int, default=32, help="sampled steps per image")
    images.add_argument("--exact-images", type=int, default=8, help="images of the every-step and ODE rows")
    images.add_argument("--batch-size", type=int, default=64)
    images.add_argument("--seed", type=int, default=0)
    images.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    images.add_argument("--save", default=None, help="write the table and the analytic variance's Γ to this JSON")
    args = parser.parse_args()
    if args.part == "toy":
        args.n_samples = args.n_samples or (1000 if args.quick else 4000)
        args.repeats = args.repeats or (2 if args.quick else 5)
        args.iterations = args.iterations or (300 if args.quick else 2000)
        run_toy(args)
    else:
        run_images(args)


if __name__ == "__main__":
    main()
