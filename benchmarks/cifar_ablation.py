"""One-change-at-a-time ablation of the CIFAR-10 training recipe at a fixed wall-clock budget, scored on a
validation split held out from training (never on the test images).

Each row of a round is that round's baseline recipe with ONE change (:data:`ROUNDS`).
Round 1's baseline was the command line's defaults when it was run (preset small, VP SDE, noise
parameterization, logit transform, lr 5e-4, 100 warm-up steps, cosine decay, EMA 0.995,
importance-sampled t with the likelihood weighting, i.e. the ELBO-weighted loss), pinned by
:data:`BASE_1` so that its table can be rerun; its two best changes (lr 1e-3, no attention at 16×16:
preset cpu) became the defaults. Round 2 (the default, ``--round 2``) starts from those defaults;
its four best changes (dropout 0, lr 2e-3, batch 16, constant lr) became the next ones, from which
round 3 (``--round 3 --batch-size 16``) starts.
Every row runs exactly what a user runs, in process: ``sdeflow train --max-seconds B --fit-schedule``
then ``sdeflow eval --split test`` with the default estimator (ELBO, time proposal fitted on a pilot
batch, EMA weights), on the data root below.

Data, and what "validation" means here: the shared subset ``../shared/data/cifar10-subset`` (4,660
real CIFAR-10 training images). Its ``data_batch_1`` … ``data_batch_4`` (its first 3,728 images) are
the training pool of ``benchmarks/cifar_budget.py``; this script splits that pool into a training
part (all but the last ``--val-images``, default 400) and a validation part (the last 400).
``data_batch_5`` (cifar_budget.py's test images) is never read. The script writes a data root of its
own, ``OUT/data``, whose ``data_batch_1..5`` hold the training part (re-chunked into five files) and
whose ``test_batch`` holds the VALIDATION part, so ``sdeflow eval --split test`` on that root scores
validation images, not test images. Choose the recipe on these numbers; report the chosen one once
with cifar_budget.py, on its test images.

Δ vs defaults is a row's bits/dim minus the defaults row's (measured in the same run), with the
paired standard error sd(bpdᵢ − bpdᵢ⁰)/√n over the validation images i (``sdeflow eval --per-image``):
both rows score the same images, so the spread between images, most of each row's own ± SE,
cancels in the difference; what is left is the two models' and estimators' noise.

Results go to ``OUT/ablation.json`` after every row (atomically), so a killed run keeps the rows it
finished; ``--resume`` skips rows whose result is already there (failed rows are run again).

    python benchmarks/cifar_ablation.py [--round 2] [--budget-min 4] [--batch-size 32] [--val-images 400]
        [--rows defaults "lr 2e-3" ...] [--eval-limit N] [--out runs/cifar_ablation2] [--resume]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cifar_budget import DEFAULT_ROOT, _write_batch  # noqa: E402

from sdeflow.cli import main as sdeflow  # noqa: E402

#: (name, extra ``sdeflow train`` flags): each row ONE change from its round's baseline. A row's flags
#: come last on the command line, so its own --batch-size overrides the script's (argparse keeps the
#: last occurrence).
#: Round 1's baseline: the flags that pin the recipe to the defaults it was measured against.
BASE_1 = ["--preset", "small", "--lr", "5e-4", "--lr-schedule", "cosine"]

ROWS_1: list[tuple[str, list[str]]] = [
    ("defaults", []),
    ("lr 2e-4", ["--lr", "2e-4"]),
    ("lr 1e-3", ["--lr", "1e-3"]),
    ("no warm-up", ["--warmup-steps", "0"]),
    ("constant lr", ["--lr-schedule", "constant"]),
    ("EMA 0.999", ["--ema-decay", "0.999"]),
    ("batch 64", ["--batch-size", "64"]),
    # the defaults are --time-sampling importance --weighting likelihood (the ELBO-weighted loss)
    ("uniform t", ["--time-sampling", "uniform"]),
    ("DDPM loss (noise weighting + uniform t)", ["--weighting", "noise", "--time-sampling", "uniform"]),
    ("drift parameterization", ["--parameterization", "drift"]),
    ("no attention", ["--attn-resolutions", "none"]),  # the middle block keeps its attention
    ("wider (base 64)", ["--base-channels", "64"]),  # preset small: base 32
    # the two single changes that helped most, together: the candidate for the new defaults
    ("lr 1e-3 + no attention", ["--lr", "1e-3", "--attn-resolutions", "none"]),
]

#: Round 2's baseline: the command line's defaults after round 1 (preset cpu with dropout 0.1, lr 1e-3
#: with cosine decay, batch 32), pinned so that its table can be rerun.
BASE_2 = ["--dropout", "0.1", "--lr", "1e-3", "--lr-schedule", "cosine"]

ROWS_2: list[tuple[str, list[str]]] = [
    ("defaults", []),
    ("dropout 0", ["--dropout", "0"]),  # preset cpu: 0.1
    ("lr 2e-3", ["--lr", "2e-3"]),
    ("batch 16", ["--batch-size", "16"]),
    ("1 residual block per level", ["--num-res-blocks", "1"]),  # preset cpu: 2
    ("EMA 0.999", ["--ema-decay", "0.999"]),
    ("constant lr", ["--lr-schedule", "constant"]),
    ("centered transform (2x - 1)", ["--transform", "centered"]),  # default: logit
    ("no gradient clipping", ["--grad-clip", "0"]),
    ("no flips", ["--no-flip"]),
    # the loss over the bound that is evaluated: t in [t_σ, T] with the exact likelihood weighting
    # (t_σ = 5.46e-5 for VP and the logit transform: sdeflow.likelihood.evaluation.noise_level_time) instead of
    # [0, T] with the weighting truncated below 10⁻³T
    ("loss from t_σ", ["--loss-t-min", "5.46349e-5"]),
    ("stratified t", ["--stratified-time"]),
    ("velocity parameterization (instead of ε)", ["--parameterization", "velocity"]),
    # the best single changes together: candidates for the new defaults
    ("dropout 0 + lr 2e-3", ["--dropout", "0", "--lr", "2e-3"]),
    ("dropout 0 + lr 2e-3 + constant lr", ["--dropout", "0", "--lr", "2e-3", "--lr-schedule", "constant"]),
    ("dropout 0 + lr 2e-3 + batch 16", ["--dropout", "0", "--lr", "2e-3", "--batch-size", "16"]),
    ("dropout 0 + lr 2e-3 + batch 16 + constant lr",
     ["--dropout", "0", "--lr", "2e-3", "--batch-size", "16", "--lr-schedule", "constant"]),
]

#: Round 3's baseline: the defaults after round 2 (preset cpu without dropout, lr 2e-3 constant), as
#: they are; run it with --batch-size 16, the batch of the README's command.
BASE_3: list[str] = []

ROWS_3: list[tuple[str, list[str]]] = [
    ("defaults", []),
    # the SDE's end point: λ(T) ≈ −5 instead of −10, less of the loss's time at nearly pure noise
    ("beta_max 10 (instead of 20)", ["--beta-max", "10"]),
]

#: round → (baseline flags, rows).
ROUNDS: dict[str, tuple[list[str], list[tuple[str, list[str]]]]] = {
    "1": (BASE_1, ROWS_1), "2": (BASE_2, ROWS_2), "3": (BASE_3, ROWS_3)}

VALIDATION = "validation: last {n} of the training pool; the test split is not used"
POOL_FILES = tuple(f"data_batch_{i}" for i in range(1, 5))  # data_batch_5 = cifar_budget.py's test images


def slug(name: str) -> str:
    """Folder name of a row: lower case, runs of other characters than [a-z0-9.] → '-'."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def _read_pool(source_root: Path) -> tuple[np.ndarray, list]:
    """data_batch_1..4 of the subset (flat uint8 (N, 3072), labels), in file order; batch 5 unread."""
    data, labels = [], []
    for name in POOL_FILES:
        with open(source_root / "cifar-10-batches-py" / name, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3072))
        labels.extend(int(v) for v in batch[b"labels"])
    return np.concatenate(data), labels


