"""Seeds, data order and RNG state: what makes a resumed run the uninterrupted one, bit for bit.

The randomness of every training step (data order, dequantisation noise, flips, diffusion time and
noise) is drawn from generators seeded by a pure function of (seed, step, rank, stream), so it does
not depend on what ran before. The global torch, numpy and Python generators are seeded from the
run's seed at the start and saved in every checkpoint, so user code that draws from them is
reproducible too.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["step_seed", "make_generator", "seed_everything", "rng_state", "set_rng_state", "DataOrder"]

#: Streams of :func:`step_seed`: independent randomness for the same (seed, step, rank).
(STREAM_STEP, STREAM_DATA_ORDER, STREAM_PILOT, STREAM_EVAL, STREAM_MONITOR, STREAM_DRAWS,
 STREAM_MONITOR_DATA) = range(7)


def step_seed(seed: int, step: int, rank: int = 0, stream: int = 0) -> int:
    """A fixed mixing of (seed, step, rank, stream) into 63 bits: every step's randomness is a pure
    function of these, which makes resumption exact without storing generator states."""
    return (seed * 0x9E3779B1 + step * 0x85EBCA77 + rank * 0xC2B2AE3D + stream * 0x27D4EB2F) & ((1 << 63) - 1)


def make_generator(device, seed: int) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global generator and Python's ``random`` from ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


def rng_state() -> dict:
    """The global RNG states (torch CPU and CUDA, numpy, Python) in a weights_only-safe form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": _py_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def _py_state_to_plain(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class DataOrder:
    """Global batches drawn without replacement from a permutation per epoch; the permutation of
    epoch e is a pure function of (seed, e), so (epoch, offset) is the whole state."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, offset: int = 0):
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the data set ({n} examples)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = epoch, offset
        self._perm_epoch, self._perm = None, None

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            gen = make_generator("cpu", step_seed(self.seed, self.epoch, 0, stream=STREAM_DATA_ORDER))
            self._perm = torch.randperm(self.n, generator=gen)
            self._perm_epoch = self.epoch
        return self._perm

    def next(self) -> torch.Tensor:
        if self.offset + self.batch_size > self.n:
            self.epoch, self.offset = self.epoch + 1, 0
        indices = self._permutation()[self.offset:self.offset + self.batch_size]
        self.offset += self.batch_size
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
