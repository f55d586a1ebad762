r"""Time grids for the fixed-step samplers: the registry ``GRIDS`` (:func:`register_grid` adds one),
:func:`time_grid` (a registered grid's times) and :func:`check_times` (the rules any explicit grid
must satisfy), and the rules for the span [t_min, t_start] a sampler run covers
(:func:`check_time_span`).
"""

from __future__ import annotations

import math

import torch

from dataclasses import dataclass
from typing import Callable

from ..utils import check_choice, check_new_name, check_positive_int, check_t_min

__all__ = ["time_grid", "check_times", "check_time_span", "Grid", "GRIDS", "register_grid"]

#: Karras et al.'s ρ.
KARRAS_RHO = 7.0


def check_time_span(t_min, t_start, T: float, needs_positive_t_min: str | None = None) -> tuple[float, float]:
    """(t_min, t_start) of a sampler run as floats: t_start in (0, T] (None: T) and t_min in
    [0, t_start), or in (0, t_start) when ``needs_positive_t_min`` names what evaluates the log-SNR
    at t_min (e.g. "grid 'logsnr'"). Otherwise ``ValueError`` naming the argument. The
    samplers' one statement of these rules."""
    t_start = float(T) if t_start is None else _finite("t_start", t_start)
    if not 0.0 < t_start <= T:
        raise ValueError(f"t_start must lie in (0, T={T}]; got {t_start}")
    if needs_positive_t_min is not None and not 0.0 < _finite("t_min", t_min) < t_start:
        raise ValueError(f"{needs_positive_t_min} needs t_min in (0, t_start={t_start}) (the log-SNR is "
                         f"infinite at t = 0); got t_min={t_min}")
    return check_t_min(t_min, t_start, end="t_start"), t_start


def _finite(name: str, value) -> float:
    try:
        real = None if isinstance(value, (bool, str, bytes)) else float(value)
    except (TypeError, ValueError):
        real = None
    if real is None or not math.isfinite(real):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    return real


# ---- time grids --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A registered time grid. ``place(sde, n_steps, t_start, t_min)`` returns ``n_steps + 1`` float64
    times, t_start = t_0 > … > t_N = t_min for a grid that spans the run (the built-ins; a grid of its
    own, such as diffusers' "leading" spacing, may start and end where it places them, inside [0, T]).
    ``needs_positive_t_min``: the grid evaluates the log-SNR at t_min, infinite at t = 0."""
    place: Callable[..., torch.Tensor]
    needs_positive_t_min: bool = False
    description: str = ""


#: name → :class:`Grid`. Add entries with :func:`register_grid`.
GRIDS: dict[str, Grid] = {}


def register_grid(name: str, place: Callable[..., torch.Tensor], *, needs_positive_t_min: bool = False,
                  description: str = "") -> Grid:
    """Register the time grid ``name`` (see :class:`Grid` for ``place``): every sampler, the command line's
    ``--grid`` and :class:`~sdeflow.samplers.SamplerSettings` then accept it. ``ValueError`` if the
    name is taken or ``place`` is not callable."""
    check_new_name(name, GRIDS, "grid")
    if not callable(place):
        raise ValueError(f"place must be callable as place(sde, n_steps, t_start, t_min); got {place!r}")
    GRIDS[name] = Grid(place, bool(needs_positive_t_min), description)
    return GRIDS[name]


def _log_snr_ends(sde, t_start: float, t_min: float) -> torch.Tensor:
    return sde.log_snr(torch.tensor([t_start, t_min], dtype=torch.float64))


def _uniform(sde, n_steps, t_start, t_min):
    r""":math:`t_i = t_0 + u_i (t_{min} - t_0)`, u_i = i/N."""
    return t_start + torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64) * (t_min - t_start)


def _quadratic(sde, n_steps, t_start, t_min):
    r""":math:`t_i = t_{min} + (t_0 - t_{min})(1 - u_i)^2` (DDIM's; short steps near the data)."""
    return t_min + (t_start - t_min) * (1 - torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)) ** 2


def _logsnr(sde, n_steps, t_start, t_min):
    r"""Uniform in the log-SNR λ(t) (DPM-Solver's): :math:`t_i = λ^{-1}(λ_0 + u_i(λ_N - λ_0))`."""
    lam_start, lam_end = _log_snr_ends(sde, t_start, t_min)
    return sde.t_from_log_snr(lam_start + torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)
                              * (lam_end - lam_start))


