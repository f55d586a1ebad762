"""Samples written to disk, read back as uint8 images (N, C, H, W) for FID and KID.

Two forms: an .npz file whose array ``samples`` is uint8 (N, C, H, W) (what ``sdeflow sample
--out FILE.npz`` writes), or a folder of PNG files, one image each, read in name order (grey-scale
PNGs give C = 1, any other mode is converted to RGB, C = 3).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_samples", "SAMPLES_KEY"]

#: The array of an .npz file of samples.
SAMPLES_KEY = "samples"


def _load_npz(path: Path) -> torch.Tensor:
    try:
        with np.load(path, allow_pickle=False) as stored:
            if SAMPLES_KEY not in stored:
                raise ValueError(f"{path} has no array {SAMPLES_KEY!r} (it has: {', '.join(stored.files) or 'none'})")
            samples = stored[SAMPLES_KEY]
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz file ({err})") from None
    if samples.dtype != np.uint8 or samples.ndim != 4:
        raise ValueError(f"{path}: {SAMPLES_KEY!r} must be a uint8 array (N, C, H, W); got {samples.dtype} "
                         f"of shape {samples.shape}")
    return torch.from_numpy(samples.copy())


def _load_pngs(folder: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise ValueError(f"folder {folder} holds no .png files")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                pixels = np.asarray(image.convert("L" if image.mode in ("1", "L", "LA") else "RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"{file} is not a readable PNG ({err})") from None
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        if images and pixels.shape != images[0].shape:
            raise ValueError(f"{file} is {pixels.shape[2]}×{pixels.shape[1]} with {pixels.shape[0]} channel(s), "
                             f"unlike {files[0].name} ({images[0].shape[2]}×{images[0].shape[1]}, "
                             f"{images[0].shape[0]} channel(s)); all samples must have one shape")
        images.append(pixels)
    return torch.from_numpy(np.stack(images).astype(np.uint8))


def load_samples(path: str | os.PathLike) -> torch.Tensor:
    """uint8 images (N, C, H, W) from an .npz file (array ``samples``) or a folder of PNG files.

    Raises FileNotFoundError for a missing path and ValueError (naming the file) for anything
    else that is not such samples."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _load_pngs(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples {path} do not exist (expected an .npz file or a folder of PNGs)")
    if path.suffix.lower() != ".npz":
        raise ValueError(f"samples must be an .npz file or a folder of PNGs; got {path}")
    return _load_npz(path)
