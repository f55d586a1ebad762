r"""A small classifier trained on a data set's labels: an offline feature network for FID / KID on
small images, and a judge of which classes samples fall in.

:class:`ClassifierNet` is LeNet-like (two 5×5 convolutions with max-pooling, a hidden layer, a
linear read-out) and works for 1×28×28 digits and 3×32×32 photographs. Its hidden layer (128-d)
gives a "classifier FID", the LeNet-feature FID of MNIST papers, which needs no download; its
predictions give the share of samples classified with confidence > 0.9 and the effective number
of classes exp(H(p̂)) of the predicted-label histogram p̂ (mode coverage: 10 for a model that
covers ten classes evenly, 1 for a collapsed one).

- :func:`train_classifier` fits it (Adam, cosine-decayed learning rate, random shifts and, for
  mirror-symmetric data, flips) from a seed;
- :func:`save_classifier` / :func:`load_classifier` write and read it atomically as a file of
  tensors and plain values, ``{"format", "version", "config", "state_dict", "info"}``, loadable with
  ``torch.load(weights_only=True)``;
- :func:`classifier_accuracy` is its accuracy on held-out labelled images, :class:`ClassHistogram`
  accumulates the coverage figures over batches.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..utils import check_fraction, check_nonneg_float, check_nonneg_int, check_positive_float, check_positive_int
from .features import check_uint8_images, device_of, iter_features

__all__ = ["ClassifierNet", "train_classifier", "classifier_accuracy", "save_classifier", "load_classifier",
           "ClassHistogram", "class_coverage", "FORMAT", "VERSION"]

FORMAT = "sdeflow-classifier"
VERSION = 1
_MIN_SIZE = 16  # two valid 5×5 convolutions, each followed by 2×2 pooling, leave at least 1×1


class ClassifierNet(nn.Module):
    r"""LeNet-like classifier of uint8 images (B, C, H, W) with H = W = ``image_size``.

    forward: x ↦ φ(x) = ReLU(W_h · flatten(pool(ReLU(conv₂(pool(ReLU(conv₁(x/127.5 − 1))))))) + b_h),
    the features (B, ``feature_dim``); :meth:`classify`: φ ↦ logits W_o · dropout(φ) + b_o, (B, ``n_classes``).
    """

    name = "classifier"

    def __init__(self, in_channels: int = 1, image_size: int = 28, n_classes: int = 10, width: int = 32,
                 feature_dim: int = 128, dropout: float = 0.25):
        super().__init__()
        self.config = {"in_channels": check_positive_int("in_channels", in_channels),
                       "image_size": check_positive_int("image_size", image_size),
                       "n_classes": check_positive_int("n_classes", n_classes),
                       "width": check_positive_int("width", width),
                       "feature_dim": check_positive_int("feature_dim", feature_dim),
                       "dropout": check_fraction("dropout", dropout)}
        if image_size < _MIN_SIZE:
            raise ValueError(f"image_size must be at least {_MIN_SIZE}; got {image_size}")
        if n_classes < 2:
            raise ValueError(f"n_classes must be at least 2; got {n_classes}")
        side = ((image_size - 4) // 2 - 4) // 2
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * side * side, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, n_classes))
        self.dim = feature_dim

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, s = self.config["in_channels"], self.config["image_size"]
        return c, s, s

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_uint8_images("images", images)
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images must have shape (N, {', '.join(map(str, self.image_shape))}) for this "
                             f"classifier; got {tuple(images.shape)}")
        return self.body(images.float() / 127.5 - 1.0)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) of the features (B, feature_dim) that :meth:`forward` returns."""
        return self.head(features)


# ---- training ------------------------------------------------------------------------------------
def _check_labelled(images: torch.Tensor, labels: torch.Tensor) -> None:
    check_uint8_images("images", images)
    if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],) \
            or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        what = f"shape {tuple(labels.shape)}, dtype {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of shape ({images.shape[0]},); got {what}")
    if labels.min() < 0:
        raise ValueError(f"labels must be >= 0; got {int(labels.min())}")


