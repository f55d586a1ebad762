r"""The plug-in reverse SDE of Huang, Lim & Courville (2021).

A network gives the drift :math:`a(y, t)`, related to the score by :math:`a = g\,s`. The
λ-family of generative processes, run from t = T down to 0, is

.. math::  dX = \big[(1 - \tfrac{\lambda}{2})\, g\, a - f\big]\, d\tau + \sqrt{1-\lambda}\; g\, d\bar B,
           \qquad \tau = T - t,

λ = 0 the reverse SDE, λ = 1 the probability-flow ODE. Its ELBO (Theorem 1 of the paper, with
Hutchinson's trace) is

.. math::  \log p(x) \ge E_{t, y_t}\Big[-\tfrac12\|a\|^2 - \nabla\cdot(g a - f)\Big]\cdot T
           + E_{y_T}[\log p_T(y_T)],\quad y_t \sim q(y_t \mid x).

The likelihood estimators stop at a small t_min > 0 (default 10⁻⁵·T) and decode the data from
y_{t_min} with :math:`p(x \mid y) = N(y/m, v/m^2)`, in closed form (see :meth:`PluginReverseSDE.elbo`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import divergence as _div
from .ode import SOLVERS, odeint_within, probability_flow_velocity
from .sdes import SDE
from .time_sampling import T_EPS_FRACTION, T_MIN_FRACTION, FittedTime, ImportanceTime, TimeProposal, UniformTime
from .utils import (append_dims, as_time, check_choice, check_finite, check_new_name, check_positive_int,
                    sum_except_batch)

__all__ = ["PluginReverseSDE", "PARAMETERIZATIONS", "TIME_SAMPLINGS", "WEIGHTINGS", "register_weighting",
           "noise_weighting", "likelihood_weighting"]

PARAMETERIZATIONS = ("drift", "score", "noise", "velocity")
TIME_SAMPLINGS = ("uniform", "importance", "fitted")
#: Largest data dimension for which ``dsm(order=2)`` forms the exact Jacobian of the score.
MAX_SECOND_ORDER_DIM = 64


# The noise parameterization divides by std(t), which is 0 at t = 0 for VP/sub-VP/VE; the
# network is never asked for that limit by the estimators (t = 0 has probability zero), but a
# user or an ODE solve may evaluate there. Clamping keeps the result finite.
MIN_STD = 1e-5


# ---- loss weightings -----------------------------------------------------------------------------
def noise_weighting(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    r""":math:`\lambda(t) = 1`: the DDPM ε-loss :math:`\tfrac12\|std\cdot s + \varepsilon\|^2` unweighted.
    (B,) -> (B,)."""
    return torch.ones_like(t)


def likelihood_weighting(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    r""":math:`\lambda(t) = T\,g(t)^2 / v(t)`: the DSM form of the ELBO's path term,
    :math:`\tfrac1T\int \lambda\,\ell\,dt = \int \tfrac12\|a + g\varepsilon/std\|^2 dt`. It diverges
    like 1/t at 0; :meth:`PluginReverseSDE.dsm` evaluates every weighting at max(t, t_ε). It is T·Z times
    the density of :class:`~sdeflow.time_sampling.ImportanceTime` with the same t_ε, so with
    ``time_sampling="importance"`` the estimate's time weight is the constant Z. (B,) -> (B,)."""
    return sde.T * sde.g2(t) / sde.var(t)


#: name → λ(sde, t): the per-time weight of the DSM loss, :math:`E_{t\sim U(0,T)}[\lambda(t)\,\ell(t)]`
#: (see :meth:`PluginReverseSDE.dsm`, which evaluates it at max(t, t_ε)). Add entries with
#: :func:`register_weighting`.
WEIGHTINGS: dict[str, Callable[[SDE, torch.Tensor], torch.Tensor]] = {
    "noise": noise_weighting,
    "likelihood": likelihood_weighting,
}


