r"""Conditional generation with an unconditional model: denoising, inpainting and posterior
sampling for linear-Gaussian observations :math:`y = A x + \sigma_n \varepsilon`.

Every function here runs :func:`sdeflow.samplers.sample` with a
:class:`~sdeflow.samplers.SamplerSettings` (any method, its steps, grid, t_min, λ and options) and
differs only in where it starts, what it does to the state after each step, or which score it
feeds the sampler. Data x has shape (B, *S); samples come back shaped like x. A ``callback`` gets
the sampler's reports ({"i", "t", "x", "nfe"}) with "backward_passes" added: the guided scheme's
vector-Jacobian products so far (0 for the others).

Which is exact (samples the true posterior when the model's score is exact, up to the
sampler's discretization error) and which is an approximation:

* :func:`denoise` — **exact**. If y = x + σ_n ε, then m(t*)·y has the law of the forward
  marginal y_{t*} = m x + √v ε at the time t* where v(t*)/m(t*)² = σ_n² (log-SNR λ(t*) = −2 log σ_n),
  so the reverse SDE started at t* from m(t*)·y samples p(x | y). For VP, sub-VP and VE.
* :func:`inpaint` with ``scheme="replacement"`` (Song et al. 2021) — **approximate, biased**:
  after every step the observed coordinates are replaced by a fresh draw of the forward marginal
  m(t)·x_o + √v(t)·ε, which ignores that the unobserved part of the state should be correlated
  with that draw; the unobserved coordinates then follow the wrong conditional.
* ``scheme="guided"`` (here and in :func:`posterior_sample`) — the reverse SDE driven by the
  conditional score :math:`\nabla\log p_t(y_t\mid y) = \nabla\log p_t(y_t) + \nabla\log p(y\mid y_t)`,
  with the likelihood of the observation given the noisy state in the Gaussian (moment-projected)
  form

  .. math::  p(y \mid y_t) \approx N\big(y;\ A\hat x_0(y_t),\ \sigma_n^2 I + A C_t A^T\big),\quad
             \hat x_0 = E[x\mid y_t] = (y_t + v\,s(y_t, t))/m,

  :math:`\hat x_0` by Tweedie's formula. ``covariance="jacobian"`` takes the exact
  :math:`C_t = \mathrm{Cov}[x\mid y_t] = (v/m^2)(I + v\,\nabla s)` (second-order Tweedie; TMPD,
  Boys et al. 2023): the guided SDE is then **exact for Gaussian data** and a moment-matched
  approximation otherwise; it costs D backward passes per step (low-dimensional data only).
  ``covariance="isotropic"`` takes :math:`C_t \approx r_t^2 I` with
  :math:`r_t^2 = c\,\sigma_t^2 / (c + \sigma_t^2)`, :math:`\sigma_t^2 = v/m^2`, c = ``data_var``
  (ΠGDM, Song et al. 2023): exact only for x ~ N(μ, cI), **approximate** otherwise; one
  backward pass per step, fine for images. The gradient of the likelihood treats C_t as
  constant in y_t (it is, for Gaussian data).

Masks: 1/True marks an observed ("known") entry, 0/False a missing one.
"""

from __future__ import annotations

import math
import dataclasses

import torch
from torch import nn

from ..model import PluginReverseSDE
from .loop import sample
from .settings import SamplerSettings
from ..sdes.linear import noise_level_time
from ..utils import append_dims, check_choice, check_finite, check_nonneg_float, check_positive_float

__all__ = ["denoise", "inpaint", "posterior_sample", "make_mask",
           "INPAINT_SCHEMES", "COVARIANCES", "MASKS"]

INPAINT_SCHEMES = ("replacement", "guided")
COVARIANCES = ("isotropic", "jacobian")
MASKS = ("left-half", "right-half", "center", "random:P")

# At v(t) = 0 (t = 0 for every SDE here) the likelihood p(y | y_t) of a noise-free observation
# is a delta; a floor on the Gram matrix keeps a sampler that evaluates exactly there finite.
_MIN_GRAM = 1e-12


