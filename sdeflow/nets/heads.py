r"""A network that outputs the reverse variance beside the mean (improved DDPM's learned Σ).

The wrapped network returns 2C channels (dim 1) for C input channels: first the mean's, in the
model's parameterization (ε̂ for "noise"), then r, from which the interpolation between the step's
variance β_n and the posterior's β̃_n is :math:`v = (r + 1)/2` and
:math:`\log\sigma_n^2 = v\log\beta_n + (1 - v)\log\tilde\beta_n` (Nichol & Dhariwal 2021, Eq. 15; the
same layout as their checkpoints). A zero-initialized output layer starts at v = ½.

:class:`MeanAndVariance` is what the model sees as its network (``forward`` returns the mean's
channels); :class:`sdeflow.discrete.LearnedVariance` reads the other half, and
:func:`sdeflow.discrete.noise_and_variance` both from one evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MeanAndVariance", "has_variance_head"]


class MeanAndVariance(nn.Module):
    """``net(y, t)`` returning 2C channels, seen as the mean's C (:meth:`forward`) and the variance's
    interpolation v (:meth:`variance`); :meth:`both` gives the two from one evaluation."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_classes = getattr(net, "num_classes", 0)  # a class-conditional network's labels pass through
        self.has_null_class = getattr(net, "has_null_class", True)

    def both(self, y: torch.Tensor, t: torch.Tensor, labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean's output, v = (r + 1)/2), each shaped like y, from one evaluation of the network."""
        out = self.net(y, t) if labels is None else self.net(y, t, labels)
        if out.ndim != y.ndim or out.shape[0] != y.shape[0] or out.shape[1] != 2 * y.shape[1] \
                or out.shape[2:] != y.shape[2:]:
            raise ValueError(f"net must return twice the channels of its input {tuple(y.shape)} (mean, then "
                             f"variance); got {tuple(out.shape)}")
        mean, r = out.chunk(2, dim=1)
        return mean, (r + 1) / 2

    def forward(self, y: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        return self.both(y, t, labels)[0]

    def variance(self, y: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        """The interpolation v (v = 0: β̃_n, v = 1: β_n), shaped like y."""
        return self.both(y, t, labels)[1]


def has_variance_head(model) -> bool:
    """Whether ``model`` (a model, or a network) outputs a reverse variance beside its mean: its network
    is a :class:`MeanAndVariance`. The one place this question is answered."""
    return isinstance(model, MeanAndVariance) or isinstance(getattr(model, "net", None), MeanAndVariance)
