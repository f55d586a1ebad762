r"""Inception-v3 pool3 features (D = 2048) as torch-fidelity computes them, for FID and KID that
compare with published figures.

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (its "inception-v3-compat"): the
weights of the TensorFlow graph of Heusel et al.'s FID code, images resized to 299×299 by
TensorFlow-1.x bilinear interpolation and scaled by (x − 128)/128, as in that graph; pytorch-fid
uses the same weights. It comes with the extra ``pip install 'sdeflow[metrics]'`` (torch-fidelity,
which needs the torchvision built for the installed torch).

sdeflow never downloads: the weights are read (weights only) from ``weights_path`` or from the file
torch-fidelity would have cached, ``<torch.hub.get_dir()>/checkpoints/`` + :data:`WEIGHTS_FILE`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

from .features import check_uint8_images

__all__ = ["InceptionFeatures", "WEIGHTS_FILE", "WEIGHTS_URL", "default_weights_path"]

#: torch-fidelity's release file of the Inception-v3 weights (converted from TensorFlow's FID graph).
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
_INSTALL = "pip install 'sdeflow[metrics]'"


def default_weights_path() -> Path:
    """Where torch-fidelity caches :data:`WEIGHTS_FILE`: torch.hub's ``checkpoints`` folder
    (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _weights_path(weights_path) -> Path:
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception-v3 weights file {path} does not exist (expected torch-fidelity's "
                                    f"{WEIGHTS_FILE}, from {WEIGHTS_URL})")
        return path
    path = default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"Inception-v3 weights not found: put torch-fidelity's {WEIGHTS_FILE} (from "
                                f"{WEIGHTS_URL}) at {path} or pass its path as weights_path; sdeflow never downloads")
    return path


def _extractor_class():
    """torch-fidelity's extractor, subclassed so that its constructor loads nothing (it would read
    the file with the full unpickler, or download when given no file)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ModuleNotFoundError as err:
        raise ImportError(f"the 'inception' features need torch-fidelity ({err}): {_INSTALL}, with "
                          f"torch=={torch.__version__.split('+')[0]} on the same line so pip keeps this torch") from None
    except Exception as err:  # noqa: BLE001 - e.g. a torchvision built for another torch fails with RuntimeError
        first = (str(err).strip().splitlines() or [""])[0]
        raise ImportError(f"torch-fidelity is installed but does not import ({type(err).__name__}: {first}); "
                          f"install the torchvision release built for torch {torch.__version__}") from None

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            return None if state_dict is None else super().load_state_dict(state_dict, *args, **kwargs)

    return Unloaded


def _nothing() -> io.BytesIO:
    # What the extractor's constructor unpickles instead of a weights file: None (so it loads nothing).
    buffer = io.BytesIO()
    torch.save(None, buffer)
    buffer.seek(0)
    return buffer


class InceptionFeatures(nn.Module):
    r"""Inception-v3 pool3 features, φ(x) ∈ R^2048, of uint8 images (B, C, H, W) of any size:
    grey images (C = 1) are repeated to three channels; torch-fidelity resizes to 299×299
    (TensorFlow-1.x bilinear) and scales by (x − 128)/128.

    Args:
        weights_path: torch-fidelity's :data:`WEIGHTS_FILE`; None: :func:`default_weights_path`.
            Read with ``torch.load(weights_only=True)``; never downloaded.
        random_weights: skip the weights and keep the random initialisation (tests of the plumbing only).

    Raises:
        FileNotFoundError: the weights file is missing (the message says where to put it).
        ImportError: torch-fidelity is missing or does not import (the message says what to install).
    """

    name = "inception"
    dim = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None, *, random_weights: bool = False):
        super().__init__()
        path = None if random_weights else _weights_path(weights_path)
        extractor = _extractor_class()("inception-v3-compat", ["2048"], feature_extractor_weights_path=_nothing())
        if path is not None:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                extractor.load_state_dict(state)
            except Exception as err:  # noqa: BLE001 - unpickling, truncation or another network's weights
                first = (str(err).strip().splitlines() or [""])[0]
                raise ValueError(f"weights_path {path} is not torch-fidelity's Inception-v3 weights file "
                                 f"{WEIGHTS_FILE} ({type(err).__name__}: {first})") from None
        self.extractor = extractor.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_uint8_images("images", images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"images must have 1 or 3 channels for the Inception features; got {images.shape[1]}")
        return self.extractor(images.contiguous())[0]
