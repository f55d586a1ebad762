r"""Class-conditional sampling with classifier-free guidance (Ho & Salimans 2022), for every sampler.

A class-conditional network (``num_classes`` C > 0, ``net(y, t, labels)``, the label C being the null
class) seen with labels y and guidance scale w becomes the network

.. math::  \hat o(x, t) = (1 + w)\,o(x, t, y) - w\,o(x, t, \varnothing),

whose ε̂ is (1 + w)·ε̂(x, y) − w·ε̂(x, ∅) in every parameterization: ε̂ is affine in the output with
coefficients that do not depend on the label (noise: ε̂ = o; score: −σ·o; drift: −σ·o/g; velocity:
σ·c·x + α·o), and (1 + w) − w = 1. :func:`guided` returns the model with that network, so x̂₀ clipping,
every method, every grid and the conditional samplers (inpainting, denoising) work on it unchanged.
w = 0 samples the conditional model p(x | y); w > 0 sharpens it toward p(x | y)·p(y | x)^w.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import PluginReverseSDE
from ..nets.classes import check_labels, null_label
from ..utils import check_nonneg_float

__all__ = ["GuidedNet", "guided"]


class GuidedNet(nn.Module):
    """``net(y, t)`` of a class-conditional ``net`` at ``labels`` (an int, or one per example) with
    guidance scale ``guidance`` (module docstring): one network evaluation at w = 0, two otherwise (the
    conditional and the null class, batched together). Labels None: the unconditional model."""

    def __init__(self, net: nn.Module, labels=None, guidance: float = 0.0):
        super().__init__()
        self.num_classes = getattr(net, "num_classes", 0)
        if not self.num_classes:
            raise ValueError("the model's network is unconditional (num_classes=0): guidance needs a network "
                             "trained with classes")
        if isinstance(labels, torch.Tensor) and labels.ndim not in (0, 1):
            raise ValueError(f"labels must be one int or one per example; got shape {tuple(labels.shape)}")
        self.net, self.labels = net, labels
        self.guidance = check_nonneg_float("guidance", guidance)
        self.has_null_class = getattr(net, "has_null_class", True)
        null = labels is None
        if labels is not None:  # refused now, not at the first step
            given = labels.shape[0] if isinstance(labels, torch.Tensor) and labels.ndim else 1
            null = bool((check_labels(labels, self.num_classes, given) == null_label(self.num_classes)).any())
        if not self.has_null_class and (null or self.guidance > 0):
            raise ValueError(f"the model's network has no null class (its {self.num_classes} embeddings are all "
                             f"classes): labels must lie in [0, {self.num_classes - 1}], and guidance > 0 and the "
                             f"unconditional model need a null class")

    def extra_repr(self) -> str:
        return f"labels={self.labels!r}, guidance={self.guidance:g}"

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = check_labels(self.labels, self.num_classes, y.shape[0], y.device)
        if self.guidance == 0.0 or bool((labels == null_label(self.num_classes)).all()):
            return self.net(y, t, labels)
        null = torch.full_like(labels, null_label(self.num_classes))
        both = self.net(torch.cat([y, y]), torch.cat([t, t]), torch.cat([labels, null]))
        conditional, unconditional = both.chunk(2)
        return (1 + self.guidance) * conditional - self.guidance * unconditional


def guided(model: PluginReverseSDE, labels=None, guidance: float = 0.0) -> PluginReverseSDE:
    """``model`` conditioned on ``labels`` (an int for every example, a (B,) tensor, or None for the
    unconditional model) with classifier-free guidance of scale ``guidance`` ≥ 0: the same SDE and
    parameterization with a :class:`GuidedNet`. Pass it to :func:`~sdeflow.samplers.sample`, the
    conditional samplers or :class:`~sdeflow.samplers.ClippedModel` as any model. ValueError for an
    unconditional model, labels outside [0, C] or a negative scale."""
    if not isinstance(model, PluginReverseSDE):
        raise ValueError(f"model must be a sdeflow PluginReverseSDE; got {type(model).__name__}")
    return PluginReverseSDE(model.sde, GuidedNet(model.net, labels, guidance), model.parameterization)
