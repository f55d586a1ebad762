"""CIFAR-10 and MNIST from their standard files: read, download, verify.

- CIFAR-10: the official ``cifar-10-batches-py`` folder (``data_batch_1`` … ``data_batch_5``,
  ``test_batch``), Python pickles that may have been written by Python 2 (str keys become bytes
  in Python 3, numpy arrays need ``encoding="latin1"``). Each holds ``data``, a uint8 array of shape
  (N, 3072) — 1024 red, 1024 green, 1024 blue values, row-major 32×32 — and ``labels``.
- MNIST: the four IDX files (``train-images-idx3-ubyte`` …), gzipped or not.

Loaders return uint8 tensors (N, C, H, W) in file order (the preprocessing in
:mod:`sdeflow.data.transforms` dequantizes them). A missing, truncated or corrupt file raises
``FileNotFoundError`` / ``ValueError`` naming the file and what to do, never a raw unpickling
traceback. Pickles are read with an unpickler that only builds numpy arrays, so a tampered
batch file cannot run code.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..utils import check_choice

__all__ = ["load_cifar10", "load_mnist", "download_and_verify", "file_md5",
           "CIFAR10_URL", "CIFAR10_MD5", "CIFAR10_FOLDER", "MNIST_URL", "MNIST_FILES"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# name without ".gz" → MD5 of the official gzipped file
MNIST_FILES = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_SPLITS = {"train": "train", "test": "t10k"}
SPLITS = ("train", "test")

_CHUNK = 1 << 20


# ---- download ---------------------------------------------------------------------------------
def file_md5(path: str | os.PathLike) -> str:
    """Hex MD5 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_tar(name: str) -> bool:
    return name.endswith((".tar.gz", ".tgz", ".tar"))


