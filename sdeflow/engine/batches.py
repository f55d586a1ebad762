"""Where a training step's batch comes from: a finite data set visited in shuffled epochs, or a
stream of fresh draws. Each is a pure function of (seed, step, rank), so resuming is exact."""

from __future__ import annotations

from typing import Callable

import torch

from .state import STREAM_DRAWS, DataOrder, make_generator, step_seed

__all__ = ["DatasetBatches", "StreamBatches"]


class DatasetBatches:
    """Batches of a fixed tensor ``data`` (N, ...), without replacement within an epoch (one
    permutation per epoch, a function of (seed, epoch)). ``transform(batch, generator, train=True)``,
    if given, maps the raw batch on the device to model space (e.g. dequantise, flip, logit) with the
    step's generator. With ``labels`` (N,), each batch comes with its examples' labels."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int,
                 transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 labels: torch.Tensor | None = None):
        if labels is not None and tuple(labels.shape) != (data.shape[0],):
            raise ValueError(f"labels must have one entry per example, shape ({data.shape[0]},); "
                             f"got {tuple(labels.shape)}")
        self.data, self.transform, self.labels = data, transform, labels
        self.order = DataOrder(data.shape[0], batch_size, seed)

    def next(self, step: int, rank: int, world: int, device, generator: torch.Generator):
        """The batch in model space, or with ``labels``: (batch, its labels on the device)."""
        local = self.order.batch_size // world
        indices = self.order.next()[rank * local:(rank + 1) * local]
        batch = self.data[indices].to(device)
        batch = batch if self.transform is None else self.transform(batch, generator)
        return batch if self.labels is None else (batch, self.labels[indices].to(device))

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


class StreamBatches:
    """Fresh batches ``sample(n, generator)`` (on the CPU, e.g. a toy data set's sampler), drawn
    with a CPU generator seeded by (seed, step, rank): no state to save."""

    def __init__(self, sample: Callable[..., torch.Tensor], batch_size: int, seed: int):
        self.sample, self.batch_size, self.seed = sample, batch_size, seed

    def next(self, step: int, rank: int, world: int, device, generator: torch.Generator) -> torch.Tensor:
        gen = make_generator("cpu", step_seed(self.seed, step, rank, stream=STREAM_DRAWS))
        return self.sample(self.batch_size // world, generator=gen).to(device)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