def write_validation_split(source_root: Path, dest_root: Path, val_images: int) -> tuple[int, int]:
    """A cifar-10-batches-py folder whose train split (data_batch_1..5) is the training pool less its
    last ``val_images`` images and whose test split (test_batch) is those last images: the
    validation part. Returns (training images, validation images)."""
    flat, labels = _read_pool(source_root)
    n_train = flat.shape[0] - val_images
    if not 0 < val_images < flat.shape[0]:
        raise SystemExit(f"--val-images must lie in 1..{flat.shape[0] - 1}; got {val_images}")
    folder = dest_root / "cifar-10-batches-py"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, index in enumerate(np.array_split(np.arange(n_train), 5), 1):
        _write_batch(folder / f"data_batch_{i}", flat[index], [labels[j] for j in index])
    _write_batch(folder / "test_batch", flat[n_train:], labels[n_train:])
    return n_train, val_images


def _save(path: Path, results: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _batch_size(default: int, flags: list[str]) -> int:
    """The batch size a row trains with: its own last --batch-size, else the script's."""
    size = default
    for i, flag in enumerate(flags):
        if flag == "--batch-size" and i + 1 < len(flags):
            size = int(flags[i + 1])
        elif flag.startswith("--batch-size="):
            size = int(flag.split("=", 1)[1])
    return size


def _sdeflow(argv: list[str]) -> int:
    """``sdeflow argv`` in process, as its exit status: argparse's errors exit (SystemExit) instead
    of returning, and an exception main() does not handle is printed and counted as status 1."""
    try:
        return int(sdeflow(argv) or 0)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except Exception:  # noqa: BLE001 - one row's crash must not end the ablation
        traceback.print_exc()
        return 1


def run_row(name: str, flags: list[str], args, root: Path, rows_dir: Path) -> dict:
    run = rows_dir / slug(name)
    if run.exists():  # a row killed earlier: start it again from scratch
        shutil.rmtree(run)
    record = {"name": name, "slug": slug(name), "flags": flags, "batch_size": _batch_size(args.batch_size, flags)}
    started = time.perf_counter()
    code = _sdeflow(["train", "--dataset", "cifar10", "--data-root", str(root), "--steps", "1000000",
                    "--batch-size", str(args.batch_size), "--max-seconds", str(args.budget_min * 60),
                    "--fit-schedule", "--out", str(run), "--no-progress", *ROUNDS[args.round][0], *flags])
    seconds = time.perf_counter() - started
    if code > 128:  # SIGINT/SIGTERM reached the training loop: stop the ablation, not just the row
        raise SystemExit(f"{name}: training interrupted (exit {code}); rerun with --resume")
    if code != 0:
        return {**record, "status": "failed", "stage": "train", "exit_code": code}
    steps = max((int(p.stem.split("-")[1]) for p in run.glob("ckpt-*.pt")), default=0)
    if steps == 0:
        return {**record, "status": "failed", "stage": "train", "exit_code": code, "why": "no checkpoint"}
    record.update(steps=steps, train_seconds=seconds, seconds_per_step=seconds / steps)
    limit = ["--limit", str(args.eval_limit)] if args.eval_limit else []
    out = run / "eval_validation.json"
    code = _sdeflow(["eval", "--checkpoint", str(run), "--dataset", "cifar10", "--data-root", str(root),
                    "--split", "test", "--json", str(out), "--per-image", "--no-progress", *limit])
    if code > 128:
        raise SystemExit(f"{name}: evaluation interrupted (exit {code}); rerun with --resume")
    if code != 0:
        return {**record, "status": "failed", "stage": "eval", "exit_code": code}
    result = json.loads(out.read_text())
    return {**record, "status": "ok", "bpd": result["bpd"], "bpd_se": result["bpd_se"],
            "n_images": result["n_images"], "estimator": result["estimator"],
            "heavy_tailed": result["heavy_tailed"], "eval_seconds": result["seconds"], "eval": result}


def _line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['name']}: FAILED in {row['stage']} (exit {row['exit_code']})"
    tail = "  [heavy-tailed: SE unreliable]" if row["heavy_tailed"] else ""
    return (f"{row['name']}: {row['bpd']:.4f} ± {row['bpd_se']:.4f} bits/dim over {row['n_images']} validation "
            f"images, {row['steps']} steps at batch {row['batch_size']} ({row['seconds_per_step']:.3f} s/step), "
            f"{row['estimator']}{tail}")


