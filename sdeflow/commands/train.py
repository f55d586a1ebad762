"""``sdeflow train``: train a U-Net diffusion model on an image data set of the registry.

Only parses arguments and calls :func:`sdeflow.experiments.images.train_images`. Every training
setting is a flag built from :class:`sdeflow.training.TrainConfig`; the SDE and its parameters from
:data:`sdeflow.sdes.linear.SDES`; the data sets from :data:`sdeflow.data.DATASETS`. Under ``torchrun`` the
same command runs data-parallel (``--batch-size`` is global).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..cli import (CLIError, add_config_arguments, add_sde_arguments, arg_type, config_from_args, device, int_list,
                   positive_int, sde_from_args)
from ..utils import check_decay

#: Flags kept from earlier releases of this command.
ALIASES = {"warmup_steps": ["--warmup"], "keep_checkpoints": ["--keep"], "sample_n_samples": ["--sample-n"],
           "sample_n_steps": ["--sample-steps"]}


def image_datasets() -> tuple[str, ...]:
    from ..data import DATASETS

    return tuple(name for name, entry in DATASETS.items() if entry.kind == "image")


def add_data_arguments(parser, split_default: str | None = None) -> None:
    """--dataset (image sets of the registry), --data-root, --download and, if given a default, --split."""
    from ..data import DATASETS

    names = image_datasets()
    parser.add_argument("--dataset", choices=names, required=True,
                        help="image data set: " + ", ".join(f"{n} ({DATASETS[n].description})" for n in names))
    parser.add_argument("--data-root", required=True, metavar="DIR",
                        help="folder holding the data set's files (cifar-10-batches-py/ for CIFAR-10)")
    parser.add_argument("--download", action="store_true",
                        help="fetch the official archive into --data-root if missing, verify its MD5, unpack it")
    if split_default is not None:
        parser.add_argument("--split", choices=("train", "test"), default=split_default,
                            help=f"which part of the data set to use (default: {split_default})")


def load_images(args, split: str, labels: bool = False):
    """The uint8 images of ``args.dataset`` (split ``split``) from ``args.data_root``; with ``labels``,
    (images, labels)."""
    from ..data import get_dataset

    root = Path(args.data_root)
    if not args.download and not root.is_dir():
        raise CLIError(f"--data-root {root} is not a directory (pass --download to fetch the data set there)")
    dataset = get_dataset(args.dataset)
    if labels and not dataset.num_classes:
        raise CLIError(f"--dataset {args.dataset} has no labels: a class-conditional model needs a labelled data set")
    if labels:
        return dataset.load(root, split, download=args.download, return_labels=True)
    return dataset.load(root, split, download=args.download)


def register(subparsers) -> None:
    from ..training import TrainConfig
    from ..data.transforms import TRANSFORMS
    from ..experiments.images import CPU_BUDGET_RECIPE
    from ..training.objectives import OBJECTIVES
    from ..engine import HOOKS
    from ..model import PARAMETERIZATIONS
    from ..nets.unet import DEFAULT_PRESET, PRESETS

    p = subparsers.add_parser(
        "train", help="train a U-Net diffusion model on an image data set",
        description="Train a U-Net by denoising score matching. Checkpoints, metrics.jsonl and sample grids "
                    "go to --out; --resume continues from its newest checkpoint. Runs data-parallel under "
                    "torchrun (--batch-size is global and must divide across processes).")
    add_data_arguments(p)
    p.add_argument("--out", required=True, metavar="RUN", help="run directory for checkpoints, metrics.jsonl and grids")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--hook", action="append", default=[], choices=tuple(HOOKS), metavar="NAME",
                   help=f"extra logging hook from sdeflow.engine.HOOKS ({', '.join(HOOKS)}); repeatable")
    net = p.add_argument_group("network (sdeflow.nets.unet)")
    net.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET,
                     help=f"U-Net size: cpu (1.6 M parameters, no attention at 16x16, no dropout: the fastest on a "
                          f"CPU), small (the same with both, sdeflow-light's), cifar10 (35.7 M, DDPM), mnist (default: {DEFAULT_PRESET})")
    net.add_argument("--base-channels", type=positive_int, help="override the preset's base channel count")
    net.add_argument("--channel-mult", type=int_list, metavar="M1,M2,...",
                     help="override the preset's channel multipliers, one per resolution level")
    net.add_argument("--num-res-blocks", type=positive_int, help="override residual blocks per level")
    net.add_argument("--attn-resolutions", type=lambda s: [] if s == "none" else int_list(s), metavar="R1,...|none",
                     help="override the resolutions with self-attention ('none' for none)")
    net.add_argument("--dropout", type=arg_type(check_decay, name="dropout"),
                     help="override the dropout probability, in [0, 1)")
    net.add_argument("--learned-variance", action="store_true",
                     help="the U-Net also outputs the reverse variance of the discrete model (improved DDPM's "
                          "learned Σ), trained with --vlb-weight times the discrete bound's terms on a "
                          "--chain-steps chain; evaluate with sdeflow eval --bound discrete --variance learned")
    net.add_argument("--class-conditional", action="store_true",
                     help="a class-conditional U-Net trained on the data set's labels, each dropped to the null "
                          "class with probability --p-uncond (classifier-free guidance); sample it with "
                          "sdeflow.guided")
    add_sde_arguments(p)
    model = p.add_argument_group("model")
    model.add_argument("--objective", choices=tuple(OBJECTIVES), default="likelihood",
                       help="what the model is trained to be good at, a named recipe of the flags below: "
                            + "; ".join(f"{name}: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                                  for k, v in objective.settings.items())
                                        for name, objective in OBJECTIVES.items())
                            + ". A flag given explicitly wins (default: %(default)s)")
    model.add_argument("--parameterization", choices=PARAMETERIZATIONS, default=None,
                       help="what the network predicts: the drift a, the score s, the noise ε, or the velocity "
                            "α·ε − σ·x (default: the objective's)")
    model.add_argument("--transform", choices=TRANSFORMS, default=None,
                       help="map from dequantised pixels x in [0,1] to model space: logit(0.05 + 0.9x) "
                            "(sdeflow-light's), centered 2x-1, or identity (default: the objective's)")
    # None marks "not given": the objective and the budget recipe fill these in (resolve_recipe).
    unset = {name: None for name in ("steps", "max_seconds", "fit_schedule", "flip",
                                     *(key for objective in OBJECTIVES.values() for key in objective.settings))}
    add_config_arguments(p, TrainConfig, {**{f.name: f.default for f in dataclasses.fields(TrainConfig)},
                                          **CPU_BUDGET_RECIPE, **unset}, aliases=ALIASES,
                         default_help={
                             "steps": f"none: the CPU budget recipe, {CPU_BUDGET_RECIPE['max_seconds']:g} s of "
                                      "training with the schedule fitted to the steps it affords",
                             "max_seconds": f"{CPU_BUDGET_RECIPE['max_seconds']:g} without --steps, else no limit",
                             "fit_schedule": "on without --steps, else off",
                             "flip": "on for mirror-symmetric data sets (CIFAR-10), off for digits",
                             **{key: "the --objective's" for objective in OBJECTIVES.values() for key in objective.settings}})
    p.set_defaults(func=run_train)


def resolve_recipe(args) -> None:
    """Fill in what the user left unset: the ``--objective``'s settings (training.OBJECTIVES), and the CPU
    budget (CPU_BUDGET_RECIPE: a 720-second run with its schedule fitted to the time) only when no
    ``--steps`` is given; with ``--steps N`` training runs N steps unless ``--max-seconds`` is given.
    ``--max-seconds 0`` means no limit."""
    from ..experiments.images import CPU_BUDGET_RECIPE
    from ..training.objectives import OBJECTIVES

    for key, value in OBJECTIVES[args.objective].settings.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    budget = CPU_BUDGET_RECIPE if args.steps is None else {"fit_schedule": False}
    for key in ("steps", "max_seconds", "fit_schedule"):
        if getattr(args, key) is None:
            setattr(args, key, budget.get(key))
    if args.max_seconds == 0:
        args.max_seconds = None


def _model_config(args) -> dict:
    from ..data import get_dataset
    from ..experiments.images import image_model_config

    channels, size, _ = get_dataset(args.dataset).shape
    overrides = {key: getattr(args, key) for key in ("base_channels", "channel_mult", "num_res_blocks",
                                                     "attn_resolutions", "dropout")
                 if getattr(args, key) is not None}
    if args.learned_variance:
        overrides["learned_variance"] = True
    if args.class_conditional:
        overrides["num_classes"] = get_dataset(args.dataset).num_classes
    return image_model_config(args.dataset, args.preset, in_channels=channels, image_size=size,
                              net_overrides=overrides, sde=sde_from_args(args),
                              parameterization=args.parameterization, transform=args.transform)


def run_train(args) -> int:
    import torch

    from ..storage.checkpoints import check_run_dir
    from ..config import build_model
    from ..training import TrainConfig, build_objective
    from ..engine.distributed import check_batch_divides
    from ..engine import ProgressBar, init_distributed, make_hook
    from ..experiments.images import train_images

    resolve_recipe(args)
    model_config = _model_config(args)
    config = config_from_args(TrainConfig, args, grad_clip=args.grad_clip or None)
    rank, world, dev = init_distributed(args.device)
    check_batch_divides(config.batch_size, world)
    check_run_dir(args.out, args.resume)
    images, labels = load_images(args, "train", labels=True) if args.class_conditional else (
        load_images(args, "train"), None)
    torch.manual_seed(args.seed)  # initial weights; every later random choice has its own seeded generator
    model = build_model(model_config)
    hooks = [make_hook(name) for name in args.hook] + ([ProgressBar()] if args.progress else [])
    objective = build_objective(args.objective, model, config, model_config["data"])
    result = train_images(model, images, args.out, config, model_config, resume=args.resume, device=dev, hooks=hooks,
                          objective=objective, labels=labels)
    if rank == 0:
        print(f"trained to step {result['step']} in {result['seconds']:.1f} s "
              f"({result['skipped']} skipped steps); checkpoint: {result['checkpoint']}")
    return 0
