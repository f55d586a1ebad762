r"""The torchdiffeq glue and the probability-flow velocity, written once.

The probability-flow ODE of a model is the λ = 1 member of its generative family,

.. math::  \frac{dy}{dt} = v(y, t) = -\mu_1(y, t) = f(y, t) - \tfrac12 g(t)\, a(y, t),

integrated from T down to the data by :func:`sample_ode` and from the data up to T by
:func:`log_prob_ode` (with the divergence of v alongside).
Both use :func:`probability_flow_velocity`, which counts network evaluations, and
:func:`odeint_within`, which keeps adaptive solvers inside [0, T]. ``solver`` is one of ``SOLVERS``:
the adaptive ``ADAPTIVE_SOLVERS`` (rtol/atol) or the fixed-grid ``FIXED_GRID_SOLVERS`` (a step size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torchdiffeq import odeint

from .divergence import DIVERGENCES, make_probe
from .divergence import divergence as field_divergence
from .elbo import decoder_log_weight, default_t_min
from ..samplers.grids import check_time_span
from ..utils import check_choice, check_finite, check_t_min, model_device_dtype

if TYPE_CHECKING:
    from ..model import PluginReverseSDE

__all__ = ["sample_ode", "log_prob_ode", "odeint_within", "probability_flow_velocity", "SOLVERS", "ADAPTIVE_SOLVERS",
           "FIXED_GRID_SOLVERS"]

ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
SOLVERS = ADAPTIVE_SOLVERS + ("rk4", "midpoint", "euler")
FIXED_GRID_SOLVERS = tuple(m for m in SOLVERS if m not in ADAPTIVE_SOLVERS)


def odeint_within(func, y0, t0: float, t1: float, *, rtol: float, atol: float, solver: str):
    """torchdiffeq's odeint from t0 to t1, returning the state at t1. Adaptive solvers are made to
    land on t1 rather than step past it, since the SDE coefficients may be undefined beyond
    [0, T] (v(t) < 0 for t < 0)."""
    like = y0[0] if isinstance(y0, tuple) else y0
    times = torch.tensor([t0, t1], dtype=like.dtype, device=like.device)
    options = {"step_t": times[1:]} if solver in ADAPTIVE_SOLVERS else None
    out = odeint(func, y0, times, rtol=rtol, atol=atol, method=solver, options=options)
    return tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]


def probability_flow_velocity(model: PluginReverseSDE) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The function torchdiffeq integrates, ``velocity(t, y) = −μ₁(y, t) = f − ½ g a`` with t a
    scalar tensor and y of shape (B, ...); ``velocity.nfe`` counts its calls (network evaluations)."""

    def velocity(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        velocity.nfe += 1
        return -model.generative_drift(y, t.expand(y.shape[0]), lmbd=1.0)

    velocity.nfe = 0
    return velocity


def log_prob_ode(model: PluginReverseSDE, x: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                 solver: str = "dopri5", divergence: str = "hutchinson", probe: str = "rademacher",
                 t_min: float | None = None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    r"""Log-likelihood under the probability-flow ODE dy/dt = v = f − ½ g a, shape (B,), of the model
    that runs the ODE from T down to ``t_min`` (default: the ELBO's, :func:`~sdeflow.likelihood.elbo.default_t_min`,
    so that the two bound the same model) and outputs x = y_{t_min}/m(t_min):

    .. math::  \log p(x) = \log p_T(y_T) + \int_{t_{min}}^T \nabla\cdot v(y_t, t)\, dt + D\log m(t_{min}),

    integrated from y = m(t_min)·x at t_min to T by torchdiffeq's ``solver`` (one of ``SOLVERS``) with
    ``rtol``/``atol``; the divergence is Hutchinson's with one ``probe`` held fixed over the solve
    (unbiased) or exact. Returns (log p, {"nfe": evaluations of the network}).
    """
    check_finite("x", x)
    check_choice("solver", solver, SOLVERS)
    check_choice("divergence", divergence, DIVERGENCES)
    t_min = check_t_min(default_t_min(model.T) if t_min is None else t_min, model.T)
    probe_noise = make_probe(x, probe, generator) if divergence == "hutchinson" else None
    velocity = probability_flow_velocity(model)

    def dynamics(t, state):
        return field_divergence(lambda z: velocity(t, z), state[0], kind=divergence, noise=probe_noise)

    scale = float(model.sde.mean_weight(torch.tensor(t_min, dtype=torch.float64)))
    state0 = (scale * x.detach(), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    with torch.no_grad():
        y_T, div_integral = odeint_within(dynamics, state0, t_min, model.T, rtol=rtol, atol=atol, solver=solver)
    logp = model.sde.prior_log_prob(y_T) + div_integral + decoder_log_weight(model.sde, x[0].numel(), t_min)
    return logp, {"nfe": velocity.nfe}


@torch.no_grad()
def sample_ode(model: PluginReverseSDE, shape, *, solver: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
               step_size: float | None = None, t_min: float = 0.0, x_T: torch.Tensor | None = None,
               generator: torch.Generator | None = None,
               callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Samples of shape ``shape``: the probability-flow ODE dx/dt = f − ½ g a solved from T down to
    ``t_min`` with torchdiffeq's ``solver``: an adaptive one (``ADAPTIVE_SOLVERS``: dopri5, dopri8,
    bosh3, fehlberg2, adaptive_heun) with ``rtol``/``atol``, or a fixed-grid one ("rk4",
    "midpoint", "euler"), which needs ``step_size`` (in units of t; the last step is shortened to
    land on t_min) and refuses it for the adaptive ones. Starts from ``x_T`` if given, else from a
    prior draw with ``generator`` on the model's device and dtype. ``callback`` is called at every
    network evaluation with {"t": its time, "x": the state it is evaluated at, "nfe": evaluations
    so far}; an adaptive solver's rejected trial steps are among them.
    """
    check_choice("solver", solver, SOLVERS)
    t_min, _ = check_time_span(t_min, None, model.T)
    if solver in ADAPTIVE_SOLVERS:
        if step_size is not None:
            raise ValueError(f"step_size is for the fixed-grid solvers {', '.join(FIXED_GRID_SOLVERS)}; "
                             f"the adaptive solver {solver!r} sets its own steps from rtol/atol")
    elif step_size is None or not (isinstance(step_size, (int, float)) and 0 < step_size <= model.T - t_min):
        raise ValueError(f"the fixed-grid solver {solver!r} needs step_size in (0, T - t_min = {model.T - t_min}]; "
                         f"got {step_size!r} (or use an adaptive solver: {', '.join(ADAPTIVE_SOLVERS)})")
    device, dtype = model_device_dtype(model, None, None)
    x = model.sde.prior_sample(shape, generator=generator, device=device, dtype=dtype) if x_T is None else x_T
    velocity = probability_flow_velocity(model)

    def reported_velocity(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = velocity(t, y)
        callback({"t": t, "x": y, "nfe": velocity.nfe})
        return out

    func = velocity if callback is None else reported_velocity
    if solver in ADAPTIVE_SOLVERS:
        return odeint_within(func, x, model.T, t_min, rtol=rtol, atol=atol, solver=solver)
    times = torch.tensor([model.T, t_min], dtype=x.dtype, device=x.device)
    return odeint(func, x, times, method=solver, options={"step_size": float(step_size)})[-1]
