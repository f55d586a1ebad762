r"""Forward (inference) SDEs with closed-form marginals.

Every SDE here is linear,

.. math::  dY_s = f(s)\,Y_s\,ds + g(s)\,dB_s,\qquad Y_0 = x,

so its transition from the data is Gaussian, :math:`q(y_t\mid x) = N(m(t)\,x,\ v(t)\,I)` with
:math:`m(t) = \exp\int_0^t f` (``mean_weight``) and :math:`v' = 2 f v + g^2,\ v(0) = 0` (``var``).
The log signal-to-noise ratio :math:`\lambda(t) = \log m(t)^2 / v(t)` decreases from
:math:`+\infty` at t = 0, and :math:`-\lambda'(t) = g(t)^2 / v(t)` for every linear SDE,
which is what makes the importance density of time sampling closed form (see
:mod:`sdeflow.likelihood.time_proposals`).

Times are tensors of shape (B,) (or scalars); results broadcast against y of shape (B, ...).
Methods that take a state and a time take them in the order (y, t).

The registry :data:`SDES` maps a name to a class; :func:`make_sde` builds one by name from plain
parameters, :func:`sde_parameters` lists a class's parameters with their defaults (read from its
``__init__``), and :func:`sde_config` is the inverse of :func:`make_sde`. Adding an SDE takes a
subclass of :class:`SDE` that stores each ``__init__`` parameter as an attribute of the same name,
and one call of :func:`register_sde`.
"""

from __future__ import annotations

import inspect
import math
import numbers
from abc import ABC, abstractmethod

import torch

from ..utils import append_dims, check_new_name, check_positive_float, sum_except_batch

__all__ = ["SDE", "IntegratedRateSDE", "IntegratedRateVPSDE", "VPSDE", "VESDE", "SubVPSDE", "SDES", "register_sde", "make_sde", "sde_parameters",
           "sde_config", "noise_level_time"]