def _augment(images: torch.Tensor, shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by a random whole-pixel shift in [-shift, shift]² (zeros enter at the
    edges) and, with ``flip``, mirrored left-right with probability 1/2."""
    n, _, h, w = images.shape
    if shift:
        padded = F.pad(images, (shift, shift, shift, shift))
        dy, dx = torch.randint(0, 2 * shift + 1, (2, n, 1), generator=generator)
        rows = (dy + torch.arange(h))[:, :, None]  # (n, h, 1)
        cols = (dx + torch.arange(w))[:, None, :]  # (n, 1, w)
        images = padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
    return images.contiguous()


def _fit(net, images, labels, steps, batch_size, lr, weight_decay, shift, flip, generator, device, callback) -> None:
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    order, position = torch.randperm(len(images), generator=generator), 0
    for step in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(images), generator=generator), 0
        index = order[position:position + batch_size]
        position += batch_size
        x = _augment(images[index], shift, flip, generator).to(device)
        y = labels[index].to(device)
        logits = net.classify(net(x))
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if callback is not None:
            callback({"step": step + 1, "steps": steps, "loss": float(loss.detach()),
                      "accuracy": float((logits.argmax(1) == y).float().mean())})


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, steps: int = 1500, batch_size: int = 128,
                     lr: float = 2e-3, weight_decay: float = 1e-4, shift: int = 2, flip: bool = False,
                     n_classes: int | None = None, width: int = 32, feature_dim: int = 128, seed: int = 0,
                     device=None, callback: Callable[[dict], None] | None = None) -> ClassifierNet:
    r"""Fit a :class:`ClassifierNet` to labelled images by minimising the cross-entropy
    −log softmax(f(x))_y over minibatches drawn without replacement (a new permutation each epoch),
    with Adam and the learning rate lr·½(1 + cos(π k / steps)) at step k.

    Args:
        images: uint8 (N, C, H, W) with H = W; labels: integers (N,) in [0, n_classes).
        steps, batch_size, lr, weight_decay: the optimisation (AdamW's decoupled weight decay).
        shift: augmentation, random shifts of up to ``shift`` pixels; flip: random left-right flips
            (for mirror-symmetric data, not digits).
        n_classes: None: max(labels) + 1.
        width, feature_dim: the network's size (see :class:`ClassifierNet`).
        seed: the initial weights, dropout, the batches and the augmentation all come from it (the
            caller's random state is untouched): the same seed gives the same network (on the same
            device and thread count).
        callback: called after every step with {"step", "steps", "loss", "accuracy" (of the batch)}.

    Returns:
        the trained network, in eval mode, on ``device`` (None: the CPU).
    """
    _check_labelled(images, labels)
    steps, batch_size = check_positive_int("steps", steps), check_positive_int("batch_size", batch_size)
    lr, shift = check_positive_float("lr", lr), check_nonneg_int("shift", shift)
    weight_decay = check_nonneg_float("weight_decay", weight_decay)
    n_classes = int(labels.max()) + 1 if n_classes is None else check_positive_int("n_classes", n_classes)
    if int(labels.max()) >= n_classes:
        raise ValueError(f"labels must lie in [0, n_classes={n_classes}); got {int(labels.max())}")
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be square; got {images.shape[2]}×{images.shape[3]}")
    device = torch.device(device if device is not None else "cpu")
    # Everything random (weights, dropout, batches, augmentation) comes from the seed; the caller's
    # random state is left as it was.
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        net = ClassifierNet(images.shape[1], images.shape[2], n_classes, width=width, feature_dim=feature_dim)
        _fit(net.to(device).train(), images, labels, steps, batch_size, lr, weight_decay, shift, flip,
             torch.Generator().manual_seed(seed), device, callback)
    return net.eval()


def predicted_logits(net: ClassifierNet, images: torch.Tensor, *, batch_size: int = 500, device=None) -> torch.Tensor:
    """The classifier's logits (N, n_classes) of uint8 images (N, C, H, W), on the CPU."""
    with torch.no_grad():
        return torch.cat([net.classify(f.to(device_of(net))).cpu()
                          for f in iter_features(net, images, batch_size=batch_size, device=device)])


def classifier_accuracy(net: ClassifierNet, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500,
                        device=None) -> float:
    """The share of ``images`` whose predicted class argmax f(x) is their label (held-out accuracy)."""
    _check_labelled(images, labels)
    return float((predicted_logits(net, images, batch_size=batch_size, device=device).argmax(1) == labels).float().mean())


# ---- the file --------------------------------------------------------------------------------------
def save_classifier(net: ClassifierNet, path: str | os.PathLike, info: dict | None = None) -> Path:
    """Write ``net`` (its configuration and weights, on the CPU) and ``info`` (plain values: data set,
    accuracy, ...) atomically to ``path``; returns the path."""
    from ..storage.files import atomic_write_bytes

    if not isinstance(net, ClassifierNet):
        raise ValueError(f"net must be a ClassifierNet; got {type(net).__name__}")
    state = {"format": FORMAT, "version": VERSION, "config": dict(net.config),
             "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "info": dict(info or {})}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def load_classifier(path: str | os.PathLike, device="cpu") -> ClassifierNet:
    """The :class:`ClassifierNet` of a file written by :func:`save_classifier`, in eval mode, read with
    ``torch.load(weights_only=True)``; its ``info`` dict is the attribute ``info``.

    Raises FileNotFoundError for a missing file and ValueError for one that is not such a file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"classifier file {path} does not exist (train one with train_classifier "
                                f"and save_classifier)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, corrupt or unsafe pickles all land here
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{path} is not a readable classifier file ({type(err).__name__}: {first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an sdeflow classifier file (format {FORMAT!r})")
    if state.get("version") != VERSION:
        raise ValueError(f"{path} is a classifier file of version {state.get('version')!r}; this sdeflow reads {VERSION}")
    try:
        net = ClassifierNet(**state["config"])
        net.load_state_dict(state["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{path} holds a classifier that does not fit its configuration ({first})") from None
    net.info = dict(state.get("info") or {})
    return net.to(device).eval()


# ---- class coverage --------------------------------------------------------------------------------
class ClassHistogram:
    r"""The predicted classes of samples, accumulated batch by batch from logits (B, K):

    - ``confident_share``: the share of samples with max_k softmax(f(x))_k > ``confidence``;
    - ``effective_classes``: exp(H(p̂)), H(p̂) = −Σ_k p̂_k log p̂_k, where p̂ is the histogram of
      argmax_k f(x)_k: between 1 (every sample in one class) and K (classes equally often).
    """

    def __init__(self, confidence: float = 0.9):
        self.confidence = check_fraction("confidence", confidence)
        self.counts = np.zeros(0, dtype=np.int64)  # sized by the first batch's K
        self.n_confident = 0

    def update(self, logits: torch.Tensor) -> "ClassHistogram":
        if logits.ndim != 2 or logits.shape[1] < 1 or (self.n and logits.shape[1] != len(self.counts)):
            expected = f"(B, {len(self.counts)})" if self.n else "(B, K)"
            raise ValueError(f"logits must have shape {expected}; got {tuple(logits.shape)}")
        if not self.n:
            self.counts = np.zeros(logits.shape[1], dtype=np.int64)
        probabilities = logits.detach().double().softmax(1).cpu()
        top, label = probabilities.max(1)
        self.counts += np.bincount(label.numpy(), minlength=len(self.counts))
        self.n_confident += int((top > self.confidence).sum())
        return self

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def result(self) -> dict:
        """{"confident_share", "effective_classes", "class_counts"} (NaN figures for no samples)."""
        if self.n == 0:
            return {"confident_share": float("nan"), "effective_classes": float("nan"), "class_counts": self.counts.tolist()}
        p = self.counts[self.counts > 0] / self.n
        return {"confident_share": self.n_confident / self.n, "effective_classes": float(np.exp(-(p * np.log(p)).sum())),
                "class_counts": self.counts.tolist()}


def class_coverage(logits: torch.Tensor, confidence: float = 0.9) -> dict:
    """:meth:`ClassHistogram.result` of one batch of logits (N, K)."""
    return ClassHistogram(confidence).update(logits).result()
