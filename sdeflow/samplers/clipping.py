r"""Samplers that keep the data prediction x̂₀ in the data's range: clipping and dynamic thresholding,
for every method at once.

Every method of ``METHODS`` reads the network through the model (``predicted_noise``, ``score``,
``drift``, ``generative_drift``, and ``noise_from_output`` for the ancestral step with a learned variance), and each
of those is a function of the data prediction

.. math::  \hat x_0 = (y - \sigma_t\,\hat\varepsilon)/\alpha_t

(α_t = ``sde.mean_weight``, σ_t = ``sde.std``). :class:`ClippedModel` wraps a model so that all of them
see x̂₀ replaced by :math:`\hat x_0' = \mathrm{clip}(\hat x_0)` (:func:`clip_prediction`), with the noise
re-derived from it as GLIDE does (diffusers' ``use_clipped_model_output=True``):

.. math::  \hat\varepsilon' = \frac{y - \alpha_t\,\hat x_0'}{\sigma_t}
           = \hat\varepsilon + \frac{\alpha_t}{\sigma_t}\,(\hat x_0 - \hat x_0'),\qquad
           s' = -\hat\varepsilon'/\sigma_t,\qquad a' = g\,s',

so a method that forms x̂₀ from ε̂' gets x̂₀' back, and DDIM's update, DPM-Solver's, the ancestral
posterior mean :math:`\tilde\mu(\hat x_0', y)` and the λ-family's drift all follow. The second form is
used: where nothing is clipped ε̂' is ε̂ exactly, without the rounding of the round trip. At σ_t = 0
(t = 0 of VP and sub-VP) x̂₀ = y/α_t whatever ε̂ is, so ε̂ is left as it is there.

The two maps of x̂₀ into the range [low, high], with centre c = (low + high)/2 and half-width
r = (high − low)/2:

* clipping (DDPM's ``clip_denoised``, diffusers' ``clip_sample``): :math:`\hat x_0' = \min(\max(\hat x_0,
  \mathrm{low}), \mathrm{high})`;
* dynamic thresholding at percentile p (Saharia et al. 2022, Imagen; diffusers' ``thresholding``):
  per example, with :math:`z = (\hat x_0 - c)/r`,
  :math:`s = \max(1, \mathrm{quantile}_{p/100}(|z|))` over the example's elements (torch.quantile's
  linear interpolation), :math:`\hat x_0' = c + r\,\mathrm{clip}(z, -s, s)/s`. For [−1, 1] this is
  Imagen's formula; s = 1 (the percentile inside the range) is plain clipping.

The ranges of the data transforms are :func:`sdeflow.data.transforms.data_range`'s.
:class:`~sdeflow.samplers.SamplerSettings` carries ``clip`` (the range) and ``threshold`` (p), and
:func:`~sdeflow.samplers.sample` wraps the model when they are set, so every method, grid and
conditional sampler works with them unchanged.
"""

from __future__ import annotations

import math

import torch

from ..model import MIN_STD, PluginReverseSDE
from ..utils import _as_real, append_dims, as_time

__all__ = ["ClippedModel", "clip_prediction", "check_clip", "check_threshold", "describe_clipping"]


def check_clip(name: str, clip) -> tuple[float, float] | None:
    """``clip`` as a pair of floats (low, high), finite with low < high, or None; ``ValueError``
    naming ``name`` otherwise."""
    if clip is None:
        return None
    pair = tuple(clip) if isinstance(clip, (tuple, list)) else ()
    values = [_as_real(value) for value in pair]
    if len(values) != 2 or any(v is None or not math.isfinite(v) for v in values) or not values[0] < values[1]:
        raise ValueError(f"{name} must be a data range (low, high) of finite numbers with low < high, or None; "
                         f"got {clip!r}")
    return values[0], values[1]


def check_threshold(name: str, threshold) -> float | None:
    """``threshold``, the percentile p of dynamic thresholding, as a float in (0, 100], or None;
    ``ValueError`` naming ``name`` otherwise."""
    if threshold is None:
        return None
    real = _as_real(threshold)
    if real is None or not 0.0 < real <= 100.0:
        raise ValueError(f"{name} must be a percentile in (0, 100] (dynamic thresholding), or None; "
                         f"got {threshold!r}")
    return real


