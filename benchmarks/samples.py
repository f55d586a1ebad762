"""Samples that look like the data, measured: FID/KID in a classifier's features against the floor of
real held-out images, the confident share, the effective classes, and FID against network
evaluations for every sampler, with and without x̂₀ clipping, for both training objectives.

Runs what a user runs, in process (README, "Samples"): ``sdeflow classifier`` on the training split,
``sdeflow train --objective samples|likelihood``, ``sdeflow fid`` on the samples and ``sdeflow eval``
for bits/dim of the held-out split; the FID-vs-NFE sweep calls the same library functions
(:func:`sdeflow.experiments.images.sample_images`, :func:`sdeflow.metrics.image_metrics`).

Data: the shared subsets have no test split, so the script writes a data root of its own in the data
set's own format: MNIST holds out the last 2,000 of ``../shared/data/mnist-subset`` (``t10k-*``
files), CIFAR-10 the last 932 of ``../shared/data/cifar10-subset`` (``test_batch``, as
benchmarks/cifar_budget.py).

    python benchmarks/samples.py split --dataset mnist --out data/mnist       # only the held-out split
    python benchmarks/samples.py run --dataset mnist --out runs/samples_mnist \\
        [--objectives samples,likelihood] [--steps 1000 --batch-size 64 | --budget-min 12]
        [--sweep ddim,dpm++2m,ancestral,euler,heun:10,20,50,100] [--n-samples 1000] [--sweep-samples 500]

Each stage is skipped when its output exists (delete the file to redo it), so a long run can be
continued; ``summary.json``, ``table.md``, ``fid_vs_nfe.png`` and the sample grids go to --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdeflow.cli import main as sdeflow
from sdeflow.experiments.images import DEFAULT_SAMPLER

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOURCES = {"mnist": SHARED / "mnist-subset", "cifar10": SHARED / "cifar10-subset"}
MNIST_HELD_OUT = 2000


# ---- data -----------------------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist_split(source: Path, dest: Path, n_test: int = MNIST_HELD_OUT) -> tuple[int, int]:
    """An MNIST folder whose train split is all but the last ``n_test`` images of ``source`` and
    whose test split (``t10k-*``) is those last ``n_test``, in the official gzipped IDX format."""
    from sdeflow.data.images import load_mnist

    images, labels = load_mnist(source, "train", return_labels=True)
    images, labels = images[:, 0].numpy(), labels.numpy().astype(np.uint8)
    n_train = images.shape[0] - n_test
    dest.mkdir(parents=True, exist_ok=True)
    for prefix, part in (("train", slice(0, n_train)), ("t10k", slice(n_train, None))):
        _write_idx(dest / f"{prefix}-images-idx3-ubyte.gz", images[part])
        _write_idx(dest / f"{prefix}-labels-idx1-ubyte.gz", labels[part])
    return n_train, n_test


def write_split(dataset: str, source: Path, dest: Path) -> tuple[int, int]:
    if dataset == "mnist":
        return write_mnist_split(source, dest)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cifar_budget import write_split as write_cifar_split

    return write_cifar_split(source, dest)


# ---- stages ---------------------------------------------------------------------------------------
def _run(args: list) -> None:
    args = [str(a) for a in args]
    code = sdeflow(args)
    if code != 0:
        raise SystemExit(f"sdeflow {' '.join(args)} failed with exit status {code}")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def classifier_stage(dataset: str, root: Path, out: Path) -> dict:
    path, report = out / "classifier.pt", out / "classifier.json"
    if not report.exists():
        _run(["classifier", "--dataset", dataset, "--data-root", root, "--out", path, "--json", report,
              "--no-progress"])
    return _json(report)


def train_stage(dataset: str, root: Path, run: Path, objective: str, budget: list) -> dict:
    done = run / "train.json"
    if not done.exists():
        started = time.perf_counter()
        _run(["train", "--dataset", dataset, "--data-root", root, "--objective", objective, "--out", run,
              "--no-progress", *budget])
        steps = max(int(name.stem.split("-")[1]) for name in run.glob("ckpt-*.pt"))
        seconds = time.perf_counter() - started
        done.write_text(json.dumps({"objective": objective, "flags": budget, "steps": steps, "seconds": seconds,
                                    "seconds_per_step": seconds / steps}, indent=2) + "\n")
    return _json(done)


def bpd_stage(dataset: str, root: Path, run: Path, limit: int) -> dict:
    path = run / "eval.json"
    if not path.exists():
        _run(["eval", "--checkpoint", run, "--dataset", dataset, "--data-root", root, "--split", "test",
              "--limit", limit, "--json", path, "--no-progress"])
    return _json(path)


def fid_stage(dataset: str, root: Path, out: Path, name: str, source: list, n_samples: int, sampler: list) -> dict:
    """``sdeflow fid`` against the training split in the classifier's features."""
    path = out / f"fid-{name}.json"
    if not path.exists():
        _run(["fid", *source, "--dataset", dataset, "--data-root", root, "--split", "train",
              "--n-samples", n_samples, "--features", "classifier", "--classifier", out / "classifier.pt",
              "--json", path, "--no-progress", *sampler])
    return _json(path)


