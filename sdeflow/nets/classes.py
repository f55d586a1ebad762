"""Class labels for conditional networks (classifier-free guidance, Ho & Salimans 2022).

A conditional network has ``num_classes`` C > 0 and takes ``forward(y, t, labels=None)``: labels (B,)
integers in [0, C], the value C (:func:`null_label`) being the null class of the unconditional model
that label dropout trains alongside; None means every example is null. :class:`ClassEmbedding` adds a
learned vector per class to the time embedding. An unconditional network (C = 0) refuses labels. A
network trained without a null class (a foreign one) says so with ``has_null_class = False``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..utils import check_nonneg_int

__all__ = ["ClassEmbedding", "check_labels", "null_label"]


def null_label(num_classes: int) -> int:
    """The index of the null (unconditional) class: C."""
    return int(num_classes)


def check_labels(labels, num_classes: int, batch: int, device=None) -> torch.Tensor:
    """``labels`` as a long tensor of shape (batch,): None → every example null; an int → every
    example that class; a (batch,) tensor of integers in [0, C] (C the null class). ValueError naming
    ``labels`` otherwise, and for an unconditional network (C = 0) given any label."""
    num_classes = check_nonneg_int("num_classes", num_classes)
    if labels is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if num_classes == 0:
        raise ValueError("labels were given to an unconditional network (num_classes=0): train it with classes")
    if isinstance(labels, bool) or not isinstance(labels, (int, torch.Tensor)):
        raise ValueError(f"labels must be None, an int or a tensor of class indices; got {type(labels).__name__}")
    labels = torch.as_tensor(labels, device=device)
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integers; got {labels.dtype}")
    labels = labels.long().expand(batch) if labels.ndim == 0 else labels.long()
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},) (one per example) or be one int; got {tuple(labels.shape)}")
    if bool(((labels < 0) | (labels > num_classes)).any()):
        raise ValueError(f"labels must lie in [0, {num_classes}] ({num_classes} = the null class); "
                         f"got {labels.min().item()} to {labels.max().item()}")
    return labels


class ClassEmbedding(nn.Module):
    """One learned vector of size ``dim`` per class and one for the null class: labels (B,) → (B, dim)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = check_nonneg_int("num_classes", num_classes)
        self.table = nn.Embedding(self.num_classes + 1, dim)

    def forward(self, labels, batch: int) -> torch.Tensor:
        return self.table(check_labels(labels, self.num_classes, batch, self.table.weight.device))
