r"""The built-in fixed-step methods of :func:`sdeflow.samplers.sample`, each a step function
registered in ``METHODS``.

Notation. The forward SDE has marginals :math:`q(y_t\mid x) = N(\alpha_t x, \sigma_t^2 I)` with
:math:`\alpha_t` = ``sde.mean_weight(t)``, :math:`\sigma_t` = ``sde.std(t)``; the half log-SNR is
:math:`\ell_t = \log(\alpha_t/\sigma_t)` = ``sde.log_snr(t) / 2`` (increasing as t decreases), the
"VE-equivalent" noise level :math:`\tilde\sigma_t = \sigma_t/\alpha_t = e^{-\ell_t}` and the scaled
state :math:`\tilde x = x/\alpha_t`. The network's noise prediction is
:math:`\hat\varepsilon = -\sigma_t s` (``model.predicted_noise``) and its data prediction
:math:`\hat x_0 = (x - \sigma_t\hat\varepsilon)/\alpha_t`. For every linear SDE (VP, sub-VP, VE) the
λ-family :math:`dX = [(1-\tfrac\lambda2) g^2 s - f X]\,d\tau + \sqrt{1-\lambda}\,g\,d\bar B` becomes,
in these coordinates (using :math:`g^2 = -2\sigma_t^2\,d\ell_t/dt` and :math:`f = d\log\alpha_t/dt`),

.. math::  d\tilde x = (2-\lambda)\,\hat\varepsilon\, d\tilde\sigma + \sqrt{1-\lambda}\; d\tilde W,
           \qquad \operatorname{Var}(d\tilde W) = -d(\tilde\sigma^2),

so the probability-flow ODE (λ = 1) is :math:`d\tilde x/d\tilde\sigma = \hat\varepsilon` (Karras et al.
2022) and DDIM's η is :math:`\sqrt{1-\lambda}` (Song et al. 2021, in the continuous-time limit).

Methods (see ``METHODS`` for each one's order, NFE per step, λ and defaults); on a grid
:math:`T = t_0 > t_1 > \dots > t_N = t_{min}`:

* ``"euler"``: Euler–Maruyama of the λ-family,
  :math:`x_{i+1} = x_i + \mu_\lambda(t_i, x_i)\,h_i + \sigma_\lambda(t_i)\sqrt{h_i}\,z_i`, h_i = t_i − t_{i+1}.
* ``"heun"``: Heun's method for :math:`d\tilde x/d\tilde\sigma = \hat\varepsilon` (Karras et al. 2022,
  Alg. 1); for λ < 1 their stochastic Alg. 2, the "churn" set to match the λ-family: noise raises
  σ̃_i to σ̂ with σ̂² = σ̃_i² + (1 − λ)(σ̃_i² − σ̃_{i+1}²), then the Heun ODE step runs from σ̂ to
  σ̃_{i+1}; an Euler step when σ̃_{i+1} = 0.
* ``"ddim"``: DDIM (Song, Meng & Ermon 2021) with η = √(1 − λ), for any linear SDE:
  :math:`x_{i+1} = \alpha_{i+1}\hat x_0 + \sqrt{\sigma_{i+1}^2 - s_i^2}\,\hat\varepsilon + s_i z`,
  :math:`s_i = \eta\,\sigma_{i+1}\sqrt{1 - e^{2(\ell_i - \ell_{i+1})}}` (η = 1: the exact posterior
  q(x_{t_{i+1}} | x_{t_i}, x̂_0)).
* ``"dpm2"``, ``"dpm3"``: DPM-Solver-2 and -3, single-step exponential integrators of the
  probability-flow ODE in log-SNR (Lu et al. 2022, Algorithms 1 and 2), from the exact solution
  :math:`x_t = \frac{\alpha_t}{\alpha_s}x_s - \alpha_t\int_{\ell_s}^{\ell_t} e^{-\ell}\hat\varepsilon\, d\ell`.
* ``"dpm++2m"``: multistep DPM-Solver++(2M) (Lu et al. 2022b), data prediction, one NFE a step.
* ``"ancestral"``: DDPM's ancestral sampler (Ho et al. 2020, Alg. 2) on any grid, each step the
  forward SDE's posterior q(x_{t_{i+1}} | x_{t_i}, x̂_0) with its mean kept and its variance one of
  :mod:`sdeflow.discrete.variances` (option ``variance``: β̃ "posterior", β "step", "learned" (the
  model's variance head) or an AnalyticVariance value) on the step from t_{i+1} to t_i
  (:func:`sdeflow.discrete.step_chain`): improved DDPM's sampling with respaced steps. With β̃ it is
  "ddim" at λ = 0.
* ``"pc"``: predictor–corrector sampling, Algorithm 1 of Song et al. (2021): **predictor first**
  (an Euler–Maruyama step of the λ-family from t_i to t_{i+1}), **then** ``n_corrector`` Langevin
  steps at t_{i+1}.

Every stochastic method adds no noise on its last step, so samples end at the step's conditional
mean (the Langevin corrector, an MCMC move at t_min, keeps its noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..utils import append_dims, check_nonneg_int, check_positive_float
from .registry import Method, Option, register_method

if TYPE_CHECKING:
    from ..model import PluginReverseSDE

__all__: list[str] = []  # the methods are reached through METHODS


# ---- shared pieces -----------------------------------------------------------------------------
def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@dataclass(frozen=True)
class _Coefs:
    """α_t, σ_t, ℓ_t = log(α_t/σ_t) and σ̃_t = σ_t/α_t at a time t of shape (B,), in float64,
    shaped (B, 1, ..., 1) to broadcast against the state."""
    alpha: torch.Tensor
    sigma: torch.Tensor
    half_log_snr: torch.Tensor
    sigma_tilde: torch.Tensor


def _coefs(sde, t: torch.Tensor, ndim: int) -> _Coefs:
    t64 = t.double()
    half_log_snr = append_dims(0.5 * sde.log_snr(t64), ndim)
    return _Coefs(alpha=append_dims(sde.mean_weight(t64), ndim), sigma=append_dims(sde.std(t64), ndim),
                  half_log_snr=half_log_snr, sigma_tilde=torch.exp(-half_log_snr))


def _t_from_half_log_snr(sde, half_log_snr: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sde.t_from_log_snr(2 * half_log_snr.reshape(-1)).to(like.dtype)


def _lin(*terms) -> torch.Tensor:
    """Σ coefficient·tensor with float64 coefficients cast to the tensors' dtype."""
    out = 0
    for coef, value in terms:
        out = out + coef.to(value.dtype) * value
    return out


