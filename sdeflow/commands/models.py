"""Which model a command runs: ``--checkpoint`` (a run of ``sdeflow train``) or ``--model`` (one trained
elsewhere), its weights, seed and device, and for a class-conditional model ``--class`` and ``--guidance``.
Shared by sample, inpaint, denoise, fid, eval and classify; argument parsing only."""

from __future__ import annotations

from pathlib import Path

from ..cli import CLIError, arg_type, device
from ..utils import check_nonneg_float, check_nonneg_int


def add_model_arguments(p) -> None:
    """--checkpoint PATH (a model sdeflow trained) or --model SOURCE:LOCATION (one trained elsewhere), and
    --allow-pickle (the opt-in to --model weights stored pickled)."""
    from ..adapters import FOREIGN_SOURCES

    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="PATH",
                       help="a checkpoint written by `sdeflow train`: a ckpt-*.pt file, or its run folder (the newest)")
    which.add_argument("--model", metavar="SOURCE:LOCATION",
                       help=f"a model trained elsewhere, SOURCE one of {', '.join(FOREIGN_SOURCES)}: e.g. "
                            f"diffusers:DIR (a folder written by save_pretrained) or diffusers:HUB_ID "
                            f"(needs pip install sdeflow[diffusers]); weights from safetensors only, unless "
                            f"--allow-pickle")
    p.add_argument("--allow-pickle", action="store_true",
                   help="with --model: also read weights stored pickled (a .bin file, from save_pretrained("
                        "safe_serialization=False)). Unpickling a file can run any code it holds: use this only "
                        "for a model whose source you trust")


def open_model(args, *, every_class: bool = False):
    """(model in eval mode, its configuration, a label for titles) from --checkpoint (its EMA weights unless
    --no-ema) or --model (through :func:`sdeflow.adapters.load_foreign`, pickled weights only with
    --allow-pickle), at --class with --guidance. ``every_class``: the command draws every class itself
    (``--class all``, :func:`class_labels`), so the model is returned as it is."""
    if args.model is not None:
        from ..adapters import PickledWeightsError, load_foreign

        try:
            model, config = load_foreign(args.model, device=args.device, allow_pickle=args.allow_pickle)
        except PickledWeightsError as err:
            raise CLIError(f"--model {args.model}: {err.detail}; pickled weights can run code when read: "
                           f"add --allow-pickle only if you trust its source") from None
        return _with_class(args, model, every_class), config, args.model + _class_text(args)
    if args.allow_pickle:
        raise CLIError("--allow-pickle is for --model (a checkpoint of sdeflow train is read safely without it)")
    from ..storage.checkpoints import load_model

    model, config, step = load_model(_resolve_checkpoint(args.checkpoint), use_ema=args.ema, device=args.device)
    return (_with_class(args, model, every_class), config,
            f"step {step}{' (EMA)' if args.ema else ''}" + _class_text(args))


def _with_class(args, model, every_class: bool):
    """The model at --class with --guidance (classifier-free guidance), or the model as it is (no --class,
    or --class all where the command draws every class)."""
    label, guidance = getattr(args, "class_label", None), getattr(args, "guidance", 0.0)
    if label is None:
        if guidance:
            raise CLIError("--guidance needs --class: the class to guide toward")
        return model
    from ..samplers.guidance import guided

    num_classes = getattr(model.net, "num_classes", 0)
    if not num_classes:
        raise CLIError("--class needs a class-conditional model (sdeflow train --class-conditional); this one "
                       "is unconditional")
    if label == EVERY_CLASS and not every_class:
        raise CLIError("--class all (every class in turn) is for sdeflow sample and sdeflow fid; give one class K")
    if label != EVERY_CLASS and label >= num_classes:
        raise CLIError(f"--class must lie in [0, {num_classes - 1}]; got {label}")
    try:  # the scale checked against the network (guidance needs a null class)
        conditioned = guided(model, 0 if label == EVERY_CLASS else label, guidance)
    except ValueError as err:
        raise CLIError(str(err)) from None
    return model if label == EVERY_CLASS else conditioned  # every class: the command draws them in turn


def class_labels(args, model, n: int, *, per_class: bool):
    """The labels of ``--class all``: ``n`` draws of every class in turn (``per_class``: C·n labels,
    n of class 0, then of class 1, ...; else n labels cycling through the classes); None otherwise."""
    import torch

    if getattr(args, "class_label", None) != EVERY_CLASS:
        return None
    num_classes = model.net.num_classes
    return torch.arange(num_classes).repeat_interleave(n) if per_class else torch.arange(n) % num_classes


def _class_text(args) -> str:
    label = getattr(args, "class_label", None)
    if label is None:
        return ""
    return f", {'every class' if label == EVERY_CLASS else f'class {label}'}, guidance {getattr(args, 'guidance', 0.0):g}"


#: ``--class all``: every class in turn.
EVERY_CLASS = "all"


def _class_arg(text: str):
    """``--class``: a class index K >= 0, or "all"."""
    if text == EVERY_CLASS:
        return text
    return arg_type(check_nonneg_int, int, "class")(text)


def _checkpoint_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--seed", type=arg_type(check_nonneg_int, int, "seed"), default=0,
                   help="seed of every random draw (default: 0)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not their EMA")
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--class", dest="class_label", type=_class_arg, default=None, metavar="K",
                   help="a class-conditional model: draw class K (default: the unconditional model); sample and fid "
                        "take all: every class in turn (sample: one row of --n-samples per class)")
    p.add_argument("--guidance", type=arg_type(check_nonneg_float, float, "guidance"), default=0.0, metavar="W",
                   help="classifier-free guidance scale w >= 0 with --class: ε̂ = (1 + w)·ε̂(x, K) − w·ε̂(x, ∅) "
                        "(default: 0)")


def _resolve_checkpoint(text: str) -> Path:
    from ..storage.checkpoints import resolve_checkpoint

    try:
        return resolve_checkpoint(text)
    except ValueError as err:
        raise CLIError(f"--checkpoint: {err}") from None