class SDE(ABC):
    """A linear forward SDE :math:`dY = f(t) Y dt + g(t) dB` on [0, T].

    Subclasses give the closed forms: ``f_coef``, ``g2``, ``mean_weight``, ``var``,
    ``log_snr`` and its inverse ``t_from_log_snr``, and the prior variance. Each ``__init__``
    parameter is stored as an attribute of the same name, which is what :meth:`parameters`,
    equality and :func:`sde_config` read.
    """

    def __init__(self, T: float = 1.0):
        self.T = check_positive_float("T", T)

    def parameters(self) -> dict:
        """The constructor's parameters with this SDE's values, ``{name: value}``, in the order of
        ``__init__``'s signature: ``type(self)(**sde.parameters())`` builds an equal SDE."""
        return {name: getattr(self, name) for name in _init_parameters(type(self))}

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.parameters() == self.parameters()

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.parameters().items())))

    # ---- closed forms each SDE provides -------------------------------------------------
    @abstractmethod
    def f_coef(self, t: torch.Tensor) -> torch.Tensor:
        """The scalar f(t) of the drift f(t)·y."""

    @abstractmethod
    def g2(self, t: torch.Tensor) -> torch.Tensor:
        """The squared diffusion coefficient g(t)²."""

    @abstractmethod
    def mean_weight(self, t: torch.Tensor) -> torch.Tensor:
        """m(t) = exp ∫₀ᵗ f(s) ds, so that E[y_t | x] = m(t)·x."""

    @abstractmethod
    def var(self, t: torch.Tensor) -> torch.Tensor:
        """v(t), the variance of y_t given x (per dimension); v(0) = 0."""

    @abstractmethod
    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t) = log(m(t)² / v(t)), computed without cancellation; +inf at t = 0."""

    @abstractmethod
    def t_from_log_snr(self, log_snr: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`log_snr`: the time t with λ(t) = log_snr."""

    @property
    @abstractmethod
    def prior_var(self) -> float:
        """Variance per dimension of the prior p_T = N(0, prior_var·I)."""

    # ---- derived quantities --------------------------------------------------------------
    def _t(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.get_default_dtype()) if not torch.is_tensor(t) else t

    def std(self, t: torch.Tensor) -> torch.Tensor:
        """√v(t), the standard deviation of y_t given x."""
        return self.var(t).sqrt()

    def f(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward drift f(t)·y, shape of y."""
        return append_dims(self.f_coef(self._t(t)), y.ndim) * y

    def g(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Diffusion coefficient g(t), shaped to broadcast against y: (B, 1, ..., 1)."""
        return append_dims(self.g2(self._t(t)).sqrt(), y.ndim).to(y.dtype)

    def sample(self, x0: torch.Tensor, t: torch.Tensor, return_noise: bool = False,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None):
        """Draw y_t = m(t)·x0 + √v(t)·ε with ε ~ N(0, I).

        Returns y_t (shape of x0), or with ``return_noise=True`` the tuple
        (y_t, ε, std, g) where std and g have shape (B, 1, ..., 1).
        """
        t = self._t(t)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        mean_weight = append_dims(self.mean_weight(t), x0.ndim).to(x0.dtype)
        std = append_dims(self.std(t), x0.ndim).to(x0.dtype)
        y = mean_weight * x0 + std * noise
        if return_noise:
            return y, noise, std, self.g(x0, t)
        return y

    def prior_sample(self, shape, generator: torch.Generator | None = None,
                     device=None, dtype=None) -> torch.Tensor:
        """Draw from p_T = N(0, prior_var·I)."""
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return z * math.sqrt(self.prior_var)

    def prior_log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """log p_T(y) = −D/2·log(2π σ²) − ‖y‖²/(2σ²), summed per example: (B, ...) -> (B,)."""
        dim = y[0].numel()
        return -0.5 * dim * math.log(2 * math.pi * self.prior_var) - 0.5 * sum_except_batch(y ** 2) / self.prior_var

    def expected_prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """E_{q(y_T | x)}[log p_T(y_T)] in closed form:
        −D/2·log(2π σ²) − (m(T)²‖x‖² + D·v(T)) / (2σ²), shape (B,).

        The ELBO uses this instead of a one-sample estimate, removing that noise entirely.
        """
        dim = x[0].numel()
        T = torch.tensor(self.T, dtype=torch.float64)
        m2, v = float(self.mean_weight(T)) ** 2, float(self.var(T))
        return (-0.5 * dim * math.log(2 * math.pi * self.prior_var)
                - 0.5 * (m2 * sum_except_batch(x ** 2) + dim * v) / self.prior_var)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.parameters().items())
        return f"{type(self).__name__}({params})"


class IntegratedRateSDE(SDE):
    """VP and sub-VP share their drift: f = −β/2 for a rate β(t) with B(t) = ∫₀ᵗ β, so m = e^{−B/2}; the
    prior is N(0, I). Subclasses give ``beta``, ``beta_integral`` and its inverse."""

    @abstractmethod
    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """β(t) = B'(t) > 0."""

    @abstractmethod
    def beta_integral(self, t: torch.Tensor) -> torch.Tensor:
        """B(t) = ∫₀ᵗ β, 0 at t = 0, increasing."""

    @abstractmethod
    def t_from_beta_integral(self, B: torch.Tensor) -> torch.Tensor:
        """The time t with B(t) = B."""

    def f_coef(self, t):
        return -0.5 * self.beta(t)

    def mean_weight(self, t):
        return torch.exp(-0.5 * self.beta_integral(t))

    @property
    def prior_var(self) -> float:
        return 1.0


class IntegratedRateVPSDE(IntegratedRateSDE):
    r"""The variance-preserving SDE of any rate β(t):
    :math:`dY = -\tfrac12\beta(t) Y dt + \sqrt{\beta(t)}\, dB`, with
    :math:`m = e^{-B/2}`, :math:`v = 1 - e^{-B}`, :math:`\lambda = -\log(e^{B} - 1)` (ᾱ = e^{−B} in DDPM's
    notation). :class:`VPSDE` is its linear β; :mod:`sdeflow.sdes.noise_levels` holds the others."""

    def g2(self, t):
        return self.beta(t)

    def var(self, t):
        return -torch.expm1(-self.beta_integral(t))

    def log_snr(self, t):
        return -torch.log(torch.expm1(self.beta_integral(t)))

    def t_from_log_snr(self, log_snr):
        # e^B − 1 = e^{−λ}  ⇒  B = softplus(−λ)
        return self.t_from_beta_integral(torch.nn.functional.softplus(-torch.as_tensor(log_snr)))


