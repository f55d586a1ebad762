"""``sdeflow train | eval | sample``: image diffusion models from the command line.

These handlers only parse arguments and call :mod:`sdeflow.training`. Exit status: 0 on success,
2 for bad input (one line on stderr), 1 when training fails at run time (non-finite steps, disk
full), 128 + signal number after SIGTERM / Ctrl-C (a checkpoint of the current step is written).
Under ``torchrun`` the same commands run data-parallel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import CLIError, nonneg_int, number, positive_int

DATASETS = ("cifar10", "mnist")
SHAPES = {"cifar10": (3, 32), "mnist": (1, 28)}


# ---------------------------------------------------------------------------------------------
# argument types: every bad value becomes a one-line argparse error (exit 2)
# ---------------------------------------------------------------------------------------------






def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _device(text: str) -> str:
    import torch
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device must be cpu or cuda; got {text!r}")
    return text


def _data_arguments(parser, split_default: str | None = None) -> None:
    parser.add_argument("--dataset", choices=DATASETS, required=True,
                        help="image data set: cifar10 (3x32x32) or mnist (1x28x28)")
    parser.add_argument("--data-root", required=True, metavar="DIR",
                        help="folder holding cifar-10-batches-py/ (CIFAR-10) or the MNIST IDX files")
    parser.add_argument("--download", action="store_true",
                        help="fetch the official archive into --data-root if missing, verify its MD5, unpack it")
    if split_default is not None:
        parser.add_argument("--split", choices=("train", "test"), default=split_default,
                            help=f"which part of the data set to use (default: {split_default})")


def _load_images(args, split: str):
    from ..data import images as data_images

    root = Path(args.data_root)
    if not args.download and not root.is_dir():
        raise CLIError(f"--data-root {root} is not a directory (pass --download to fetch the data set there)")
    loader = data_images.load_cifar10 if args.dataset == "cifar10" else data_images.load_mnist
    return loader(root, split, download=args.download)


def _runtime_errors_exit_1(handler):
    """Run-time failures that are not bad input (a diverged model, a disk that refuses a write):
    one line on stderr and exit status 1."""
    import functools

    @functools.wraps(handler)
    def wrapped(args) -> int:
        from .. import training
        from ..checkpoint import CheckpointWriteError

        try:
            return handler(args)
        except (training.TrainingError, CheckpointWriteError) as err:
            print(f"sdeflow {args.command}: error: {err}", file=sys.stderr)
            return 1
    return wrapped


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def _add_train(subparsers) -> None:
    from ..nets.unet import PRESETS
    from ..training import LR_SCHEDULES, PRECISIONS, SDES

    p = subparsers.add_parser(
        "train", help="train a U-Net diffusion model on CIFAR-10 or MNIST",
        description="Train a U-Net drift network by denoising score matching. Checkpoints, metrics.jsonl and "
                    "sample grids go to --out; --resume continues from its newest checkpoint. Runs "
                    "data-parallel under torchrun (--batch-size is global and must divide across processes).")
    _data_arguments(p)
    p.add_argument("--preset", choices=tuple(PRESETS), default="small",
                   help="U-Net size: small (1.6 M parameters, CPU), cifar10 (35.7 M, DDPM), mnist (default: small)")
    p.add_argument("--base-channels", type=positive_int, help="override the preset's base channel count")
    p.add_argument("--channel-mult", type=_int_list, metavar="M1,M2,...",
                   help="override the preset's channel multipliers, one per resolution level")
    p.add_argument("--num-res-blocks", type=positive_int, help="override residual blocks per level")
    p.add_argument("--attn-resolutions", type=lambda s: [] if s == "none" else _int_list(s), metavar="R1,...|none",
                   help="override the resolutions with self-attention ('none' for none)")
    p.add_argument("--dropout", type=number(0, 1, high_open=True), help="override the dropout probability")
    p.add_argument("--sde", choices=tuple(SDES), default="vp", help="forward SDE (default: vp)")
    p.add_argument("--parameterization", choices=("drift", "score", "noise"), default="noise",
                   help="what the network predicts: the drift a, the score s, or the noise ε (default: noise)")
    p.add_argument("--transform", choices=("logit", "centered", "identity"), default="logit",
                   help="map from dequantised pixels x in [0,1] to model space: logit(0.05 + 0.9x) (default, "
                        "as sdeflow-light), centered 2x-1, or identity")
    p.add_argument("--steps", type=positive_int, required=True, help="total optimizer steps (resume counts from the checkpoint)")
    p.add_argument("--batch-size", type=positive_int, required=True, help="global batch size (split over processes)")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory for checkpoints, metrics.jsonl and grids")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--lr", type=number(0, low_open=True), default=2e-4, help="Adam learning rate (default: 2e-4)")
    p.add_argument("--warmup", type=nonneg_int, default=0, help="linear learning-rate warm-up steps (default: 0)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="constant, or cosine decay to 0 at --steps (default: constant)")
    p.add_argument("--grad-clip", type=number(0), default=1.0,
                   help="clip the global gradient norm to this value; 0 disables (default: 1)")
    p.add_argument("--ema-decay", type=number(0, 1, high_open=True), default=0.999,
                   help="decay of the parameter EMA used for evaluation and sampling (default: 0.999)")
    p.add_argument("--time-sampling", choices=("uniform", "importance"), default="importance",
                   help="distribution of the diffusion time in the loss: uniform, or importance ∝ g²/σ² (default)")
    p.add_argument("--weighting", choices=("noise", "likelihood"), default="likelihood",
                   help="loss weighting: noise (DDPM ε-loss) or likelihood (the ELBO's; default)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default) or bf16 autocast for the forward pass")
    p.add_argument("--max-bad-steps", type=positive_int, default=10,
                   help="stop after this many consecutive steps with a non-finite loss or gradient (default: 10)")
    p.add_argument("--checkpoint-every", type=positive_int, default=1000, help="checkpoint period in steps (default: 1000)")
    p.add_argument("--keep", type=positive_int, default=3, help="keep the newest K checkpoints (default: 3)")
    p.add_argument("--log-every", type=positive_int, default=10, help="metrics.jsonl period in steps (default: 10)")
    p.add_argument("--sample-every", type=nonneg_int, default=0,
                   help="write a grid of EMA samples every N steps; 0 disables (default: 0)")
    p.add_argument("--sample-n", type=positive_int, default=64, help="images per sample grid (default: 64)")
    p.add_argument("--sample-steps", type=positive_int, default=200, help="Euler steps per sample grid (default: 200)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="disable random horizontal flips")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=run_train)


def _model_config(args) -> dict:
    from ..training import default_model_config

    channels, size = SHAPES[args.dataset]
    overrides = {key: getattr(args, key) for key in ("base_channels", "channel_mult", "num_res_blocks",
                                                     "attn_resolutions", "dropout")
                 if getattr(args, key) is not None}
    return default_model_config(args.dataset, args.preset, in_channels=channels, image_size=size,
                                net_overrides=overrides, sde=args.sde, parameterization=args.parameterization,
                                transform=args.transform)


def run_train(args) -> int:
    from .. import checkpoint as ckpt
    from .. import training

    model_config = _model_config(args)
    config = training.TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
        lr_schedule=args.lr_schedule, grad_clip=args.grad_clip or None, ema_decay=args.ema_decay,
        time_sampling=args.time_sampling, weighting=args.weighting, precision=args.precision,
        max_bad_steps=args.max_bad_steps, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep,
        log_every=args.log_every, sample_every=args.sample_every, sample_n=args.sample_n,
        sample_steps=args.sample_steps, seed=args.seed, flip=args.flip, progress=args.progress).validate()
    rank, world, device = training.init_distributed(args.device)
    if args.batch_size % world:
        raise CLIError(f"--batch-size {args.batch_size} does not divide across {world} processes; "
                       f"use a multiple of {world}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    if not args.resume and ckpt.latest_checkpoint(out) is not None:
        raise CLIError(f"--out {out} already holds checkpoints; pass --resume to continue that run "
                       f"or choose another directory")
    if args.resume and ckpt.latest_checkpoint(out) is None:
        raise CLIError(f"--resume: no checkpoint in {out}; start without --resume")
    images = _load_images(args, "train")
    import torch
    torch.manual_seed(args.seed)  # initial weights; every later random choice has its own seeded generator
    model = training.build_model(model_config)
    try:
        result = training.train(model, images, out, config, model_config, resume=args.resume, device=device)
    except training.TrainingInterrupted as stop:
        print(f"sdeflow train: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except (training.TrainingError, ckpt.CheckpointWriteError) as err:
        print(f"sdeflow train: error: {err}", file=sys.stderr)
        return 1
    if rank == 0:
        print(f"trained to step {result['step']} in {result['seconds']:.1f} s "
              f"({result['skipped']} skipped steps); checkpoint: {result['checkpoint']}")
    return 0


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------
def _checkpoint_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a ckpt-*.pt file, or a run directory (its newest checkpoint is used)")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="use the raw trained weights instead of their EMA (the default)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda (default: cpu)")


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="bits/dim of a data set under a trained checkpoint",
        description="Estimate bits/dim of every image of a split: the ELBO (unbiased; default estimator: "
                    "time drawn from a proposal fitted to the model on a pilot batch, lowest variance) or, "
                    "with --ode, the probability-flow ODE likelihood. Prints mean ± standard error. "
                    "Under torchrun the images are split across processes.")
    _checkpoint_arguments(p)
    _data_arguments(p, split_default="test")
    p.add_argument("--n-slices", type=positive_int, default=1,
                   help="ELBO draws (time, noise, probe) per image, averaged (default: 1)")
    p.add_argument("--time-sampling", choices=("fitted", "importance", "uniform"), default="fitted",
                   help="ELBO time proposal: fitted (default, lowest variance), importance ∝ g²/σ², or uniform")
    p.add_argument("--ode", action="store_true", help="probability-flow ODE likelihood instead of the ELBO (reports NFE)")
    p.add_argument("--rtol", type=number(0, low_open=True), default=1e-5, help="ODE relative tolerance (default: 1e-5)")
    p.add_argument("--atol", type=number(0, low_open=True), default=1e-5, help="ODE absolute tolerance (default: 1e-5)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch per process (default: 64)")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N images of the split")
    p.add_argument("--json", metavar="FILE", help="also write bpd, bpd_se, n_images, seconds (nfe with --ode) as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=run_eval)


def _resolve_checkpoint(text: str) -> Path:
    from .. import checkpoint as ckpt

    path = Path(text)
    if path.is_dir():
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            raise CLIError(f"--checkpoint {path} is a directory with no ckpt-*.pt file")
        return latest
    if not path.is_file():
        raise CLIError(f"--checkpoint {path} does not exist")
    return path


def _check_dataset_matches(args, config: dict) -> None:
    if config.get("dataset") != args.dataset:
        raise CLIError(f"the checkpoint was trained on {config.get('dataset')!r}, not --dataset {args.dataset}")


@_runtime_errors_exit_1
def run_eval(args) -> int:
    from .. import training
    from ..checkpoint import atomic_write_bytes

    path = _resolve_checkpoint(args.checkpoint)
    if args.json:
        json_dir = Path(args.json).parent
        if not json_dir.is_dir():
            raise CLIError(f"--json {args.json}: folder {json_dir} does not exist")
    rank, world, device = training.init_distributed(args.device)
    model, config, step = training.load_model(path, use_ema=args.ema, device=device)
    _check_dataset_matches(args, config)
    images = _load_images(args, args.split)
    if args.limit:
        images = images[:args.limit]
    result = training.evaluate_bpd(model, images, config, batch_size=args.batch_size, n_slices=args.n_slices,
                                   time_sampling=args.time_sampling, ode=args.ode, rtol=args.rtol,
                                   atol=args.atol, seed=args.seed, device=device, progress=args.progress)
    if rank != 0:
        return 0
    estimator = "ODE" if args.ode else f"ELBO, {args.time_sampling} time, {args.n_slices} slice(s)"
    summary = {key: result[key] for key in ("bpd", "bpd_se", "n_images", "seconds")}
    if args.ode:
        summary["nfe"] = result["nfe"]
    summary.update({"checkpoint": str(path), "step": step, "split": args.split, "estimator": estimator,
                    "ema": args.ema, "seed": args.seed})
    extra = f", mean NFE {result['nfe']:.0f}" if args.ode else ""
    print(f"{args.split} bits/dim: {result['bpd']:.4f} ± {result['bpd_se']:.4f} "
          f"({result['n_images']} images, {estimator}, {result['seconds']:.1f} s{extra})")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return 0


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------
def _add_sample(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="draw a grid of images from a trained checkpoint",
        description="Integrate the λ-family of generative processes (λ = 0: reverse SDE, 1: probability-flow "
                    "ODE) from the prior with Euler steps and write the images as a PNG grid.")
    _checkpoint_arguments(p)
    p.add_argument("--n", type=positive_int, default=64, help="number of images (default: 64)")
    p.add_argument("--lmbd", type=number(0, 1), default=0.0,
                   help="λ in [0, 1]: 0 reverse SDE (default), 1 probability-flow ODE")
    p.add_argument("--steps", type=positive_int, default=1000, help="Euler steps from T to 0 (default: 1000)")
    p.add_argument("--out", required=True, metavar="PNG", help="output PNG file")
    p.set_defaults(func=run_sample)


@_runtime_errors_exit_1
def run_sample(args) -> int:
    from .. import training

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must name a .png file; got {out}")
    if not out.parent.is_dir() and str(out.parent) not in ("", "."):
        raise CLIError(f"--out {out}: folder {out.parent} does not exist")
    path = _resolve_checkpoint(args.checkpoint)
    model, config, step = training.load_model(path, use_ema=args.ema, device=args.device)
    images = training.sample_images(model, config, args.n, n_steps=args.steps, lmbd=args.lmbd, seed=args.seed)
    training.save_image_grid(images, out, title=f"{config['dataset']} samples, step {step}"
                             f"{' (EMA)' if args.ema else ''}, λ={args.lmbd:g}, {args.steps} Euler steps")
    print(f"wrote {args.n} samples to {out}")
    return 0


def register(subparsers) -> None:
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_sample(subparsers)
