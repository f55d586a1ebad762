"""``sdeflow classifier`` and ``sdeflow fid`` end to end on tiny data, and their user errors: one line,
exit status 2, never a traceback, never a download."""

from __future__ import annotations

import gzip
import json
import re
import struct
import sys

import numpy as np
import pytest
import torch

from sdeflow import cli
from sdeflow.metrics import ClassifierNet, save_classifier
from sdeflow.metrics.inception import WEIGHTS_FILE

from training_helpers import one_thread, single_thread, train_args, write_cifar_batches  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def write_mnist(root, n_train: int = 240, n_test: int = 60, seed: int = 0):
    """A folder of gzipped MNIST IDX files: digits-like images, each of ten classes a bar at its own place."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 30, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 4 + 2 * label: 6 + 2 * label, 4:24] = 255
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


def _one_line_error(code, err, *pieces):
    assert code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for piece in pieces:
        assert piece in err, err


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("cli_metrics") / "mnist")


@pytest.fixture(scope="module")
def classifier(mnist, tmp_path_factory):
    """A classifier file trained by the command on the tiny MNIST folder."""
    out = tmp_path_factory.mktemp("classifier") / "c.pt"
    with one_thread():
        assert cli.main(["classifier", "--dataset", "mnist", "--data-root", str(mnist), "--out", str(out),
                         "--steps", "30", "--batch-size", "32", "--no-progress"]) == 0
    return out


def test_classifier_command_writes_the_file_and_reports_held_out_accuracy(tmp_path, capsys, mnist):
    out, report = tmp_path / "c.pt", tmp_path / "c.json"
    code, stdout, err = _run(["classifier", "--dataset", "mnist", "--data-root", mnist, "--out", out, "--steps", 30,
                              "--batch-size", 32, "--seed", 1, "--json", report, "--no-progress"], capsys)
    assert code == 0, err
    match = re.fullmatch(rf"wrote {re.escape(str(out))}: mnist classifier, held-out accuracy ([\d.]+)% on 60 images "
                         r"\(the test split; 30 steps on 240 images, \d+ s\)", stdout)
    assert match, stdout
    summary = json.loads(report.read_text())
    assert summary["accuracy"] == pytest.approx(float(match.group(1)) / 100, abs=1e-4)
    assert summary["accuracy"] > 0.5 and summary["n_train"] == 240 and summary["n_heldout"] == 60
    state = torch.load(out, weights_only=True)
    assert state["info"]["dataset"] == "mnist" and state["config"]["image_size"] == 28


def test_classifier_command_holds_out_training_images_where_there_is_no_test_split(tmp_path, capsys):
    root = write_cifar_batches(tmp_path / "cifar", n_train=40, n_test=4)
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    common = ["classifier", "--dataset", "cifar10", "--data-root", root, "--out", tmp_path / "c.pt", "--steps", 2,
              "--batch-size", 8, "--no-progress"]
    code, _, err = _run(common, capsys)
    _one_line_error(code, err, "--holdout N")
    code, stdout, err = _run(common + ["--holdout", 10], capsys)
    assert code == 0, err
    assert "on 10 images (the last 10 training images; 2 steps on 46 images" in stdout
    code, _, err = _run(common + ["--holdout", 56], capsys)
    _one_line_error(code, err, "--holdout 56 leaves no training images")


def test_fid_of_samples_in_an_npz_with_classifier_features(tmp_path, capsys, mnist, classifier):
    from sdeflow.data.images import load_mnist

    test_images = load_mnist(mnist, "test")
    np.savez(tmp_path / "real.npz", samples=test_images.numpy())
    noise = np.random.default_rng(0).integers(0, 256, test_images.shape).astype(np.uint8)
    np.savez(tmp_path / "noise.npz", samples=noise)
    cache, report = tmp_path / "ref.npz", tmp_path / "fid.json"
    common = ["fid", "--dataset", "mnist", "--data-root", mnist, "--features", "classifier", "--classifier",
              classifier, "--kid-subsets", 10, "--kid-subset-size", 50, "--no-progress"]
    code, stdout, err = _run(common + ["--samples", tmp_path / "real.npz", "--reference-cache", cache,
                                       "--json", report], capsys)
    assert code == 0, err
    line = re.fullmatch(r"FID ([\d.]+), KID (-?[\d.]+) ± ([\d.]+) \(60 samples vs 240 mnist train images, classifier "
                        r"features; ([\d.]+)% classified with confidence > 0.9, ([\d.]+) effective classes\)", stdout)
    assert line, stdout
    summary = json.loads(report.read_text())
    assert summary["fid"] == pytest.approx(float(line.group(1)), abs=1e-3)
    assert {"kid", "kid_se", "n_samples", "n_reference", "features", "confident_share", "effective_classes",
            "source", "dataset", "split"} <= set(summary)
    assert summary["features"] == "classifier" and summary["n_samples"] == 60 and cache.is_file()
    code, again, err = _run(common + ["--samples", tmp_path / "real.npz", "--reference-cache", cache], capsys)
    assert code == 0 and again == stdout, err  # the cached reference statistics give the same figures
    code, stdout, err = _run(common + ["--samples", tmp_path / "noise.npz", "--n-samples", 50], capsys)
    assert code == 0, err
    assert float(stdout.split()[1].rstrip(",")) > 3 * summary["fid"] and "(50 samples vs" in stdout


def test_fid_of_a_folder_of_pngs(tmp_path, capsys, mnist, classifier):
    from PIL import Image

    from sdeflow.data.images import load_mnist

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(load_mnist(mnist, "test")[:12]):
        Image.fromarray(image[0].numpy()).save(folder / f"{i:02d}.png")
    code, stdout, err = _run(["fid", "--samples", folder, "--dataset", "mnist", "--data-root", mnist, "--split", "test",
                              "--features", "classifier", "--classifier", classifier, "--kid-subset-size", 10,
                              "--kid-subsets", 5, "--no-progress"], capsys)
    assert code == 0, err
    assert "(12 samples vs 60 mnist test images, classifier features;" in stdout


def test_fid_of_a_checkpoint_draws_its_samples_with_the_sampler_flags(tmp_path, capsys):
    root = write_cifar_batches(tmp_path / "cifar", n_train=16, n_test=6)
    with one_thread():
        assert cli.main(train_args(root, tmp_path / "run", 2)) == 0
    capsys.readouterr()
    net = ClassifierNet(3, 32, width=4, feature_dim=8)
    save_classifier(net, tmp_path / "c.pt")
    code, stdout, err = _run(["fid", "--checkpoint", tmp_path / "run", "--n-samples", 4, "--method", "heun",
                              "--n-steps", 2, "--dataset", "cifar10", "--data-root", root, "--features", "classifier",
                              "--classifier", tmp_path / "c.pt", "--kid-subset-size", 4, "--kid-subsets", 3,
                              "--no-progress", "--no-clip", "--json", tmp_path / "fid.json"], capsys)
    assert code == 0, err
    assert "(4 samples vs 32 cifar10 train images, classifier features;" in stdout
    nfe = re.search(r"; heun, 2 steps, NFE (\d+)\)$", stdout)
    assert nfe, stdout
    summary = json.loads((tmp_path / "fid.json").read_text())
    assert summary["nfe"] == int(nfe.group(1)) and "run" in summary["source"]
    code, _, err = _run(["fid", "--checkpoint", tmp_path / "run", "--dataset", "cifar10", "--data-root", root,
                         "--features", "classifier", "--classifier", tmp_path / "c.pt", "--no-progress"], capsys)
    _one_line_error(code, err, "--n-samples N is needed")
    code, _, err = _run(["fid", "--checkpoint", tmp_path / "run", "--n-samples", 2, "--dataset", "mnist",
                         "--data-root", root, "--features", "classifier", "--classifier", tmp_path / "c.pt",
                         "--no-progress"], capsys)
    _one_line_error(code, err)


def test_missing_inception_weights_say_where_to_put_them(tmp_path, capsys, monkeypatch, mnist):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    np.savez(tmp_path / "s.npz", samples=np.zeros((2, 1, 28, 28), np.uint8))
    common = ["fid", "--samples", tmp_path / "s.npz", "--dataset", "mnist", "--data-root", mnist, "--no-progress"]
    code, _, err = _run(common, capsys)
    _one_line_error(code, err, WEIGHTS_FILE, str(tmp_path / "torch-home"), "--inception-weights PATH",
                    "never downloads")
    code, _, err = _run(common + ["--inception-weights", tmp_path / "nowhere.pth"], capsys)
    _one_line_error(code, err, "--inception-weights", "nowhere.pth does not exist")


def test_missing_extra_says_what_to_install(tmp_path, capsys, monkeypatch, mnist):
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(b"")
    # as if torch-fidelity were not installed
    for name in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3"):
        monkeypatch.setitem(sys.modules, name, None)
    np.savez(tmp_path / "s.npz", samples=np.zeros((2, 1, 28, 28), np.uint8))
    code, _, err = _run(["fid", "--samples", tmp_path / "s.npz", "--dataset", "mnist", "--data-root", mnist,
                         "--features", "inception", "--inception-weights", weights, "--no-progress"], capsys)
    _one_line_error(code, err, "pip install 'sdeflow[metrics]'")


@pytest.mark.parametrize("extra, piece", [
    (["--features", "classifier"], "--features classifier needs --classifier FILE.pt"),
    (["--features", "classifier", "--classifier", "missing.pt"], "--classifier missing.pt does not exist"),
    (["--classifier", "c.pt"], "--classifier applies to --features classifier"),
    (["--features", "classifier", "--classifier", "c.pt", "--n-samples", 5], "holds only 2 samples"),
    (["--features", "classifier", "--classifier", "c.pt", "--json", "nofolder/x.json"], "does not exist"),
])
def test_fid_user_errors(tmp_path, capsys, monkeypatch, mnist, extra, piece):
    monkeypatch.chdir(tmp_path)
    save_classifier(ClassifierNet(1, 28, width=4, feature_dim=8), tmp_path / "c.pt")
    np.savez(tmp_path / "s.npz", samples=np.zeros((2, 1, 28, 28), np.uint8))
    code, _, err = _run(["fid", "--samples", "s.npz", "--dataset", "mnist", "--data-root", mnist, "--no-progress",
                         *extra], capsys)
    _one_line_error(code, err, piece)


def test_fid_refuses_samples_of_another_shape(tmp_path, capsys, mnist):
    save_classifier(ClassifierNet(1, 28, width=4, feature_dim=8), tmp_path / "c.pt")
    np.savez(tmp_path / "s.npz", samples=np.zeros((2, 3, 32, 32), np.uint8))
    code, _, err = _run(["fid", "--samples", tmp_path / "s.npz", "--dataset", "mnist", "--data-root", mnist,
                         "--features", "classifier", "--classifier", tmp_path / "c.pt", "--no-progress"], capsys)
    _one_line_error(code, err, "the samples are (3, 32, 32) images, the mnist images (1, 28, 28)")
