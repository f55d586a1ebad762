"""sdeflow: continuous-time diffusion models you can measure.

Train a model, measure its likelihood in bits/dim (an unbiased ELBO or the exact probability-flow
ODE likelihood) and sample from it. Start with the 2-D toy example, `sdeflow swissroll --out
runs/swissroll`, then images: `sdeflow train --dataset cifar10 --data-root DIR --steps N
--batch-size 32 --out RUN`, `sdeflow eval --checkpoint RUN --dataset cifar10 --data-root DIR` and
`sdeflow sample --checkpoint RUN --out grid.png --method dpm++2m --n-steps 20`.
"""

# How this module works: each subcommand lives in a module of sdeflow.commands that defines
# register(subparsers); its handler returns an exit status. Bad input ends in a one-line message
# and exit status 2 (handlers raise CLIError or the library's ValueError), a failure at run time in
# one line and exit status 1, never a traceback. Flags of configuration dataclasses and of the SDE
# registry are built from the library (add_config_arguments, add_sde_arguments), so every setting
# the library has, the command line has.

from __future__ import annotations

import argparse
import importlib
import sys

from .model import check_lmbd
from .utils import (check_fraction, check_nonneg_float, check_nonneg_int, check_positive_float,
                    check_positive_int)

COMMAND_MODULES = ("swissroll", "train", "evaluate", "sampling", "metrics")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---- argument types: the library's own checks; every bad value becomes a one-line argparse error (exit 2)
def arg_type(check, parse=float, name: str = "value"):
    """An argparse type that parses the text with ``parse`` (int or float) and applies the library's
    ``check(name, value)`` (a ``sdeflow.utils.check_*``): the rule is written once, in the library."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = text  # not a number: the check refuses it in its own words
        try:
            return check(name, value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = getattr(check, "__name__", "value")
    return convert


positive_int = arg_type(check_positive_int, int)
nonneg_int = arg_type(check_nonneg_int, int)
positive_float = arg_type(check_positive_float)
nonneg_float = arg_type(check_nonneg_float)
fraction = arg_type(check_fraction)
lmbd = arg_type(lambda name, value: check_lmbd(value), name="lmbd")


def device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:N."""
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"device must be a torch device such as cpu, cuda or cuda:1; "
                                         f"got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device must be cpu or cuda; got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine; use --device cpu")
    return text


def int_list(text: str) -> list[int]:
    """Comma-separated positive integers, e.g. 1,2,2."""
    try:
        values = [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# ---- flags built from the library's configuration dataclasses and registries -------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser, cls, defaults, *, skip=(), aliases=None, required=(), default_help=None) -> None:
    """One flag per field of the dataclass ``cls`` (``--batch-size`` for ``batch_size``), typed,
    with its help text and choices from the field's metadata and the default from ``defaults`` (an
    instance or a dict). ``aliases`` {field: [extra flags]}; ``required`` fields have no default;
    ``default_help`` {field: words} says what the default is where the value alone would not."""
    import dataclasses

    defaults = defaults if isinstance(defaults, dict) else dataclasses.asdict(defaults)
    aliases = aliases or {}
    default_help = default_help or {}
    # One argument group per named group of fields (cls.GROUPS, e.g. TrainConfig's), else one for all.
    sections = getattr(cls, "GROUPS", None) or {"": tuple(f.name for f in dataclasses.fields(cls))}
    titles = {name: parser.add_argument_group(f"{name + ' ' if name else ''}settings of {cls.__module__}.{cls.__name__}")
              for name in sections}
    section_of = {field: name for name, fields in sections.items() for field in fields}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        group = titles[section_of[f.name]]
        flags = [_flag(f.name), *aliases.get(f.name, [])]
        text = f.metadata.get("help", "")
        default = defaults.get(f.name)
        said = f"(default: {default_help[f.name]})" if f.name in default_help else "(default: %(default)s)"
        if f.type in (bool, "bool", "bool | None"):  # --flag and --no-flag, whichever the default is
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None if default is None else bool(default),
                               help=f"{text} {said}")
            continue
        kwargs = {"dest": f.name, "help": f"{text} {said}"}
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices is not None:
            kwargs["choices"] = tuple(choices())
        elif check is not None:
            kwargs["type"] = arg_type(check, int if "int" in str(f.type) else float, f.name)
        if f.name in required:
            kwargs.update(required=True, help=text)
        else:
            kwargs["default"] = default
        group.add_argument(*flags, **kwargs)
    parser.set_defaults(**{f"_config_{cls.__name__}": True})


def config_from_args(cls, args, **extra):
    """An instance of ``cls`` from the parsed flags of :func:`add_config_arguments` (validated if
    ``cls`` has ``validate``), with ``extra`` fields."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(extra)
    config = cls(**values)
    return config.validate() if hasattr(config, "validate") else config


def add_sde_arguments(parser, default: str = "vp") -> None:
    """``--sde NAME`` (choices: sdeflow.sdes.linear.SDES) and one flag per parameter of any registered SDE
    (``--beta-max``, ``--sigma-max``, ...), defaulting to the chosen SDE's own defaults."""
    from .sdes.linear import SDES, sde_parameters

    group = parser.add_argument_group("forward SDE (sdeflow.sdes.linear.SDES)")
    group.add_argument("--sde", choices=tuple(SDES), default=default,
                       help=f"forward SDE: {', '.join(f'{n} ({SDES[n].__name__})' for n in SDES)} (default: %(default)s)")
    owners: dict[str, list[str]] = {}
    types: dict[str, type] = {}
    for name in SDES:
        for param, value in sde_parameters(name).items():
            if value is None:  # settable from Python only (e.g. a given table)
                continue
            owners.setdefault(param, []).append(f"{name}: {value:g}" if isinstance(value, float) else f"{name}: {value}")
            types.setdefault(param, type(value))  # parsed as its default's type; the SDE's __init__ checks it
    for param, owners_of in owners.items():
        group.add_argument(_flag(param), dest=f"sde_{param}", type=types[param], metavar="X",
                           help=f"SDE parameter {param} (defaults {', '.join(owners_of)})")


def sde_from_args(args) -> dict:
    """{"name", **parameters given} for :func:`sdeflow.config.model_config`; a parameter the chosen
    SDE does not have is refused."""
    from .sdes.linear import sde_parameters

    allowed = sde_parameters(args.sde)
    given = {key[len("sde_"):]: value for key, value in vars(args).items()
             if key.startswith("sde_") and value is not None}
    for param in given:
        if param not in allowed:
            raise CLIError(f"{_flag(param)} does not apply to --sde {args.sde} (its parameters: "
                           f"{', '.join(_flag(p) for p in allowed)})")
    return {"name": args.sde, **given}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sdeflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"sdeflow.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"sdeflow.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .engine.errors import TrainingError, TrainingInterrupted
    from .likelihood.evaluation import EvaluationError

    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as stop:
        print(f"sdeflow {args.command}: {stop}; continue with --resume", file=sys.stderr)
        return 128 + stop.signum
    except (TrainingError, EvaluationError) as err:  # a run-time failure, not the user's input
        print(f"sdeflow {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (CLIError, ValueError, ImportError, FileNotFoundError, PermissionError) as err:  # incl. a missing extra
        print(f"sdeflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk filled or a device failed while running: not the user's input
        print(f"sdeflow {args.command}: error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # torch refused an operation while running (e.g. out of memory)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"sdeflow {args.command}: error: {first}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sdeflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