def paired_se(row: dict, base: dict) -> float:
    """sd(bpdᵢ − bpdᵢ⁰)/√n over the images both rows scored."""
    diff = np.asarray(row["eval"]["bpd_per_image"]) - np.asarray(base["eval"]["bpd_per_image"])
    return float(diff.std(ddof=1) / math.sqrt(diff.size))


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["slug"] == slug("defaults") and r["status"] == "ok"), None)
    lines = ["| change | validation bits/dim | ± SE | steps | s/step | Δ vs defaults |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['name']} | failed ({row['stage']}, exit {row['exit_code']}) | | | | |")
            continue
        mark = " ⚠" if row["heavy_tailed"] else ""
        if base is None:
            delta = "—"
        elif row is base:
            delta = "0"
        else:
            delta = f"{row['bpd'] - base['bpd']:+.4f} ± {paired_se(row, base):.4f}"
        lines.append(f"| {row['name']} | {row['bpd']:.4f}{mark} | {row['bpd_se']:.4f} | {row['steps']} | "
                     f"{row['seconds_per_step']:.3f} | {delta} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT), help="the shared subset (cifar-10-batches-py/)")
    parser.add_argument("--budget-min", type=float, default=4.0, help="training wall-clock budget per row, minutes")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of every row without its own")
    parser.add_argument("--val-images", type=int, default=400, help="last N images of the training pool held out")
    parser.add_argument("--round", choices=tuple(ROUNDS), default="2",
                        help="which ablation: 1 (against the pinned former defaults) or 2 (against today's)")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="names or slugs of the rows to run (default: all)")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N validation images")
    parser.add_argument("--out", default=None, help="output folder (default: runs/cifar_ablation<round>)")
    parser.add_argument("--resume", action="store_true", help="keep OUT/ablation.json and skip its finished rows")
    args = parser.parse_args(argv)

    ROWS = ROUNDS[args.round][1]
    chosen = ROWS
    if args.rows:
        known = {key: (name, flags) for name, flags in ROWS for key in (name, slug(name))}
        unknown = [r for r in args.rows if r not in known]
        if unknown:
            parser.error(f"unknown row(s) {unknown}; rows: {', '.join(repr(n) for n, _ in ROWS)}")
        wanted = {known[r][0] for r in args.rows}
        chosen = [(name, flags) for name, flags in ROWS if name in wanted]

    out = Path(args.out or f"runs/cifar_ablation{args.round}")
    path = out / "ablation.json"
    settings = {"round": args.round, "budget_min": args.budget_min, "batch_size": args.batch_size, "val_images": args.val_images,
                "eval_limit": args.eval_limit, "source": str(Path(args.data_root).resolve())}
    results = {"settings": settings, "rows": []}
    if args.resume and path.exists():
        results = json.loads(path.read_text())
        if results.get("settings") != settings:
            raise SystemExit(f"--resume: {path} was run with {results.get('settings')}, not {settings}; "
                             f"its rows would not be comparable")
    elif out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    root = out / "data"
    n_train, n_val = write_validation_split(Path(args.data_root), root, args.val_images)
    results.update(n_train=n_train, n_validation=n_val, validation=VALIDATION.format(n=n_val))
    print(f"data: {n_train} training images; {VALIDATION.format(n=n_val)}; "
          f"{args.budget_min:g} min per row, batch {args.batch_size}; torch threads {torch.get_num_threads()}",
          flush=True)

    order = {slug(name): i for i, (name, _) in enumerate(ROWS)}
    for name, flags in chosen:
        done = next((r for r in results["rows"] if r["slug"] == slug(name)), None)
        if done is not None and done["status"] == "ok":
            print(f"{name}: already in {path}, skipped", flush=True)
            continue
        row = run_row(name, flags, args, root, out / "rows")
        results["rows"] = sorted([r for r in results["rows"] if r["slug"] != row["slug"]] + [row],
                                 key=lambda r: order.get(r["slug"], len(order)))
        _save(path, results)
        print(_line(row), flush=True)

    print()
    print(f"## CIFAR-10 recipe ablation, {args.budget_min:g} min per row "
          f"({VALIDATION.format(n=n_val)}; {n_train} training images)")
    print()
    print(table(results["rows"]))
    print()
    estimators = sorted({r["estimator"] for r in results["rows"] if r["status"] == "ok"})
    heavy = any(r["status"] == "ok" and r["heavy_tailed"] for r in results["rows"])
    if estimators:
        print(f"estimator: {'; '.join(estimators)}. Δ's ± is the paired standard error over the shared "
              f"validation images." + (" ⚠: heavy-tailed per-image bits/dim, the SE is unreliable." if heavy else ""))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
