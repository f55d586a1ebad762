import gzip
import hashlib
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sdeflow.data import get_dataset
from sdeflow.data.images import (CIFAR10_FOLDER, download_and_verify, load_cifar10,
                                 load_mnist)

SUBSET = Path("/work/shared/data/cifar10-subset")


def _batch(n, seed, bytes_keys=True):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    d = {"batch_label": "batch", "data": data, "labels": labels, "filenames": [f"img{i}.png" for i in range(n)]}
    if bytes_keys:  # how the official (Python 2) files load: keys are byte strings
        d = {k.encode(): v for k, v in d.items()}
    return d


def _write_cifar(root: Path, n=3, bytes_keys=True):
    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        batches[name] = _batch(n, i, bytes_keys)
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f, protocol=2)
    return batches


def _data(batch):
    return batch.get(b"data", batch.get("data"))


def test_cifar_reads_official_format_in_order_with_channels_first(tmp_path):
    batches = _write_cifar(tmp_path)
    images, labels = load_cifar10(tmp_path, "train", return_labels=True)
    assert images.dtype == torch.uint8 and images.shape == (15, 3, 32, 32)
    first = _data(batches["data_batch_1"])[0]
    # 1024 red values first, row-major: pixel (row 0, col 1) of the red plane is data[1].
    assert images[0, 0, 0, 1] == first[1] and images[0, 1, 0, 0] == first[1024] and images[0, 2, 31, 31] == first[3071]
    assert torch.equal(images[3], torch.from_numpy(_data(batches["data_batch_2"])[0].reshape(3, 32, 32)))
    assert labels.tolist()[:3] == batches["data_batch_1"][b"labels"]
    test = load_cifar10(tmp_path, "test")
    assert torch.equal(test, torch.from_numpy(_data(batches["test_batch"]).reshape(-1, 3, 32, 32)))


def test_cifar_accepts_str_keyed_pickles(tmp_path):
    _write_cifar(tmp_path, bytes_keys=False)
    assert load_cifar10(tmp_path, "test").shape == (3, 3, 32, 32)


def test_cifar_python2_style_pickle(tmp_path):
    # A Python-2 pickle stores numpy's buffer as a (latin1) str; emulate the opcode stream.
    _write_cifar(tmp_path)
    arr = np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072) % 251
    py2 = (b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03K\x00"
           b"\x85U\x01b\x87Rq\x04(K\x01K\x02M\x00\x0c\x86cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06(K\x03U\x01|"
           b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T" + struct.pack("<I", arr.size) + arr.tobytes()
           + b"tbU\x06labelsq\x07]q\x08(K\x01K\x02eu.")
    (tmp_path / CIFAR10_FOLDER / "test_batch").write_bytes(py2)
    images, labels = load_cifar10(tmp_path, "test", return_labels=True)
    assert torch.equal(images, torch.from_numpy(arr.reshape(2, 3, 32, 32)))
    assert labels.tolist() == [1, 2]


def test_cifar_missing_truncated_corrupt_and_misshapen_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_cifar10(tmp_path / "nowhere")
    _write_cifar(tmp_path)
    folder = tmp_path / CIFAR10_FOLDER
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch.*download=True"):
        load_cifar10(tmp_path, "test")
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="data_batch_3.*truncated or corrupt.*download=True"):
        load_cifar10(tmp_path, "train")
    (folder / "data_batch_3").write_bytes(b"this is not a pickle at all")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(tmp_path, "train")
    bad = _batch(2, 0)
    bad[b"data"] = bad[b"data"][:, :3000]
    (folder / "data_batch_3").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3.*\(N, 3072\).*3000"):
        load_cifar10(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "validation")


def test_cifar_refuses_pickles_that_would_run_code(tmp_path):
    _write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / CIFAR10_FOLDER / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch.*refusing to load (__builtin__|builtins)\.print"):
        load_cifar10(tmp_path, "test")


def _archive(tmp_path: Path):
    src = tmp_path / "src"
    batches = _write_cifar(src, n=2)
    archive = tmp_path / "server" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / CIFAR10_FOLDER, arcname=CIFAR10_FOLDER)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest(), batches


def test_download_via_file_url_verifies_md5_and_unpacks(tmp_path):
    archive, md5, batches = _archive(tmp_path)
    root = tmp_path / "data"
    images = load_cifar10(root, "test", download=True, url=archive.as_uri(), md5=md5)
    assert torch.equal(images, torch.from_numpy(_data(batches["test_batch"]).reshape(-1, 3, 32, 32)))
    assert (root / "cifar-10-python.tar.gz").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    # A corrupted batch is replaced by a fresh unpack when the download is asked for again.
    (root / CIFAR10_FOLDER / "test_batch").unlink()
    assert load_cifar10(root, "test", download=True, url=archive.as_uri(), md5=md5).shape == (2, 3, 32, 32)


def test_download_with_wrong_md5_leaves_nothing_behind(tmp_path):
    archive, md5, _ = _archive(tmp_path)
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="MD5 mismatch.*expected 0{32}"):
        download_and_verify(archive.as_uri(), root, "0" * 32)
    assert list(root.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="could not download"):
        download_and_verify((tmp_path / "missing.tar.gz").as_uri(), root, md5)


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(folder: Path, n=4, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix in ("train", "t10k"):
        arrays[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    for name, arr in arrays.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(_idx(arr)))
        else:
            (folder / name).write_bytes(_idx(arr))
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_idx_files(tmp_path, gz):
    arrays = _write_mnist(tmp_path, gz=gz)
    images, labels = load_mnist(tmp_path, "test", return_labels=True)
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_errors_and_download(tmp_path):
    server = tmp_path / "server"
    arrays = _write_mnist(server)
    with pytest.raises(FileNotFoundError, match="empty does not exist.*download=True"):
        load_mnist(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*download=True"):
        load_mnist(tmp_path / "empty")
    import sdeflow.data.images as images_module
    md5s = {name: hashlib.md5((server / f"{name}.gz").read_bytes()).hexdigest() for name in arrays}
    original = dict(images_module.MNIST_FILES)
    images_module.MNIST_FILES.update(md5s)
    try:
        got = load_mnist(tmp_path / "data", "train", download=True, url=server.as_uri())
    finally:
        images_module.MNIST_FILES.update(original)
    assert torch.equal(got[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    path = server / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx(arrays["t10k-images-idx3-ubyte"]))[:-30])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*truncated or corrupt"):
        load_mnist(server, "test")
    path.write_bytes(gzip.compress(_idx(arrays["t10k-images-idx3-ubyte"])[:-5]))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        load_mnist(server, "test")


def test_datasets_registry():
    assert get_dataset("cifar10").shape == (3, 32, 32) and get_dataset("mnist").shape == (1, 28, 28)
    assert get_dataset("cifar10").load is load_cifar10


@pytest.mark.skipif(not (SUBSET / CIFAR10_FOLDER).is_dir(), reason="shared CIFAR-10 subset not present")
def test_shared_subset_smoke():
    images, labels = load_cifar10(SUBSET, "train", return_labels=True)
    assert images.shape == (4660, 3, 32, 32)
    assert labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # the official first labels
    assert 100 < images.float().mean() < 140
