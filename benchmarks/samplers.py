"""Sample quality against network evaluations (NFE) for every sampler and time grid.

    python benchmarks/samplers.py                      # 2-D and 64-D mixture oracles, Swissroll
    python benchmarks/samplers.py --plot samplers.png  # and draw SW₁ against NFE
    python benchmarks/samplers.py --quick              # fewer budgets and repeats, no Swissroll

For each problem it prints the sliced Wasserstein-1 distance (``sdeflow.metrics.sliced_wasserstein``)
between samples and fresh true samples, the median over ``--repeats`` seeds (every method starts a
repeat from the same prior draw x_T), for every method of ``sdeflow.samplers.METHODS`` on every
grid of ``GRIDS`` at several NFE budgets, plus torchdiffeq's adaptive dopri5, against:

- the floor: the distance between two independent true sample sets (what a perfect sampler gets);
- the baseline: 1000-step Euler–Maruyama (λ = 0, uniform grid), measured in the same run.

Problems: an exact-score oracle (``sdeflow.nets.oracles.ExactScoreNet``) for eight 2-D Gaussians and
for a 64-D mixture of ten Gaussians, so that only the sampler's error shows, and a Swissroll MLP
trained here for ``--swissroll-steps`` steps (its samples also carry the learning error).

Targets (issue 5): some method at ≤ 20 NFE within the floor of the baseline's distance
(SW ≤ SW_EM1000 + floor), and at ≤ 10 NFE within 2× of it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
from tqdm import tqdm

import sdeflow
from sdeflow.metrics import sliced_wasserstein
from sdeflow.nets.oracles import ExactScoreNet, GaussianMixture
from sdeflow.samplers import METHODS, SamplerSettings, Trace
from sdeflow.samplers.grids import GRIDS

# (label, method, λ): stochastic variants where the method has them.
VARIANTS = [
    ("euler λ=0", "euler", 0.0), ("euler λ=1", "euler", 1.0),
    ("heun λ=1", "heun", 1.0), ("heun λ=0", "heun", 0.0),
    ("ddim η=0", "ddim", 1.0), ("ddim η=1", "ddim", 0.0),
    ("dpm2", "dpm2", 1.0), ("dpm3", "dpm3", 1.0), ("dpm++2m", "dpm++2m", 1.0),
    ("pc λ=0", "pc", 0.0),
]
NFE_BUDGETS = (5, 10, 20, 50, 100)
HIGH_DIM_NFE_BUDGETS = (5, 10, 20, 50)  # the 64-D oracle costs ~25× more per evaluation
QUICK_NFE_BUDGETS = (10, 20, 50)
DEFAULT_T_MIN = 1e-3  # in units of T, where the grid or the method needs t_min > 0


def eight_gaussians() -> GaussianMixture:
    from sdeflow.data.toy import EIGHT_GAUSSIANS
    return EIGHT_GAUSSIANS


def high_dim_mixture(dim: int = 64, n_components: int = 8, seed: int = 0) -> GaussianMixture:
    """Eight Gaussians in ``dim`` dimensions: means ~ N(0, I), per-coordinate stds ~ U(0.1, 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(n_components, dim, generator=gen, dtype=torch.float64)
    stds = 0.1 + 0.4 * torch.rand(n_components, dim, generator=gen, dtype=torch.float64)
    return GaussianMixture(means, stds)


def trained_swissroll(steps: int, seed: int):
    """A Swissroll MLP trained with the toy example's defaults (:mod:`sdeflow.experiments.toy`) for
    ``steps`` steps, and a sampler of true points."""
    from sdeflow.data import get_dataset
    from sdeflow.engine import ProgressBar
    from sdeflow.experiments.toy import ToyConfig, make_toy_model, toy_train_config, train_toy

    config = ToyConfig(dataset="swissroll", train=toy_train_config(steps=steps, seed=seed, monitor_every=0,
                                                                    warmup_steps=min(200, steps // 10)))
    torch.manual_seed(seed)
    hooks = [ProgressBar(desc="training swissroll")] if sys.stderr.isatty() else []
    with tempfile.TemporaryDirectory() as run_dir:
        model, _, _ = train_toy(make_toy_model(config), config, run_dir, hooks=hooks)
    return model, lambda n, generator: get_dataset("swissroll").sample(n, generator=generator)


def run_config(model, shape, variant, grid, nfe_budget, x_T, generator):
    """Samples and the NFE used by one (method, λ, grid) at about ``nfe_budget`` evaluations."""
    _, method, lmbd = variant
    spec = METHODS[method]
    per_step = spec.nfe()  # at the method's default options (pc: 1 + n_corrector)
    n_steps = max(1, round(nfe_budget / per_step))
    t_min = None
    if grid in ("logsnr", "karras") and spec.default_t_min == 0:
        t_min = DEFAULT_T_MIN * model.T
    trace = Trace()
    settings = SamplerSettings(method=method, n_steps=n_steps, lmbd=lmbd, grid=grid, t_min=t_min)
    x = sdeflow.sample(model, shape, settings, x_T=x_T.clone(), generator=generator, callback=trace)
    return x, trace.nfe


def benchmark_problem(title, model, true_sampler, n_samples, repeats, budgets, n_projections):
    """Returns {"floor", "baseline", "rows": [(label, grid, nfe, sw)], "seconds"}."""
    dim = true_sampler(2, torch.Generator().manual_seed(0)).shape[1]
    shape = (n_samples, dim)
    results: dict[tuple, list] = {}
    floors, baselines = [], []
    configs = [(v, s, b) for v in VARIANTS for s in GRIDS for b in budgets]
    start = time.perf_counter()
    bar = tqdm(total=repeats * (len(configs) + 3), desc=title, disable=not sys.stderr.isatty(), leave=False)
    for repeat in range(repeats):
        gen = torch.Generator().manual_seed(1000 + repeat)
        truth = true_sampler(n_samples, gen).float()
        other = true_sampler(n_samples, gen).float()
        x_T = model.sde.prior_sample(shape, generator=gen)

        def distance(x):
            # The same projections for every sampler in a repeat: differences are not projection noise.
            return sliced_wasserstein(x, truth, n_projections=n_projections,
                                      generator=torch.Generator().manual_seed(repeat))

        floors.append(distance(other))
        bar.update(1)
        x = sdeflow.sample(model, shape, SamplerSettings(method="euler", n_steps=1000, lmbd=0.0), x_T=x_T.clone(),
                           generator=gen)
        baselines.append(distance(x))
        bar.update(1)
        for rtol in (1e-3, 1e-5):
            trace = Trace()
            x = sdeflow.sample_ode(model, shape, rtol=rtol, atol=rtol, x_T=x_T.clone(), callback=trace)
            results.setdefault((f"dopri5 rtol={rtol:g}", "adaptive", rtol), []).append((trace.nfe, distance(x)))
        bar.update(1)
        for variant, grid, budget in configs:
            x, nfe = run_config(model, shape, variant, grid, budget, x_T, gen)
            sw = distance(x) if torch.isfinite(x).all() else math.inf
            results.setdefault((variant[0], grid, budget), []).append((nfe, sw))
            bar.update(1)
    bar.close()
    rows = []
    for (label, grid, _), values in results.items():
        nfe = int(torch.tensor([v[0] for v in values], dtype=torch.float64).median())
        rows.append((label, grid, nfe, float(torch.tensor([v[1] for v in values]).median())))
    return {"floor": float(torch.tensor(floors).median()), "baseline": float(torch.tensor(baselines).median()),
            "rows": rows, "seconds": time.perf_counter() - start}


def print_problem(title, result):
    floor, baseline = result["floor"], result["baseline"]
    print(f"\n== {title} ==  (median of repeats; {result['seconds']:.0f} s)")
    print(f"floor (two true sets): SW = {floor:.4f}    baseline Euler–Maruyama 1000 steps (NFE 1000): "
          f"SW = {baseline:.4f}")
    table = {}
    for label, grid, nfe, sw in result["rows"]:
        table.setdefault((label, grid), []).append((nfe, sw))
    width = max(len(f"{label} [{grid}]") for label, grid in table) + 2
    n_columns = max(len(cells) for cells in table.values())
    print(f"{'method [grid]':<{width}}" + "".join(f"{'NFE':>6}{'SW':>9}" for _ in range(n_columns)))
    sys.stdout.flush()
    for (label, grid), cells in table.items():
        print(f"{label + ' [' + grid + ']':<{width}}" + "".join(f"{nfe:>6d}{sw:>9.4f}" for nfe, sw in cells))
    for limit, bound, text in ((20, baseline + floor, "SW ≤ SW_EM1000 + floor"), (10, 2 * baseline, "SW ≤ 2·SW_EM1000")):
        candidates = [(sw, label, grid, nfe) for label, grid, nfe, sw in result["rows"] if nfe <= limit]
        sw, label, grid, nfe = min(candidates)
        verdict = "MET" if sw <= bound else "NOT MET"
        print(f"target NFE ≤ {limit}: {text} = {bound:.4f}; best: {label} [{grid}] NFE {nfe} "
              f"SW {sw:.4f} ({sw / baseline:.2f}× baseline) -> {verdict}")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip([v[0] for v in VARIANTS], plt.cm.tab10.colors))
    fig, axes = plt.subplots(len(results), len(GRIDS), figsize=(4.2 * len(GRIDS), 3.6 * len(results)),
                             squeeze=False, sharex=True)
    for row, (title, result) in enumerate(results.items()):
        for col, grid in enumerate(GRIDS):
            ax = axes[row, col]
            for label, _, _ in VARIANTS:
                points = sorted((nfe, sw) for lab, sch, nfe, sw in result["rows"] if lab == label and sch == grid)
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, color=colors[label], label=label)
            ode = sorted((nfe, sw) for lab, sch, nfe, sw in result["rows"] if sch == "adaptive")
            ax.plot([p[0] for p in ode], [p[1] for p in ode], "k*", ms=8, label="dopri5 (adaptive)")
            ax.axhline(result["baseline"], color="k", ls="--", lw=1, label="Euler–Maruyama, 1000 NFE")
            ax.axhline(result["floor"], color="gray", ls=":", lw=1.5, label="floor (two true sets)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            # Diverged few-step runs would flatten the interesting range; the table has their values.
            ax.set_ylim(0.5 * min(result["floor"], result["baseline"]), 30 * result["baseline"])
            ax.set_title(f"{title}\nschedule = {grid}", fontsize=9)
            ax.set_xlabel("network evaluations (NFE)")
            if col == 0:
                ax.set_ylabel("sliced Wasserstein-1 to data")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp.name, path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sde", choices=["vp", "subvp", "ve"], default="vp", help="forward SDE of the oracles")
    parser.add_argument("--n-samples", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--high-dim-samples", type=int, default=2000)
    parser.add_argument("--high-dim-repeats", type=int, default=1)
    parser.add_argument("--projections", type=int, default=500)
    parser.add_argument("--dim", type=int, default=64, help="dimension of the high-dimensional oracle")
    parser.add_argument("--swissroll-steps", type=int, default=2000, help="training steps (0: skip Swissroll)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="NFE 10/20/50, 1 repeat, no Swissroll")
    parser.add_argument("--plot", metavar="FILE", help="write SW against NFE as a PNG")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--from-json", metavar="FILE", help="print and plot results saved with --json, no runs")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        for title, result in results.items():
            result["rows"] = [tuple(row) for row in result["rows"]]
            print_problem(title, result)
        if args.plot:
            plot(results, args.plot)
            print(f"\nwrote {args.plot}")
        return
    torch.set_num_threads(args.threads)
    budgets = QUICK_NFE_BUDGETS if args.quick else NFE_BUDGETS
    repeats = 1 if args.quick else args.repeats
    sde = {"vp": sdeflow.VPSDE, "subvp": sdeflow.SubVPSDE, "ve": sdeflow.VESDE}[args.sde]()

    # title -> (model, true sampler, n_samples, repeats, budgets)
    problems = {}
    mixture = eight_gaussians()
    model = sdeflow.PluginReverseSDE(sde, ExactScoreNet(sde, mixture, "score"), "score")
    problems[f"eight Gaussians, 2-D, exact score, {args.sde}"] = (
        model, lambda n, generator, m=mixture: m.sample(n, generator=generator), args.n_samples, repeats, budgets)
    mixture = high_dim_mixture(args.dim)
    model = sdeflow.PluginReverseSDE(sde, ExactScoreNet(sde, mixture, "score"), "score")
    problems[f"{args.dim}-D mixture of 8 Gaussians, exact score, {args.sde}"] = (
        model, lambda n, generator, m=mixture: m.sample(n, generator=generator), args.high_dim_samples,
        1 if args.quick else args.high_dim_repeats, QUICK_NFE_BUDGETS if args.quick else HIGH_DIM_NFE_BUDGETS)
    if args.swissroll_steps > 0 and not args.quick:
        problems[f"Swissroll, MLP trained {args.swissroll_steps} steps, vp"] = (
            *trained_swissroll(args.swissroll_steps, seed=0), args.n_samples, repeats, budgets)

    print(f"sliced Wasserstein-1 (SW) to as many true samples, {args.projections} projections; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    results = {}
    for title, (model, true_sampler, n_samples, n_repeats, problem_budgets) in problems.items():
        print(f"\n{title}: {n_samples} samples, {n_repeats} repeat(s)", flush=True)
        results[title] = benchmark_problem(title, model, true_sampler, n_samples, n_repeats, problem_budgets,
                                           args.projections)
        print_problem(title, results[title])
    if args.json:
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(args.json)), suffix=".json",
                                         delete=False) as tmp:
            json.dump(results, tmp, indent=1)
        os.replace(tmp.name, args.json)
    if args.plot:
        plot(results, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
