import math

import pytest
import torch
from scipy import integrate, stats

from sdeflow.data.transforms import (ALPHA, TRANSFORMS, TRUNCATION, Preprocess, bits_per_dim, dequantize,
                                     logit_inverse, logit_transform, quantize, random_hflip,
                                     truncated_normal_dequantize, truncated_normal_scale)


def _images(shape=(4, 3, 5, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def test_dequantize_stays_in_its_cell_and_quantize_inverts_it():
    k = _images()
    k[0, 0, 0, 0], k[0, 0, 0, 1] = 0, 255
    x = dequantize(k, generator=torch.Generator().manual_seed(1))
    assert x.dtype == torch.float32 and x.shape == k.shape
    assert ((x >= k.float() / 256) & (x < (k.float() + 1) / 256)).all()
    assert torch.equal(quantize(x), k)


def test_dequantize_is_reproducible_with_a_generator_and_uniform_within_cells():
    k = torch.full((20000,), 7, dtype=torch.uint8)
    a = dequantize(k, generator=torch.Generator().manual_seed(3))
    b = dequantize(k, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    u = a * 256 - 7  # should be U[0, 1)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005


def test_dequantize_refuses_float_input():
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.rand(2, 3))


def test_logit_round_trip_and_logdet_matches_autograd_jacobian():
    x = torch.rand(2, 1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, logdet = logit_transform(x)
    assert logdet.shape == (2,)
    assert torch.allclose(logit_inverse(y), x, atol=1e-12)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda z: logit_transform(z)[0], x[b:b + 1])
        jac = jac.reshape(x[0].numel(), x[0].numel())
        assert torch.allclose(logdet[b], torch.linalg.slogdet(jac).logabsdet, atol=1e-10)


@pytest.mark.parametrize("transform", ["logit", "centered", "identity"])
def test_preprocess_logdet_matches_autograd_and_inverse_recovers_images(transform):
    pre = Preprocess(transform)
    x = torch.rand(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, logdet = pre.forward(x)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda z: pre.forward(z)[0], x[b:b + 1]).reshape(4, 4)
        assert torch.allclose(logdet[b], torch.linalg.slogdet(jac).logabsdet, atol=1e-10)
    assert torch.allclose(pre.inverse(y), x, atol=1e-12)
    k = _images()
    batch = pre(k, generator=torch.Generator().manual_seed(0))
    assert batch.dequantized and batch.logdet.shape == (4,)
    assert torch.equal(pre.to_uint8(batch.y), k)


def test_flips_only_in_training_and_reproducible():
    k = _images((64, 1, 2, 3))
    pre = Preprocess("identity")
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    evaluation = pre(k, train=False, generator=g())
    assert torch.equal(quantize(evaluation.y), k)  # never flipped at evaluation
    flipped = random_hflip(k, generator=g())
    is_flipped = (flipped == k.flip(-1)).flatten(1).all(1)
    is_same = (flipped == k).flatten(1).all(1)
    assert (is_flipped | is_same).all()
    assert 10 < int((is_flipped & ~is_same).sum()) < 54  # about half of 64
    assert torch.equal(flipped, random_hflip(k, generator=g()))
    train = pre(k, train=True, generator=g())
    assert not torch.equal(quantize(train.y), k)
    assert not torch.equal(quantize(Preprocess("identity", flip=False)(k, train=True).y).flip(-1), k)


def test_bits_per_dim_of_the_uniform_density_is_eight():
    # p_X = 1 on [0, 1]^D puts mass 256^-D on every 8-bit image: exactly 8 bits/dim.
    k = _images()
    pre = Preprocess("identity")
    batch = pre(k, generator=torch.Generator().manual_seed(0))
    bpd = pre.bits_per_dim(torch.zeros(4), batch)
    assert torch.allclose(bpd, torch.full((4,), 8.0))
    # Through the logit: p_Y(y) = p_X(x) / |det ∂y/∂x| = exp(-logdet), the same discrete model.
    logit = Preprocess("logit")
    batch = logit(k, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logit.bits_per_dim(-batch.logdet, batch), torch.full((4,), 8.0), atol=1e-5)


def test_bits_per_dim_of_a_point_mass_model_is_zero_and_of_gaussian_is_closed_form():
    # Data that is always the image k0, modelled by the uniform density on k0's cell (density
    # 256^D there): P(k0) = 1, so 0 bits/dim.
    D = 12
    ll = torch.full((2,), D * math.log(256.0))
    assert torch.allclose(bits_per_dim(ll, torch.zeros(2), D), torch.zeros(2), atol=1e-12)
    # A standard normal model of y = 2x - 1 at y = 0: log p = -D/2 log(2π); logdet = D log 2.
    ll = torch.full((1,), -0.5 * D * math.log(2 * math.pi))
    expected = 0.5 * math.log2(2 * math.pi) - 1.0 + 8.0
    assert torch.allclose(bits_per_dim(ll, torch.full((1,), D * math.log(2.0)), D),
                          torch.tensor([expected]))


def test_bits_per_dim_refuses_non_dequantized_data_and_bad_arguments():
    pre = Preprocess("logit", dequantize=False)
    batch = pre(_images())
    assert not batch.dequantized
    with pytest.raises(ValueError, match="dequantiz"):
        pre.bits_per_dim(torch.zeros(4), batch)
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(torch.zeros(2), torch.zeros(2), 0)
    with pytest.raises(ValueError, match="logdet"):
        bits_per_dim(torch.zeros(2), torch.zeros(3), 4)
    with pytest.raises(ValueError, match="transform"):
        Preprocess("tanh")
    with pytest.raises(ValueError, match="uint8"):
        Preprocess()(torch.rand(2, 3, 4, 4))
    assert ALPHA == 0.05


# --- Truncated-normal dequantization ---------------------------------------------------------------

LEVELS = (0, 1, 127, 128, 254, 255)


def _phi(transform, x):
    """φ of plain floats (or a float64 tensor) in [0, 1], as Preprocess computes it."""
    return Preprocess(transform).forward(torch.as_tensor(x, dtype=torch.float64).reshape(-1))[0]


def _bin(transform, k):
    """(c_k, a_k, b_k) of level k in model space, as floats."""
    lo, c, hi = _phi(transform, [k / 256, (k + 0.5) / 256, (k + 1) / 256]).tolist()
    return c, lo - c, hi - c


def _reference_log_q(z, a, b, sigma):
    """The truncated normal's log density at offsets z (numpy/float), independently of sdeflow."""
    return stats.truncnorm(a / sigma, b / sigma, scale=sigma).logpdf(z)


def _pixels(level, n, transform="logit", sigma=None, seed=0, dtype=torch.float64):
    """n single-pixel images of one level: (offsets z = y - c_k as float64 numpy, log q, c, a, b)."""
    c, a, b = _bin(transform, level)
    k = torch.full((n, 1), level, dtype=torch.uint8)
    y, w = truncated_normal_dequantize(k, transform, sigma=sigma, generator=torch.Generator().manual_seed(seed),
                                       dtype=dtype)
    log_q = math.log(256) - w.double()  # w = -log q + D ln L with D = 1
    return (y.double()[:, 0] - c).numpy(), log_q.numpy(), c, a, b


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_truncated_normal_samples_stay_in_their_bins_and_the_scale_fits_every_half_bin(transform):
    k = _images()
    k[0, 0, 0, :] = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    y, w = truncated_normal_dequantize(k, transform, generator=torch.Generator().manual_seed(2),
                                       dtype=torch.float64)
    assert y.shape == k.shape and y.dtype == torch.float64 and w.shape == (4,) and torch.isfinite(w).all()
    kd = k.double()
    lo, hi = _phi(transform, kd / 256).view_as(y), _phi(transform, (kd + 1) / 256).view_as(y)
    assert ((y >= lo) & (y <= hi)).all()
    y32, _ = truncated_normal_dequantize(k, transform, generator=torch.Generator().manual_seed(2))
    assert torch.equal(Preprocess(transform).to_uint8(y32), k)
    # σ·τ is the narrowest half-bin: at most every one, and attained.
    sigma = truncated_normal_scale(transform)
    edges = _phi(transform, torch.arange(257, dtype=torch.float64) / 256)
    centres = _phi(transform, (torch.arange(256, dtype=torch.float64) + 0.5) / 256)
    half = torch.minimum(centres - edges[:-1], edges[1:] - centres)
    assert (sigma * TRUNCATION <= half * (1 + 1e-12)).all()
    assert sigma * TRUNCATION == pytest.approx(half.min().item(), rel=1e-12)


def test_truncated_normal_scale_of_the_linear_transforms_is_closed_form():
    assert truncated_normal_scale("identity") == pytest.approx(1 / (2 * 256 * 3), rel=1e-12)
    assert truncated_normal_scale("centered") == pytest.approx(1 / (256 * 3), rel=1e-12)
    assert truncated_normal_scale("identity", tau=1.5) == pytest.approx(1 / (2 * 256 * 1.5), rel=1e-12)
    # logit: the middle bins are the narrowest, slope (1-2α)/(s(1-s)) = 3.6 at s = ½.
    assert truncated_normal_scale("logit", ALPHA) == pytest.approx(3.6 / 512 / 3, rel=1e-3)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_truncated_normal_log_q_is_a_normalised_density_and_is_what_is_returned(transform):
    sigma = truncated_normal_scale(transform)
    for level in LEVELS:
        c, a, b = _bin(transform, level)
        log_mass = math.log(stats.norm.cdf(b / sigma) - stats.norm.cdf(a / sigma))

        def density(z):
            return math.exp(-0.5 * (z / sigma) ** 2 - math.log(math.sqrt(2 * math.pi) * sigma) - log_mass)

        mass, _ = integrate.quad(density, a, b, points=[0.0], epsabs=1e-12, limit=200)
        assert mass == pytest.approx(1.0, abs=1e-4)
        z, log_q, *_ = _pixels(level, 3, transform, seed=level)
        expected = [math.log(density(zi)) for zi in z]
        assert log_q == pytest.approx(expected, abs=1e-9)
        assert log_q == pytest.approx(_reference_log_q(z, a, b, sigma), abs=1e-9)


@pytest.mark.parametrize("level,sigma", [(128, None), (255, 0.02), (0, 0.05)])
def test_truncated_normal_draws_follow_scipys_truncnorm(level, sigma):
    n = 20000
    z, _, _, a, b = _pixels(level, n, sigma=sigma, seed=11)
    sigma = truncated_normal_scale("logit") if sigma is None else sigma
    ref = stats.truncnorm(a / sigma, b / sigma, scale=sigma)
    mean, var = ref.stats(moments="mv")
    fourth = ref.expect(lambda x: (x - mean) ** 4)
    assert abs(z.mean() - mean) < 5 * math.sqrt(var / n)
    assert abs(z.var() - var) < 5 * math.sqrt((fourth - var ** 2) / n)
    assert stats.kstest(z, ref.cdf).pvalue > 1e-3
    assert ((z >= a) & (z <= b)).all()


def test_truncated_normal_bound_is_a_bound_and_exact_where_the_model_matches_it():
    n, level, mu, s = 20000, 128, 0.3, 1.5
    lo, hi = _phi("logit", [level / 256, (level + 1) / 256]).tolist()
    log_p_k = math.log(stats.norm.cdf((hi - mu) / s) - stats.norm.cdf((lo - mu) / s))
    z, log_q, c, a, b = _pixels(level, n, seed=5)
    elbo = stats.norm.logpdf(c + z, mu, s) - log_q
    se = elbo.std() / math.sqrt(n)
    assert elbo.mean() <= log_p_k + 5 * se
    # The gap is KL(q || p restricted to the bin): for this p, nearly flat across the bin, about
    # KL(q || uniform) ≈ 0.37 nats, not ~0 (the truncated normal is tight only for a p like itself).
    sigma = truncated_normal_scale("logit")
    ref = stats.truncnorm(a / sigma, b / sigma, scale=sigma)
    kl = ref.expect(lambda x: ref.logpdf(x) - stats.norm.logpdf(c + x, mu, s) + log_p_k)
    assert 0.3 < kl < 0.45
    assert abs(log_p_k - elbo.mean() - kl) < 5 * se + 1e-4
    # Uniform dequantization through dequantize + φ + logdet: tight for a nearly flat density.
    k = torch.full((n, 1), level, dtype=torch.uint8)
    y_u, logdet = Preprocess("logit").forward(dequantize(k, torch.Generator().manual_seed(6), torch.float64))
    elbo_u = stats.norm.logpdf(y_u[:, 0].numpy(), mu, s) + logdet.numpy() - math.log(256)
    assert elbo_u.mean() <= log_p_k + 5 * elbo_u.std() / math.sqrt(n) + 1e-12
    assert abs(elbo_u.mean() - log_p_k) < 0.05
    # A model equal to the t_min marginal near this pixel, N(c_k, σ²): the bound is exact, draw by draw.
    elbo_exact = stats.norm.logpdf(z, 0.0, sigma) - log_q
    assert elbo_exact == pytest.approx(math.log(stats.norm.cdf(b / sigma) - stats.norm.cdf(a / sigma)), abs=1e-9)


def test_truncated_normal_log_weight_turns_bits_per_dim_into_the_bound():
    k = torch.tensor([[3], [128], [250]], dtype=torch.uint8)
    y, w = truncated_normal_dequantize(k, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sigma = truncated_normal_scale("logit")
    log_p = torch.distributions.Normal(0.3, 1.5).log_prob(y[:, 0])
    log_q = torch.tensor([_reference_log_q(y[i, 0].item() - _bin("logit", int(k[i]))[0],
                                           *_bin("logit", int(k[i]))[1:], sigma) for i in range(3)],
                         dtype=torch.float64)
    assert torch.allclose(bits_per_dim(log_p, w, 1), -(log_p - log_q) / math.log(2), atol=1e-9, rtol=0)
    # Several pixels: w = -Σ log q_i + D ln 256.
    k2 = torch.tensor([[[3, 128], [250, 0]]], dtype=torch.uint8)
    y2, w2 = truncated_normal_dequantize(k2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    parts = [_reference_log_q(y2[0, i, j].item() - _bin("logit", int(k2[0, i, j]))[0],
                              *_bin("logit", int(k2[0, i, j]))[1:], sigma) for i in range(2) for j in range(2)]
    assert w2.item() == pytest.approx(-sum(parts) + 4 * math.log(256), abs=1e-9)


def test_truncated_normal_is_reproducible_and_dtype_only_rounds():
    k = _images((2, 3, 4, 4), seed=3)
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    y1, w1 = truncated_normal_dequantize(k, generator=g())
    y2, w2 = truncated_normal_dequantize(k, generator=g())
    assert torch.equal(y1, y2) and torch.equal(w1, w2) and y1.dtype == w1.dtype == torch.float32
    y64, w64 = truncated_normal_dequantize(k, generator=g(), dtype=torch.float64)
    assert y64.dtype == w64.dtype == torch.float64
    assert torch.allclose(y1.double(), y64, rtol=1e-6, atol=1e-7)
    assert torch.allclose(w1.double(), w64, rtol=1e-6, atol=0)
    assert not torch.equal(y1, truncated_normal_dequantize(k, generator=torch.Generator().manual_seed(10))[0])


def test_truncated_normal_refuses_bad_arguments():
    k = _images((1, 1, 2, 2))
    with pytest.raises(ValueError, match="uint8"):
        truncated_normal_dequantize(torch.rand(1, 1, 2, 2))
    for bad in (0.0, -1e-3, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="sigma"):
            truncated_normal_dequantize(k, sigma=bad)
    for bad in (0, -3.0, float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="tau"):
            truncated_normal_scale("logit", tau=bad)
    with pytest.raises(ValueError, match="transform"):
        truncated_normal_scale("tanh")
    with pytest.raises(ValueError, match="transform"):
        truncated_normal_dequantize(k, "tanh")
