"""Small shape and validation helpers shared by every module."""

from __future__ import annotations

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


def check_positive_int(name: str, value) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` naming the argument if it is not a positive integer."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


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
