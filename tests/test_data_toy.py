"""Tests of sdeflow.data.toy: shapes, seeding, and the exact densities against quadrature."""

import math

import pytest
import torch

from sdeflow.data import DATASETS, toy
from sdeflow.data import sample_toy, toy_log_prob

TOY_SETS = [name for name, entry in DATASETS.items() if entry.kind == "toy"]
LOG_DENSITIES = [name for name in TOY_SETS if DATASETS[name].log_prob is not None]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", TOY_SETS)
def test_shape_dtype_finite_and_seeded(name):
    x = sample_toy(name, 1000, generator=_gen(0))
    assert x.shape == (1000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert x.abs().max() < 5  # every set lives on the scale the VP prior N(0, I) expects
    assert torch.equal(x, sample_toy(name, 1000, generator=_gen(0)))
    assert not torch.equal(x, sample_toy(name, 1000, generator=_gen(1)))


@pytest.mark.parametrize("name", list(LOG_DENSITIES))
def test_exact_density_integrates_to_one(name):
    # Midpoint quadrature of exp(log p) on [-4, 4]^2 with step 0.02; the checkerboard's edges fall
    # on grid lines between midpoints, so its quadrature is exact.
    h = 0.02
    axis = torch.arange(-4 + h / 2, 4, h, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    mass = float(toy_log_prob(name, grid).exp().sum()) * h * h
    assert mass == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("name", list(LOG_DENSITIES))
def test_samples_lie_where_the_density_is(name):
    x = sample_toy(name, 4000, generator=_gen(3))
    logp = toy_log_prob(name, x)
    assert logp.dtype == torch.float64 and torch.isfinite(logp).all()


def test_checkerboard_density_values():
    assert torch.allclose(toy.checkerboard_log_prob(sample_toy("checkerboard", 500, _gen(2))),
                          torch.full((500,), -math.log(8), dtype=torch.float64))
    # (0.5, 0.5): cell (0, 0), black; (0.5, -0.5): cell (0, -1), white; (3, 0): off the board.
    logp = toy.checkerboard_log_prob(torch.tensor([[0.5, 0.5], [0.5, -0.5], [3.0, 0.0], [-1.5, -1.5]]))
    assert logp[0] == pytest.approx(-math.log(8)) and logp[3] == pytest.approx(-math.log(8))
    assert logp[1] == -math.inf and logp[2] == -math.inf
    # every one of the eight black squares is visited equally often
    x = sample_toy("checkerboard", 80000, _gen(4))
    counts = torch.bincount(((x[:, 0].floor() + 2) * 4 + (x[:, 1].floor() + 2)).long(), minlength=16)
    black = counts[counts > 0]
    assert len(black) == 8 and (black - 10000).abs().max() < 500  # ~5 binomial std


def test_gaussian_mixture_moments_match_its_law():
    x = sample_toy("gaussian_mixture", 200000, _gen(5)).double()
    mix = toy.GAUSSIAN_MIXTURE
    mean = (mix.weights[:, None] * mix.means).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=0.01)
    # log p on samples averages to minus the entropy; compare with an independent estimate
    logp = toy.gaussian_mixture_log_prob(x[:1000].float())
    assert torch.allclose(logp, mix.log_prob(x[:1000]), atol=1e-5)


@pytest.mark.parametrize("name, mixture", [("8gaussians", toy.EIGHT_GAUSSIANS), ("gaussian_mixture", toy.GAUSSIAN_MIXTURE)])
def test_the_mixtures_are_labelled_by_their_components(name, mixture):
    """return_labels: the same points as without, and each label's points follow its component's law
    (the class of ClassConditionalScoreNet), in the shares of the mixture's weights."""
    x, labels = sample_toy(name, 40000, _gen(2), return_labels=True)
    assert DATASETS[name].num_classes == len(mixture.weights) and labels.dtype == torch.long
    assert torch.equal(x, sample_toy(name, 40000, _gen(2)))
    shares = torch.bincount(labels, minlength=len(mixture.weights)).double() / len(labels)
    assert torch.allclose(shares, mixture.weights, atol=0.01)
    for k in range(len(mixture.weights)):
        points = x[labels == k].double()
        assert torch.allclose(points.mean(0), mixture.means[k], atol=0.03)
        assert torch.allclose(points.std(0), mixture.stds[k], rtol=0.05)


def test_an_unlabelled_toy_set_refuses_labels():
    with pytest.raises(ValueError, match="'swissroll' has no labels; the labelled toy sets are 8gaussians, gaussian_mixture"):
        sample_toy("swissroll", 4, return_labels=True)


def test_swissroll_lies_on_the_spiral():
    x = sample_toy("swissroll", 5000, _gen(6))
    radius = x.norm(dim=1)
    # radius θ/5 with θ in [1.5π, 4.5π]: 0.94 to 2.83, blurred by noise 0.1
    assert 0.6 < float(radius.min()) and float(radius.max()) < 3.3
    assert float(radius.mean()) == pytest.approx(3 * math.pi / 5, abs=0.05)
    clean = toy.swissroll(5000, noise=0.0, generator=_gen(6))
    theta = 5 * clean.norm(dim=1)
    assert torch.allclose(torch.atan2(clean[:, 1], clean[:, 0]),
                          torch.atan2(torch.sin(theta), torch.cos(theta)), atol=1e-4)


def test_moons_are_two_half_circles():
    x = toy.moons(4000, noise=0.0, generator=_gen(7)).double() / 1.5 + torch.tensor([0.5, 0.25], dtype=torch.float64)
    outer = (x.norm(dim=1) - 1).abs() < 1e-6
    inner = ((x - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1) - 1).abs() < 1e-6
    assert bool((outer | inner).all())
    assert 0.45 < float(outer.double().mean()) < 0.55


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_n(n):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        sample_toy("moons", n)


def test_bad_names_and_inputs():
    with pytest.raises(ValueError, match="dataset must be one of"):
        sample_toy("spiral", 10)
    with pytest.raises(ValueError, match="noise"):
        toy.swissroll(10, noise=-1)
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        toy.checkerboard_log_prob(torch.zeros(3, 3))
    assert toy_log_prob("swissroll", torch.zeros(3, 2)) is None