def register_weighting(name: str, fn: Callable[[SDE, torch.Tensor], torch.Tensor]) -> Callable:
    """Add the loss weighting ``fn(sde, t) -> λ(t)`` (times (B,) -> weights (B,), positive) to
    :data:`WEIGHTINGS` under ``name`` and return it. ValueError if ``name`` is taken or ``fn`` is
    not callable."""
    check_new_name(name, WEIGHTINGS, "weighting")
    if not callable(fn):
        raise ValueError(f"fn must be a callable fn(sde, t) -> weights; got {fn!r}")
    WEIGHTINGS[name] = fn
    return fn


def velocity_coefficients(sde: SDE, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""(c, α, σ) = (1/√(m² + v), m·c, std·c) at t, with α² + σ² = 1: the rescaled state
    c·y = α·x + σ·ε of y = m·x + std·ε, whose velocity is v = α·ε − σ·x (Salimans & Ho 2022, i-DODE;
    for VP, c = 1). Then ε = σ·c·y + α·v, which is how the "velocity" parameterization turns the
    network's v̂ into ε̂. Each (B,)."""
    m, var = sde.mean_weight(t), sde.var(t)
    c = torch.rsqrt(m ** 2 + var)
    return c, m * c, var.sqrt() * c


def check_lmbd(lmbd: float) -> float:
    lmbd = float(lmbd)
    if not 0.0 <= lmbd <= 1.0:
        raise ValueError(f"lmbd must lie in [0, 1] (0: reverse SDE, 1: probability-flow ODE); got {lmbd}")
    return lmbd


class PluginReverseSDE(nn.Module):
    """A forward SDE and a network ``net(y, t)`` (t of shape (B,)) that predicts, per
    ``parameterization``, the drift a, the score s = a/g, the noise ε = −std·s, or the velocity
    v = α·ε − σ·x of i-DODE (ε = σ·c·y + α·v, see :func:`velocity_coefficients`).

    With "noise", a = −g·ε_θ/std, so the ELBO's integrand grows like ‖ε_θ(y, t)‖²/(2t) as
    t → 0 wherever the network's ε_θ does not vanish there (it must, for data with a finite
    score). Its integral then diverges logarithmically and estimates of the bound are
    heavy-tailed: on the checkerboard toy, single draws near t = 10⁻⁸ contributed hundreds of
    nats and the mean bound sat about 0.02 nats below that of a score network. "drift" and
    "score" keep the integrand bounded; ε networks train faster on images. The likelihood
    estimators therefore start at t_min > 0 by default (:meth:`elbo`). The ODE likelihood is
    unaffected (its integrand grows like t^{-1/2}).

    Attributes:
        sde: the forward :class:`~sdeflow.sdes.SDE` (owns T).
        net: the network.
        time_proposal: the :class:`~sdeflow.time_sampling.FittedTime` used by
            ``time_sampling="fitted"``; fitted on the first batch ``elbo`` sees when None, or
            explicitly with :meth:`fit_time_proposal`.
    """

    def __init__(self, sde: SDE, net: nn.Module, parameterization: str = "drift"):
        super().__init__()
        check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        if not isinstance(sde, SDE):
            raise ValueError(f"sde must be an sdeflow SDE (VPSDE, VESDE, SubVPSDE); got {type(sde).__name__}")
        self.sde = sde
        self.net = net
        self.parameterization = parameterization
        self.time_proposal: FittedTime | None = None

    @property
    def T(self) -> float:
        return self.sde.T

    # ---- the network in each parameterization --------------------------------------------
    def _net(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(y, t)
        if out.shape != y.shape:
            raise ValueError(f"net must return a tensor shaped like its input {tuple(y.shape)}; "
                             f"got {tuple(out.shape)}")
        return out

    def drift(self, y: torch.Tensor, t) -> torch.Tensor:
        """a(y, t): the network output, or g·s, or −g·ε̂/std. Shape of y."""
        t = as_time(t, y.shape[0], y)
        if self.parameterization == "drift":
            return self._net(y, t)
        return self.sde.g(y, t) * self.score(y, t)

    def score(self, y: torch.Tensor, t) -> torch.Tensor:
        """s(y, t) ≈ ∇ log p_t(y): the network output, or a/g, or −ε̂/std (std at least MIN_STD). Shape of y."""
        t = as_time(t, y.shape[0], y)
        if self.parameterization == "drift":
            return self._net(y, t) / self.sde.g(y, t)
        if self.parameterization == "score":
            return self._net(y, t)
        std = append_dims(self.sde.std(t), y.ndim).clamp_min(MIN_STD)
        return -self._noise_from_output(self._net(y, t), y, t) / std

    def _noise_from_output(self, out: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # ε̂ of the "noise" (the output itself) and "velocity" (σ·c·y + α·v̂) parameterizations.
        if self.parameterization == "noise":
            return out
        c, alpha, sigma = (append_dims(k, y.ndim).to(y.dtype) for k in velocity_coefficients(self.sde, t))
        return sigma * c * y + alpha * out

    # ---- the λ-family --------------------------------------------------------------------
    def mu(self, y: torch.Tensor, t, lmbd: float = 0.0) -> torch.Tensor:
        """Generative drift (1 − λ/2)·g·a − f at forward time t (the process runs t: T → 0)."""
        lmbd = check_lmbd(lmbd)
        t = as_time(t, y.shape[0], y)
        return (1 - 0.5 * lmbd) * self.sde.g(y, t) * self.drift(y, t) - self.sde.f(y, t)

    def sigma(self, y: torch.Tensor, t, lmbd: float = 0.0) -> torch.Tensor:
        """Generative diffusion √(1 − λ)·g at forward time t, shape (B, 1, ..., 1)."""
        lmbd = check_lmbd(lmbd)
        t = as_time(t, y.shape[0], y)
        return (1 - lmbd) ** 0.5 * self.sde.g(y, t)

    # ---- time proposals ------------------------------------------------------------------
    def default_t_min(self) -> float:
        """The likelihood estimators' default start time, 10⁻⁵·T (``time_sampling.T_MIN_FRACTION``)."""
        return T_MIN_FRACTION * self.T

    def _truncation_time(self, t_min: float) -> float:
        """t_ε of a loss or importance proposal on [t_min, T]: t_min itself when it is > 0, else 10⁻³T
        (sdeflow-light's), below which the likelihood weighting g²/v is held constant."""
        return t_min if t_min > 0 else T_EPS_FRACTION * self.T

    def _proposal(self, time_sampling, x: torch.Tensor | None = None, t_min: float = 0.0,
                  **fit_kwargs) -> TimeProposal:
        if isinstance(time_sampling, TimeProposal):
            if time_sampling.t_min != t_min:
                raise ValueError(f"t_min ({t_min}) must be the start of the time proposal's support "
                                 f"({time_sampling.t_min})")
            return time_sampling
        check_choice("time_sampling", time_sampling, TIME_SAMPLINGS)
        if time_sampling == "uniform":
            return UniformTime(self.T, t_min)
        if time_sampling == "importance":
            return ImportanceTime(self.sde, t_eps=self._truncation_time(t_min), t_min=t_min)
        if self.time_proposal is None or self.time_proposal.t_min != t_min:
            if x is None:
                raise ValueError('time_sampling="fitted" needs a fitted proposal: call fit_time_proposal first')
            self.fit_time_proposal(x, t_min=t_min, **fit_kwargs)
        return self.time_proposal

    @torch.no_grad()
    def fit_time_proposal(self, x: torch.Tensor, *, n_bins: int = 32, max_examples: int = 16,
                          defensive: float = 0.02, t_min: float | None = None, chunk_size: int | None = None,
                          divergence: str = "hutchinson", generator: torch.Generator | None = None) -> FittedTime:
        """Fit ``self.time_proposal`` on [t_min, T] (default t_min: :meth:`default_t_min`) to the
        ELBO's denoising integrand h₀ and its control variate w (see :meth:`elbo`) on a pilot batch
        (at most ``max_examples`` of x; one draw of t per bin and example): per bin the coefficient
        c of h₀ + c·w of least variance, and q ∝ √E[(h₀ + c w)²]. Costs n_bins × examples forward
        passes of the network, ``chunk_size`` at a time (default: about 2¹⁷ numbers per chunk, 42
        CIFAR images: larger batches of images run slower per image on a CPU). With
        ``divergence="exact"`` (affordable for low-dimensional data only) the pilot also measures the
        Hutchinson form with the exact divergence, and the bins where it is quieter take it
        (``time_proposal.hutchinson``). Returns the proposal.
        """
        check_choice("divergence", divergence, _div.ESTIMATORS)
        check_finite("x", x)
        t_min = self._check_t_min(t_min)
        chunk_size = self._chunk_size(x) if chunk_size is None else check_positive_int("chunk_size", chunk_size)
        pilot = x[:check_positive_int("max_examples", max_examples)]
        batch = pilot.shape[0]

        def integrands(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
            xs = pilot.repeat((t.numel() // batch,) + (1,) * (pilot.ndim - 1))
            forms = self._denoising_terms(xs, t, generator, chunk_size=chunk_size)
            if divergence != "exact":
                return forms
            return forms + (self._hutchinson_terms(xs, t, divergence="exact", generator=generator),)

        self.time_proposal = FittedTime.fit(integrands, self.sde, n_bins=n_bins, n_per_bin=batch, t_min=t_min,
                                            defensive=defensive, generator=generator, dtype=x.dtype, device=x.device)
        return self.time_proposal

    # ---- training loss -------------------------------------------------------------------
    def dsm(self, x: torch.Tensor, time_sampling="uniform", weighting: str = "noise",
            t: torch.Tensor | None = None, generator: torch.Generator | None = None,
            order: int = 1, second_order_weight: float = 0.3, t_min: float = 0.0,
            strata: int = 1) -> torch.Tensor:
        r"""Per-example denoising score matching loss, shape (B,).

        With y_t = m(t)·x + std(t)·ε, the loss at time t is
        :math:`w(t)\,\ell(t)` with :math:`\ell(t) = \tfrac12\|std\cdot s(y_t, t) + \varepsilon\|^2` and
        w = λ(max(t, t_ε)), λ = ``WEIGHTINGS[weighting](sde, ·)``: 1 for ``"noise"`` (the DDPM ε-loss),
        :math:`T\,g^2/v` for ``"likelihood"`` (the DSM form of the ELBO's path term,
        :math:`\int \tfrac12\|a + g\varepsilon/std\|^2 dt`).

        The loss covers t in [t_min, T]. With ``t_min`` = 0 (sdeflow-light's), the weighting is
        truncated below t_ε = 10⁻³T, where the likelihood weighting would diverge. With ``t_min`` > 0,
        t_ε = t_min: the likelihood-weighted loss is then exactly the path term of the ELBO started at
        t_min (:meth:`elbo`), the bound that is evaluated.
        The returned value estimates :math:`\tfrac1T\int_{t_{min}}^T w\,\ell\,dt` as
        :math:`w\ell / (T q(t))` with t ~ q (``time_sampling`` on [t_min, T], "importance" ∝ g²/v at
        max(t, t_ε)), unbiased for every proposal. ``strata`` = K (dividing B) draws the times
        stratified, block k of the batch from the k-th of K equal quantile ranges of q (a
        low-discrepancy sampler, as VDM's): the same objective with less variance. Pass ``t``
        (shape (B,)) to evaluate :math:`w\,\ell(t)` at given times instead.
        ``weighting="likelihood"`` with ``time_sampling="importance"`` is sdeflow-light's debiased loss
        times the constant Z.

        ``order=2`` adds second-order score matching (Lu et al. 2022) with weight κ =
        ``second_order_weight``: with r = ε + std·ŝ (ŝ the score, not differentiated) and J = ∇_y s,

        .. math::  \ell(t) \mathrel{+}= \kappa\big(\|std^2 J + I - r r^\top\|_F^2
                   + (std^2 \operatorname{tr} J + D - \|r\|^2)^2\big),

        whose minimiser is the Hessian of log p_t, since E[r rᵀ | y] = std²∇²log p_t(y) + I when
        ŝ is exact. First-order DSM fits the score but not its Jacobian, and the probability-flow
        ODE's likelihood depends on the Jacobian (its divergence); this term makes it agree with
        the ELBO. J is exact (D backward passes), so D is limited to 64.
        """
        check_finite("x", x)
        check_choice("weighting", weighting, WEIGHTINGS)
        check_choice("order", order, (1, 2))
        t_min = self._check_t_min(t_min)
        dim = x[0].numel()
        if order == 2 and dim > MAX_SECOND_ORDER_DIM:
            raise ValueError(f"order=2 needs the exact Jacobian of the score, allowed for data of at most "
                             f"{MAX_SECOND_ORDER_DIM} dimensions; got {dim}")
        second_order_weight = float(second_order_weight)
        if not 0 <= second_order_weight < float("inf"):
            raise ValueError(f"second_order_weight must be a finite number >= 0; got {second_order_weight!r}")
        if t is None:
            proposal = self._proposal(time_sampling, x, t_min)
            t, q = proposal.sample(x.shape[0], generator=generator, device=x.device, dtype=x.dtype, strata=strata)
            time_weight = 1.0 / (self.T * q)
        else:
            t = as_time(t, x.shape[0], x)
            time_weight = torch.ones_like(t)
        y, noise, std, _ = self.sde.sample(x, t, return_noise=True, generator=generator)
        if order == 1:
            loss = 0.5 * sum_except_batch((std * self.score(y, t) + noise) ** 2)
        else:
            score, second_order = self._score_and_second_order_term(y, t, noise, std)
            loss = 0.5 * sum_except_batch((std * score + noise) ** 2) + second_order_weight * second_order
        return loss * (time_weight * WEIGHTINGS[weighting](self.sde, t.clamp_min(self._truncation_time(t_min))))

    def _score_and_second_order_term(self, y, t, noise, std):
        # (s, ‖std²J + I − r rᵀ‖²_F + (std² tr J + D − ‖r‖²)²) at (y, t); see dsm. J needs a graph
        # even under no_grad; the arithmetic after it follows the caller's grad mode.
        batch, dim = y.shape[0], y[0].numel()
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            score = self.score(y, t)
            flat = score.reshape(batch, dim)
            # jac[b, i, j] = ∂s_i/∂y_j, one backward pass per output coordinate i.
            jac = torch.stack([torch.autograd.grad(flat[:, i].sum(), y, create_graph=True)[0].reshape(batch, dim)
                               for i in range(dim)], dim=1)
        var = std.reshape(batch, 1, 1) ** 2
        r = noise.reshape(batch, dim) + std.reshape(batch, 1) * flat.detach()
        eye = torch.eye(dim, dtype=y.dtype, device=y.device)
        frobenius = ((var * jac + eye - r[:, :, None] * r[:, None, :]) ** 2).sum(dim=(1, 2))
        trace = (var[:, 0, 0] * torch.diagonal(jac, dim1=1, dim2=2).sum(dim=1) + dim - (r ** 2).sum(dim=1)) ** 2
        return score, frobenius + trace

    # ---- the ELBO ------------------------------------------------------------------------
    def predicted_noise(self, y: torch.Tensor, t) -> torch.Tensor:
        """ε̂(y, t) = −std·s(y, t): the network's output for "noise", σ·c·y + α·out for "velocity",
        −std·out for "score", −std·out/g for "drift" (no clamping of std). Shape of y."""
        t = as_time(t, y.shape[0], y)
        out = self._net(y, t)
        if self.parameterization in ("noise", "velocity"):
            return self._noise_from_output(out, y, t)
        std = append_dims(self.sde.std(t), y.ndim).to(y.dtype)
        return -std * out if self.parameterization == "score" else -std * out / self.sde.g(y, t)

    def _hutchinson_integrand(self, a, div_a, t):
        # g depends on t only, so ∇·(g a) = g ∇·a; ∇·f = D·f(t) for the linear drift.
        g = self.sde.g2(t).sqrt().to(a.dtype)
        return -0.5 * sum_except_batch(a ** 2) - g * div_a + a[0].numel() * self.sde.f_coef(t).to(a.dtype)

    @staticmethod
    def _chunk_size(x: torch.Tensor) -> int:
        # About 2¹⁷ numbers per network call (42 CIFAR images): larger batches of images run slower
        # per image on a CPU (3× at 512).
        return max(1, 2 ** 17 // max(1, x[0].numel()))

    def _denoising_terms(self, x: torch.Tensor, t: torch.Tensor, generator=None, chunk_size: int | None = None):
        r"""(h₀, w), float64 of shape (B,), at y_t = m x + std ε: the ELBO's integrand in denoising form
        and its control variate,

        .. math::  h_0 = -\tfrac12\rho\,(\|\hat\varepsilon - \varepsilon\|^2 - D) + D f,\qquad
                   w = \tfrac12\rho\,(\|\varepsilon\|^2 - D),\qquad \rho = g^2/v.

        h₀ follows from the Hutchinson form by parts: :math:`E_y[g\nabla\cdot a] = E[g\,a\cdot\varepsilon/std]`
        (since :math:`\nabla_y\log q(y_t|x) = -\varepsilon/std`) and completing the square, with
        a = −g ε̂/std. w has mean zero exactly (E‖ε‖² = D). h₀ + w = −½ρ(‖ε̂‖² − 2ε̂·ε) + Df, whose
        noise vanishes with ε̂: it is the quiet form at small t, where the data's dequantisation noise
        makes ε unpredictable; h₀ is the quiet one at large t, where ε̂ ≈ ε. Each sum is formed on its
        own (no difference of large numbers)."""
        if chunk_size is not None and x.shape[0] > chunk_size:  # ``chunk_size`` examples per network call
            parts = [self._denoising_terms(x[i:i + chunk_size], t[i:i + chunk_size], generator)
                     for i in range(0, x.shape[0], chunk_size)]
            return torch.cat([h for h, _ in parts]), torch.cat([w for _, w in parts])
        y, noise, _, _ = self.sde.sample(x, t, return_noise=True, generator=generator)
        eps = self.predicted_noise(y, t)
        rho = (self.sde.g2(t) / self.sde.var(t)).double()
        dim = x[0].numel()
        s_eps = sum_except_batch(eps ** 2).double()
        s_cross = sum_except_batch(eps * noise).double()
        s_noise = sum_except_batch(noise ** 2 - 1).double()
        h0 = -0.5 * rho * (s_eps - 2 * s_cross + s_noise) + dim * self.sde.f_coef(t).double()
        return h0, 0.5 * rho * s_noise

    def elbo_integrand(self, y: torch.Tensor, t: torch.Tensor, *, probe: str = "rademacher",
                       divergence: str = "hutchinson", generator: torch.Generator | None = None,
                       create_graph: bool = False) -> torch.Tensor:
        r"""The ELBO's integrand in its Hutchinson form, h(y, t) = −½‖a‖² − g ∇·a + D·f(t), shape (B,)."""
        a, div_a = _div.divergence(lambda z: self.drift(z, t), y, estimator=divergence, probe=probe,
                                   generator=generator, create_graph=create_graph)
        return self._hutchinson_integrand(a, div_a, t)

    def _hutchinson_terms(self, x: torch.Tensor, t: torch.Tensor, probe: str = "rademacher",
                          divergence: str = "hutchinson", generator=None) -> torch.Tensor:
        """The Hutchinson form of the integrand at y_t = m x + std ε, in chunks; (B,)."""
        y, size = self.sde.sample(x, t, generator=generator), self._chunk_size(x)
        return torch.cat([self.elbo_integrand(y[i:i + size], t[i:i + size], probe=probe, divergence=divergence,
                                              generator=generator, create_graph=torch.is_grad_enabled())
                          for i in range(0, y.shape[0], size)])

    def _check_t_min(self, t_min, time_sampling=None) -> float:
        if t_min is None:
            return time_sampling.t_min if isinstance(time_sampling, TimeProposal) else self.default_t_min()
        t_min = float(t_min)
        if not 0.0 <= t_min < self.T:
            raise ValueError(f"t_min must lie in [0, T={self.T}); got {t_min}")
        return t_min

    def decoder_log_weight(self, dim: int, t_min: float) -> float:
        """D·log m(t_min): the closed-form term of the Gaussian decoder p(x | y) = N(y/m, v/m²) in the
        ELBO started at t_min, and of the output y/m of the ODE stopped there (0 for t_min = 0 and
        for VE)."""
        return dim * float(torch.log(self.sde.mean_weight(torch.tensor(t_min, dtype=torch.float64))))

    def elbo(self, x: torch.Tensor, n_slices: int = 1, time_sampling="fitted",
             probe: str = "rademacher", divergence: str = "hutchinson",
             generator: torch.Generator | None = None, t_min: float | None = None) -> torch.Tensor:
        r"""Unbiased per-example estimate of the ELBO in nats, shape (B,), of the model that runs the
        reverse SDE from T down to ``t_min`` and decodes x from y = y_{t_min} with
        :math:`p(x\mid y) = N(y/m, (v/m^2) I)` (m, v at t_min):

        .. math::  \log p(x) \ge \int_{t_{min}}^T E_{y_t}[h(y_t, t)]\,dt + E_{q(y_T|x)}[\log p_T(y_T)]
                   + D\log m(t_{min}),

        since :math:`\log p(x|y) - \log q(y|x) = D\log m` for that decoder and
        :math:`E_{q(y|x)}\log p_{t_{min}}(y)` is bounded by Huang et al.'s Theorem 1 on [t_min, T].
        t_min = 0 gives the bound of the SDE run to 0 (no decoder); the default 10⁻⁵·T
        (:meth:`default_t_min`) leaves out the times at which a network's ε prediction is untrained
        and need not vanish, where the integrand grows like ‖ε̂‖²/(2t), its integral diverges and
        every estimate of it is heavy-tailed.

        The path term is :math:`\sum_k w_k\, h(y_{t_k}, t_k)/q(t_k)` with K = ``n_slices`` draws per
        example, one in each stratum of q (quantile range [b_k, b_{k+1}) of mass w_k, from
        :meth:`~sdeflow.time_sampling.TimeProposal.strata_bounds`: equal quantiles, or for a fitted
        proposal the strata that cut the variance most); unbiased, and never noisier than K
        independent draws. The prior term is in closed form. ``time_sampling``: "uniform", "importance" (q ∝ g²/v) or any
        :class:`~sdeflow.time_sampling.TimeProposal` take h in the Hutchinson form
        :math:`-\tfrac12\|a\|^2 - g\nabla\cdot a + D f` (divergence by ``divergence`` =
        "hutchinson" with a ``probe``, or "exact"; sdeflow-light's slice); "fitted" (the default:
        ``self.time_proposal``, fitted on this batch if there is none for this t_min yet; lowest
        variance, one forward pass per draw) takes the denoising form h₀ + c·w of
        :meth:`_denoising_terms` with the control-variate coefficient c of the time's bin (and, when
        fitted with ``divergence="exact"``, the exact Hutchinson form in the bins where it is
        quieter). Every form has the same expectation at every t. Differentiable when grad is enabled.
        """
        check_finite("x", x)
        n_slices = check_positive_int("n_slices", n_slices)
        check_choice("probe", probe, _div.PROBES)
        check_choice("divergence", divergence, _div.ESTIMATORS)
        t_min = self._check_t_min(t_min, time_sampling)
        proposal = self._proposal(time_sampling, x, t_min, divergence=divergence, generator=generator)
        batch = x.shape[0]
        # Slice k of every example draws its time from the k-th stratum of q; q̃ carries the stratum's weight.
        t, q = proposal.sample(n_slices * batch, generator=generator, device=x.device, dtype=x.dtype,
                               strata=n_slices)
        xs = x.repeat((n_slices,) + (1,) * (x.ndim - 1))
        hutch = proposal.hutchinson_at(t) if isinstance(proposal, FittedTime) else torch.ones_like(t, dtype=torch.bool)
        h = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        if hutch.any():
            h = h.index_put((hutch,), self._hutchinson_terms(xs[hutch], t[hutch], probe=probe, divergence=divergence,
                                                             generator=generator).double())
        if not hutch.all():
            den = ~hutch
            h0, w = self._denoising_terms(xs[den], t[den], generator, chunk_size=self._chunk_size(x))
            h = h.index_put((den,), h0 + proposal.control_at(t[den]) * w)
        path_term = (h / q.to(h.dtype)).reshape(n_slices, batch).mean(dim=0).to(x.dtype)
        return path_term + self.sde.expected_prior_log_prob(x) + self.decoder_log_weight(x[0].numel(), t_min)

    # ---- exact likelihood ----------------------------------------------------------------
    def log_prob_ode(self, x: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5,
                     solver: str = "dopri5", divergence: str = "hutchinson", probe: str = "rademacher",
                     t_min: float = 0.0, generator: torch.Generator | None = None,
                     return_info: bool = False):
        r"""Log-likelihood under the probability-flow ODE dy/dt = v = f − ½ g a, shape (B,), of the model
        that runs the ODE from T down to ``t_min`` and outputs x = y_{t_min}/m(t_min):

        .. math::  \log p(x) = \log p_T(y_T) + \int_{t_{min}}^T \nabla\cdot v(y_t, t)\, dt + D\log m(t_{min}),

        integrated from y = m(t_min)·x at t_min to T by torchdiffeq's ``solver`` (one of
        ``sdeflow.ode.SOLVERS``) with
        ``rtol``/``atol``; the divergence is Hutchinson's with one probe held fixed over the solve
        (unbiased) or exact. With ``return_info=True`` returns (log p, {"nfe": n}) where n counts
        evaluations of the network.
        """
        check_finite("x", x)
        check_choice("solver", solver, SOLVERS)
        check_choice("divergence", divergence, _div.ESTIMATORS)
        if not 0.0 <= t_min < self.T:
            raise ValueError(f"t_min must lie in [0, T={self.T}); got {t_min}")
        probe_noise = _div.make_probe(x, probe, generator) if divergence == "hutchinson" else None
        velocity = probability_flow_velocity(self)

        def dynamics(t, state):
            return _div.divergence(lambda z: velocity(t, z), state[0], estimator=divergence, noise=probe_noise)

        scale = float(self.sde.mean_weight(torch.tensor(t_min, dtype=torch.float64)))
        state0 = (scale * x.detach(), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
        with torch.no_grad():
            y_T, div_integral = odeint_within(dynamics, state0, t_min, self.T, rtol=rtol, atol=atol,
                                              solver=solver)
        logp = self.sde.prior_log_prob(y_T) + div_integral + self.decoder_log_weight(x[0].numel(), t_min)
        return (logp, {"nfe": velocity.nfe}) if return_info else logp