def clip_prediction(x0: torch.Tensor, clip: tuple[float, float], threshold: float | None = None) -> torch.Tensor:
    r"""x̂₀ (B, ...) mapped into ``clip`` = (low, high): clipped, or with ``threshold`` = p dynamically
    thresholded per example (module docstring: :math:`z = (\hat x_0 - c)/r`,
    :math:`s = \max(1, \mathrm{quantile}_{p/100}|z|)`, :math:`c + r\,\mathrm{clip}(z, -s, s)/s`).
    Same shape and dtype as x̂₀ (half precision is thresholded in float32, as diffusers does)."""
    low, high = clip
    if threshold is None:
        return x0.clamp(low, high)
    centre, half_width = 0.5 * (low + high), 0.5 * (high - low)
    z = (x0 - centre) / half_width
    flat = z.reshape(z.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # torch.quantile takes float32 and float64 only
    s = torch.quantile(flat.abs(), threshold / 100.0, dim=1).clamp_min(1.0)
    s = append_dims(s, z.ndim).to(z.dtype)
    return centre + half_width * (torch.minimum(torch.maximum(z, -s), s) / s)


def describe_clipping(clip: tuple[float, float] | None, threshold: float | None = None) -> str:
    """In words, for titles: "x̂₀ clipped to [-1, 1]", "x̂₀ thresholded at p99.5 in [-1, 1]", or ""."""
    if clip is None:
        return ""
    low, high = clip
    where = f"[{low:.4g}, {high:.4g}]"
    return f"x̂₀ clipped to {where}" if threshold is None else f"x̂₀ thresholded at p{threshold:g} in {where}"


class ClippedModel(PluginReverseSDE):
    r"""``model`` with every quantity a sampler reads (``predicted_noise``, ``noise_from_output``,
    ``score``, ``drift`` and so ``generative_drift``) computed from the data prediction mapped into ``clip`` =
    (low, high) by :func:`clip_prediction` (``threshold`` = p: dynamic thresholding at percentile p),
    with ε̂' = (y − α_t x̂₀')/σ_t (module docstring). Shares ``model``'s SDE, network and
    parameterization, so the network's variance head (``variance="learned"`` of the ancestral
    method) is read as before, its ε̂ through :meth:`noise_from_output`. Shapes as
    :class:`~sdeflow.model.PluginReverseSDE`'s. ValueError for a bad ``clip`` or ``threshold``."""

    def __init__(self, model: PluginReverseSDE, clip: tuple[float, float], threshold: float | None = None):
        if not isinstance(model, PluginReverseSDE):
            raise ValueError(f"model must be a sdeflow PluginReverseSDE; got {type(model).__name__}")
        clip = check_clip("clip", clip)
        if clip is None:
            raise ValueError("clip must be a data range (low, high); got None")
        super().__init__(model.sde, model.net, model.parameterization)
        self.base = model
        self.clip, self.threshold = clip, check_threshold("threshold", threshold)

    def extra_repr(self) -> str:
        return f"clip={self.clip}, threshold={self.threshold}"

    def clipped_noise(self, eps: torch.Tensor, y: torch.Tensor, t) -> torch.Tensor:
        r"""ε̂' = ε̂ + (α_t/σ_t)(x̂₀ − x̂₀') for the model's ε̂ at (y, t), x̂₀ = (y − σ_t ε̂)/α_t and
        x̂₀' its image in the range; ε̂ where σ_t = 0. Shape of y."""
        t = as_time(t, y.shape[0], y).double()
        alpha = append_dims(self.sde.mean_weight(t), y.ndim).clamp_min(torch.finfo(torch.float64).tiny)
        sigma = append_dims(self.sde.std(t), y.ndim)
        noisy = sigma > 0
        alpha, sigma = alpha.to(y.dtype), sigma.to(y.dtype)
        x0 = (y - sigma * eps) / alpha
        excess = x0 - clip_prediction(x0, self.clip, self.threshold)
        return eps + torch.where(noisy, alpha * excess / torch.where(noisy, sigma, torch.ones_like(sigma)), 0.0)

    def noise_from_output(self, out: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂' of the network's output ``out`` at (y, t) (:meth:`clipped_noise`). Shape of y."""
        return self.clipped_noise(self.base.noise_from_output(out, y, t), y, t)

    def predicted_noise(self, y: torch.Tensor, t) -> torch.Tensor:
        """ε̂'(y, t): the model's ε̂ with x̂₀ in the range (:meth:`clipped_noise`). Shape of y."""
        return self.clipped_noise(self.base.predicted_noise(y, t), y, t)

    def score(self, y: torch.Tensor, t) -> torch.Tensor:
        r"""s' = −ε̂'/σ̄_t with σ̄_t = max(σ_t, MIN_STD), ε̂ = −σ̄_t·s read from the model's score (one
        evaluation, every parameterization): exactly the noise parameterization's rule, and the
        model's own score wherever x̂₀ is in the range. Shape of y."""
        t = as_time(t, y.shape[0], y)
        std = append_dims(self.sde.std(t), y.ndim).clamp_min(MIN_STD).to(y.dtype)
        return -self.clipped_noise(-std * self.base.score(y, t), y, t) / std

    def drift(self, y: torch.Tensor, t) -> torch.Tensor:
        """a' = g·s' (:meth:`score`). Shape of y."""
        t = as_time(t, y.shape[0], y)
        return self.sde.g(y, t) * self.score(y, t)