# ---- methods: step(model, x, t, t_next, lmbd, generator, last, state) -> (x_next, nfe) -----------
def _euler_step(model: PluginReverseSDE, x, t, t_next, lmbd, generator, last, state):
    h = append_dims(t - t_next, x.ndim)
    x_next = x + model.generative_drift(x, t, lmbd) * h
    if not last and lmbd < 1:
        x_next = x_next + model.generative_diffusion(x, t, lmbd) * h.sqrt() * _noise(x, generator)
    return x_next, 1


def _heun_step(model: PluginReverseSDE, x, t, t_next, lmbd, generator, last, state):
    """Karras et al. (2022), Alg. 2 in (x̃, σ̃): for λ < 1 first raise the noise level to
    σ̂² = σ̃_i² + (1 − λ)(σ̃_i² − σ̃_{i+1}²) (capped at σ̃(T)) by adding √(σ̂² − σ̃_i²)·z to x̃, then
    a Heun step of the ODE dx̃/dσ̃ = ε̂ from σ̂ to σ̃_{i+1}:
    x̃' = x̃ + (σ̃_{i+1} − σ̂) ε̂(σ̂),  x̃_{i+1} = x̃ + (σ̃_{i+1} − σ̂)(ε̂(σ̂) + ε̂'(σ̃_{i+1}))/2
    (just x̃' when σ̃_{i+1} = 0, where ε̂ is 0/0). The extra ODE stretch σ̂ → σ̃_i supplies the
    (1 − λ)·ε̂ dσ̃ part of the λ-family's drift (2 − λ)·ε̂ dσ̃, the added noise its (1 − λ)·d(σ̃²)."""
    sde = model.sde
    c, c_next = _coefs(sde, t, x.ndim), _coefs(sde, t_next, x.ndim)
    x_tilde = x / c.alpha.to(x.dtype)
    t_hat, c_hat = t, c
    if not last and lmbd < 1:
        sigma_cap = torch.exp(-0.5 * sde.log_snr(torch.tensor(sde.T, dtype=torch.float64)))
        sigma_hat = (c.sigma_tilde ** 2 + (1 - lmbd) * (c.sigma_tilde ** 2 - c_next.sigma_tilde ** 2)).sqrt()
        sigma_hat = torch.maximum(torch.minimum(sigma_hat, sigma_cap), c.sigma_tilde)
        x_tilde = x_tilde + (sigma_hat ** 2 - c.sigma_tilde ** 2).sqrt().to(x.dtype) * _noise(x, generator)
        t_hat = _t_from_half_log_snr(sde, -torch.log(sigma_hat), t)
        c_hat = _coefs(sde, t_hat, x.ndim)
    d_sigma = c_next.sigma_tilde - c_hat.sigma_tilde
    eps = model.predicted_noise(x_tilde * c_hat.alpha.to(x.dtype), t_hat)
    x_tilde_euler = x_tilde + _lin((d_sigma, eps))
    if bool((c_next.sigma_tilde == 0).all()):
        return x_tilde_euler * c_next.alpha.to(x.dtype), 1
    eps_next = model.predicted_noise(x_tilde_euler * c_next.alpha.to(x.dtype), t_next)
    x_tilde_next = x_tilde + _lin((0.5 * d_sigma, eps + eps_next))
    return x_tilde_next * c_next.alpha.to(x.dtype), 2


