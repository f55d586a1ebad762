r"""Image preprocessing with exact log-determinants, and bits per dimension.

The pipeline of sdeflow-light (and RealNVP / FFJORD), from 8-bit images k ∈ {0, …, 255}^D:

1. **Uniform dequantization**: :math:`x = (k + u)/256`, :math:`u \sim U[0,1)^D`, so x has a
   density on [0, 1]^D and each discrete image owns the cell :math:`\prod_i [k_i/256, (k_i+1)/256)`
   of volume :math:`256^{-D}`.
2. **A bijection** :math:`y = \phi(x)` to the space the diffusion model works in, with its
   per-example log-determinant :math:`\log|\det \partial y/\partial x|`:
   ``"logit"`` :math:`y = \operatorname{logit}(\alpha + (1-2\alpha)x)`, α = 0.05 (RealNVP);
   ``"centered"`` :math:`y = 2x - 1` (DDPM's [−1, 1]); ``"identity"`` :math:`y = x`.
3. **Random horizontal flips**, for training only.

:func:`bits_per_dim` turns a log-likelihood (or ELBO) of y into bits per dimension of the
discrete images; :class:`Preprocess` bundles the steps and refuses to compute bits/dim of data
that was never dequantized.

**Truncated-normal dequantization** (training-free, Zheng et al. 2023, i-DODE) replaces step 1
for likelihood evaluation: :func:`truncated_normal_dequantize` draws y directly in model space,
:math:`y = c_k + z` with :math:`c_k = \phi((k+\tfrac12)/256)` the centre of level k's bin
:math:`[\phi(k/256), \phi((k+1)/256)]` and z a normal :math:`N(0, \sigma^2)` truncated to that bin,
σ = :func:`truncated_normal_scale` (the narrowest half-bin over ``TRUNCATION`` = 3). It helps when
the probability-flow ODE is integrated from the time :math:`t_{\min}` whose noise level
:math:`\operatorname{std}(t)/m(t)` equals σ: the model's marginal there is the data blurred by
:math:`N(0, \sigma^2)`, which is what these inputs look like, so the variational bound is much
tighter than uniform noise fed to the model's density at t = 0 (which sees box-shaped,
never-trained-on inputs). For a density that is flat across a bin the uniform bound is the
tighter one (the truncated normal pays :math:`\mathrm{KL}(q\,\|\,\mathrm{uniform})`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..utils import check_choice, check_positive_float, check_positive_int, log_interval_mass, sum_except_batch

__all__ = ["ALPHA", "NUM_LEVELS", "TRANSFORMS", "TRUNCATION", "dequantize", "quantize",
           "logit_transform", "logit_inverse", "random_hflip", "bits_per_dim", "Preprocess",
           "Preprocessed", "truncated_normal_scale", "truncated_normal_dequantize", "check_images", "preprocess", "postprocess",
           "data_range"]

ALPHA = 0.05  # RealNVP's / sdeflow-light's margin: keeps logit away from ±∞ at x = 0 and 1.
NUM_LEVELS = 256  # 8-bit images
TRANSFORMS = ("logit", "centered", "identity")
TRUNCATION = 3.0  # τ: the truncated normal's ±τσ fits inside every bin (i-DODE).


def _check_uint8(name: str, images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8:
        got = images.dtype if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name} must be a torch.uint8 tensor of 8-bit pixel levels 0..255; got {got}")


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, num_levels: int = NUM_LEVELS) -> torch.Tensor:
    r"""Uniform dequantization :math:`x = (k + u)/L`, u ~ U[0, 1) per pixel, L = ``num_levels``.

    ``images``: uint8 levels k of any shape (B, ...). Returns x in [0, 1) of the same shape.
    """
    _check_uint8("images", images)
    noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=dtype)
    return (images.to(dtype) + noise) / num_levels


def quantize(x: torch.Tensor, num_levels: int = NUM_LEVELS) -> torch.Tensor:
    r"""The inverse of :func:`dequantize` up to the noise: :math:`k = \lfloor L x \rfloor`, clipped
    to {0, …, L−1}. x of any shape → uint8 of the same shape."""
    return torch.floor(x * num_levels).clamp_(0, num_levels - 1).to(torch.uint8)


def logit_transform(x: torch.Tensor, alpha: float = ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    r"""RealNVP's logit transform and its exact log-determinant.

    .. math::  s = \alpha + (1-2\alpha)\,x,\qquad y = \log s - \log(1-s),\qquad
               \log\Big|\det\frac{\partial y}{\partial x}\Big| = \sum_i \big[\log(1-2\alpha)
               - \log s_i - \log(1 - s_i)\big].

    x: (B, ...) in [0, 1]. Returns (y of x's shape, logdet of shape (B,)).
    """
    s = alpha + (1.0 - 2.0 * alpha) * x
    log_s, log_1ms = torch.log(s), torch.log1p(-s)
    logdet = sum_except_batch(math.log(1.0 - 2.0 * alpha) - log_s - log_1ms)
    return log_s - log_1ms, logdet


def logit_inverse(y: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    r""":math:`x = (\sigma(y) - \alpha)/(1 - 2\alpha)`, clipped to [0, 1] (samples may overshoot)."""
    return ((torch.sigmoid(y) - alpha) / (1.0 - 2.0 * alpha)).clamp(0.0, 1.0)


def random_hflip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of (B, C, H, W) left-right with probability ½, independently."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip.view(-1, *([1] * (images.ndim - 1))), images.flip(-1), images)


def bits_per_dim(log_likelihood: torch.Tensor, logdet: torch.Tensor, num_dims: int,
                 num_levels: int = NUM_LEVELS) -> torch.Tensor:
    r"""Bits per dimension of L-level discrete data from the log-likelihood (or ELBO) of the
    transformed variable, per example:

    .. math::  \text{bpd} = -\frac{\log p_Y(y) + \log|\det \partial y/\partial x|}{D \ln 2} + \log_2 L.

    Derivation. With x = (k + u)/L the dequantized image and y = φ(x), change of variables gives
    the density of x on [0, 1]^D: :math:`\log p_X(x) = \log p_Y(y) + \log|\det \partial y/\partial x|`.
    The model's probability of the discrete image k is the mass of its cell
    :math:`C_k = \prod_i [k_i/L, (k_i+1)/L)`, of volume :math:`L^{-D}`:

    .. math::  \log P(k) = \log \int_{C_k} p_X(x)\,dx = \log E_{u}\big[p_X((k+u)/L)\big] - D\log L
               \ \ge\ E_u\big[\log p_X((k+u)/L)\big] - D \log L

    (Jensen). So :math:`-\log_2 P(k)/D` is at most the expectation of the formula above: the
    :math:`\log_2 L` (8 for 8-bit images) is the cell volume, nothing else; an ELBO in place of
    :math:`\log p_Y` makes the bound looser but still valid. Bits/dim computed from data that was
    not dequantized has no such meaning (and can be negative); :meth:`Preprocess.bits_per_dim`
    refuses it.

    Args:
        log_likelihood: (B,) nats, log p_Y(y) or an ELBO of it.
        logdet: (B,) nats, the summed log|det ∂y/∂x| of every transform from the dequantized x
            in [0, 1]^D to y (0 for the identity).
        num_dims: D, the number of dimensions of one example (C·H·W).
        num_levels: L, the number of discrete levels per dimension (256).

    Returns:
        (B,) bits per dimension.
    """
    if int(num_dims) != num_dims or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer (C*H*W); got {num_dims!r}")
    if int(num_levels) != num_levels or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2; got {num_levels!r}")
    log_likelihood = torch.as_tensor(log_likelihood)
    logdet = torch.as_tensor(logdet, dtype=log_likelihood.dtype, device=log_likelihood.device)
    if logdet.shape != log_likelihood.shape and logdet.ndim != 0:
        raise ValueError(f"logdet must have the shape of log_likelihood {tuple(log_likelihood.shape)} "
                         f"(one per example) or be a scalar; got {tuple(logdet.shape)}")
    return -(log_likelihood + logdet) / (num_dims * math.log(2.0)) + math.log2(num_levels)


@dataclass
class Preprocessed:
    """A preprocessed batch: ``y`` (B, C, H, W) for the model, ``logdet`` (B,) =
    log|det ∂y/∂x| from the data in [0, 1]^D to y, and whether x was dequantized."""

    y: torch.Tensor
    logdet: torch.Tensor
    dequantized: bool

    @property
    def num_dims(self) -> int:
        return self.y[0].numel()


class Preprocess:
    """uint8 images → (y, logdet) for the model, and back for sampling.

    Args:
        transform: ``"logit"`` (sdeflow-light's default, α = ``alpha``), ``"centered"`` (2x − 1)
            or ``"identity"``; see the module docstring.
        alpha: the logit margin.
        flip: random horizontal flips when called with ``train=True`` (never at evaluation).
        dequantize: add uniform noise (:func:`dequantize`). ``False`` maps k ↦ k/255 as image
            libraries do; such batches train, but :meth:`bits_per_dim` refuses them.
    """

    def __init__(self, transform: str = "logit", alpha: float = ALPHA, flip: bool = True,
                 dequantize: bool = True):
        check_choice("transform", transform, TRANSFORMS)
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5); got {alpha}")
        self.transform, self.alpha, self.flip, self.dequantize = transform, float(alpha), bool(flip), bool(dequantize)

    def __repr__(self) -> str:
        return (f"Preprocess(transform={self.transform!r}, alpha={self.alpha}, flip={self.flip}, "
                f"dequantize={self.dequantize})")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y = φ(x) and log|det ∂y/∂x| (B,) for x (B, ...) in [0, 1]."""
        if self.transform == "logit":
            return logit_transform(x, self.alpha)
        zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        if self.transform == "centered":
            return 2.0 * x - 1.0, zeros + x[0].numel() * math.log(2.0)
        return x, zeros

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """x = φ⁻¹(y) in [0, 1] (clipped), same shape as y."""
        if self.transform == "logit":
            return logit_inverse(y, self.alpha)
        x = (y + 1.0) / 2.0 if self.transform == "centered" else y
        return x.clamp(0.0, 1.0)

    def to_uint8(self, y: torch.Tensor) -> torch.Tensor:
        """Model space → 8-bit images: :func:`quantize` ∘ :meth:`inverse`."""
        return quantize(self.inverse(y))

    def __call__(self, images: torch.Tensor, train: bool = False,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Preprocessed:
        """uint8 images (B, C, H, W) → :class:`Preprocessed`; flips only when ``train`` (and ``flip``)."""
        _check_uint8("images", images)
        if images.ndim != 4:
            raise ValueError(f"images must have shape (B, C, H, W); got {tuple(images.shape)}")
        if train and self.flip:
            images = random_hflip(images, generator)
        if self.dequantize:
            x = dequantize(images, generator=generator, dtype=dtype)
        else:
            x = images.to(dtype) / (NUM_LEVELS - 1)
        y, logdet = self.forward(x)
        return Preprocessed(y=y, logdet=logdet, dequantized=self.dequantize)

    @staticmethod
    def bits_per_dim(log_likelihood: torch.Tensor, batch: Preprocessed) -> torch.Tensor:
        """:func:`bits_per_dim` of a batch this object produced; ``ValueError`` if it was not
        dequantized (bits/dim of continuous densities at discrete points is meaningless)."""
        if not batch.dequantized:
            raise ValueError("bits/dim needs dequantized data: the batch was preprocessed with "
                             "dequantize=False, whose density values at 8-bit points give meaningless "
                             "(even negative) bits/dim; preprocess with dequantize=True")
        return bits_per_dim(log_likelihood, batch.logdet, batch.num_dims)


# --- Truncated-normal dequantization (i-DODE) ---------------------------------------------------

def _bin_geometry(transform: str, alpha: float, num_levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Level k's bin in model space, float64 tensors of length L indexed by k:
    centre :math:`c_k = \phi((k+\tfrac12)/L)` and offsets :math:`a_k = \phi(k/L) - c_k < 0 <
    b_k = \phi((k+1)/L) - c_k` (φ increasing)."""
    grid = torch.arange(2 * num_levels + 1, dtype=torch.float64) / (2 * num_levels)
    y = Preprocess(transform, alpha, flip=False).forward(grid)[0]
    edges, centres = y[0::2], y[1::2]
    return centres, edges[:-1] - centres, edges[1:] - centres


def _sample_offsets(lower: torch.Tensor, upper: torch.Tensor, sigma: float,
                    generator: torch.Generator | None) -> torch.Tensor:
    r"""z ~ N(0, σ²) truncated to [a, b] per element by the inverse CDF, in float64:
    :math:`u = \Phi(a/\sigma) + r\,(\Phi(b/\sigma) - \Phi(a/\sigma))`, r ~ U[0, 1),
    :math:`z = \sigma\,\Phi^{-1}(u)`, clamped into [a, b] against rounding."""
    r = torch.rand(lower.shape, generator=generator, dtype=torch.float64, device=lower.device)
    low_cdf = torch.special.ndtr(lower / sigma)
    u = low_cdf + r * torch.exp(log_interval_mass(lower / sigma, upper / sigma))
    return torch.clamp(sigma * torch.special.ndtri(u), lower, upper)


def _log_density(z: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sigma: float) -> torch.Tensor:
    r"""Per-element log density of the truncated normal at offset z:
    :math:`-z^2/(2\sigma^2) - \log(\sqrt{2\pi}\,\sigma) - \log(\Phi(b/\sigma) - \Phi(a/\sigma))`."""
    return (-0.5 * (z / sigma) ** 2 - math.log(math.sqrt(2.0 * math.pi) * sigma)
            - log_interval_mass(lower / sigma, upper / sigma))


def truncated_normal_scale(transform: str = "logit", alpha: float = ALPHA, tau: float = TRUNCATION,
                           num_levels: int = NUM_LEVELS) -> float:
    r"""The truncated normal's scale: the narrowest half-bin in model space over τ,

    .. math::  \sigma = \frac{1}{\tau}\,\min_{k}\,\min(-a_k,\ b_k),\qquad
               a_k = \phi(k/L) - c_k,\quad b_k = \phi((k+1)/L) - c_k,\quad c_k = \phi((k+\tfrac12)/L),

    so :math:`\pm\tau\sigma` around every bin's centre lies inside the bin. For the identity this
    is :math:`1/(2L\tau)`, for ``"centered"`` :math:`1/(L\tau)`; for the logit the narrowest bins
    are the middle ones.

    ``ValueError`` (naming the argument) for an unknown ``transform``, a ``tau`` that is not a
    finite number > 0, or ``num_levels`` < 2.
    """
    check_choice("transform", transform, TRANSFORMS)
    tau = check_positive_float("tau", tau)
    if check_positive_int("num_levels", num_levels) < 2:
        raise ValueError(f"num_levels must be an integer >= 2; got {num_levels!r}")
    _, lower, upper = _bin_geometry(transform, alpha, int(num_levels))
    return float(torch.minimum(-lower, upper).min()) / tau


def truncated_normal_dequantize(images: torch.Tensor, transform: str = "logit", alpha: float = ALPHA,
                                sigma: float | None = None, generator: torch.Generator | None = None,
                                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Truncated-normal dequantization in model space (i-DODE), and the log-weight that turns
    :func:`bits_per_dim` into its bound.

    Per pixel with level k, :math:`y = c_k + z`, :math:`z \sim N(0, \sigma^2)` truncated to the
    bin offsets :math:`[a_k, b_k]` (see :func:`truncated_normal_scale`), drawn independently by
    the exact inverse CDF in float64 and then cast to ``dtype``. Its density in model space is

    .. math::  \log q(y \mid k) = \sum_i \Big[-\frac{z_i^2}{2\sigma^2} - \log(\sqrt{2\pi}\,\sigma)
               - \log\big(\Phi(b_{k_i}/\sigma) - \Phi(a_{k_i}/\sigma)\big)\Big].

    The bound. φ maps level k's cell of [0, 1]^D onto the box :math:`B_k = \prod_i
    [\phi(k_i/L), \phi((k_i+1)/L)]`, and these boxes partition y-space, so the model's probability
    of the discrete image is :math:`P(k) = \int_{B_k} p_Y(y)\,dy = E_{q}[p_Y(y)/q(y \mid k)]`, and
    by Jensen :math:`\log P(k) \ge E_q[\log p_Y(y) - \log q(y \mid k)]`, i.e.

    .. math::  -\frac{\log_2 P(k)}{D} \le E_q\Big[-\frac{\log p_Y(y) - \log q(y \mid k)}{D \ln 2}\Big].

    The second value returned is the **log-weight** :math:`w = -\log q(y \mid k) + D \ln L`: the
    ``logdet`` argument that :func:`bits_per_dim` ``(log p_Y(y), w, D)`` turns into this bound, as
    :math:`-(\log p_Y + w)/(D\ln 2) + \log_2 L = -(\log p_Y - \log q)/(D \ln 2)`. (For uniform
    dequantization, :math:`q(y \mid k) = L^D\,|\det \partial x/\partial y|` and this w is exactly
    the ``logdet`` of the transform.) An ELBO in place of :math:`\log p_Y` keeps the bound valid.

    Args:
        images: uint8 levels k of shape (B, ...), L = 256.
        transform: ``"logit"``, ``"centered"`` or ``"identity"`` (φ; see the module docstring).
        alpha: the logit margin.
        sigma: the normal's scale in model space; default :func:`truncated_normal_scale`
            ``(transform, alpha)``.
        generator: for the uniform draws (float64, one per pixel, whatever ``dtype``).
        dtype: of both outputs.

    Returns:
        (y of the images' shape, log-weight w of shape (B,)), both ``dtype``; log q is summed in
        float64 at the float64 sample before the cast.
    """
    _check_uint8("images", images)
    check_choice("transform", transform, TRANSFORMS)
    if images.ndim < 1:
        raise ValueError("images must have a batch dimension: shape (B, ...)")
    sigma = truncated_normal_scale(transform, alpha) if sigma is None else check_positive_float("sigma", sigma)
    index = images.long()
    centre, lower, upper = (t.to(images.device)[index] for t in _bin_geometry(transform, alpha, NUM_LEVELS))
    z = _sample_offsets(lower, upper, sigma, generator)
    log_q = sum_except_batch(_log_density(z, lower, upper, sigma))
    log_weight = -log_q + images[0].numel() * math.log(NUM_LEVELS)
    return (centre + z).to(dtype), log_weight.to(dtype)


def check_images(images, config: dict, name: str = "images") -> torch.Tensor:
    """Refuse anything but a uint8 tensor (N, C, H, W) of the model's shape."""
    if not torch.is_tensor(images):
        images = torch.as_tensor(np.asarray(images))
    if images.dtype != torch.uint8:
        raise ValueError(f"{name} must hold raw 8-bit levels (dtype uint8), not {images.dtype}: they are "
                         f"dequantized here, and bits/dim of data that was not dequantized is meaningless")
    c, s = config["net"]["in_channels"], config["net"]["image_size"]
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
        raise ValueError(f"{name} must have shape (N, {c}, {s}, {s}) for this model; got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return images


def data_range(data_config: dict) -> tuple[float, float]:
    r"""(low, high) = (φ(0), φ(1)): the range of the data in model space under the configured
    transform φ ({"transform", "alpha"}; φ increasing): [−1, 1] for "centered",
    :math:`[\operatorname{logit}\alpha, \operatorname{logit}(1-\alpha)]` for "logit" (symmetric
    about 0), [0, 1] for "identity". What the samplers clip x̂₀ into
    (:attr:`sdeflow.samplers.SamplerSettings.clip`)."""
    transform = data_config["transform"]
    check_choice("transform", transform, TRANSFORMS)
    if transform == "logit":
        alpha = float(data_config.get("alpha", ALPHA))
        high = math.log1p(-alpha) - math.log(alpha)
        return -high, high
    return (-1.0, 1.0) if transform == "centered" else (0.0, 1.0)


def _preprocessor(data_config: dict, flip: bool = False) -> Preprocess:
    return Preprocess(data_config["transform"], alpha=data_config["alpha"], flip=flip)


def preprocess(images: torch.Tensor, data_config: dict, generator: torch.Generator | None, flip: bool = False,
               dtype: torch.dtype = torch.float32):
    """uint8 (B, C, H, W) → :class:`sdeflow.data.transforms.Preprocessed` (model input ``y`` of
    ``dtype``, ``logdet`` = log|det ∂y/∂x| from the dequantised x ∈ [0, 1]^D), by the configured
    :class:`~sdeflow.data.transforms.Preprocess`; random flips only when ``flip`` (training)."""
    return _preprocessor(data_config, flip)(images, train=flip, generator=generator, dtype=dtype)


def postprocess(y: torch.Tensor, data_config: dict) -> torch.Tensor:
    """Model space → uint8 images (the inverse transform, then quantised)."""
    return _preprocessor(data_config).to_uint8(y)
