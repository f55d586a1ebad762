r"""The exponential moving average of a model's parameters used for evaluation and sampling."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..storage.checkpoints import load_averages

__all__ = ["EMA"]


class EMA:
    r"""An exponential moving average of a model's parameters, :math:`\bar\theta \leftarrow
    \beta\bar\theta + (1-\beta)\theta` after every optimizer step; buffers are copied, never averaged.

    ``EMA.model`` is a frozen copy of the model holding the averages (use it to evaluate/sample).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must lie in [0, 1); got {decay!r}")
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._averages = list(self.model.parameters())
        self._buffers = list(self.model.buffers())

    @torch.no_grad()
    def update(self, model: nn.Module, num_updates: int | None = None) -> None:
        """One averaging step; with ``num_updates`` = n (updates before this one) the decay is
        min(β, (1 + n)/(10 + n)), a warm-up that forgets the initial weights quickly."""
        decay = self.decay if num_updates is None else min(self.decay, (1 + num_updates) / (10 + num_updates))
        torch._foreach_lerp_(self._averages, [p.detach() for p in model.parameters()], 1.0 - decay)
        self.copy_buffers(model)

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        """Buffers are not averaged: the EMA model uses the live ones."""
        for avg_buf, live_buf in zip(self._buffers, model.buffers()):
            avg_buf.copy_(live_buf)

    def state_dict(self) -> dict:
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    def load_state_dict(self, state: dict) -> None:
        load_averages(self.model, state)