def _ddim_step(model: PluginReverseSDE, x, t, t_next, lmbd, generator, last, state):
    c, c_next = _coefs(model.sde, t, x.ndim), _coefs(model.sde, t_next, x.ndim)
    eps = model.predicted_noise(x, t)
    x0_hat = (x - c.sigma.to(x.dtype) * eps) / c.alpha.to(x.dtype)
    eta = math.sqrt(1 - lmbd)
    # s² = η² σ_{i+1}² (1 − SNR_i/SNR_{i+1}); at t_next = 0, σ_{i+1} = 0 and so is s.
    noise_var = eta ** 2 * c_next.sigma ** 2 * -torch.expm1(2 * (c.half_log_snr - c_next.half_log_snr))
    noise_var = torch.where(c_next.sigma > 0, noise_var, torch.zeros_like(noise_var))
    x_next = _lin((c_next.alpha, x0_hat), ((c_next.sigma ** 2 - noise_var).clamp_min(0).sqrt(), eps))
    if not last and lmbd < 1:
        x_next = x_next + noise_var.sqrt().to(x.dtype) * _noise(x, generator)
    return x_next, 1


def _dpm2_step(model: PluginReverseSDE, x, t, t_next, lmbd, generator, last, state):
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1, r₁ = ½): with h = ℓ_t − ℓ_s and s₁ at ℓ_s + h/2,
    u = (α_{s₁}/α_s) x − σ_{s₁}(e^{h/2} − 1) ε̂(x, s),
    x_t = (α_t/α_s) x − σ_t(e^h − 1) ε̂(u, s₁)."""
    sde = model.sde
    c, c_next = _coefs(sde, t, x.ndim), _coefs(sde, t_next, x.ndim)
    h = c_next.half_log_snr - c.half_log_snr
    mid_half_log_snr = c.half_log_snr + 0.5 * h
    s1 = _t_from_half_log_snr(sde, mid_half_log_snr, t)
    c1 = _coefs(sde, s1, x.ndim)
    eps = model.predicted_noise(x, t)
    u = _lin((c1.alpha / c.alpha, x), (-c1.sigma * torch.expm1(0.5 * h), eps))
    eps_mid = model.predicted_noise(u, s1)
    return _lin((c_next.alpha / c.alpha, x), (-c_next.sigma * torch.expm1(h), eps_mid)), 2


def _dpm3_step(model: PluginReverseSDE, x, t, t_next, lmbd, generator, last, state):
    """DPM-Solver-3 (Lu et al. 2022, Alg. 2, r₁ = ⅓, r₂ = ⅔): with h = ℓ_t − ℓ_s, φ₁(z) = e^z − 1,
    u₁ = (α_{s₁}/α_s) x − σ_{s₁} φ₁(r₁h) ε̂_s,  D₁ = ε̂(u₁, s₁) − ε̂_s,
    u₂ = (α_{s₂}/α_s) x − σ_{s₂} φ₁(r₂h) ε̂_s − σ_{s₂} (r₂/r₁)(φ₁(r₂h)/(r₂h) − 1) D₁,  D₂ = ε̂(u₂, s₂) − ε̂_s,
    x_t = (α_t/α_s) x − σ_t φ₁(h) ε̂_s − (σ_t/r₂)(φ₁(h)/h − 1) D₂."""
    sde = model.sde
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    c, c_next = _coefs(sde, t, x.ndim), _coefs(sde, t_next, x.ndim)
    h = c_next.half_log_snr - c.half_log_snr
    s1 = _t_from_half_log_snr(sde, c.half_log_snr + r1 * h, t)
    s2 = _t_from_half_log_snr(sde, c.half_log_snr + r2 * h, t)
    c1, c2 = _coefs(sde, s1, x.ndim), _coefs(sde, s2, x.ndim)
    phi_1, phi_r1, phi_r2 = torch.expm1(h), torch.expm1(r1 * h), torch.expm1(r2 * h)
    eps = model.predicted_noise(x, t)
    u1 = _lin((c1.alpha / c.alpha, x), (-c1.sigma * phi_r1, eps))
    d1 = model.predicted_noise(u1, s1) - eps
    u2 = _lin((c2.alpha / c.alpha, x), (-c2.sigma * phi_r2, eps),
              (-c2.sigma * (r2 / r1) * (phi_r2 / (r2 * h) - 1), d1))
    d2 = model.predicted_noise(u2, s2) - eps
    x_next = _lin((c_next.alpha / c.alpha, x), (-c_next.sigma * phi_1, eps),
                  (-c_next.sigma / r2 * (phi_1 / h - 1), d2))
    return x_next, 3


def _dpmpp_2m_step(model: PluginReverseSDE, x, t, t_next, lmbd, generator, last, state):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): with h_i = ℓ_{t_{i+1}} − ℓ_{t_i}, r = h_{i−1}/h_i,
    D = (1 + 1/(2r)) x̂₀(x_i, t_i) − 1/(2r) x̂₀(x_{i−1}, t_{i−1}) (D = x̂₀(x_i, t_i) on the first step,
    and on a last step to t = 0, where h = ∞),
    x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1}(e^{−h_i} − 1) D."""
    c, c_next = _coefs(model.sde, t, x.ndim), _coefs(model.sde, t_next, x.ndim)
    eps = model.predicted_noise(x, t)
    x0_hat = (x - c.sigma.to(x.dtype) * eps) / c.alpha.to(x.dtype)
    h = c_next.half_log_snr - c.half_log_snr
    previous = state.get("previous")
    if previous is None or bool(torch.isinf(h).any()):
        d = x0_hat
    else:
        x0_previous, h_previous = previous
        half_inv_r = 0.5 * h / h_previous
        d = _lin((1 + half_inv_r, x0_hat), (-half_inv_r, x0_previous))
    state["previous"] = (x0_hat, h)
    # σ_{i+1}/σ_i = (α_{i+1}/α_i) e^{−h}; both factors vanish at t_next = 0, leaving x = α_0 D.
    x_next = _lin((c_next.sigma / c.sigma, x), (-c_next.alpha * torch.expm1(-h), d))
    return x_next, 1


