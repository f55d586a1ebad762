r"""Samplers: plain functions that integrate the generative λ-family of a model from t = T to t_min.

``sample`` runs a fixed-step method on a time grid; ``sample_ode`` solves the probability-flow
ODE adaptively with torchdiffeq. Both hand back the number of network evaluations (NFE).

Euler–Maruyama (``method="euler"``), for a grid T = t_0 > t_1 > … > t_N = t_min and h_i = t_i − t_{i+1}:

.. math::  x_{i+1} = x_i + \mu_\lambda(t_i, x_i)\, h_i + \sigma_\lambda(t_i)\sqrt{h_i}\, z_i,

with no noise on the last step, so samples end at the denoised mean. Strong order ½ (λ < 1),
order 1 for the ODE (λ = 1); one network evaluation per step; any λ ∈ [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from .model import ODE_METHODS, PluginReverseSDE, check_lmbd, odeint_within
from .utils import append_dims, check_choice

__all__ = ["sample", "sample_ode", "time_grid", "METHODS", "SCHEDULES"]

SCHEDULES = ("uniform",)


def time_grid(sde, n_steps: int, schedule: str = "uniform", t_min: float = 0.0,
              t_start: float | None = None, device=None, dtype=None) -> torch.Tensor:
    """Decreasing times t_start = t_0 > … > t_N = t_min (t_start defaults to T), shape (n_steps + 1,)."""
    check_choice("schedule", schedule, SCHEDULES)
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer; got {n_steps!r}")
    t_start = sde.T if t_start is None else float(t_start)
    if not 0.0 < t_start <= sde.T:
        raise ValueError(f"t_start must lie in (0, T={sde.T}]; got {t_start}")
    if not 0.0 <= t_min < t_start:
        raise ValueError(f"t_min must lie in [0, t_start={t_start}); got {t_min}")
    return torch.linspace(t_start, t_min, int(n_steps) + 1, device=device, dtype=dtype)


def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _euler_step(model: PluginReverseSDE, x, t, t_next, lmbd, generator, last):
    h = append_dims(t - t_next, x.ndim)
    x_next = x + model.mu(t, x, lmbd) * h
    if not last and lmbd < 1:
        x_next = x_next + model.sigma(t, x, lmbd) * h.sqrt() * _noise(x, generator)
    return x_next, 1


@dataclass(frozen=True)
class Method:
    """A fixed-step method: ``step(model, x, t, t_next, lmbd, generator, last) -> (x_next, nfe)``."""
    step: Callable
    order: str
    nfe_per_step: int
    lmbd: str
    default_schedule: str = "uniform"
    default_t_min: float = 0.0


METHODS: dict[str, Method] = {
    "euler": Method(_euler_step, order="strong ½ (SDE), 1 (ODE)", nfe_per_step=1, lmbd="[0, 1]"),
}


def _model_device_dtype(model, device, dtype):
    param = next(model.parameters(), None)
    device = device if device is not None else (param.device if param is not None else None)
    dtype = dtype if dtype is not None else (param.dtype if param is not None else torch.get_default_dtype())
    return device, dtype


@torch.no_grad()
def sample(model: PluginReverseSDE, shape, n_steps: int = 1000, lmbd: float = 0.0, method: str = "euler",
           schedule: str | None = None, t_min: float | None = None, t_start: float | None = None,
           x_T: torch.Tensor | None = None,
           project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
           generator: torch.Generator | None = None, device=None, dtype=None,
           return_trajectory: bool = False, return_info: bool = False,
           callback: Callable[[dict], None] | None = None):
    """Draw samples of shape ``shape`` by integrating the λ-family from T to ``t_min`` with ``method``
    (see ``METHODS``) on an ``n_steps`` grid (``schedule``).

    Starts at time ``t_start`` (default T) from ``x_T`` if given, else from the prior drawn with
    ``generator``. ``project(x, t_next)``, if given, replaces the state after every step (inpainting
    re-imposes the observed values with it). ``callback`` is called after every step with
    {"i", "t", "x"}. Returns the samples; with ``return_trajectory``
    also the states (n_steps + 1, *shape); with ``return_info`` also {"nfe": n}, in that order.
    """
    check_choice("method", method, tuple(METHODS))
    spec = METHODS[method]
    lmbd = check_lmbd(lmbd)
    device, dtype = _model_device_dtype(model, device, dtype)
    schedule = spec.default_schedule if schedule is None else schedule
    t_min = spec.default_t_min if t_min is None else t_min
    ts = time_grid(model.sde, n_steps, schedule, t_min, t_start, device=device, dtype=dtype)
    x = model.sde.prior_sample(shape, generator=generator, device=device, dtype=dtype) if x_T is None else x_T
    trajectory = [x] if return_trajectory else None
    nfe = 0
    for i in range(len(ts) - 1):
        t = ts[i].expand(x.shape[0])
        t_next = ts[i + 1].expand(x.shape[0])
        x, n = spec.step(model, x, t, t_next, lmbd, generator, i == len(ts) - 2)
        nfe += n
        if project is not None:
            x = project(x, t_next)
        if trajectory is not None:
            trajectory.append(x)
        if callback is not None:
            callback({"i": i, "t": ts[i + 1], "x": x})
    out = (x,)
    if return_trajectory:
        out += (torch.stack(trajectory),)
    if return_info:
        out += ({"nfe": nfe},)
    return out[0] if len(out) == 1 else out


@torch.no_grad()
def sample_ode(model: PluginReverseSDE, shape, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
               t_min: float = 0.0, x_T: torch.Tensor | None = None, generator: torch.Generator | None = None,
               device=None, dtype=None, return_info: bool = False):
    """Solve the probability-flow ODE dx/dt = f − ½ g a from T down to ``t_min`` with torchdiffeq's
    ``method`` (adaptive ones use ``rtol``/``atol``). Returns samples, and {"nfe": n} with ``return_info``.
    """
    check_choice("method", method, ODE_METHODS)
    if not 0.0 <= t_min < model.T:
        raise ValueError(f"t_min must lie in [0, T={model.T}); got {t_min}")
    device, dtype = _model_device_dtype(model, device, dtype)
    x = model.sde.prior_sample(shape, generator=generator, device=device, dtype=dtype) if x_T is None else x_T
    nfe = 0

    def velocity(t, y):
        nonlocal nfe
        nfe += 1
        return -model.mu(t.expand(y.shape[0]), y, lmbd=1.0)

    x0 = odeint_within(velocity, x, model.T, t_min, rtol=rtol, atol=atol, method=method)
    return (x0, {"nfe": nfe}) if return_info else x0