class _LinearBetaSDE(IntegratedRateSDE):
    """Shared by VP and sub-VP: β(t) = β_min + (β_max − β_min)·t/T, B(t) = ∫₀ᵗ β."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0):
        super().__init__(T)
        self.beta_min = check_positive_float("beta_min", beta_min)
        self.beta_max = check_positive_float("beta_max", beta_max)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min; got beta_min={beta_min}, beta_max={beta_max}")

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * self._t(t) / self.T

    def beta_integral(self, t: torch.Tensor) -> torch.Tensor:
        """B(t) = β_min·t + (β_max − β_min)·t²/(2T)."""
        t = self._t(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2 / self.T

    def t_from_beta_integral(self, B: torch.Tensor) -> torch.Tensor:
        """Solve B(t) = B for t, in the cancellation-free form 2B / (β_min + √(β_min² + 2kB))."""
        k = (self.beta_max - self.beta_min) / self.T
        return 2 * B / (self.beta_min + torch.sqrt(self.beta_min ** 2 + 2 * k * B))


class VPSDE(_LinearBetaSDE, IntegratedRateVPSDE):
    r"""Variance-preserving SDE (DDPM in continuous time) with a linear rate β(t):
    :math:`dY = -\tfrac12\beta(t) Y dt + \sqrt{\beta(t)}\, dB`, with
    :math:`m = e^{-B/2}`, :math:`v = 1 - e^{-B}`, :math:`\lambda = -\log(e^{B} - 1)`, prior N(0, I).
    """


class SubVPSDE(_LinearBetaSDE):
    r"""Sub-VP SDE (Song et al. 2021): drift as VP, :math:`g^2 = \beta(t)(1 - e^{-2B(t)})`, so
    :math:`m = e^{-B/2}`, :math:`v = (1 - e^{-B})^2`, :math:`\lambda = -2\log(2\sinh(B/2))`, prior N(0, I).
    """

    def g2(self, t):
        return self.beta(t) * -torch.expm1(-2 * self.beta_integral(t))

    def var(self, t):
        return torch.expm1(-self.beta_integral(t)) ** 2

    def log_snr(self, t):
        return -2 * torch.log(2 * torch.sinh(0.5 * self.beta_integral(t)))

    def t_from_log_snr(self, log_snr):
        return self.t_from_beta_integral(2 * torch.asinh(0.5 * torch.exp(-0.5 * log_snr)))


class VESDE(SDE):
    r"""Variance-exploding SDE (SMLD in continuous time): σ(t) = σ_min·(σ_max/σ_min)^{t/T},
    :math:`dY = \sqrt{d\sigma^2/dt}\, dB`, so :math:`m = 1`,
    :math:`v = \sigma(t)^2 - \sigma_{min}^2` (exactly 0 at t = 0), and prior N(0, v(T)·I).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0):
        super().__init__(T)
        self.sigma_min = check_positive_float("sigma_min", sigma_min)
        self.sigma_max = check_positive_float("sigma_max", sigma_max)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min; got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _rate(self) -> float:
        # d/dt log σ(t)² = 2·log(σ_max/σ_min)/T
        return 2 * self._log_ratio / self.T

    def sigma(self, t):
        return self.sigma_min * torch.exp(self._rate() * 0.5 * self._t(t))

    def f_coef(self, t):
        return torch.zeros_like(self._t(t))

    def g2(self, t):
        return self._rate() * self.sigma(t) ** 2

    def mean_weight(self, t):
        return torch.ones_like(self._t(t))

    def var(self, t):
        return self.sigma_min ** 2 * torch.expm1(self._rate() * self._t(t))

    def log_snr(self, t):
        return -torch.log(self.var(t))

    def t_from_log_snr(self, log_snr):
        return torch.log1p(torch.exp(-log_snr) / self.sigma_min ** 2) / self._rate()

    @property
    def prior_var(self) -> float:
        return self.sigma_max ** 2 - self.sigma_min ** 2


