import math

import pytest
import torch

from sdeflow.data.transforms import (ALPHA, Preprocess, bits_per_dim, dequantize, logit_inverse,
                                     logit_transform, quantize, random_hflip)


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