def _langevin_corrector(model: PluginReverseSDE, x, t, snr: float, generator):
    """One Langevin step at time t (Song et al. 2021, Alg. 4 with α_i = 1, as their code does for
    VE and sub-VP): g = s(x, t), z ~ N(0, I), ε = 2 (snr·‖z‖/‖g‖)², x ← x + ε g + √(2ε) z.
    The norms are averaged over the batch, as in Song et al.'s code: per-example norms of
    low-dimensional samples make ε blow up where g ≈ 0."""
    score = model.score(x, t)
    z = _noise(x, generator)
    score_norm = score.reshape(x.shape[0], -1).norm(dim=1).mean()
    noise_norm = z.reshape(x.shape[0], -1).norm(dim=1).mean()
    step = 2 * (snr * noise_norm / score_norm.clamp_min(torch.finfo(x.dtype).tiny)) ** 2
    return x + step * score + (2 * step).sqrt() * z


def _pc_step(model: PluginReverseSDE, x, t, t_next, lmbd, generator, last, state):
    """Algorithm 1 of Song et al. (2021): x_{i+1} ← Predictor(x_i) (Euler–Maruyama of the λ-family from
    t_i to t_{i+1}); then n_corrector times x_{i+1} ← Corrector(x_{i+1}) (Langevin at t_{i+1})."""
    x_next, nfe = _euler_step(model, x, t, t_next, lmbd, generator, last, state)
    for _ in range(state["n_corrector"]):
        x_next = _langevin_corrector(model, x_next, t_next, state["snr"], generator)
        nfe += 1
    return x_next, nfe


