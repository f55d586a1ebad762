r"""The one data-set registry: every toy set (:mod:`sdeflow.data.toy`) and every image set
(:mod:`sdeflow.data.images`), each a :class:`Dataset` entry of :data:`DATASETS`.

A toy set draws points, ``sample(n, generator=None) -> (n, *shape)`` float32; an image set loads
its files, ``load(root, split="train", download=False) -> (N, C, H, W)`` uint8; ``log_prob(x)`` is
the exact log-density where one is known (float64, (n, *shape) -> (n,)), else None. Adding a data
set is one :func:`register_dataset` call; the command line and the experiments read their choices
from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import images as _images
from . import toy as _toy
from ..utils import check_choice, check_new_name, check_positive_int

__all__ = ["Dataset", "DATASETS", "KINDS", "register_dataset", "get_dataset", "sample_toy", "toy_log_prob"]

KINDS = ("toy", "image")


@dataclass(frozen=True)
class Dataset:
    """One registered data set.

    Attributes:
        name: the registry key.
        kind: "toy" (drawn by ``sample``) or "image" (read by ``load``).
        shape: the shape of one example, e.g. (2,) or (C, H, W).
        description: one line for help texts.
        sample: toy sets: ``sample(n, generator=None) -> (n, *shape)`` float32.
        load: image sets: ``load(root, split="train", download=False) -> (N, *shape)`` uint8.
        log_prob: the exact log-density, ``log_prob(x) -> (n,)`` float64, or None.
        mirror_symmetric: image sets: a horizontally flipped example is as likely as the example
            (photographs, not digits), so training may flip images at random.
        num_classes: data sets with labels: how many classes (``load(..., return_labels=True)``, for a
            toy set ``sample(..., return_labels=True)``, then also returns them); 0: no labels.
    """

    name: str
    kind: str
    shape: tuple
    description: str
    sample: Callable[..., torch.Tensor] | None = None
    load: Callable[..., torch.Tensor] | None = None
    log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None
    mirror_symmetric: bool = False
    num_classes: int = 0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string; got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(repr(k) for k in KINDS)}; got {self.kind!r}")
        if not isinstance(self.shape, (tuple, list)) or not self.shape:
            raise ValueError(f"shape must be a non-empty tuple of positive integers; got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(check_positive_int("shape entries", s) for s in self.shape))
        needed = "sample" if self.kind == "toy" else "load"
        if not callable(getattr(self, needed)):
            raise ValueError(f"a {self.kind} data set needs a callable {needed}; got {getattr(self, needed)!r}")
        if self.log_prob is not None and not callable(self.log_prob):
            raise ValueError(f"log_prob must be callable or None; got {self.log_prob!r}")


#: name → :class:`Dataset`. Add entries with :func:`register_dataset`.
DATASETS: dict[str, Dataset] = {}


def register_dataset(dataset: Dataset) -> Dataset:
    """Add ``dataset`` to :data:`DATASETS` under ``dataset.name`` and return it; ValueError if the
    name is taken or ``dataset`` is not a :class:`Dataset`."""
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset must be an sdeflow.data.Dataset; got {type(dataset).__name__}")
    check_new_name(dataset.name, DATASETS, "dataset")
    DATASETS[dataset.name] = dataset
    return dataset


def get_dataset(name: str) -> Dataset:
    """The registered data set ``name``; ValueError listing the registered names otherwise."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(repr(n) for n in DATASETS)}; got {name!r}")
    return DATASETS[name]


def _toy_dataset(name: str):
    check_choice("dataset", name, tuple(n for n, entry in DATASETS.items() if entry.kind == "toy"))
    return DATASETS[name]


def sample_toy(name: str, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
    """Draw n points of the toy data set ``name`` (a toy entry of :data:`DATASETS`), (n, *shape) float32;
    with ``return_labels`` (a labelled set: ``num_classes`` > 0) also their classes, (n,) long."""
    dataset = _toy_dataset(name)
    if not return_labels:
        return dataset.sample(n, generator=generator)
    if not dataset.num_classes:
        labelled = ", ".join(k for k, entry in DATASETS.items() if entry.kind == "toy" and entry.num_classes)
        raise ValueError(f"dataset {name!r} has no labels; the labelled toy sets are {labelled}")
    return dataset.sample(n, generator=generator, return_labels=True)


def toy_log_prob(name: str, x: torch.Tensor) -> torch.Tensor | None:
    """Exact log-density of the toy data set ``name`` at x, (n, *shape) -> (n,) float64; None if it has none."""
    log_prob = _toy_dataset(name).log_prob
    return None if log_prob is None else log_prob(x)


for _entry in (
    Dataset("swissroll", "toy", (2,), "a noisy 2-D spiral (scikit-learn's swiss roll seen from above)",
            sample=_toy.swissroll),
    Dataset("moons", "toy", (2,), "two interleaving noisy half circles", sample=_toy.moons),
    Dataset("8gaussians", "toy", (2,), "eight Gaussians on a circle of radius 2 (exact density)",
            sample=_toy.eight_gaussians, log_prob=_toy.eight_gaussians_log_prob, num_classes=8),
    Dataset("checkerboard", "toy", (2,), "uniform on the eight black squares of a 4x4 board (exact density)",
            sample=_toy.checkerboard, log_prob=_toy.checkerboard_log_prob),
    Dataset("gaussian_mixture", "toy", (2,), "an anisotropic four-component Gaussian mixture (exact density)",
            sample=_toy.gaussian_mixture, log_prob=_toy.gaussian_mixture_log_prob, num_classes=4),
    Dataset("cifar10", "image", (3, 32, 32), "CIFAR-10, 50,000 + 10,000 32x32 colour images",
            load=_images.load_cifar10, mirror_symmetric=True, num_classes=10),
    Dataset("mnist", "image", (1, 28, 28), "MNIST, 60,000 + 10,000 28x28 grey-scale digits",
            load=_images.load_mnist, num_classes=10),
):
    register_dataset(_entry)
del _entry
