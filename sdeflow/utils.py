"""Small shape and validation helpers shared by every module."""

from __future__ import annotations

import dataclasses
from dataclasses import field

import math

import torch


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dimensions so that ``x`` (shape (B,) or ()) broadcasts
    against a tensor with ``ndim`` dimensions (shape (B, ...)).

    The one broadcasting rule of the library: a 2-D toy batch and a CIFAR batch share
    one code path.
    """
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a tensor of {x.ndim} dims against {ndim} dims")
    return x.reshape(x.shape + (1,) * missing)


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def check_choice(name: str, value, allowed) -> None:
    """Raise ``ValueError`` naming the argument and what is allowed."""
    if value not in allowed:
        allowed_text = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {allowed_text}; got {value!r}")


def check_new_name(name, registry, what: str) -> str:
    """Return ``name`` if it can key a new entry of ``registry`` (a non-empty string without
    surrounding spaces, not taken yet); otherwise raise ``ValueError`` naming the argument and, for a
    taken name, listing the registered ones. ``what`` says what the registry holds ("SDE", "net")."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"name must be a non-empty string without surrounding spaces; got {name!r}")
    if name in registry:
        article = "an" if what[:1].lower() in "aeio" else "a"
        raise ValueError(f"{article} {what} named {name!r} is already registered; choose another name "
                         f"(registered: {', '.join(registry)})")
    return name


def _as_real(value) -> float | None:
    # A real number (Python, numpy or a 0-d tensor) as a float; None for bools, strings and the rest.
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_integer(value) -> bool:
    real = _as_real(value)
    return real is not None and math.isfinite(real) and real == int(real)


def check_positive_int(name: str, value) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` naming the argument if it is not a positive integer."""
    if not _is_integer(value) or _as_real(value) < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def check_nonneg_int(name: str, value) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` naming the argument if it is not an integer >= 0."""
    if not _is_integer(value) or _as_real(value) < 0:
        raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
    return int(value)


def check_positive_float(name: str, value) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming the argument if it is not a finite number > 0."""
    real = _as_real(value)
    if real is None or not math.isfinite(real) or real <= 0:
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return real


def check_nonneg_float(name: str, value) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming the argument if it is not a finite number >= 0."""
    real = _as_real(value)
    if real is None or not math.isfinite(real) or real < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return real


def check_fraction(name: str, value, meaning: str = "") -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming the argument (and what its ends
    mean, ``meaning``) if it does not lie in [0, 1]."""
    real = _as_real(value)
    if real is None or not 0.0 <= real <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]{' ' + meaning if meaning else ''}; got {value!r}")
    return real


def check_decay(name: str, value) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming the argument if it does not lie in [0, 1)."""
    real = _as_real(value)
    if real is None or not 0.0 <= real < 1.0:
        raise ValueError(f"{name} must lie in [0, 1); got {value!r}")
    return real


def check_finite(name: str, x: torch.Tensor) -> None:
    """Refuse non-finite input data with a ``ValueError`` that names the argument."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf); clean the data first")


def as_time(t, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Turn a float or a tensor of times into a (B,) tensor on ``like``'s device and dtype."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(batch)
    return t


def model_device_dtype(model, device, dtype):
    """``device`` and ``dtype``, each defaulting (None) to that of the model's first parameter
    (no parameters: no device, the default dtype)."""
    param = next(model.parameters(), None)
    device = device if device is not None else (param.device if param is not None else None)
    dtype = dtype if dtype is not None else (param.dtype if param is not None else torch.get_default_dtype())
    return device, dtype


def check_t_min(t_min, T: float, name: str = "t_min", end: str = "T") -> float:
    """Return ``t_min`` as a float if it lies in [0, T), where every estimator and sampler can stop
    (``end`` names T in the message: "T", or a sampler's "t_start"); otherwise raise ``ValueError``
    naming the argument (``name``) and the interval. The one place this rule is written."""
    real = _as_real(t_min)
    if real is None or not 0.0 <= real < T:
        raise ValueError(f"{name} must lie in [0, {end}={T}); got {t_min!r}")
    return real


def config_field(text: str, choices=None, check=None, **kwargs):
    """A field with its help text, its rule and, for a choice, a function returning the allowed values
    (read from the registry that owns them when the command line is built). ``check(name, value) ->
    value`` is the field's rule (a ``sdeflow.utils.check_*``), applied by ``validate`` (to values other
    than None) and by the command line's argument type: each rule is written once. TrainConfig,
    LikelihoodSettings and SamplerSettings build their fields with it."""
    return field(metadata={"help": text, "choices": choices, "check": check}, **kwargs)


def validate_fields(config) -> None:
    """Apply every field's ``check`` (to values other than None) and ``choices`` (to strings: a field may
    take a value in place of a name, its check says which) of a configuration dataclass built with
    :func:`config_field`; ``ValueError`` naming the first bad field."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        if f.metadata.get("choices") is not None and isinstance(value, str):
            check_choice(f.name, value, tuple(f.metadata["choices"]()))
        if f.metadata.get("check") is not None:
            f.metadata["check"](f.name, value)


def log_interval_mass(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(\Phi(b) - \Phi(a))` for a < b (either may be ±∞), accurate in both tails: an
    interval on the positive side is mirrored onto the negative one, where
    :math:`\log(\Phi(b) - \Phi(a)) = \log\Phi(b) + \log(1 - e^{\log\Phi(a) - \log\Phi(b)})`."""
    # Edges beyond ±10⁴ standard deviations are held there, where the mass is exactly 0 or 1 in
    # float64 anyway, so that gradients through a learned variance stay finite.
    lower, upper = lower.clamp(-1e4, 1e4), upper.clamp(-1e4, 1e4)
    mirror = lower > 0
    a = torch.where(mirror, -upper, lower)
    b = torch.where(mirror, -lower, upper)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log(-torch.expm1((log_a - log_b).clamp_max(0.0)))