def _ancestral_step(model: PluginReverseSDE, x, t, t_next, lmbd, generator, last, state):
    """x_{i+1} = (x − β/√v_t · ε̂)/a + σ z (no noise on the last step), with a = m_t/m_{t_{i+1}},
    β = v_t − a² v_{t_{i+1}} and σ² the ``variance`` option's on that step (the grid's times are
    shared by the batch)."""
    from ..discrete.chain import step_chain
    from ..discrete.variances import noise_and_variance

    chain = step_chain(model.sde, float(t_next[0]), float(t[0]))
    n = torch.full((x.shape[0],), 2, dtype=torch.long, device=x.device)
    eps, var = noise_and_variance(model, state["variance"], chain, n, x, t)
    step_var, std, step_mean_weight = (float(chain.step_var[2]), float(chain.var[2].sqrt()),
                                       float(chain.step_mean_weight[2]))
    x_next = (x - (step_var / std) * eps) / step_mean_weight
    if not last:
        x_next = x_next + var.to(x.dtype).sqrt() * _noise(x, generator)
    return x_next, 1


def _check_variance_option(name: str, value):
    from ..discrete.variances import check_variance

    return check_variance(value, name)


# ---- the registry's built-in entries ---------------------------------------------------------
register_method("euler", Method(
    _euler_step, order="1 (ODE); strong 1, weak 1 for λ < 1 (the noise is additive)",
    nfe_per_step=1, lmbd="any λ in [0, 1]"))
register_method("heun", Method(
    _heun_step, order="2 (ODE); weak 1 for λ < 1", nfe_per_step=2, lmbd="any λ in [0, 1]",
    default_lmbd=1.0, default_grid="karras", default_t_min=1e-3))
register_method("ddim", Method(
    _ddim_step, order="1 (η = 0); weak 1 for η > 0", nfe_per_step=1, lmbd="any λ in [0, 1] (η = √(1 − λ))",
    default_lmbd=1.0, default_grid="quadratic", default_t_min=1e-3))
register_method("dpm2", Method(
    _dpm2_step, order="2", nfe_per_step=2, lmbd="λ = 1 only (probability-flow ODE)", lmbd_range=(1.0, 1.0),
    default_lmbd=1.0, default_grid="logsnr", default_t_min=1e-3, needs_positive_t_min=True))
register_method("dpm3", Method(
    _dpm3_step, order="3", nfe_per_step=3, lmbd="λ = 1 only (probability-flow ODE)", lmbd_range=(1.0, 1.0),
    default_lmbd=1.0, default_grid="logsnr", default_t_min=1e-3, needs_positive_t_min=True))
register_method("dpm++2m", Method(
    _dpmpp_2m_step, order="2", nfe_per_step=1, lmbd="λ = 1 only (probability-flow ODE)", lmbd_range=(1.0, 1.0),
    default_lmbd=1.0, default_grid="logsnr", default_t_min=1e-3))
register_method("ancestral", Method(
    _ancestral_step, order="weak 1", nfe_per_step=1, lmbd="λ = 0 only (a reverse-SDE sampler)",
    lmbd_range=(0.0, 0.0), default_grid="uniform",
    options={"variance": Option("posterior", _check_variance_option,
                                "reverse variances of the ancestral steps: posterior (β̃), step (β) or learned "
                                "(the model's variance head)")}))
register_method("pc", Method(
    _pc_step, order="that of the Euler–Maruyama predictor; the corrector adds accuracy, not order",
    nfe_per_step="1 + n_corrector", lmbd="any λ in [0, 1] for the predictor",
    default_grid="uniform", default_t_min=1e-3,
    options={"n_corrector": Option(1, check_nonneg_int, "Langevin corrector steps after each predictor step"),
             "snr": Option(0.16, check_positive_float, "the corrector's signal-to-noise ratio, which sets its "
                                                          "step size (Song et al. 2021, Alg. 4)")},
    step_nfe=lambda options: 1 + options["n_corrector"]))