def _karras(sde, n_steps, t_start, t_min, rho: float = KARRAS_RHO):
    r"""Karras et al. (2022), uniform in :math:`\tilde\sigma^{1/\rho}` with :math:`\tilde\sigma = \sigma_t/\alpha_t
    = e^{-λ/2}`: :math:`\tilde\sigma_i = (\tilde\sigma_0^{1/\rho} + u_i(\tilde\sigma_N^{1/\rho} - \tilde\sigma_0^{1/\rho}))^\rho`."""
    sigma_start, sigma_end = torch.exp(-0.5 * _log_snr_ends(sde, t_start, t_min))
    u = torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)
    sigmas = (sigma_start ** (1 / rho) + u * (sigma_end ** (1 / rho) - sigma_start ** (1 / rho))) ** rho
    return sde.t_from_log_snr(-2 * torch.log(sigmas))


register_grid("uniform", _uniform, description="equal steps in t")
register_grid("quadratic", _quadratic, description="DDIM's quadratic spacing, short steps near the data")
register_grid("logsnr", _logsnr, needs_positive_t_min=True, description="equal steps in log-SNR (DPM-Solver's)")
register_grid("karras", _karras, needs_positive_t_min=True, description="Karras et al.'s σ^(1/7) spacing")


def check_times(times, T: float, name: str = "times") -> torch.Tensor:
    """An explicit time grid as float64: a 1-D tensor of at least two finite times in [0, T], strictly
    decreasing (the sampler runs from times[0] down to times[-1]); ``ValueError`` naming ``name``."""
    times = torch.as_tensor(times).detach()
    if times.ndim != 1 or times.numel() < 2 or not times.is_floating_point():
        raise ValueError(f"{name} must be a 1-D float tensor of at least 2 times; got shape {tuple(times.shape)} "
                         f"of {times.dtype}")
    times = times.to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(times).all()) or float(times.min()) < 0.0 or float(times.max()) > T:
        raise ValueError(f"{name} must lie in [0, T={T}]; got [{float(times.min())}, {float(times.max())}]")
    if not bool((times[1:] < times[:-1]).all()):
        raise ValueError(f"{name} must be strictly decreasing (from the start time down to t_min)")
    return times


def time_grid(sde, n_steps: int, grid: str = "uniform", t_min: float = 0.0, t_start: float | None = None,
              device=None, dtype=None) -> torch.Tensor:
    r"""The registered ``grid``'s decreasing times t_start = t_0 > … > t_N = t_min (t_start defaults to T),
    shape (n_steps + 1,): "uniform", "quadratic", "logsnr", "karras" (see their functions here), or one
    added by :func:`register_grid`. "logsnr" and "karras" need t_min > 0 (λ(0) = +∞). ``ValueError``
    if the grid is unknown, the span is not allowed, or the grid is not strictly decreasing in ``dtype``."""
    check_choice("grid", grid, tuple(GRIDS))
    spec = GRIDS[grid]
    n_steps = check_positive_int("n_steps", n_steps)
    t_min, t_start = check_time_span(t_min, t_start, sde.T, f"grid {grid!r}" if spec.needs_positive_t_min else None)
    ts = torch.as_tensor(spec.place(sde, n_steps, t_start, t_min), dtype=torch.float64).clone()
    if ts.shape != (n_steps + 1,):
        raise ValueError(f"grid {grid!r} placed {tuple(ts.shape)} times; a grid of n_steps={n_steps} has {n_steps + 1}")
    if grid in ("uniform", "quadratic", "logsnr", "karras"):
        ts[0], ts[-1] = t_start, t_min  # the inverse maps round; pin the ends exactly
    ts = ts.to(device=device, dtype=dtype)
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"n_steps={n_steps} is too many for grid {grid!r} on [{t_min}, {t_start}] "
                         f"in {ts.dtype}: the grid is not strictly decreasing")
    return ts