# ---- validation ------------------------------------------------------------------------------
def _check_mask(mask, x: torch.Tensor) -> torch.Tensor:
    """A boolean mask expanded to x.shape; every example must have both observed and missing entries."""
    mask = torch.as_tensor(mask, device=x.device)
    try:
        shape = torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast against the data "
                         f"of shape {tuple(x.shape)}")
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must be boolean or hold only 0 (missing) and 1 (observed)")
        mask = mask != 0
    mask = mask.expand(x.shape)
    per_example = mask.reshape(x.shape[0], -1)
    if not per_example.any(dim=1).all():
        raise ValueError("mask observes nothing in some example: there is nothing to condition on")
    if per_example.all(dim=1).any():
        raise ValueError("mask observes everything in some example: there is nothing to inpaint")
    return mask


def make_mask(spec: str, shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask (True = observed) of shape ``shape`` = (B, *S) from a name of the MISSING
    region: "left-half" / "right-half" (of the last axis: image width, or the coordinates of a
    vector), "center" (the central half of each of the last two axes; of the last axis for
    vectors), or "random:P" (each entry of the last axes missing independently with probability
    P ∈ (0, 1), shared by the channels of an image, i.e. the axis before the last two).
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be (B, *S) with at least one data axis; got {shape}")
    missing = torch.zeros(shape, dtype=torch.bool)
    width = shape[-1]
    if spec == "left-half":
        missing[..., : width // 2] = True
    elif spec == "right-half":
        missing[..., width - width // 2:] = True
    elif spec == "center":
        lo, hi = width // 4, width // 4 + max(width // 2, 1)
        if len(shape) >= 3:
            h = shape[-2]
            missing[..., h // 4: h // 4 + max(h // 2, 1), lo:hi] = True
        else:
            missing[..., lo:hi] = True
    elif spec.startswith("random:"):
        try:
            p = float(spec.split(":", 1)[1])
        except ValueError:
            p = float("nan")
        if not 0.0 < p < 1.0:
            raise ValueError(f"mask 'random:P' needs P in (0, 1), the probability of a missing entry; got {spec!r}")
        # Images share one pixel mask across channels, as an occlusion would.
        draw_shape = shape[:1] + shape[-2:] if len(shape) >= 4 else shape
        draw = torch.rand(draw_shape, generator=generator) < p
        missing = (draw.unsqueeze(1) if len(shape) >= 4 else draw).expand(shape).clone()
    else:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}; got {spec!r}")
    return ~missing


# ---- linear observation operators -------------------------------------------------------------
class _MaskOperator:
    """A = selection of the observed entries, represented in data space: A x = mask·x."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask  # (B, *S) bool
        self.flat = mask.reshape(mask.shape[0], -1).double()

    def apply(self, x):
        return x * self.mask

    def adjoint(self, u):
        return u * self.mask

    def solve(self, residual, cov, noise_var):
        """K⁻¹ r with K = σ_n² I + A C Aᵀ on the observed entries; ``cov`` is r_t² (B,) or C (B, D, D)."""
        if cov.ndim == 1:
            gram = (noise_var + append_dims(cov, residual.ndim)).clamp_min(_MIN_GRAM)
            return residual * self.mask / gram.to(residual.dtype)
        # Embed the observed block in D×D with the identity on missing rows: the solution is then
        # zero there and equals the block solve on the observed entries.
        p = self.flat
        eye = torch.eye(p.shape[1], dtype=torch.float64, device=p.device)
        gram = p[:, :, None] * cov * p[:, None, :] + torch.diag_embed(noise_var * p + (1 - p))
        gram = gram + _MIN_GRAM * eye
        r = (residual * self.mask).reshape(p.shape[0], -1, 1).double()
        return torch.linalg.solve(gram, r).reshape(residual.shape).to(residual.dtype)


class _MatrixOperator:
    """A given as an (M, D) matrix acting on flattened data: A x = x.flatten(1) @ Aᵀ, shape (B, M)."""

    def __init__(self, matrix: torch.Tensor, x_shape):
        self.matrix, self.x_shape = matrix, tuple(x_shape)

    def apply(self, x):
        return x.reshape(x.shape[0], -1) @ self.matrix.T.to(x.dtype)

    def adjoint(self, u):
        return (u @ self.matrix.to(u.dtype)).reshape(self.x_shape)

    def solve(self, residual, cov, noise_var):
        A = self.matrix.double()
        eye = torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
        if cov.ndim == 1:
            gram = noise_var * eye + cov.double()[:, None, None] * (A @ A.T)
        else:
            gram = noise_var * eye + A @ cov @ A.T
        gram = gram + _MIN_GRAM * eye
        return torch.linalg.solve(gram, residual.double()[..., None])[..., 0].to(residual.dtype)


class _GuidedScoreNet(nn.Module):
    r"""``net(y_t, t)`` returning the conditional score s(y_t, t) + ∇ log p(y | y_t) (module
    docstring), for use as a "score"-parameterized network. Counts its backward passes."""

    def __init__(self, model: PluginReverseSDE, operator, observation, noise_std: float,
                 covariance: str, data_var: float):
        super().__init__()
        self.model, self.operator, self.observation = model, operator, observation
        self.noise_var = noise_std ** 2
        self.covariance, self.data_var = covariance, data_var
        self.backward_passes = 0

    def forward(self, y_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sde = self.model.sde
        m = append_dims(sde.mean_weight(t), y_t.ndim).to(y_t.dtype)
        v = append_dims(sde.var(t), y_t.ndim).to(y_t.dtype)
        if self.covariance == "isotropic":
            with torch.enable_grad():
                z = y_t.detach().requires_grad_(True)
                score = self.model.score(z, t)
                x0 = (z + v * score) / m
                residual = self.observation - self.operator.apply(x0)
                sigma2 = (sde.var(t) / sde.mean_weight(t) ** 2).double()
                r2 = self.data_var * sigma2 / (self.data_var + sigma2)
                w = self.operator.adjoint(self.operator.solve(residual.detach(), r2, self.noise_var))
                # ΠGDM: (∂x̂₀/∂y_t)ᵀ Aᵀ K⁻¹ (y − A x̂₀) by one vector-Jacobian product.
                (vjp,) = torch.autograd.grad(x0, z, w)
            self.backward_passes += 1
            # Below SNR 1 (σ_t² > data_var) the VJP multiplies the score's error by (v/m)², which
            # makes learned models diverge; there ∂x̂₀/∂y_t is taken as (m/v)·r_t²·I, the same
            # isotropic covariance as in K (exact for x ~ N(μ, c I)).
            isotropic = append_dims((r2 * sde.mean_weight(t).double() / sde.var(t).double()), w.ndim) * w
            low_snr = append_dims(sigma2 > self.data_var, w.ndim)
            likelihood_score = torch.where(low_snr, isotropic.to(vjp.dtype), vjp)
            return (score.detach() + likelihood_score).detach()
        with torch.enable_grad():
            z = y_t.detach().requires_grad_(True)
            score = self.model.score(z, t)
            jac = self._score_jacobian(score, z)  # (B, D, D): jac[b, i, k] = ∂s_i/∂y_k
        # The likelihood's gradient is (∂x̂₀/∂y_t)ᵀ Aᵀ K⁻¹ (y − A x̂₀), and second-order Tweedie gives
        # ∂x̂₀/∂y_t = (m/v)·C_t. Using the same clipped C_t there as in K keeps the two consistent:
        # with a learned score, the raw Jacobian disagrees with a clipped C_t and the guidance then
        # explodes at large t, where 1/m amplifies the score's error.
        score = score.detach()
        x0 = (y_t + v * score) / m
        residual = self.observation - self.operator.apply(x0)
        batch, dim = jac.shape[:2]
        m64 = sde.mean_weight(t).double()[:, None, None]
        v64 = sde.var(t).double()[:, None, None]
        eye = torch.eye(dim, dtype=torch.float64, device=jac.device)
        cov = v64 / m64 ** 2 * (eye + v64 * 0.5 * (jac + jac.transpose(1, 2)))
        # A learned score's Jacobian need not give a PSD covariance: clip its eigenvalues to
        # [10⁻⁴, 1]·v/m² (Cov[x | y_t] ≤ v/m² · I whenever the data law is log-concave).
        evals, evecs = torch.linalg.eigh(cov)
        level = (v64 / m64 ** 2)[:, :, 0]
        evals = torch.minimum(evals.clamp_min(0) + 1e-4 * level, level)
        cov = evecs @ torch.diag_embed(evals) @ evecs.transpose(1, 2)
        w = self.operator.adjoint(self.operator.solve(residual, cov, self.noise_var))
        likelihood_score = (m64 / v64 * cov @ w.reshape(batch, dim, 1).double()).reshape(y_t.shape)
        return (score + likelihood_score.to(y_t.dtype)).detach()

    def _score_jacobian(self, score, z):
        """∂s_i/∂y_k per example, (B, D, D) float64: D vector-Jacobian products."""
        batch, dim = score.shape[0], score[0].numel()
        # Row i of every example's Jacobian is the VJP with the i-th unit vector; the D of them
        # run as one vmapped backward pass.
        units = torch.eye(dim, dtype=score.dtype, device=score.device)
        units = units[:, None, :].expand(dim, batch, dim).reshape((dim,) + score.shape)
        try:
            (rows,) = torch.autograd.grad(score, z, units, retain_graph=True, is_grads_batched=True)
        except RuntimeError:  # an op without a batching rule: one backward pass per row
            rows = torch.stack([torch.autograd.grad(score, z, u, retain_graph=True)[0] for u in units])
        self.backward_passes += dim
        return rows.reshape(dim, batch, dim).transpose(0, 1).double()


def _guided_sample(model, operator, observation, noise_std, x_shape, guidance, settings, generator, callback):
    """Samples of the reverse SDE driven by the conditional score of :class:`_GuidedScoreNet`;
    ``guidance`` = (covariance, data_var)."""
    covariance, data_var = guidance
    check_choice("covariance", covariance, COVARIANCES)
    data_var = check_positive_float("data_var", data_var)
    guided_net = _GuidedScoreNet(model, operator, observation, noise_std, covariance, data_var)
    guided = PluginReverseSDE(model.sde, guided_net, parameterization="score")
    return sample(guided, x_shape, settings, generator=generator, callback=_reporting(callback, guided_net),
                  device=observation.device, dtype=observation.dtype)


def _reporting(callback, guided_net: _GuidedScoreNet | None = None):
    """The sampler's callback with "backward_passes" added: the guidance's vector-Jacobian products
    so far (0 without guidance)."""
    if callback is None:
        return None

    def report(info: dict) -> None:
        callback({**info, "backward_passes": 0 if guided_net is None else guided_net.backward_passes})

    return report


# ---- public API -------------------------------------------------------------------------------
def denoise(model: PluginReverseSDE, y: torch.Tensor, noise_std: float, settings: SamplerSettings | None = None,
            *, generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    r"""Sample the posterior p(x | y) of clean data given y = x + σ_n ε, ε ~ N(0, I) (exact).

    With t* = :func:`~sdeflow.sdes.noise_level_time` (v(t*)/m(t*)² = σ_n²), m(t*)·y has the law of the forward marginal
    at t*, so the generative process started there from m(t*)·y (``sample(..., t_start=t*,
    x_T=m(t*)·y)``) ends at a draw of p(x | y) when the score is exact. That holds for the
    reverse-time SDE (λ = 0) only: it is the time reversal of the forward process, so its law at 0
    given its state at t* is q(x | y_{t*}); the other members of the λ-family share its marginals
    from p_T but not its conditionals (λ = 1, the ODE, would return one deterministic point), so
    ``settings.lmbd`` must be None or 0 and the method must accept λ = 0. ``y``: (B, *S), one
    posterior draw per row (repeat a row for several draws); σ_n must be > 0 and reachable
    (t* ≤ T). ``settings``: the sampler run over [t_min, t*] (:class:`~sdeflow.samplers.SamplerSettings`).
    ``callback``: the sampler's, its reports with "backward_passes" = 0. Returns (B, *S).
    """
    check_finite("y", y)
    settings = SamplerSettings() if settings is None else settings
    if isinstance(settings, SamplerSettings):
        if settings.lmbd not in (None, 0):
            raise ValueError(f"denoise samples the reverse SDE, λ = 0: settings.lmbd must be None or 0; "
                             f"got {settings.lmbd!r}")
        settings = dataclasses.replace(settings, lmbd=0.0)
    t_start = noise_level_time(model.sde, noise_std, name="noise_std")
    m = float(model.sde.mean_weight(torch.tensor(t_start, dtype=torch.float64)))
    return sample(model, y.shape, settings, t_start=t_start, x_T=m * y, generator=generator,
                  callback=_reporting(callback), device=y.device, dtype=y.dtype)


def inpaint(model: PluginReverseSDE, x: torch.Tensor, mask, scheme: str = "replacement",
            settings: SamplerSettings | None = None, *, covariance: str = "isotropic", data_var: float = 1.0,
            generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    r"""Fill in the missing entries of ``x`` (B, *S) where ``mask`` (broadcastable to x; True/1 =
    observed) is 0, sampling from (an approximation of) p(x_missing | x_observed). The values of x
    at missing entries are never read.

    ``scheme="replacement"`` (Song et al. 2021; approximate and biased): start from the prior
    with the observed entries drawn from q(y_T | x), and after every sampler step to t_next replace
    the observed entries by m(t_next)·x + √v(t_next)·ε (the ``project`` hook of
    :func:`~sdeflow.samplers.sample`). ``scheme="guided"``: the reverse SDE with the conditional
    score of the noise-free observation A x = mask·x (see the module docstring; ``covariance``
    "jacobian" is exact for Gaussian data, "isotropic" with ``data_var`` is the cheap
    approximation). ``settings``: the sampler run (:class:`~sdeflow.samplers.SamplerSettings`).
    ``callback``: the sampler's, its reports with "backward_passes" (the guided scheme's
    vector-Jacobian products so far). Returns (B, *S) with the observed entries equal to x exactly.
    """
    check_choice("scheme", scheme, INPAINT_SCHEMES)
    mask = _check_mask(mask, x)
    observed = torch.where(mask, x, torch.zeros_like(x))  # missing values must not leak in
    check_finite("x (its observed entries)", observed)
    if scheme == "guided":
        samples = _guided_sample(model, _MaskOperator(mask), observed, 0.0, x.shape, (covariance, data_var),
                                 settings, generator, callback)
        return torch.where(mask, observed, samples)
    sde = model.sde

    def replace_observed(state, t_next):
        return torch.where(mask, sde.sample(observed, t_next, generator=generator), state)

    T = torch.full((x.shape[0],), sde.T, dtype=x.dtype, device=x.device)
    prior = sde.prior_sample(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    samples = sample(model, x.shape, settings, x_T=replace_observed(prior, T), project=replace_observed,
                     generator=generator, callback=_reporting(callback), device=x.device, dtype=x.dtype)
    return torch.where(mask, observed, samples)


def posterior_sample(model: PluginReverseSDE, y: torch.Tensor, A: torch.Tensor, noise_std: float = 0.0,
                     settings: SamplerSettings | None = None, *, x_shape=None, covariance: str = "isotropic",
                     data_var: float = 1.0, generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    r"""Sample p(x | y) for the linear-Gaussian observation y = A x + σ_n ε, ε ~ N(0, I_M), with
    the guided reverse SDE of the module docstring (exact for Gaussian data with
    ``covariance="jacobian"``; approximate with "isotropic" and ``data_var``).

    ``y``: (B, M), one draw per row; ``A``: (M, D) acting on flattened data; ``x_shape``: the data
    shape (B, *S) with prod(S) = D (default (B, D)); ``noise_std`` ≥ 0. For A = I and σ_n > 0 use
    :func:`denoise`, which is exact for any data law; :func:`inpaint` is the masked special case.
    ``settings``: the sampler run (:class:`~sdeflow.samplers.SamplerSettings`); ``callback``: the
    sampler's, its reports with "backward_passes". Returns (B, *S).
    """
    check_finite("y", y)
    noise_std = check_nonneg_float("noise_std", noise_std)
    A = torch.as_tensor(A, device=y.device)
    if A.ndim != 2:
        raise ValueError(f"A must be an (M, D) matrix; got shape {tuple(A.shape)}")
    if y.ndim != 2 or y.shape[1] != A.shape[0]:
        raise ValueError(f"y must have shape (B, M={A.shape[0]}) to match A; got {tuple(y.shape)}")
    x_shape = (y.shape[0], A.shape[1]) if x_shape is None else tuple(x_shape)
    if x_shape[0] != y.shape[0] or math.prod(x_shape[1:]) != A.shape[1]:
        raise ValueError(f"x_shape must be (B={y.shape[0]}, *S) with prod(S) = D = {A.shape[1]}; got {x_shape}")
    return _guided_sample(model, _MatrixOperator(A, x_shape), y, noise_std, x_shape, (covariance, data_var),
                          settings, generator, callback)