def held_out_npz(dataset: str, root: Path, out: Path, n: int) -> Path:
    """The first ``n`` held-out images as an NPZ (key "samples"), for the floor."""
    from sdeflow.data import get_dataset

    path = out / f"held-out-{n}.npz"
    if not path.exists():
        images = get_dataset(dataset).load(root, "test")[:n]
        np.savez(path, samples=images.numpy())
    return path


def sweep_stage(run: Path, out: Path, name: str, classifier: Path, root: Path, dataset: str, methods: list,
                nfe_list: list, n_samples: int, seed: int) -> list:
    """FID (classifier features) of ``n_samples`` EMA samples for every method × budget × clipping, a
    budget of B network evaluations being B // (the method's NFE per step) steps."""
    from sdeflow.storage.checkpoints import load_model
    from sdeflow.data import get_dataset
    from sdeflow.data.transforms import data_range
    from sdeflow.experiments.images import sample_images
    from sdeflow.metrics import image_metrics, load_classifier, reference_statistics
    from sdeflow.plotting import save_image_grid
    from sdeflow.samplers import METHODS, SamplerSettings

    path = out / f"sweep-{name}.json"
    rows = _json(path) if path.exists() else []
    done = {(r["method"], r["n_steps"], r["clip"]) for r in rows}
    model, config, step = load_model(run)
    net = load_classifier(classifier)
    reference = reference_statistics(net, get_dataset(dataset).load(root, "train"), cache=out / "reference-train.npz")
    for method in methods:
        for n_steps in sorted({max(1, nfe // METHODS[method].nfe()) for nfe in nfe_list}):
            for clip in (False, True):
                if (method, n_steps, clip) in done:
                    continue
                settings = SamplerSettings(method=method, n_steps=n_steps,
                                           clip=data_range(config["data"]) if clip else None)
                started = time.perf_counter()
                images = sample_images(model, config, n_samples, settings, seed=seed)
                seconds = time.perf_counter() - started
                metrics = image_metrics(net, images, reference, generator=torch.Generator().manual_seed(seed))
                row = {"method": method, "n_steps": n_steps, "clip": clip,
                       "nfe": METHODS[method].nfe() * n_steps, "sample_seconds": seconds,
                       **{k: v for k, v in metrics.items() if k != "class_counts"}}
                rows.append(row)
                print(f"{name}: {method:>9} {n_steps:>4} steps{' clip' if clip else '     '}: FID {row['fid']:.3f}, "
                      f"KID {row['kid']:.4f} ± {row['kid_se']:.4f}, confident {row['confident_share']:.2f}, "
                      f"classes {row['effective_classes']:.2f} ({seconds:.0f} s)", flush=True)
                path.write_text(json.dumps(rows, indent=2) + "\n")
                if n_steps * METHODS[method].nfe() >= max(nfe_list):
                    save_image_grid(images[:100], out / f"grid-{name}-{method}-{n_steps}{'-clip' if clip else ''}.png",
                                    title=f"{name}: {method}, {n_steps} steps{', x̂₀ clipped' if clip else ''} "
                                          f"(step {step} EMA)")
    return rows


def plot_sweep(rows_by_name: dict, floor: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows_by_name)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = rows_by_name[name]
        for index, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            for clip, style in ((False, "--"), (True, "-")):  # one colour per method: dashed unclipped, solid clipped
                points = sorted((r["nfe"], r["fid"]) for r in rows if r["method"] == method and r["clip"] == clip)
                if points:
                    ax.plot(*zip(*points), style, marker="o", color=f"C{index}",
                            label=f"{method}{' clipped' if clip else ''}")
        ax.axhline(floor, color="k", lw=1, label="floor (real held-out)")
        ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample", ylabel="classifier FID",
               title=f"objective: {name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


def sweep_table(rows: list, floor: float) -> str:
    """Markdown: one row per method, FID without / with clipping at each NFE budget, the floor beside."""
    budgets = sorted({r["nfe"] for r in rows})
    lines = ["| method | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for b in budgets:
            fids = {r["clip"]: r["fid"] for r in rows if r["method"] == method and r["nfe"] == b}
            cells.append(" / ".join(f"{fids[c]:.1f}" if c in fids else "–" for c in (False, True)) if fids else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append(f"\nclassifier FID of {rows[0]['n_samples']} samples, unclipped / x̂₀ clipped; "
                 f"floor (real held-out images) {floor:.1f}")
    return "\n".join(lines) + "\n"


# ---- the command ----------------------------------------------------------------------------------
def run(args) -> None:
    out = Path(args.out)
    root = out / "data"
    if not root.exists():
        n_train, n_test = write_split(args.dataset, Path(args.data_root), root)
        print(f"data: {n_train} training images, {n_test} held out")
    summary = {"dataset": args.dataset, "torch_threads": torch.get_num_threads(), "n_samples": args.n_samples}
    summary["classifier"] = classifier_stage(args.dataset, root, out)
    for n in sorted({args.n_samples, args.sweep_samples}):
        source = ["--samples", held_out_npz(args.dataset, root, out, n)]
        summary[f"floor_{n}"] = fid_stage(args.dataset, root, out, f"floor-{n}", source, n, [])
        print(f"floor: FID {summary[f'floor_{n}']['fid']:.3f} of {n} held-out images", flush=True)
    budget = (["--steps", args.steps, "--batch-size", args.batch_size] if args.steps else
              ["--max-seconds", args.budget_min * 60, "--batch-size", args.batch_size])
    methods, nfe_list = args.sweep.split(":")
    methods, nfe_list = methods.split(","), [int(s) for s in nfe_list.split(",") if s]
    sweeps = {}
    for objective in args.objectives.split(","):
        run_dir = out / f"run-{objective}"
        entry = {"train": train_stage(args.dataset, root, run_dir, objective, [str(b) for b in budget + args.train_flags])}
        sampler = ["--method", args.method, "--n-steps", args.n_steps, "--clip" if args.clip else "--no-clip"]
        name = f"{objective}-{args.method}-{args.n_steps}{'-clip' if args.clip else ''}"
        entry["fid"] = fid_stage(args.dataset, root, out, name,
                                 ["--checkpoint", run_dir], args.n_samples, sampler)
        if args.eval_limit:
            entry["bpd"] = bpd_stage(args.dataset, root, run_dir, args.eval_limit)
        if methods != [""]:
            sweeps[objective] = sweep_stage(run_dir, out, objective, out / "classifier.pt", root, args.dataset,
                                            methods, nfe_list, args.sweep_samples, args.seed)
        summary[objective] = entry
    if sweeps:
        floor = summary[f"floor_{args.sweep_samples}"]["fid"]
        plot_sweep(sweeps, floor, out / "fid_vs_nfe.png")
        (out / "table.md").write_text("\n".join(f"objective {name}:\n\n{sweep_table(rows, floor)}"
                                               for name, rows in sweeps.items()))
        summary["sweeps"] = sweeps
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "sweeps"}, indent=2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    split = sub.add_parser("split", help="write the held-out split only")
    split.add_argument("--dataset", choices=tuple(SOURCES), default="mnist")
    split.add_argument("--data-root", help="the source folder (default: ../shared/data/<dataset>-subset)")
    split.add_argument("--out", required=True)
    full = sub.add_parser("run", help="classifier, training, FID, the sweep")
    full.add_argument("--dataset", choices=tuple(SOURCES), default="mnist")
    full.add_argument("--data-root", help="the source folder (default: ../shared/data/<dataset>-subset)")
    full.add_argument("--out", required=True)
    full.add_argument("--objectives", default="samples,likelihood")
    full.add_argument("--steps", type=int, default=None, help="training steps (else --budget-min)")
    full.add_argument("--budget-min", type=float, default=10.0)
    full.add_argument("--batch-size", type=int, default=64)
    full.add_argument("--n-samples", type=int, default=1000, help="samples of the headline FID")
    full.add_argument("--sweep-samples", type=int, default=500, help="samples per FID of the sweep")
    full.add_argument("--method", default=DEFAULT_SAMPLER["method"], help="the headline sampler of sdeflow fid")
    full.add_argument("--n-steps", type=int, default=DEFAULT_SAMPLER["n_steps"])
    full.add_argument("--clip", action=argparse.BooleanOptionalAction, default=DEFAULT_SAMPLER["clip"],
                      help="the headline sampler clips x̂₀")
    full.add_argument("--sweep", default="ddim,dpm++2m,ancestral,euler,heun:10,20,50,100",
                      help="METHODS:NFE budgets for the FID-vs-NFE sweep (steps = NFE // the method's NFE per "
                           "step); ':' for none")
    full.add_argument("--eval-limit", type=int, default=500, help="held-out images for bits/dim; 0: skip")
    full.add_argument("--seed", type=int, default=0)
    full.add_argument("--train-flags", default="", help="more sdeflow train flags, e.g. '--base-channels 16'")
    args = parser.parse_args(argv)
    args.data_root = args.data_root or str(SOURCES[args.dataset])
    args.train_flags = args.train_flags.split() if getattr(args, "train_flags", "") else []
    if args.stage == "split":
        n_train, n_test = write_split(args.dataset, Path(args.data_root), Path(args.out))
        print(f"wrote {args.out}: {n_train} training images, {n_test} held out")
    else:
        run(args)


if __name__ == "__main__":
    main()
