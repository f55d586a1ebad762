"""The settings of one sampler run, shared by the Python API and the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .grids import GRIDS, check_time_span
from ..utils import check_choice, check_positive_int
from .clipping import check_clip, check_threshold
from .registry import METHODS

__all__ = ["SamplerSettings"]


@dataclass(frozen=True)
class SamplerSettings:
    """What a fixed-step sampler run is: ``n_steps`` steps of ``method`` (a key of ``METHODS``) on a
    ``grid`` of times (a key of ``GRIDS``) from the start time down to ``t_min``, integrating
    the λ-family member ``lmbd`` (0: the reverse SDE, 1: the probability-flow ODE), with the
    method's own ``options`` (e.g. ``{"n_corrector": 2}`` for "pc"). None: the method's default.
    ``clip`` = (low, high), the data's range (:func:`sdeflow.data.transforms.data_range`): every
    step sees the data prediction x̂₀ clipped into it, or with ``threshold`` = p (a percentile in
    (0, 100]) dynamically thresholded within it (:mod:`sdeflow.samplers.clipping`); None: x̂₀ as the
    model gives it.

    Build one freely; :meth:`validate` is where every rule is checked and every None resolved.
    ``options`` is kept as a read-only mapping.
    """
    method: str = "euler"
    n_steps: int = 1000
    lmbd: float | None = None
    grid: str | None = None
    t_min: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    clip: tuple[float, float] | None = None
    threshold: float | None = None

    def __post_init__(self):
        if not isinstance(self.options, Mapping):
            raise ValueError(f"options must be a mapping of the method's option names to values; "
                             f"got {type(self.options).__name__}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def __reduce__(self):
        # A mappingproxy does not pickle; the plain dict it wraps does.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return (_rebuild, (fields | {"options": dict(self.options)},))

    def validate(self, T: float, t_start: float | None = None) -> SamplerSettings:
        """These settings checked for a model whose SDE ends at ``T`` and a run that starts at
        ``t_start`` (None: T), with every None replaced by the method's default (t_min: its
        ``default_t_min``·T) and every option of the method present. Rules: ``method`` registered;
        ``n_steps`` a positive integer; ``lmbd`` in the method's ``lmbd_range``; ``grid``
        registered; t_min in [0, t_start), in (0, t_start) for a method with ``needs_positive_t_min``
        or a log-SNR grid; each option accepted by the method and passed by its
        :class:`~sdeflow.samplers.Option` check; ``clip`` None or (low, high), finite, low < high;
        ``threshold`` None or in (0, 100], and only with a ``clip`` range. ``ValueError`` naming the
        setting otherwise."""
        check_choice("method", self.method, tuple(METHODS))
        spec = METHODS[self.method]
        options = spec.resolve_options(self.method, self.options)
        lmbd = spec.default_lmbd if self.lmbd is None else self.lmbd
        low, high = spec.lmbd_range
        if isinstance(lmbd, (bool, str, bytes)) or not low <= lmbd <= high:
            raise ValueError(f"method {self.method!r} supports {spec.lmbd}; got lmbd={lmbd!r}")
        grid = spec.default_grid if self.grid is None else self.grid
        check_choice("grid", grid, tuple(GRIDS))
        t_min = spec.default_t_min * T if self.t_min is None else self.t_min
        needs_positive = (f"method {self.method!r}" if spec.needs_positive_t_min else
                          f"grid {grid!r}" if GRIDS[grid].needs_positive_t_min else None)
        t_min, _ = check_time_span(t_min, t_start, T, needs_positive)
        clip, threshold = check_clip("clip", self.clip), check_threshold("threshold", self.threshold)
        if threshold is not None and clip is None:
            raise ValueError(f"threshold={threshold:g} needs clip, the data range (low, high) it rescales x̂₀ within; "
                             f"got clip=None")
        return SamplerSettings(method=self.method, n_steps=check_positive_int("n_steps", self.n_steps),
                               lmbd=float(lmbd), grid=grid, t_min=t_min, options=options, clip=clip,
                               threshold=threshold)


def _rebuild(fields: dict) -> SamplerSettings:
    return SamplerSettings(**fields)
