r"""Time grids for the fixed-step samplers: decreasing times t_start = t_0 > … > t_N = t_min.

With u_i = i/N and the log-SNR λ(t) = ``sde.log_snr(t)``:

* ``"uniform"``: :math:`t_i = t_0 + u_i (t_{min} - t_0)`;
* ``"quadratic"``: :math:`t_i = t_{min} + (t_0 - t_{min})(1 - u_i)^2` (DDIM's; short steps near the data);
* ``"logsnr"``: uniform in the log-SNR λ(t) (DPM-Solver's), :math:`t_i = λ^{-1}(λ_0 + u_i(λ_N - λ_0))`;
* ``"karras"``: Karras et al. (2022), uniform in :math:`\tilde\sigma^{1/\rho}` with
  :math:`\tilde\sigma = \sigma_t/\alpha_t = e^{-λ/2}`,
  :math:`\tilde\sigma_i = (\tilde\sigma_0^{1/\rho} + u_i(\tilde\sigma_N^{1/\rho} - \tilde\sigma_0^{1/\rho}))^\rho`.

"logsnr" and "karras" need t_min > 0 (λ(0) = +∞).
"""

from __future__ import annotations

import math

import torch

from .utils import check_choice

__all__ = ["time_grid", "SCHEDULES"]

SCHEDULES = ("uniform", "quadratic", "logsnr", "karras")
# Schedules that place points by log-SNR, infinite at t = 0.
_SCHEDULES_NEEDING_POSITIVE_T_MIN = ("logsnr", "karras")


# ---- time grids --------------------------------------------------------------------------------
def _check_n_steps(n_steps) -> int:
    if isinstance(n_steps, bool) or int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer; got {n_steps!r}")
    return int(n_steps)


def time_grid(sde, n_steps: int, schedule: str = "uniform", t_min: float = 0.0,
              t_start: float | None = None, device=None, dtype=None, rho: float = 7.0) -> torch.Tensor:
    r"""Decreasing times t_start = t_0 > … > t_N = t_min (t_start defaults to T), shape (n_steps + 1,).

    With u_i = i/N:

    * ``"uniform"``: :math:`t_i = t_0 + u_i (t_{min} - t_0)`;
    * ``"quadratic"``: :math:`t_i = t_{min} + (t_0 - t_{min})(1 - u_i)^2` (DDIM's; short steps near the data);
    * ``"logsnr"``: uniform in the log-SNR λ(t) (DPM-Solver's), :math:`t_i = λ^{-1}(λ_0 + u_i(λ_N - λ_0))`;
    * ``"karras"``: Karras et al. (2022), uniform in :math:`\tilde\sigma^{1/\rho}` with
      :math:`\tilde\sigma = \sigma_t/\alpha_t = e^{-λ/2}`,
      :math:`\tilde\sigma_i = (\tilde\sigma_0^{1/\rho} + u_i(\tilde\sigma_N^{1/\rho} - \tilde\sigma_0^{1/\rho}))^\rho`.

    "logsnr" and "karras" need t_min > 0 (λ(0) = +∞).
    """
    check_choice("schedule", schedule, SCHEDULES)
    n_steps = _check_n_steps(n_steps)
    t_start = sde.T if t_start is None else float(t_start)
    if not 0.0 < t_start <= sde.T:
        raise ValueError(f"t_start must lie in (0, T={sde.T}]; got {t_start}")
    t_min = float(t_min)
    if schedule in _SCHEDULES_NEEDING_POSITIVE_T_MIN:
        if not 0.0 < t_min < t_start:
            raise ValueError(f"schedule {schedule!r} needs t_min in (0, t_start={t_start}) "
                             f"(the log-SNR is infinite at t = 0); got t_min={t_min}")
    elif not 0.0 <= t_min < t_start:
        raise ValueError(f"t_min must lie in [0, t_start={t_start}); got {t_min}")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a positive number; got {rho!r}")
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
