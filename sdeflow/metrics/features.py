r"""Feature networks for FID and KID, their registry, and features of images computed in batches.

A *feature network* is an ``nn.Module`` that maps uint8 images (B, C, H, W) to float32 features
φ(x) of shape (B, D), with a ``name`` for reports. One that also classifies (the classifier of
:mod:`sdeflow.metrics.classifier`) has ``classify(features) -> logits`` (B, K). :data:`FEATURES`
maps a name to a builder, ``builder(**params) -> feature network``:

- ``"inception"``: :class:`~sdeflow.metrics.inception.InceptionFeatures`, Inception-v3's pool3
  (D = 2048) as torch-fidelity computes it (the extra ``sdeflow[metrics]``);
- ``"classifier"``: :func:`~sdeflow.metrics.classifier.load_classifier`, the penultimate layer of a
  small classifier sdeflow trained on a data set's labels.

Both are registered by :mod:`sdeflow.metrics`; :func:`register_features` adds another.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..utils import check_new_name, check_positive_int

__all__ = ["FEATURES", "register_features", "make_features", "iter_features", "compute_features",
           "check_uint8_images", "device_of"]

#: name → builder(**params) -> feature network (uint8 (B, C, H, W) -> float32 (B, D)).
FEATURES: dict[str, Callable[..., nn.Module]] = {}


def register_features(name: str, builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Add ``builder(**params) -> feature network`` to :data:`FEATURES` under ``name`` and return it;
    ValueError if the name is taken or ``builder`` is not callable."""
    if not callable(builder):
        raise ValueError(f"builder must be callable (a class or a function); got {builder!r}")
    FEATURES[check_new_name(name, FEATURES, "feature network")] = builder
    return builder


def make_features(name: str, **params) -> nn.Module:
    """The feature network registered as ``name``, built with ``params``; ValueError for an unknown
    name or parameter (listing the allowed ones)."""
    if name not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(repr(n) for n in FEATURES)}; got {name!r}")
    builder = FEATURES[name]
    try:
        inspect.signature(builder).bind(**params)
    except TypeError as err:
        allowed = ", ".join(inspect.signature(builder).parameters)
        raise ValueError(f"bad parameters for the {name!r} features ({err}); allowed: {allowed}") from None
    return builder(**params)


def check_uint8_images(name: str, images: torch.Tensor) -> torch.Tensor:
    """Return ``images`` if it is a uint8 tensor (N, C, H, W) with N >= 1; else ValueError naming ``name``."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        what = (f"a {images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                else type(images).__name__)
        raise ValueError(f"{name} must be a uint8 tensor (N, C, H, W); got {what}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image; got shape {tuple(images.shape)}")
    return images


def device_of(net: nn.Module) -> torch.device:
    """The device of a network's first parameter (the CPU for one without parameters)."""
    param = next(net.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batches(images, batch_size: int, name: str) -> Iterator[torch.Tensor]:
    # A tensor is cut into batches; an iterable's batches are taken as they come (cut if larger).
    batches = [images] if isinstance(images, torch.Tensor) else images
    for batch in batches:
        check_uint8_images(name, batch)
        yield from batch.split(batch_size)


def iter_features(net: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int = 250,
                  device=None, name: str = "images", callback: Callable[[dict], None] | None = None
                  ) -> Iterator[torch.Tensor]:
    """φ(x) of ``images`` batch by batch: float32 (B, D) on the CPU, under ``torch.no_grad`` with
    ``net`` in eval mode (restored afterwards).

    Args:
        net: a feature network (uint8 (B, C, H, W) -> (B, D)).
        images: uint8 (N, C, H, W), or an iterable of such batches (e.g. samples drawn on the fly).
        batch_size: images per forward pass.
        device: where ``net`` runs (None: the device of its first parameter, else the CPU).
        name: what ``images`` is called in error messages (and in the callback's reports).
        callback: called after each batch with {"images": name, "batch": the batch's size}.
    """
    check_positive_int("batch_size", batch_size)
    device = device_of(net) if device is None else torch.device(device)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for batch in _batches(images, batch_size, name):
                features = net(batch.to(device))
                if features.ndim != 2 or features.shape[0] != batch.shape[0]:
                    raise ValueError(f"the feature network must return (B, D) features; got shape "
                                     f"{tuple(features.shape)} for {batch.shape[0]} images")
                if callback is not None:
                    callback({"images": name, "batch": batch.shape[0]})
                yield features.float().cpu()
    finally:
        net.train(was_training)


def compute_features(net: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int = 250,
                     device=None) -> torch.Tensor:
    """φ(x) of all ``images`` at once: float32 (N, D) on the CPU (see :func:`iter_features`)."""
    features = list(iter_features(net, images, batch_size=batch_size, device=device))
    if not features:
        raise ValueError("images must hold at least one image; got none")
    return torch.cat(features)
