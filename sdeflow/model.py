r"""The model: a forward SDE and a network, and how the network's output becomes the drift, the
score, the noise and the velocity. Nothing else: the estimators over it live in :mod:`sdeflow.training.losses`,
:mod:`sdeflow.likelihood.elbo` and :mod:`sdeflow.likelihood.ode`, the samplers in :mod:`sdeflow.samplers`.

The network predicts one of (``PARAMETERIZATIONS``), with :math:`y_t = m\,x + std\,\varepsilon`:

- the drift :math:`a(y, t)` of Huang, Lim & Courville (2021), related to the score by :math:`a = g\,s`;
- the score :math:`s \approx \nabla\log p_t(y)`;
- the noise :math:`\hat\varepsilon = -std\cdot s` (DDPM);
- the velocity :math:`v = \alpha\varepsilon - \sigma x` of i-DODE (:func:`velocity_coefficients`).

The λ-family of generative processes, run from t = T down to 0 (τ = T − t), is

.. math::  dX = \big[(1 - \tfrac{\lambda}{2})\, g\, a - f\big]\, d\tau + \sqrt{1-\lambda}\; g\, d\bar B,

λ = 0 the reverse SDE (the plug-in reverse SDE of the paper), λ = 1 the probability-flow ODE.
"""

from __future__ import annotations

import torch
from torch import nn

from .sdes.linear import SDE
from .utils import append_dims, as_time, check_choice, check_fraction

__all__ = ["PluginReverseSDE", "PARAMETERIZATIONS", "velocity_coefficients", "check_lmbd", "MIN_STD"]

PARAMETERIZATIONS = ("drift", "score", "noise", "velocity")

# The score of the noise parameterization divides by std(t), which is 0 at t = 0 for VP/sub-VP/VE; the
# estimators never ask for that limit (t = 0 has probability zero), but a user or an ODE solve may.
# Clamping keeps the result finite.
MIN_STD = 1e-5


def velocity_coefficients(sde: SDE, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""(c, α, σ) = (1/√(m² + v), m·c, std·c) at t, with α² + σ² = 1: the rescaled state
    c·y = α·x + σ·ε of y = m·x + std·ε, whose velocity is v = α·ε − σ·x (Salimans & Ho 2022, i-DODE;
    for VP, c = 1). Then ε = σ·c·y + α·v, which is how the "velocity" parameterization turns the
    network's v̂ into ε̂. Each (B,)."""
    m, var = sde.mean_weight(t), sde.var(t)
    c = torch.rsqrt(m ** 2 + var)
    return c, m * c, var.sqrt() * c


def check_lmbd(lmbd: float) -> float:
    """λ as a float if it lies in [0, 1]; ValueError naming ``lmbd`` otherwise."""
    return check_fraction("lmbd", lmbd, "(0: reverse SDE, 1: probability-flow ODE)")


class PluginReverseSDE(nn.Module):
    """A forward SDE ``sde`` and a network ``net(y, t)`` (y of shape (B, ...), t of shape (B,),
    output shaped like y) that predicts the ``parameterization``'s quantity.

    An ε network's ELBO integrand grows like ‖ε̂(y, t)‖²/(2t) as t → 0 wherever ε̂ does not vanish
    there (it must, for data with a finite score), so the likelihood estimators start at t_min > 0
    (:mod:`sdeflow.likelihood.elbo`); "drift" and "score" keep the integrand bounded; ε networks train faster on
    images.
    """

    def __init__(self, sde: SDE, net: nn.Module, parameterization: str = "drift"):
        super().__init__()
        check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        if not isinstance(sde, SDE):
            raise ValueError(f"sde must be an sdeflow SDE (VPSDE, VESDE, SubVPSDE, ...); got {type(sde).__name__}")
        self.sde = sde
        self.net = net
        self.parameterization = parameterization

    @property
    def T(self) -> float:
        return self.sde.T

    def _net(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(y, t)
        if out.shape != y.shape:
            raise ValueError(f"net must return a tensor shaped like its input {tuple(y.shape)}; "
                             f"got {tuple(out.shape)}")
        return out

    def drift(self, y: torch.Tensor, t) -> torch.Tensor:
        """a(y, t) = g·s: the network's output, or g times the score. Shape of y."""
        t = as_time(t, y.shape[0], y)
        if self.parameterization == "drift":
            return self._net(y, t)
        return self.sde.g(y, t) * self.score(y, t)

    def score(self, y: torch.Tensor, t) -> torch.Tensor:
        """s(y, t) ≈ ∇ log p_t(y): the network's output, or a/g, or −ε̂/std (std at least MIN_STD). Shape of y."""
        t = as_time(t, y.shape[0], y)
        if self.parameterization == "drift":
            return self._net(y, t) / self.sde.g(y, t)
        if self.parameterization == "score":
            return self._net(y, t)
        std = append_dims(self.sde.std(t), y.ndim).clamp_min(MIN_STD)
        return -self.noise_from_output(self._net(y, t), y, t) / std

    def predicted_noise(self, y: torch.Tensor, t) -> torch.Tensor:
        """ε̂(y, t) = −std·s(y, t) of the network's output (:meth:`noise_from_output`). Shape of y."""
        t = as_time(t, y.shape[0], y)
        return self.noise_from_output(self._net(y, t), y, t)

    def noise_from_output(self, out: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂ of the network's output ``out`` at (y, t), t of shape (B,): the output itself for "noise",
        σ·c·y + α·v̂ for "velocity", −std·out for "score", −std·out/g for "drift" (no clamping of std)."""
        if self.parameterization == "noise":
            return out
        if self.parameterization == "velocity":
            c, alpha, sigma = (append_dims(k, y.ndim).to(y.dtype) for k in velocity_coefficients(self.sde, t))
            return sigma * c * y + alpha * out
        std = append_dims(self.sde.std(t), y.ndim).to(y.dtype)
        return -std * out if self.parameterization == "score" else -std * out / self.sde.g(y, t)

    def generative_drift(self, y: torch.Tensor, t, lmbd: float = 0.0) -> torch.Tensor:
        """Generative drift (1 − λ/2)·g·a − f at forward time t (the process runs t: T → 0). Shape of y."""
        lmbd = check_lmbd(lmbd)
        t = as_time(t, y.shape[0], y)
        return (1 - 0.5 * lmbd) * self.sde.g(y, t) * self.drift(y, t) - self.sde.f(y, t)

    def generative_diffusion(self, y: torch.Tensor, t, lmbd: float = 0.0) -> torch.Tensor:
        """Generative diffusion √(1 − λ)·g at forward time t, shape (B, 1, ..., 1)."""
        lmbd = check_lmbd(lmbd)
        t = as_time(t, y.shape[0], y)
        return (1 - lmbd) ** 0.5 * self.sde.g(y, t)
