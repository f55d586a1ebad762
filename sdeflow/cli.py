"""The ``sdeflow`` command line: argparse subcommands that parse arguments and call the library.

Each subcommand lives in a module of :mod:`sdeflow.commands` that defines
``register(subparsers)``; the handler it sets with ``set_defaults(func=...)`` returns an exit
status. Bad input anywhere ends in a one-line message on stderr and exit status 2, never a
traceback: handlers raise :class:`CLIError` (or ``ValueError`` from the library) for that.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

COMMAND_MODULES = ("swissroll", "images", "sampling")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---- argument types: every bad value becomes a one-line argparse error (exit 2) ----------------
def _integer(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    return _integer(text, 0, "a non-negative integer")


def number(low=None, high=None, low_open=False, high_open=False):
    """An argparse type for a finite float in the interval given by its ends."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = not math.isfinite(value)
        bad |= low is not None and (value < low or (low_open and value == low))
        bad |= high is not None and (value > high or (high_open and value == high))
        if bad:
            lo = "(" if low_open else "["
            hi = ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"expected a number in {lo}{low if low is not None else '-inf'}, "
                                             f"{high if high is not None else 'inf'}{hi}, got {text!r}")
        return value
    return parse


positive_float = number(0, low_open=True)
lmbd = number(0, 1)  # 0: the reverse SDE, 1: the probability-flow ODE
fraction = number(0, 1)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sdeflow", description=__doc__.splitlines()[0])
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
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, PermissionError) as err:
        print(f"sdeflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk filled or a device failed while running: not the user's input
        print(f"sdeflow {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sdeflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
