"""The classifier of sdeflow/metrics/classifier.py: its shapes, training that learns and is reproducible
from a seed, its file (round trip, refused files), held-out accuracy and the class coverage of samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdeflow.metrics import (ClassHistogram, ClassifierNet, class_coverage, classifier_accuracy, load_classifier,
                             make_features, save_classifier, train_classifier)
from sdeflow.metrics.classifier import _augment

from training_helpers import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def shapes(n: int, seed: int = 0, size: int = 16):
    """Three classes of 1×size×size images that a small network tells apart: a horizontal bar,
    a vertical bar, a square, each at a random place and brightness over faint noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    images = torch.randint(0, 40, (n, 1, size, size), generator=gen).float()
    for i, label in enumerate(labels.tolist()):
        r, c = torch.randint(2, size - 6, (2,), generator=gen).tolist()
        value = float(torch.randint(150, 256, (), generator=gen))
        if label == 0:
            images[i, 0, r, 2:-2] = value
        elif label == 1:
            images[i, 0, 2:-2, c] = value
        else:
            images[i, 0, r:r + 4, c:c + 4] = value
    return images.to(torch.uint8), labels


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 16, 16)])
def test_classifier_shapes(shape):
    net = ClassifierNet(shape[0], shape[1])
    x = torch.randint(0, 256, (5, *shape), dtype=torch.uint8)
    features = net(x)
    assert features.shape == (5, 128) and net.classify(features).shape == (5, 10)
    with pytest.raises(ValueError, match=r"images must have shape \(N, "):
        net(torch.zeros(5, shape[0], shape[1] + 2, shape[2] + 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        net(x.float())


def test_classifier_refuses_bad_configurations():
    with pytest.raises(ValueError, match="image_size must be at least 16"):
        ClassifierNet(1, 15)
    with pytest.raises(ValueError, match="n_classes"):
        ClassifierNet(1, 28, n_classes=1)
    with pytest.raises(ValueError, match="width"):
        ClassifierNet(1, 28, width=0)


def test_augmentation_shifts_and_flips_whole_images():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 1, 16, 16, dtype=torch.uint8)
    x[:, :, 7:9, 7:9] = 200
    moved = _augment(x, 2, False, gen)
    assert moved.shape == x.shape and moved.dtype == torch.uint8
    assert (moved.sum((1, 2, 3)) == x.sum((1, 2, 3))).all()  # a shift of ≤ 2 keeps the centred square inside
    centres = (moved[:, 0] > 0).nonzero()[:, 1:].float().view(64, 4, 2).mean(1) - 7.5
    assert centres.abs().max() <= 2 and len({tuple(c) for c in centres.tolist()}) > 5
    x[:, :, :, :8] = 50  # left half
    flipped = _augment(x, 0, True, gen)
    is_flipped = (flipped[:, 0, 0, -1] == 50)
    assert 10 < int(is_flipped.sum()) < 54 and torch.equal(flipped[is_flipped], x[is_flipped].flip(-1))


def test_training_learns_and_is_reproducible_from_its_seed():
    images, labels = shapes(600)
    test_images, test_labels = shapes(300, seed=1)
    state = torch.get_rng_state()
    reports = []
    net = train_classifier(images, labels, steps=150, batch_size=32, width=8, feature_dim=16, seed=3,
                           callback=reports.append)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    assert [r["step"] for r in reports] == list(range(1, 151)) and reports[-1]["steps"] == 150
    assert reports[-1]["loss"] < reports[0]["loss"]
    assert not net.training and net.config["n_classes"] == 3
    assert classifier_accuracy(net, test_images, test_labels) > 0.95
    again = train_classifier(images, labels, steps=150, batch_size=32, width=8, feature_dim=16, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    other = train_classifier(images, labels, steps=2, batch_size=32, width=8, feature_dim=16, seed=4)
    assert not torch.equal(other.state_dict()["head.1.weight"], again.state_dict()["head.1.weight"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=torch.zeros(3)), "labels must be an integer tensor"),
    (dict(labels=torch.full((4,), -1)), "labels must be >= 0"),
    (dict(labels=torch.tensor([0, 1, 2, 3]), n_classes=3), r"labels must lie in \[0, n_classes=3\)"),
    (dict(steps=0), "steps"),
    (dict(lr=-1.0), "lr"),
])
def test_training_refuses_bad_arguments_by_name(kwargs, match):
    args = dict(images=torch.zeros(4, 1, 16, 16, dtype=torch.uint8), labels=torch.tensor([0, 1, 0, 1]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        train_classifier(args.pop("images"), args.pop("labels"), **args)


def test_the_file_round_trip_and_refused_files(tmp_path):
    net = ClassifierNet(3, 16, n_classes=4, width=4, feature_dim=8).eval()
    path = save_classifier(net, tmp_path / "c.pt", info={"dataset": "toy", "accuracy": 0.5})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # written atomically: no temporary left
    stored = torch.load(path, weights_only=True)  # tensors and plain values only
    assert stored["format"] == "sdeflow-classifier" and stored["config"]["n_classes"] == 4
    loaded = load_classifier(path)
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x)) and torch.equal(loaded.classify(loaded(x)), net.classify(net(x)))
    assert loaded.info == {"dataset": "toy", "accuracy": 0.5} and not loaded.training
    assert isinstance(make_features("classifier", path=path), ClassifierNet)  # the registry's builder

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classifier(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable classifier file"):
        load_classifier(tmp_path / "junk.pt")
    torch.save({"format": "sdeflow-checkpoint"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an sdeflow classifier file"):
        load_classifier(tmp_path / "other.pt")
    stored["config"]["width"] = 5  # weights of another shape
    torch.save(stored, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit its configuration"):
        load_classifier(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="ClassifierNet"):
        save_classifier(torch.nn.Linear(2, 2), tmp_path / "x.pt")


def test_class_coverage_counts_confident_predictions_and_effective_classes():
    confident, unsure = 10.0, 0.5  # softmax max ≈ 0.9999 and ≈ 0.25 of 4 classes
    logits = torch.zeros(8, 4)
    for i, k in enumerate([0, 0, 1, 1, 2, 2, 3, 3]):
        logits[i, k] = confident if i % 2 == 0 else unsure
    result = class_coverage(logits)
    assert result["confident_share"] == 0.5
    assert result["effective_classes"] == pytest.approx(4.0)  # uniform over 4 classes
    assert result["class_counts"] == [2, 2, 2, 2]
    collapsed = class_coverage(torch.tensor([[5.0, 0.0, 0.0]] * 6))
    assert collapsed["effective_classes"] == pytest.approx(1.0) and collapsed["confident_share"] == 1.0
    # streamed over batches: the same figures; p = (3/4, 1/4) gives exp(H) = 4 / 3^(3/4)
    histogram = ClassHistogram()
    for batch in torch.tensor([[4.0, 0.0]] * 3 + [[0.0, 4.0]]).split(3):
        histogram.update(batch)
    assert histogram.result()["effective_classes"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    with pytest.raises(ValueError, match=r"logits must have shape \(B, 2\)"):
        histogram.update(torch.zeros(2, 3))
    assert np.isnan(ClassHistogram().result()["effective_classes"])
    with pytest.raises(ValueError, match="confidence"):
        ClassHistogram(confidence=1.5)