def download_and_verify(url: str, dest: str | os.PathLike, md5: str, *, extract: bool = True) -> Path:
    """Fetch ``url`` (``https://``, ``http://`` or ``file://``) into the directory ``dest``,
    check its MD5 against ``md5``, and unpack it there when it is a tar archive and ``extract``.

    Atomic: the download goes to a temporary file in ``dest`` that is renamed only once its MD5
    matches, and an archive is unpacked into a temporary folder whose top-level entries are then
    renamed into ``dest`` (replacing older copies), so an interrupted run never leaves a
    half-written file under its final name. A file already in ``dest`` with the right MD5 is not
    fetched again. Returns the path of the downloaded file.

    Raises ``ValueError`` on an MD5 mismatch (the bad download is deleted) and
    ``FileNotFoundError`` / ``OSError`` when the URL cannot be read.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise ValueError(f"url must name a file; got {url!r}")
    target = dest / name
    if not (target.is_file() and file_md5(target) == md5):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
        try:
            digest = hashlib.md5()
            try:
                response = urllib.request.urlopen(url)  # noqa: S310 - http(s) and file:// are both wanted
            except (urllib.error.URLError, OSError) as err:
                raise FileNotFoundError(f"could not download {url}: {getattr(err, 'reason', err)}") from None
            with response, os.fdopen(fd, "wb") as out:
                total = response.headers.get("Content-Length")
                with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                          desc=f"downloading {name}", disable=None, leave=False) as bar:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            if digest.hexdigest() != md5:
                raise ValueError(f"MD5 mismatch for {url}: expected {md5}, got {digest.hexdigest()}; the "
                                 f"download is corrupt or is not the expected file (it was deleted)")
            os.replace(tmp_name, target)
        finally:
            if os.path.exists(tmp_name):
                os.remove(tmp_name)
    if extract and _is_tar(name):
        _extract_atomically(target, dest)
    return target


def _extract_atomically(archive: Path, dest: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".extract.", dir=dest))
    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(staging, filter="data")  # "data": no absolute paths, links out, devices
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"cannot unpack {archive}: {err}; delete it and download again") from None
        for entry in staging.iterdir():
            final = dest / entry.name
            if final.is_dir() and not final.is_symlink():
                # Move the old copy aside first so the new one appears with a single rename.
                old = Path(tempfile.mkdtemp(prefix=f".old.{entry.name}.", dir=dest))
                os.replace(final, old / entry.name)
                os.replace(entry, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(entry, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- CIFAR-10 ---------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds the dicts, lists, strings and numpy arrays of a CIFAR batch and nothing else."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # Python 3 writes bytes in protocol 2 via _codecs.encode

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}, which a CIFAR-10 batch never contains")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    advice = "delete it and load with download=True to fetch the official archive again"
    try:
        with open(path, "rb") as f:
            # latin1: Python-2 str (keys and numpy's raw buffers) decode byte for byte.
            batch = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise FileNotFoundError(f"CIFAR-10 batch file {path} is missing; load with download=True "
                                f"to fetch the official archive") from None
    except Exception as err:  # any unpickling failure: truncated, corrupt, not a pickle
        raise ValueError(f"CIFAR-10 batch file {path} is truncated or corrupt "
                         f"({type(err).__name__}: {err}); {advice}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"CIFAR-10 batch file {path} holds a {type(batch).__name__}, not a dict; {advice}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"CIFAR-10 batch file {path} lacks 'data' or 'labels' (keys: {sorted(batch)}); {advice}")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise ValueError(f"CIFAR-10 batch file {path}: 'data' must be a uint8 array of shape (N, 3072); "
                         f"got shape {shape} and dtype {dtype}; {advice}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer) \
            or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"CIFAR-10 batch file {path}: 'labels' must be {data.shape[0]} integers in 0..9; "
                         f"got shape {labels.shape} and dtype {labels.dtype}; {advice}")
    return data, labels.astype(np.int64)


def load_cifar10(root: str | os.PathLike, split: str = "train", download: bool = False,
                 url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, return_labels: bool = False):
    """CIFAR-10 images of ``split`` ("train": data_batch_1…5, "test": test_batch) in file order.

    Args:
        root: the directory containing ``cifar-10-batches-py/``.
        download: fetch ``url`` (the official ``cifar-10-python.tar.gz``) into ``root``, verify
            ``md5`` and unpack it, when the split's files are missing.
        return_labels: also return the labels.

    Returns:
        uint8 tensor (N, 3, 32, 32); with ``return_labels``, also an int64 tensor (N,).
    """
    check_choice("split", split, SPLITS)
    root = Path(root).expanduser()
    folder = root / CIFAR10_FOLDER
    files = [folder / name for name in CIFAR10_SPLITS[split]]
    if download and not all(f.is_file() for f in files):
        download_and_verify(url, root, md5)
    if not folder.is_dir():
        where = f"data root {root} does not exist" if not root.exists() else f"{folder} not found"
        raise FileNotFoundError(f"CIFAR-10: {where}; load with download=True to fetch {url}, "
                                f"or set root to the directory that contains {CIFAR10_FOLDER}/")
    images, labels = [], []
    for path in files:
        data, lab = _read_cifar_batch(path)
        images.append(data)
        labels.append(lab)
    images = torch.from_numpy(np.concatenate(images).reshape(-1, 3, 32, 32))
    return (images, torch.from_numpy(np.concatenate(labels))) if return_labels else images


# ---- MNIST ------------------------------------------------------------------------------------
_IDX_UBYTE = 0x08


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes: magic 0x0000 08 <ndim>, ndim big-endian uint32 sizes, data."""
    advice = "delete it and load with download=True to fetch it again"
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"MNIST file {path} is truncated or corrupt ({err}); {advice}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != expected_ndim:
        raise ValueError(f"MNIST file {path} is not an IDX file of {expected_ndim}-D unsigned bytes "
                         f"(header {raw[:4].hex() or 'empty'}); {advice}")
    header = 4 + 4 * expected_ndim
    if len(raw) < header:
        raise ValueError(f"MNIST file {path} is truncated (incomplete header); {advice}")
    shape = struct.unpack(f">{expected_ndim}I", raw[4:header])
    size = int(np.prod(shape))
    if len(raw) != header + size:
        raise ValueError(f"MNIST file {path} holds {len(raw) - header} data bytes, but its header "
                         f"announces shape {shape} ({size} bytes): truncated or corrupt; {advice}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_mnist(root: Path, name: str) -> Path | None:
    # The plain layout (files in root) and torchvision's (root/MNIST/raw), gzipped or not.
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_mnist(root: str | os.PathLike, split: str = "train", download: bool = False,
               url: str = MNIST_URL, return_labels: bool = False):
    """MNIST images of ``split`` ("train": 60,000, "test": 10,000) in file order.

    Args:
        root: the directory with the IDX files (``train-images-idx3-ubyte[.gz]`` …), or with
            torchvision's ``MNIST/raw/`` holding them.
        download: fetch the missing gzipped files from ``url`` (a folder URL; ``file://`` works)
            into ``root``, verifying each one's MD5.
        return_labels: also return the labels.

    Returns:
        uint8 tensor (N, 1, 28, 28); with ``return_labels``, also an int64 tensor (N,).
    """
    check_choice("split", split, SPLITS)
    root = Path(root).expanduser()
    prefix = MNIST_SPLITS[split]
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    paths = [_find_mnist(root, n) for n in names]
    if download and None in paths:
        for name, path in zip(names, paths):
            if path is None:
                download_and_verify(url.rstrip("/") + f"/{name}.gz", root, MNIST_FILES[name], extract=False)
        paths = [_find_mnist(root, n) for n in names]
    for name, path in zip(names, paths):
        if path is None:
            where = f"data root {root} does not exist" if not root.exists() else f"{root / name}[.gz] not found"
            raise FileNotFoundError(f"MNIST: {where}; load with download=True to fetch it from {url}")
    images = _read_idx(paths[0], 3)
    labels = _read_idx(paths[1], 1)
    if images.shape[1:] != (28, 28) or labels.shape[0] != images.shape[0]:
        raise ValueError(f"MNIST files {paths[0]} and {paths[1]} disagree or are not 28×28 images: "
                         f"images {images.shape}, labels {labels.shape}")
    images = torch.from_numpy(images.copy()).unsqueeze(1)
    return (images, torch.from_numpy(labels.astype(np.int64))) if return_labels else images

