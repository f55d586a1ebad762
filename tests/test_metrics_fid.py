"""FID and KID (sdeflow/metrics/fid.py), the feature-network plumbing (features.py, inception.py) and
samples on disk (samples.py): the Fréchet distance against its closed forms and scipy, streamed
statistics against numpy, KID's unbiasedness, the reference cache, and the figures on real digits
(held-out images give the floor; noise, one repeated image, blur and noise lie far above it, rising
with the level)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from sdeflow.metrics import (FEATURES, ClassifierNet, FeatureStatistics, InceptionFeatures, compute_features,
                             feature_statistics, frechet_distance, image_metrics, kid, load_samples, make_features,
                             reference_statistics, register_features, train_classifier)
from sdeflow.metrics.inception import WEIGHTS_FILE

from training_helpers import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
MNIST_SUBSET = next((p for p in (REPO.parent / "shared" / "data" / "mnist-subset",
                                 Path("/work/shared/data/mnist-subset")) if p.is_dir()), None)


def _random_cov(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d + 3))
    return a @ a.T / a.shape[1]


# ---- the Fréchet distance --------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 5, 64])
def test_frechet_distance_of_commuting_covariances_is_its_closed_form(d):
    # C1 = Q diag(a) Qᵀ, C2 = Q diag(b) Qᵀ commute, so Tr(C1 + C2 - 2 (C1 C2)^½) = Σ (√a - √b)².
    rng = np.random.default_rng(d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for rotation in (np.eye(d), q):  # diagonal, then rotated
        c1, c2 = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
        assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_frechet_distance_of_non_commuting_covariances_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    for d in (2, 7, 40):
        c1, c2 = _random_cov(d, rng), _random_cov(d, rng)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        root = scipy.linalg.sqrtm(c1 @ c2).real  # the direct formula
        direct = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * root)
        assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(direct, rel=1e-9)
        assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(frechet_distance(mu2, c2, mu1, c1), rel=1e-9)
        # tensors of any float dtype are taken in float64
        assert frechet_distance(torch.tensor(mu1), torch.tensor(c1), torch.tensor(mu2),
                                torch.tensor(c2)) == pytest.approx(direct, rel=1e-9)


def test_frechet_distance_of_equal_and_singular_gaussians():
    rng = np.random.default_rng(2)
    c = _random_cov(30, rng, rank=10)  # singular, as with fewer samples than dimensions
    mu = rng.normal(size=30)
    assert 0.0 <= frechet_distance(mu, c, mu, c) < 1e-9
    a = np.r_[rng.uniform(0.5, 2, 10), np.zeros(20)]
    b = rng.uniform(0.5, 2, 30)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("args, name", [
    ((np.zeros(3), np.eye(3), np.zeros(3), np.eye(4)), "cov2"),
    ((np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), "mu1"),
    ((np.zeros(3), np.eye(3), np.zeros(2), np.eye(3)), "mu2"),
    ((np.zeros(3), np.full((3, 3), np.nan), np.zeros(3), np.eye(3)), "cov1"),
])
def test_frechet_distance_refuses_bad_arguments_by_name(args, name):
    with pytest.raises(ValueError, match=name):
        frechet_distance(*args)


# ---- streamed statistics ---------------------------------------------------------------------------
def test_streamed_statistics_equal_one_shot_numpy_statistics():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1000, 16)) @ rng.normal(size=(16, 16)) + 100.0  # far from 0: cancellation would show
    stats = FeatureStatistics(16, keep=2000)
    start = 0
    for size in (1, 2, 300, 7, 0, 690):
        stats.update(torch.from_numpy(x[start:start + size]).float())
        start += size
    x32 = x.astype(np.float32).astype(np.float64)
    assert stats.n == 1000
    np.testing.assert_allclose(stats.mean, x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-12)
    assert torch.equal(stats.kept, torch.from_numpy(x).float())  # fewer than `keep`: all, in order
    again = FeatureStatistics.from_arrays(stats.to_arrays())
    assert again.n == 1000 and np.array_equal(again.covariance, stats.covariance)
    assert torch.equal(again.kept, stats.kept)


def test_kept_features_are_a_uniform_sample_without_replacement():
    n, keep, reps = 40, 10, 600
    x = torch.arange(n, dtype=torch.float32)[:, None]
    counts = np.zeros(n)
    gen = torch.Generator().manual_seed(0)
    for _ in range(reps):
        stats = FeatureStatistics(1, keep=keep, generator=gen)
        for batch in x.split(7):
            stats.update(batch)
        kept = stats.kept.flatten().long().numpy()
        assert len(kept) == keep and len(set(kept)) == keep
        counts[kept] += 1
    share = counts / reps  # each index is kept with probability keep/n = 0.25
    assert np.abs(share - keep / n).max() < 5 * np.sqrt(0.25 * 0.75 / reps)
    assert abs(share[:keep].mean() - share[keep:].mean()) < 0.04  # the first ones have no advantage


def test_feature_statistics_refuse_bad_features():
    stats = FeatureStatistics(4)
    with pytest.raises(ValueError, match=r"features must be a tensor \(B, 4\)"):
        stats.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStatistics(4).update(torch.zeros(1, 4)).covariance


# ---- KID -------------------------------------------------------------------------------------------
def _kid_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return within - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2


def test_kid_of_whole_sets_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.3
    mean, se = kid(torch.tensor(x), torch.tensor(y), n_subsets=3, subset_size=1000)  # capped at 6: the whole sets
    assert mean == pytest.approx(_kid_by_loops(x, y), rel=1e-5)
    assert se == pytest.approx(0.0, abs=1e-9)


def test_kid_is_zero_in_expectation_for_one_law_and_positive_for_two():
    gen = torch.Generator().manual_seed(5)
    d = 16

    def draw(n, shift=0.0):
        return torch.randn(n, d, generator=gen) + shift

    mean, se = kid(draw(2000), draw(2000), n_subsets=100, subset_size=50, generator=gen)
    assert abs(mean) < 4 * se
    # unbiased: over independent pairs of samples of one law, the estimates average to 0
    means = np.array([kid(draw(200), draw(200), n_subsets=5, subset_size=100, generator=gen)[0] for _ in range(40)])
    assert abs(means.mean()) < 3 * means.std(ddof=1) / np.sqrt(len(means))
    mean, se = kid(draw(2000), draw(2000, shift=0.5), n_subsets=100, subset_size=50, generator=gen)
    assert mean > 0 and mean > 20 * se


def test_kid_is_reproducible_from_its_generator_and_refuses_bad_arguments():
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    run = lambda seed: kid(x, x + 0.1, n_subsets=5, subset_size=20, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert run(1) == run(1) != run(2)
    with pytest.raises(ValueError, match="same dimension"):
        kid(x, x[:, :3])
    with pytest.raises(ValueError, match="n_subsets"):
        kid(x, x, n_subsets=0)
    with pytest.raises(ValueError, match="at least 2"):
        kid(x[:1], x)


# ---- feature networks, image metrics and the reference cache ---------------------------------------
class CountingFeatures(nn.Module):
    """The mean of each image channel as its features, counting the images it saw."""

    name = "channel-means"

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen = 0

    def forward(self, images):
        self.seen += len(images)
        x = images.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1) * self.scale


def _uint8(n, seed, shape=(1, 16, 16), high=256):
    return torch.randint(0, high, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_image_metrics_of_one_law_lie_at_the_floor_and_of_two_far_above():
    net = CountingFeatures()
    reference, same, other = _uint8(400, 0), _uint8(400, 1), _uint8(400, 2, high=128)
    gen = torch.Generator().manual_seed(0)
    floor = image_metrics(net, same, reference, subset_size=100, n_subsets=20, generator=gen)
    assert set(floor) >= {"fid", "kid", "kid_se", "n_samples", "n_reference", "features", "feature_dim"}
    assert floor["n_samples"] == floor["n_reference"] == 400 and floor["features"] == "channel-means"
    assert floor["feature_dim"] == 2 and floor["kid_subset_size"] == 100
    far = image_metrics(net, other, reference, subset_size=100, n_subsets=20, generator=gen)
    assert far["fid"] > 100 * floor["fid"] and far["kid"] > 20 * far["kid_se"]
    # batches from an iterable (as samples drawn on the fly) give the same statistics
    batched = image_metrics(net, iter(same.split(64)), reference, subset_size=100, n_subsets=20,
                            generator=torch.Generator().manual_seed(0))
    again = image_metrics(net, same, reference, subset_size=100, n_subsets=20, generator=torch.Generator().manual_seed(0))
    assert batched["fid"] == pytest.approx(again["fid"], rel=1e-9) and batched["kid"] == again["kid"]
    with pytest.raises(ValueError, match="same image shape"):
        image_metrics(net, _uint8(10, 0, (3, 16, 16)), reference)
    with pytest.raises(ValueError, match="uint8"):
        image_metrics(net, same.float(), reference)


def test_reference_statistics_are_cached_by_network_and_images(tmp_path):
    net, images = CountingFeatures(), _uint8(50, 3)
    cache = tmp_path / "ref.npz"
    first = reference_statistics(net, images, cache=cache, batch_size=16)
    assert cache.is_file() and net.seen == 50
    second = reference_statistics(net, images, cache=cache)
    assert net.seen == 50 and np.array_equal(second.covariance, first.covariance)  # read, not computed
    reference_statistics(net, images[:40], cache=cache)  # other images: computed again, rewritten
    assert net.seen == 90
    with torch.no_grad():
        net.scale.fill_(2.0)  # other weights: computed again
    reference_statistics(net, images[:40], cache=cache)
    assert net.seen == 130
    cache.write_bytes(b"not an npz")  # unreadable: computed again and replaced
    reference_statistics(net, images[:40], cache=cache)
    assert net.seen == 170 and reference_statistics(net, images[:40], cache=cache).n == 40 and net.seen == 170
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary file left


def test_compute_features_batches_and_restores_the_mode():
    net = ClassifierNet(1, 16, width=4, feature_dim=8).train()
    images = _uint8(10, 4)
    features = compute_features(net, images, batch_size=3)
    assert features.shape == (10, 8) and features.dtype == torch.float32 and net.training
    assert torch.allclose(features, compute_features(net, list(images.split(4))))  # eval mode: no dropout noise
    with pytest.raises(ValueError, match="batch_size"):
        compute_features(net, images, batch_size=0)


def test_feature_registry():
    assert {"inception", "classifier"} <= set(FEATURES)
    register_features("test-channel-means", CountingFeatures)
    try:
        assert isinstance(make_features("test-channel-means"), CountingFeatures)
        with pytest.raises(ValueError, match="already registered"):
            register_features("test-channel-means", CountingFeatures)
        with pytest.raises(ValueError, match="allowed"):
            make_features("test-channel-means", weights=1)
    finally:
        FEATURES.pop("test-channel-means")
    with pytest.raises(ValueError, match="features must be one of"):
        make_features("vgg")


def test_inception_refuses_missing_weights_with_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FileNotFoundError) as info:
        InceptionFeatures()
    message = str(info.value)
    assert "\n" not in message and WEIGHTS_FILE in message and str(tmp_path / "torch-home") in message
    assert "never downloads" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InceptionFeatures(tmp_path / "missing.pth")


def test_inception_without_torch_fidelity_says_what_to_install(tmp_path, monkeypatch):
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(b"")
    # as if torch-fidelity were not installed
    for name in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'sdeflow\[metrics\]'") as info:
        InceptionFeatures(weights)
    assert "\n" not in str(info.value)


def _torch_fidelity():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as err:  # noqa: BLE001 - missing, or a torchvision built for another torch
        pytest.skip(f"torch-fidelity does not import here ({type(err).__name__}: {str(err)[:80]})")
    return FeatureExtractorInceptionV3


def test_inception_plumbing_with_random_weights_matches_torch_fidelity(tmp_path):
    extractor_class = _torch_fidelity()
    torch.manual_seed(0)
    net = InceptionFeatures(random_weights=True)
    rgb, grey = _uint8(2, 5, (3, 32, 32)), _uint8(2, 6, (1, 28, 28))
    features = compute_features(net, rgb)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert compute_features(net, grey).shape == (2, 2048)
    # the same weights through torch-fidelity's own loading give the same features
    weights = tmp_path / WEIGHTS_FILE
    torch.save(net.extractor.state_dict(), weights)
    theirs = extractor_class("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        assert torch.allclose(theirs(rgb)[0], features, atol=1e-5)
        assert torch.allclose(theirs(grey.expand(-1, 3, -1, -1))[0], compute_features(net, grey), atol=1e-5)
    assert torch.allclose(compute_features(InceptionFeatures(weights), rgb), features, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        net(_uint8(1, 0, (2, 32, 32)))


# ---- samples on disk -------------------------------------------------------------------------------
def test_load_samples_from_npz_and_png_folders(tmp_path):
    from PIL import Image

    images = _uint8(3, 7, (3, 8, 8))
    np.savez(tmp_path / "s.npz", samples=images.numpy())
    assert torch.equal(load_samples(tmp_path / "s.npz"), images)
    for kind, batch in (("rgb", images), ("grey", images[:, :1])):
        folder = tmp_path / kind
        folder.mkdir()
        for i, image in enumerate(batch):
            array = image.permute(1, 2, 0).numpy()
            Image.fromarray(array[..., 0] if kind == "grey" else array).save(folder / f"{i:03d}.png")
        assert torch.equal(load_samples(folder), batch)
    np.savez(tmp_path / "wrong.npz", images=images.numpy())
    with pytest.raises(ValueError, match="no array 'samples'"):
        load_samples(tmp_path / "wrong.npz")
    np.savez(tmp_path / "float.npz", samples=images.float().numpy())
    with pytest.raises(ValueError, match="uint8"):
        load_samples(tmp_path / "float.npz")
    with pytest.raises(FileNotFoundError):
        load_samples(tmp_path / "missing.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png"):
        load_samples(tmp_path / "empty")


# ---- the figures on real digits --------------------------------------------------------------------
def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma + 0.5)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    taps = taps / taps.sum()
    x = images.float()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), taps.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), taps.view(1, 1, -1, 1))
    return x.round().clamp(0, 255).to(torch.uint8)


def _noised(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * std
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def digits():
    """Real MNIST digits (training images only) and a classifier trained on them in a few seconds."""
    if MNIST_SUBSET is None:
        pytest.skip("the shared MNIST subset is not present")
    from sdeflow.data.images import load_mnist

    images, labels = load_mnist(MNIST_SUBSET, "train", return_labels=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = train_classifier(images[:4000], labels[:4000], steps=150, batch_size=64, width=8, feature_dim=32, seed=0)
    finally:
        torch.set_num_threads(before)
    return images, net


def test_fid_on_real_digits_has_a_floor_that_degraded_images_lie_far_above(digits):
    images, net = digits
    n = 1000
    reference = feature_statistics(net, images[:4000])
    held_out = images[-n:]  # real images the classifier never saw

    def fid(candidates):
        stats = feature_statistics(net, candidates)
        return frechet_distance(stats.mean, stats.covariance, reference.mean, reference.covariance)

    floor = fid(held_out)
    noise = fid(torch.randint(0, 256, held_out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8))
    repeated = fid(held_out[:1].expand(n, -1, -1, -1))
    blurred = [fid(_blur(held_out, sigma)) for sigma in (1.0, 1.5, 2.0, 3.0)]
    noised = [fid(_noised(held_out, std)) for std in (40, 80, 120, 160)]
    # at N = 1000: floor ≈ 0.7; the mildest blur (σ = 1 px) ≈ 20, the mildest noise (σ = 40 of 255) ≈ 3
    assert noise > 20 * floor and repeated > 20 * floor
    assert min(blurred + noised) > 3 * floor
    assert blurred == sorted(blurred) and noised == sorted(noised)  # rising with the level
    # KID agrees: the held-out images are at 0 within its noise, noised ones clearly above
    gen = torch.Generator().manual_seed(0)
    real = image_metrics(net, held_out, reference, subset_size=200, n_subsets=50, generator=gen)
    noisy = image_metrics(net, _noised(held_out, 96), reference, subset_size=200, n_subsets=50, generator=gen)
    assert real["fid"] == pytest.approx(floor, rel=1e-9)
    assert abs(real["kid"]) < 5 * real["kid_se"] + 1e-3 * noisy["kid"]
    assert noisy["kid"] > 20 * noisy["kid_se"]
    assert real["effective_classes"] > 9 and real["confident_share"] > noisy["confident_share"]