# ---- the registry ----------------------------------------------------------------------------
#: name → SDE class. Add entries with :func:`register_sde`.
SDES: dict[str, type] = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def _init_parameters(cls: type) -> dict:
    """``{name: default}`` of ``cls.__init__``'s named parameters (``inspect.Parameter.empty``
    where there is no default); ValueError if it takes ``*args`` or ``**kwargs``, which would hide
    its parameters."""
    params = {}
    for name, param in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ValueError(f"cls {cls.__name__}.__init__ must name its parameters (no *args or **kwargs), "
                             f"so that they can be listed and checked")
        params[name] = param.default
    return params


def register_sde(name: str, cls: type) -> type:
    """Add the SDE class ``cls`` to :data:`SDES` under ``name`` and return it.

    ``cls`` must be a concrete subclass of :class:`SDE` whose ``__init__`` names its parameters,
    each with a default and each stored as an attribute of the same name. ValueError if ``name`` is
    taken or ``cls`` is not such a class.
    """
    check_new_name(name, SDES, "forward SDE")
    if not (isinstance(cls, type) and issubclass(cls, SDE)) or inspect.isabstract(cls):
        raise ValueError(f"cls must be a concrete subclass of sdeflow.SDE; got {cls!r}")
    required = [p for p, default in _init_parameters(cls).items() if default is inspect.Parameter.empty]
    if required:
        raise ValueError(f"cls {cls.__name__}.__init__ must give every parameter a default; "
                         f"{', '.join(required)} have none")
    SDES[name] = cls
    return cls


def _sde_class(name: str) -> type:
    if name not in SDES:
        raise ValueError(f"name must be one of {', '.join(repr(n) for n in SDES)}; got {name!r}")
    return SDES[name]


def sde_parameters(name: str) -> dict:
    """The parameters of the SDE registered as ``name`` with their defaults, from its ``__init__``:
    e.g. ``sde_parameters("vp") == {"beta_min": 0.1, "beta_max": 20.0, "T": 1.0}``."""
    return _init_parameters(_sde_class(name))


def make_sde(name: str, **params) -> SDE:
    """Build the SDE registered as ``name`` with ``params`` (the others keep their defaults).
    ValueError naming an unknown parameter and listing the allowed ones."""
    cls = _sde_class(name)
    allowed = _init_parameters(cls)
    unknown = [p for p in params if p not in allowed]
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for the SDE {name!r}; "
                         f"allowed: {', '.join(allowed)}")
    return cls(**params)


def _plain(name: str, value):
    # Checkpoints are loaded with weights_only=True: only plain Python values may be stored.
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(f"SDE parameter {name} must be a plain number, string, bool or None to be stored; "
                     f"got {type(value).__name__}")


def sde_config(sde: SDE) -> dict:
    """``{"name": registered name, **sde.parameters()}`` in plain Python types, such that
    ``make_sde(**sde_config(sde)) == sde``. ValueError if ``sde``'s class is not registered."""
    names = [name for name, cls in SDES.items() if cls is type(sde)]
    if not names:
        raise ValueError(f"sde must be an instance of a registered SDE class ({', '.join(SDES)}); "
                         f"got {type(sde).__name__}; add its class with register_sde")
    return {"name": names[0], **{k: _plain(k, v) for k, v in sde.parameters().items()}}


def noise_level_time(sde: SDE, sigma: float, name: str = "sigma") -> float:
    r"""The time t at which the SDE's noise level √v(t)/m(t) equals ``sigma``: log-SNR λ(t) = −2 log σ.
    ``ValueError`` naming ``name`` if σ ≤ 0 or the SDE never gets that noisy on [0, T]. Denoising starts there (the
    observation's noise), and likelihoods of 8-bit images stop there (a pixel bin's scale)."""
    sigma = check_positive_float(name, sigma)
    max_sigma = float(torch.exp(-0.5 * sde.log_snr(torch.tensor(sde.T, dtype=torch.float64))))
    if sigma > max_sigma * (1 + 1e-9):
        raise ValueError(f"{name}={sigma} is not reachable by {type(sde).__name__}: its noise level √v/m is at "
                         f"most {max_sigma:.4g} at T={sde.T}")
    return min(float(sde.t_from_log_snr(torch.tensor(-2.0 * math.log(sigma), dtype=torch.float64))), sde.T)
