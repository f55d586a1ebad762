"""Held-out CIFAR-10 bits/dim after a fixed wall-clock training budget, on the user's own path.

Runs exactly what a user runs, in process: ``sdeflow train`` with the command line's defaults and
``--max-seconds B --fit-schedule`` (the cosine decay and the last step fitted to the steps the
budget affords, measured as training runs), then ``sdeflow eval`` on held-out images with the
default estimator (ELBO, time proposal fitted on a pilot batch, EMA weights) and, for scale, with
sdeflow-light's uniform-time slice.

Data: the shared subset ``../shared/data/cifar10-subset`` (4,660 real CIFAR-10 training images)
has no test batch, so the script writes a data root of its own beside the run: the training split
holds ``data_batch_1`` … ``data_batch_4`` (3,728 images, re-chunked into five files) and the test
split ``data_batch_5`` (932 images), which training never sees.

    python benchmarks/cifar_budget.py [--budget-min 12] [--batch-size 16] [--out runs/cifar_budget]
        [-- extra sdeflow train flags, e.g. --precision bf16]
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from sdeflow.cli import main as sdeflow
from sdeflow.data.images import load_cifar10

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-subset"


def write_split(source_root: Path, dest_root: Path) -> tuple[int, int]:
    """A cifar-10-batches-py folder whose train split is batches 1-4 of ``source_root`` and whose
    test split is its batch 5, in the official format. Returns (train images, test images)."""
    images, labels = load_cifar10(source_root, "train", return_labels=True)
    per_file = images.shape[0] // 5
    folder = dest_root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    flat, labels = images.reshape(images.shape[0], -1).numpy(), labels.tolist()
    train, test = slice(0, 4 * per_file), slice(4 * per_file, images.shape[0])
    chunks = np.array_split(np.arange(train.stop), 5)
    for i, index in enumerate(chunks, 1):
        _write_batch(folder / f"data_batch_{i}", flat[index], [labels[j] for j in index])
    _write_batch(folder / "test_batch", flat[test], labels[test])
    return train.stop, images.shape[0] - train.stop


def _write_batch(path: Path, data: np.ndarray, labels: list) -> None:
    with open(path, "wb") as handle:
        pickle.dump({b"data": np.ascontiguousarray(data, dtype=np.uint8), b"labels": labels}, handle, protocol=2)


def _eval(run: Path, root: Path, out: Path, *extra) -> dict:
    code = sdeflow(["eval", "--checkpoint", str(run), "--dataset", "cifar10", "--data-root", str(root),
                    "--split", "test", "--json", str(out), "--no-progress", *extra])
    if code != 0:
        raise SystemExit(f"sdeflow eval failed with exit status {code}")
    return json.loads(out.read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT))
    parser.add_argument("--budget-min", type=float, default=12.0, help="training wall-clock budget in minutes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="runs/cifar_budget")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N held-out images")
    parser.add_argument("--no-uniform", action="store_true", help="skip the uniform-time comparison")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    root, run = out / "data", out / "run"
    n_train, n_test = write_split(Path(args.data_root), root)
    print(f"data: {n_train} training images, {n_test} held out; torch threads {torch.get_num_threads()}")
    limit = ["--limit", str(args.eval_limit)] if args.eval_limit else []

    started = time.perf_counter()
    code = sdeflow(["train", "--dataset", "cifar10", "--data-root", str(root), "--steps", "1000000",
                    "--batch-size", str(args.batch_size), "--max-seconds", str(args.budget_min * 60),
                    "--fit-schedule", "--out", str(run), "--no-progress", *extra])
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"sdeflow train failed with exit status {code}")
    steps = max(int(name.stem.split("-")[1]) for name in run.glob("ckpt-*.pt"))
    fitted = _eval(run, root, out / "eval.json", *limit)
    summary = {"budget_min": args.budget_min, "steps": steps, "batch_size": args.batch_size,
               "seconds_per_step": seconds / steps, "extra_train_flags": extra, "held_out": fitted}
    if not args.no_uniform:
        summary["held_out_uniform_time"] = _eval(run, root, out / "eval_uniform.json", "--time-sampling", "uniform",
                                                 *limit)
    print(f"trained {steps} steps in {seconds / 60:.1f} min ({seconds / steps:.3f} s/step)")
    print(f"held-out bits/dim, default estimator: {fitted['bpd']:.3f} ± {fitted['bpd_se']:.3f} "
          f"over {fitted['n_images']} images ({fitted['seconds']:.0f} s)")
    if "held_out_uniform_time" in summary:
        uniform = summary["held_out_uniform_time"]
        print(f"  uniform-time ELBO (sdeflow-light's slice): {uniform['bpd']:.3f} ± {uniform['bpd_se']:.3f} "
              f"(standard error {uniform['bpd_se'] / fitted['bpd_se']:.1f}x the default's)")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
