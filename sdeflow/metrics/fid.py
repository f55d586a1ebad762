r"""FID and KID of image samples in the feature space of a feature network.

With features φ(x) ∈ R^D (:mod:`sdeflow.metrics.features`: Inception-v3 pool3, or a classifier's
hidden layer) of the samples s and of reference images r:

- FID (Heusel et al. 2017): the Fréchet distance between the Gaussians fitted to the two feature
  sets, ‖μ_s − μ_r‖² + Tr(C_s + C_r − 2 (C_s C_r)^{1/2}) (:func:`frechet_distance`);
- KID (Bińkowski et al. 2018): the unbiased MMD² with the kernel k(x, y) = (xᵀy / D + 1)³, averaged
  over random subsets, with its standard error (:func:`kid`).

Features are accumulated batch by batch (:class:`FeatureStatistics`: D² numbers in float64 and a
bounded sample of features for KID), so 50,000 samples fit in memory. FID is biased upwards at small
N: compare figures only at equal N, and against the floor of real held-out images at that N.
:func:`image_metrics` gives both figures (and, for a classifier, the classes samples fall in);
:func:`reference_statistics` caches a data set's statistics in an .npz keyed by what produced them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..utils import check_fraction, check_nonneg_int, check_positive_int
from .classifier import ClassHistogram
from .features import check_uint8_images, device_of, iter_features

__all__ = ["frechet_distance", "FeatureStatistics", "kid", "feature_statistics", "reference_statistics",
           "image_metrics", "module_digest"]


# ---- FID -----------------------------------------------------------------------------------------
def _as_float64(name: str, value, ndim: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s); got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains non-finite values")
    return array


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues that
    rounding made slightly negative count as 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    r"""The Fréchet (Wasserstein-2) distance² between N(μ₁, C₁) and N(μ₂, C₂), FID's formula:

    .. math::  d^2 = \|\mu_1 - \mu_2\|^2 + \operatorname{Tr}\bigl(C_1 + C_2 - 2 (C_1 C_2)^{1/2}\bigr).

    Computed in float64 with Tr (C₁C₂)^{1/2} = Tr (C₁^{1/2} C₂ C₁^{1/2})^{1/2}: the matrix inside is
    symmetric positive semi-definite, so both roots come from symmetric eigen-decompositions and no
    imaginary parts arise (singular covariances, as with N < D, are fine).

    Args:
        mu1, mu2: means (D,); cov1, cov2: covariances (D, D); numpy arrays or tensors.

    Returns:
        d² >= 0, a float.
    """
    mu1, mu2 = _as_float64("mu1", mu1, 1), _as_float64("mu2", mu2, 1)
    cov1, cov2 = _as_float64("cov1", cov1, 2), _as_float64("cov2", cov2, 2)
    d = mu1.shape[0]
    for name, cov in (("cov1", cov1), ("cov2", cov2)):
        if cov.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}) to match mu1; got {cov.shape}")
    if mu2.shape != (d,):
        raise ValueError(f"mu2 must have shape ({d},) to match mu1; got {mu2.shape}")
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_root = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_root
    return float(max(distance, 0.0))  # equal laws can round to -1e-12


# ---- streamed statistics -------------------------------------------------------------------------
class FeatureStatistics:
    r"""Mean and covariance of features accumulated batch by batch, and a bounded uniform sample of them.

    Each batch (B, D) is merged by Chan et al.'s pairwise update, in float64: with n, μ and the
    scatter M = Σᵢ (xᵢ − μ)(xᵢ − μ)ᵀ of what came before and n_b, μ_b, M_b of the batch,
    δ = μ_b − μ, n' = n + n_b, μ' = μ + δ n_b / n', M' = M + M_b + δδᵀ n n_b / n'.
    ``covariance`` is M / (n − 1), the unbiased estimate. ``kept`` holds up to ``keep`` of the
    features (float32) for KID, a uniform sample without replacement (reservoir sampling, Vitter's
    algorithm R, drawing from ``generator`` once more than ``keep`` have come).

    Memory: D² + D float64 numbers and keep·D float32 ones, whatever N.
    """

    def __init__(self, dim: int, *, keep: int = 10_000, generator: torch.Generator | None = None):
        self.dim = check_positive_int("dim", dim)
        self.keep = check_nonneg_int("keep", keep)
        self.generator = generator
        self.n = 0
        self._mean = np.zeros(dim)
        self._scatter = np.zeros((dim, dim))
        self._kept: list[torch.Tensor] = []

    def update(self, features: torch.Tensor) -> "FeatureStatistics":
        """Add a batch of features (B, D)."""
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] != self.dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a tensor (B, {self.dim}); got {shape}")
        if not torch.isfinite(features).all():
            raise ValueError("features contain non-finite values (NaN or inf): the images or the network diverged")
        if features.shape[0] == 0:
            return self
        self._keep_some(features.detach().float().cpu())
        x = features.detach().cpu().double().numpy()
        n_b = x.shape[0]
        mean_b = x.mean(0)
        centred = x - mean_b
        delta = mean_b - self._mean
        total = self.n + n_b
        self._scatter += centred.T @ centred + np.outer(delta, delta) * (self.n * n_b / total)
        self._mean = self._mean + delta * (n_b / total)
        self.n = total
        return self

    def _keep_some(self, rows: torch.Tensor) -> None:
        held = sum(len(chunk) for chunk in self._kept)
        room = max(self.keep - held, 0)
        if room:
            self._kept.append(rows[:room].clone())
        rest = rows[room:]
        if len(rest) == 0 or self.keep == 0:
            return
        kept = self.kept  # full now: one tensor (keep, D)
        first = self.n + room  # the 0-based index of rest[0] among all features seen
        index = torch.arange(first, first + len(rest), dtype=torch.float64)
        slot = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64) * (index + 1)).long()
        hits = (slot < self.keep).nonzero().flatten().numpy()
        # Row i replaces slot j with probability keep/(i+1); of two rows drawing one slot, the later one stays.
        slots = slot.numpy()[hits]
        _, last = np.unique(slots[::-1], return_index=True)
        chosen = hits[::-1][last]
        kept[torch.from_numpy(slots[::-1][last].copy())] = rest[torch.from_numpy(chosen.copy())]

    @property
    def kept(self) -> torch.Tensor:
        """The kept features, float32 (min(n, keep), D)."""
        if len(self._kept) != 1:
            self._kept = [torch.cat(self._kept) if self._kept else torch.zeros(0, self.dim)]
        return self._kept[0]

    @property
    def mean(self) -> np.ndarray:
        """μ, float64 (D,)."""
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        """The unbiased covariance M / (n − 1), float64 (D, D); ValueError with fewer than 2 features."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 features; got {self.n}")
        return self._scatter / (self.n - 1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything as numpy arrays (for an .npz): n, mean, scatter, kept, keep."""
        return {"n": np.array(self.n), "mean": self._mean, "scatter": self._scatter,
                "kept": self.kept.numpy(), "keep": np.array(self.keep)}

    @classmethod
    def from_arrays(cls, arrays) -> "FeatureStatistics":
        """The statistics :meth:`to_arrays` wrote (any mapping of those names to arrays)."""
        mean = np.asarray(arrays["mean"], dtype=np.float64)
        stats = cls(mean.shape[0], keep=int(arrays["keep"]))
        stats.n, stats._mean = int(arrays["n"]), mean
        stats._scatter = np.asarray(arrays["scatter"], dtype=np.float64)
        stats._kept = [torch.from_numpy(np.asarray(arrays["kept"], dtype=np.float32).copy())]
        if stats._scatter.shape != (stats.dim, stats.dim) or stats._kept[0].shape[1:] != (stats.dim,):
            raise ValueError("arrays do not fit together: mean, scatter and kept must have D, (D, D) and (k, D) entries")
        return stats


def _accumulate(net: nn.Module, images, stats: FeatureStatistics | None, histogram: ClassHistogram | None, *,
                batch_size: int, device, name: str, keep: int, generator, callback
                ) -> tuple[FeatureStatistics, ClassHistogram | None]:
    for features in iter_features(net, images, batch_size=batch_size, device=device, name=name, callback=callback):
        if stats is None:
            stats = FeatureStatistics(features.shape[1], keep=keep, generator=generator)
        stats.update(features)
        if histogram is not None:
            with torch.no_grad():
                histogram.update(net.classify(features.to(device_of(net))))
    if stats is None or stats.n == 0:
        raise ValueError(f"{name} must hold at least one image; got none")
    return stats, histogram


def feature_statistics(net: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int = 250,
                       device=None, keep: int = 10_000, generator: torch.Generator | None = None,
                       callback: Callable[[dict], None] | None = None) -> FeatureStatistics:
    """The :class:`FeatureStatistics` of φ(x) over uint8 ``images`` (N, C, H, W), or an iterable of
    such batches, computed ``batch_size`` at a time; ``callback`` as for
    :func:`~sdeflow.metrics.features.iter_features`."""
    return _accumulate(net, images, None, None, batch_size=batch_size, device=device, name="images", keep=keep,
                       generator=generator, callback=callback)[0]


# ---- KID -------------------------------------------------------------------------------------------
def _feature_matrix(name: str, features) -> torch.Tensor:
    if isinstance(features, FeatureStatistics):
        features = features.kept
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) tensor or FeatureStatistics; got {getattr(features, 'shape', type(features).__name__)}")
    return features.detach().cpu()


def kid(features_a, features_b, n_subsets: int = 100, subset_size: int = 1000,
        generator: torch.Generator | None = None) -> tuple[float, float]:
    r"""Kernel Inception Distance (Bińkowski et al. 2018) between two feature sets: the unbiased
    estimate of MMD² with the cubic polynomial kernel k(x, y) = (xᵀy / D + 1)³,

    .. math::  \widehat{\mathrm{MMD}}^2 = \frac{1}{m(m-1)} \sum_{i \ne j} [k(a_i, a_j) + k(b_i, b_j)]
               - \frac{2}{m^2} \sum_{i, j} k(a_i, b_j),

    on ``n_subsets`` pairs of random subsets of m = min(``subset_size``, N_a, N_b) features each (drawn
    without replacement from ``generator``). Its expectation is 0 when both sets come from one law.

    Args:
        features_a, features_b: (N_a, D) and (N_b, D) tensors or arrays, or :class:`FeatureStatistics`
            (their kept features).

    Returns:
        (mean, standard error) over the subsets, the error being std / √n_subsets. Subsets share
        features, so it measures the subsampling noise, not the spread over fresh samples of N.
    """
    a, b = _feature_matrix("features_a", features_a), _feature_matrix("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a and features_b must have the same dimension; got {a.shape[1]} and {b.shape[1]}")
    n_subsets, subset_size = check_positive_int("n_subsets", n_subsets), check_positive_int("subset_size", subset_size)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features on each side; got {len(a)} and {len(b)}")
    d = a.shape[1]
    estimates = np.empty(n_subsets)
    for i in range(n_subsets):
        x = a[torch.randperm(len(a), generator=generator)[:m]].float()
        y = b[torch.randperm(len(b), generator=generator)[:m]].float()
        # Inner products in float32 (the bulk of the work), the kernel and its sums in float64.
        k_xx = (x @ x.T).double().div_(d).add_(1).pow_(3)
        k_yy = (y @ y.T).double().div_(d).add_(1).pow_(3)
        k_xy = (x @ y.T).double().div_(d).add_(1).pow_(3)
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        estimates[i] = float(within - 2 * k_xy.sum() / (m * m))
    se = float(estimates.std(ddof=1) / math.sqrt(n_subsets)) if n_subsets > 1 else float("nan")
    return float(estimates.mean()), se


# ---- both, and the reference's cache ----------------------------------------------------------------
def module_digest(net: nn.Module) -> str:
    """SHA-256 of a network's class and weights (names, dtypes, shapes, values): what produced a set of features."""
    digest = hashlib.sha256(f"{type(net).__module__}.{type(net).__qualname__}".encode())
    for key, value in net.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _images_digest(images: torch.Tensor) -> str:
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def reference_statistics(net: nn.Module, images: torch.Tensor, *, cache: str | os.PathLike | None = None,
                         batch_size: int = 250, device=None, keep: int = 10_000,
                         generator: torch.Generator | None = None,
                         callback: Callable[[dict], None] | None = None) -> FeatureStatistics:
    """:func:`feature_statistics` of reference ``images`` (uint8 (N, C, H, W)), read from the .npz
    ``cache`` when it was written for the same network weights (:func:`module_digest`), the same
    images (their SHA-256) and the same ``keep``; otherwise computed and written there atomically.
    A cache file that cannot be read counts as absent and is replaced. ``callback`` as for
    :func:`image_metrics` (reports name the images "reference")."""
    from ..storage.files import atomic_write_bytes

    check_uint8_images("images", images)
    key = json.dumps({"network": module_digest(net), "images": _images_digest(images.cpu()), "keep": keep},
                     sort_keys=True)
    if cache is not None and os.path.isfile(cache):
        try:
            with np.load(cache, allow_pickle=False) as stored:
                if str(stored["key"]) == key:
                    return FeatureStatistics.from_arrays(stored)
        except (OSError, ValueError, KeyError):
            pass
    stats = _accumulate(net, images, None, None, batch_size=batch_size, device=device, name="reference", keep=keep,
                        generator=generator, callback=callback)[0]
    if cache is not None:
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array(key), **stats.to_arrays())
        atomic_write_bytes(cache, buffer.getvalue())
    return stats


