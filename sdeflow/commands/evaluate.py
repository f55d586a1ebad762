"""``sdeflow eval``: bits/dim of an image data set under a trained checkpoint.

Only parses arguments and calls :mod:`sdeflow.evaluation` (never the training code).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..cli import CLIError, device, number, positive_int
from .train import add_data_arguments, load_images


def register(subparsers) -> None:
    from ..divergence import ESTIMATORS as DIVERGENCES
    from ..evaluation import DEQUANTIZATIONS
    from ..model import TIME_SAMPLINGS

    p = subparsers.add_parser(
        "eval", help="bits/dim of a data set under a trained checkpoint",
        description="Estimate bits/dim of every image of a split: the ELBO (unbiased; default estimator: "
                    "time drawn from a proposal fitted to the model on a pilot batch, lowest variance) or, "
                    "with --ode, the probability-flow ODE likelihood. Prints mean ± standard error and the "
                    "estimator used, and warns on stderr when a few images carry most of the variance "
                    "(then the standard error itself is unreliable). "
                    "Under torchrun the images are split across processes.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a ckpt-*.pt file, or a run directory (its newest checkpoint is used)")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="use the raw trained weights instead of their EMA (the default)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda (default: cpu)")
    add_data_arguments(p, split_default="test")
    p.add_argument("--n-slices", type=positive_int, default=4,
                   help="ELBO draws (time, noise, probe) per image, one per stratum of the time proposal "
                        "(default: 4; the fitted proposal places its strata where they cut the variance most)")
    p.add_argument("--time-sampling", choices=TIME_SAMPLINGS, default="fitted",
                   help="ELBO time proposal: fitted (default, lowest variance), importance ∝ g²/σ², or uniform")
    p.add_argument("--ode", action="store_true", help="probability-flow ODE likelihood instead of the ELBO (reports NFE)")
    p.add_argument("--divergence", choices=DIVERGENCES, default="hutchinson",
                   help="divergence of the ELBO's or the ODE's drift: hutchinson (default: one random probe per "
                        "image, its noise counted in the standard error) or exact (D times the cost; no probe noise)")
    p.add_argument("--t-min", type=number(0), default=None, metavar="T",
                   help="start the estimator at this time: the ELBO then decodes the data from y_T with a Gaussian "
                        "(default: 1e-5·T), the ODE evaluates the density of the data at T (default: 0, or with "
                        "--dequantization truncated-normal the time whose noise level matches it)")
    p.add_argument("--dequantization", choices=DEQUANTIZATIONS, default="uniform",
                   help="uniform noise in each pixel's bin (default), or the truncated normal of i-DODE with its "
                        "importance weight (for --ode: the ODE starts where the model's noise level matches it)")
    p.add_argument("--rtol", type=number(0, low_open=True), default=1e-5, help="ODE relative tolerance (default: 1e-5)")
    p.add_argument("--atol", type=number(0, low_open=True), default=1e-5, help="ODE absolute tolerance (default: 1e-5)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch per process (default: 64)")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N images of the split")
    p.add_argument("--json", metavar="FILE",
                   help="also write bpd, bpd_se, n_images, seconds, estimator, tail_share, tail_count, kurtosis, "
                        "heavy_tailed (nfe with --ode) as JSON")
    p.add_argument("--per-image", action="store_true",
                   help="also write each image's bits/dim to the --json file (bpd_per_image), e.g. to compare two "
                        "models on the same images with a paired standard error")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from ..checkpoint import atomic_write_bytes
    from ..engine.distributed import init_distributed
    from ..evaluation import evaluate_bpd
    from ..experiments.images import load_model, resolve_checkpoint

    path = resolve_checkpoint(args.checkpoint)
    if args.per_image and not args.json:
        raise CLIError("--per-image writes to the --json file: give --json FILE too")
    if args.json and not Path(args.json).parent.is_dir():
        raise CLIError(f"--json {args.json}: folder {Path(args.json).parent} does not exist")
    rank, world, dev = init_distributed(args.device)
    model, config, step = load_model(path, use_ema=args.ema, device=dev)
    if config.get("dataset") != args.dataset:
        raise CLIError(f"the checkpoint was trained on {config.get('dataset')!r}, not --dataset {args.dataset}")
    images = load_images(args, args.split)
    if args.limit:
        images = images[:args.limit]
    result = evaluate_bpd(model, images, config, batch_size=args.batch_size, n_slices=args.n_slices,
                          time_sampling=args.time_sampling, ode=args.ode, divergence=args.divergence,
                          rtol=args.rtol, atol=args.atol, t_min=args.t_min, dequantization=args.dequantization,
                          seed=args.seed, device=dev, progress=args.progress)
    if rank != 0:
        return 0
    keys = ("bpd", "bpd_se", "n_images", "seconds", "estimator", "tail_share", "tail_count", "kurtosis",
            "heavy_tailed")
    summary = {key: result[key] for key in keys + (("nfe",) if args.ode else ())}
    summary = {key: None if value != value else value for key, value in summary.items()}  # NaN: JSON's null
    summary.update({"checkpoint": str(path), "step": step, "split": args.split, "ema": args.ema, "seed": args.seed})
    if args.per_image:
        summary["bpd_per_image"] = result["bpd_per_image"].tolist()
    extra = f", mean NFE {result['nfe']:.0f}" if args.ode else ""
    print(f"{args.split} bits/dim: {result['bpd']:.4f} ± {result['bpd_se']:.4f} "
          f"({result['n_images']} images, {result['estimator']}, {result['seconds']:.1f} s{extra})")
    if result["heavy_tailed"]:
        print(heavy_tail_warning(result, ode=args.ode), file=sys.stderr)
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return 0


def heavy_tail_warning(result: dict, ode: bool = False) -> str:
    """The one-line warning for a result of :func:`sdeflow.evaluation.evaluate_bpd` whose per-image
    bits/dim are heavy-tailed (its "heavy_tailed")."""
    hint = "" if ode else "; more --n-slices average the estimator's own noise"
    return (f"sdeflow eval: warning: the standard error ± {result['bpd_se']:.4f} is unreliable: the per-image "
            f"bits/dim are heavy-tailed, {result['tail_count']} of {result['n_images']} images carry "
            f"{result['tail_share']:.0%} of their variance (kurtosis {result['kurtosis']:.0f}; a Gaussian's is 3)"
            f"{hint}")
