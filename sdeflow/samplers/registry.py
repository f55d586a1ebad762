"""The sampler registry: what a fixed-step method is (:class:`Method`, with its :class:`Option` s)
and ``METHODS``, the name -> method table that :func:`sdeflow.samplers.sample`, the conditional
samplers and the command line read. Add a method with :func:`register_method`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .grids import GRIDS
from ..utils import check_choice, check_new_name

__all__ = ["Option", "Method", "METHODS", "register_method"]


@dataclass(frozen=True)
class Option:
    """An option of a :class:`Method`, set in :attr:`SamplerSettings.options`.

    Attributes:
        default: the value used when the option is not given; its type (int, float) is the
            option's type.
        check: ``check(name, value) -> value``: the value, normalized, or ``ValueError`` naming
            ``name`` and what is allowed.
        help: what the option sets, in words.
    """
    default: Any
    check: Callable[[str, Any], Any]
    help: str = ""


@dataclass(frozen=True)
class Method:
    """A fixed-step method for :func:`sdeflow.samplers.sample`.

    Attributes:
        step: ``step(model, x, t, t_next, lmbd, generator, last, state) -> (x_next, nfe)``; t, t_next
            of shape (B,); ``state`` is a dict kept across the steps of one run, which starts as the
            method's resolved options (multistep methods keep their history in it).
        order: convergence order, in words.
        nfe_per_step: network evaluations a step costs, in words or as a number (a Heun step onto
            t = 0 costs 1).
        lmbd: the λ it supports, in words; ``lmbd_range`` the closed interval.
        default_lmbd, default_grid: used when the settings leave them None.
        default_t_min: t_min in units of T used when the settings leave it None.
        needs_positive_t_min: the method evaluates the log-SNR at t_min, so t_min = 0 is refused.
        options: name -> :class:`Option`: the options this method accepts.
        step_nfe: ``step_nfe(options) -> int``, the NFE of one step given the resolved options, for
            a cost that depends on them; None: ``nfe_per_step``, which must then be an int.
    """
    step: Callable
    order: str
    nfe_per_step: int | str
    lmbd: str
    lmbd_range: tuple[float, float] = (0.0, 1.0)
    default_lmbd: float = 0.0
    default_grid: str = "uniform"
    default_t_min: float = 0.0
    needs_positive_t_min: bool = False
    options: Mapping[str, Option] = field(default_factory=dict)
    step_nfe: Callable[[Mapping[str, Any]], int] | None = None

    def resolve_options(self, name: str, given: Mapping[str, Any] | None = None) -> dict:
        """The options of one run: ``given`` checked by each option's own check, defaults for the
        rest. ``name`` is the method's name, for the error: a ``ValueError`` naming any option this
        method does not accept, the ones it does, and the methods that own the refused ones."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            accepted = ", ".join(self.options) if self.options else "none"
            owners = {option: [m for m, spec in METHODS.items() if option in spec.options] for option in unknown}
            hint = "; ".join(f"{option!r} is an option of {', '.join(repr(m) for m in owners[option])}"
                             for option in unknown if owners[option])
            raise ValueError(f"method {name!r} does not accept the option(s) {', '.join(unknown)}; "
                             f"it accepts: {accepted}" + (f" ({hint})" if hint else ""))
        return {option: spec.check(option, given[option]) if option in given else spec.default
                for option, spec in self.options.items()}

    def nfe(self, options: Mapping[str, Any] | None = None) -> int:
        """Network evaluations of one step with ``options`` (missing ones at their defaults)."""
        resolved = {option: spec.default for option, spec in self.options.items()}
        resolved.update(options or {})
        return int(self.step_nfe(resolved)) if self.step_nfe is not None else int(self.nfe_per_step)

    def describe(self) -> str:
        """One line: order, NFE per step, λ and the options with their defaults."""
        options = ", ".join(f"{option}={spec.default!r}" for option, spec in self.options.items())
        return (f"order {self.order}; {self.nfe_per_step} NFE/step; {self.lmbd}, default λ={self.default_lmbd:g}"
                + (f"; options {options}" if options else ""))


def _check_method(name: str, method: Method) -> None:
    if not isinstance(method, Method):
        raise ValueError(f"method must be a sdeflow.samplers.Method; got {type(method).__name__}")
    if not callable(method.step):
        raise ValueError(f"method {name!r}: step must be callable")
    low, high = method.lmbd_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"method {name!r}: lmbd_range must satisfy 0 <= low <= high <= 1; got {method.lmbd_range}")
    if not low <= method.default_lmbd <= high:
        raise ValueError(f"method {name!r}: default_lmbd={method.default_lmbd} lies outside lmbd_range "
                         f"{method.lmbd_range}")
    check_choice(f"method {name!r}: default_grid", method.default_grid, tuple(GRIDS))
    if not 0.0 <= method.default_t_min < 1.0:
        raise ValueError(f"method {name!r}: default_t_min (in units of T) must lie in [0, 1); "
                         f"got {method.default_t_min}")
    for option, spec in method.options.items():
        if not (isinstance(option, str) and option.isidentifier()):
            raise ValueError(f"method {name!r}: option names must be identifiers; got {option!r}")
        if not isinstance(spec, Option):
            raise ValueError(f"method {name!r}: option {option!r} must be a sdeflow.samplers.Option")
        spec.check(option, spec.default)
    if method.step_nfe is None and not isinstance(method.nfe_per_step, int):
        raise ValueError(f"method {name!r}: nfe_per_step={method.nfe_per_step!r} is not a number, "
                         f"so step_nfe(options) must say what a step costs")


METHODS: dict[str, Method] = {}


def register_method(name: str, method: Method) -> Method:
    """Add ``method`` to ``METHODS`` under ``name``, so that :func:`~sdeflow.samplers.sample` (and
    everything built on it: :mod:`sdeflow.samplers.conditional`, the command line) can use it. Refuses a
    name already taken and a ``Method`` whose defaults contradict themselves (``ValueError``).
    Returns ``method``."""
    check_new_name(name, METHODS, "method")
    _check_method(name, method)
    METHODS[name] = method
    return method