def image_metrics(net: nn.Module, samples: torch.Tensor | Iterable[torch.Tensor],
                  reference: torch.Tensor | Iterable[torch.Tensor] | FeatureStatistics, *, batch_size: int = 250,
                  device=None, keep: int = 10_000, n_subsets: int = 100, subset_size: int = 1000,
                  confidence: float = 0.9, generator: torch.Generator | None = None,
                  callback: Callable[[dict], None] | None = None) -> dict:
    """FID and KID of uint8 ``samples`` against ``reference`` images in the feature space of ``net``.

    Args:
        net: a feature network (:mod:`sdeflow.metrics.features`).
        samples: uint8 (N, C, H, W) or an iterable of such batches (e.g. drawn on the fly).
        reference: the same for real images, or their :class:`FeatureStatistics` (e.g. from
            :func:`reference_statistics`).
        keep: features kept per side for KID (at least 2; see :class:`FeatureStatistics`).
        n_subsets, subset_size: KID's subsets (see :func:`kid`).
        confidence: for a network that classifies, the threshold of the confident share.
        generator: the KID subsets and the kept features.
        callback: after each batch, {"images": "samples" or "reference", "batch": its size}.

    Returns:
        {"fid", "kid", "kid_se", "n_samples", "n_reference", "features" (the network's name),
        "feature_dim", "kid_subsets", "kid_subset_size"}; for a network with ``classify``, also
        "confident_share", "effective_classes" and "class_counts" of the samples (see
        :class:`~sdeflow.metrics.classifier.ClassHistogram`).
    """
    if check_nonneg_int("keep", keep) < 2:
        raise ValueError(f"keep must be at least 2 (KID needs 2 features per side); got {keep}")
    check_fraction("confidence", confidence)
    if isinstance(samples, torch.Tensor) and isinstance(reference, torch.Tensor):
        check_uint8_images("samples", samples)
        check_uint8_images("reference", reference)
        if samples.shape[1:] != reference.shape[1:]:
            raise ValueError(f"samples and reference must have the same image shape; got "
                             f"{tuple(samples.shape[1:])} and {tuple(reference.shape[1:])}")
    common = dict(batch_size=batch_size, device=device, keep=keep, generator=generator, callback=callback)
    if not isinstance(reference, FeatureStatistics):
        reference, _ = _accumulate(net, reference, None, None, name="reference", **common)
    histogram = None
    if callable(getattr(net, "classify", None)):
        histogram = ClassHistogram(confidence)
    stats = FeatureStatistics(reference.dim, keep=keep, generator=generator)
    stats, histogram = _accumulate(net, samples, stats, histogram, name="samples", **common)
    kid_mean, kid_se = kid(stats, reference, n_subsets=n_subsets, subset_size=subset_size, generator=generator)
    result = {"fid": frechet_distance(stats.mean, stats.covariance, reference.mean, reference.covariance),
              "kid": kid_mean, "kid_se": kid_se, "n_samples": stats.n, "n_reference": reference.n,
              "features": getattr(net, "name", type(net).__name__), "feature_dim": stats.dim,
              "kid_subsets": n_subsets, "kid_subset_size": min(subset_size, len(stats.kept), len(reference.kept))}
    if histogram is not None:
        result.update(histogram.result())
    return result

