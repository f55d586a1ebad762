r"""Time grids for the fixed-step samplers (:func:`time_grid`, one of ``SCHEDULES``) and the rules for
the span [t_min, t_start] a sampler run covers (:func:`check_time_span`).
"""

from __future__ import annotations

import math

import torch

from ..utils import check_choice, check_positive_float, check_positive_int, check_t_min

__all__ = ["time_grid", "check_time_span", "SCHEDULES", "SCHEDULES_NEEDING_POSITIVE_T_MIN"]

SCHEDULES = ("uniform", "quadratic", "logsnr", "karras")
#: Schedules that place points by log-SNR, infinite at t = 0: they need t_min > 0.
SCHEDULES_NEEDING_POSITIVE_T_MIN = ("logsnr", "karras")


def check_time_span(t_min, t_start, T: float, needs_positive_t_min: str | None = None) -> tuple[float, float]:
    """(t_min, t_start) of a sampler run as floats: t_start in (0, T] (None: T) and t_min in
    [0, t_start), or in (0, t_start) when ``needs_positive_t_min`` names what evaluates the log-SNR
    at t_min (e.g. "schedule 'logsnr'"). Otherwise ``ValueError`` naming the argument. The
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
def time_grid(sde, n_steps: int, schedule: str = "uniform", t_min: float = 0.0,
              t_start: float | None = None, device=None, dtype=None, rho: float = 7.0) -> torch.Tensor:
    r"""Decreasing times t_start = t_0 > … > t_N = t_min (t_start defaults to T), shape (n_steps + 1,).

    With u_i = i/N and the log-SNR λ(t) = ``sde.log_snr(t)``:

    * ``"uniform"``: :math:`t_i = t_0 + u_i (t_{min} - t_0)`;
    * ``"quadratic"``: :math:`t_i = t_{min} + (t_0 - t_{min})(1 - u_i)^2` (DDIM's; short steps near the data);
    * ``"logsnr"``: uniform in the log-SNR λ(t) (DPM-Solver's), :math:`t_i = λ^{-1}(λ_0 + u_i(λ_N - λ_0))`;
    * ``"karras"``: Karras et al. (2022), uniform in :math:`\tilde\sigma^{1/\rho}` with
      :math:`\tilde\sigma = \sigma_t/\alpha_t = e^{-λ/2}`,
      :math:`\tilde\sigma_i = (\tilde\sigma_0^{1/\rho} + u_i(\tilde\sigma_N^{1/\rho} - \tilde\sigma_0^{1/\rho}))^\rho`.

    "logsnr" and "karras" need t_min > 0 (λ(0) = +∞).
    """
    check_choice("schedule", schedule, SCHEDULES)
    n_steps = check_positive_int("n_steps", n_steps)
    positive = f"schedule {schedule!r}" if schedule in SCHEDULES_NEEDING_POSITIVE_T_MIN else None
    t_min, t_start = check_time_span(t_min, t_start, sde.T, positive)
    rho = check_positive_float("rho", rho)
    u = torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)
    ends = torch.tensor([t_start, t_min], dtype=torch.float64)
    if schedule == "uniform":
        ts = t_start + u * (t_min - t_start)
    elif schedule == "quadratic":
        ts = t_min + (t_start - t_min) * (1 - u) ** 2
    elif schedule == "logsnr":
        lam_start, lam_end = sde.log_snr(ends)
        ts = sde.t_from_log_snr(lam_start + u * (lam_end - lam_start))
    else:
        sigma_start, sigma_end = torch.exp(-0.5 * sde.log_snr(ends))
        sigmas = (sigma_start ** (1 / rho) + u * (sigma_end ** (1 / rho) - sigma_start ** (1 / rho))) ** rho
        ts = sde.t_from_log_snr(-2 * torch.log(sigmas))
    # The inverse maps round; pin the ends exactly and keep the grid strictly decreasing.
    ts[0], ts[-1] = t_start, t_min
    ts = ts.to(device=device, dtype=dtype)
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"n_steps={n_steps} is too many for schedule {schedule!r} on [{t_min}, {t_start}] "
                         f"in {ts.dtype}: the grid is not strictly decreasing")
    return ts
