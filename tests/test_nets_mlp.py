"""Tests of sdeflow.nets.mlp."""

import pytest
import torch

import sdeflow

from sdeflow import PluginReverseSDE, VPSDE
from sdeflow.nets.mlp import MLP, TimeEmbedding


def test_time_embedding_shape_and_range():
    emb = TimeEmbedding(16, T=2.0)
    t = torch.linspace(0, 2, 7)
    e = emb(t)
    assert e.shape == (7, 16) and e.abs().max() <= 1
    # sin² + cos² = 1 for every frequency
    assert torch.allclose(e[:, :8] ** 2 + e[:, 8:] ** 2, torch.ones(7, 8), atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        TimeEmbedding(15)


def test_output_shape_zero_start_and_dependence_on_y_and_t():
    torch.manual_seed(0)
    net = MLP(dim=3, hidden=32, n_blocks=2)
    y, t = torch.randn(5, 3), torch.rand(5)
    out = net(y, t)
    assert out.shape == (5, 3)
    assert torch.equal(out, torch.zeros(5, 3))  # zero-initialised output layer
    torch.nn.init.normal_(net.output.weight)
    assert not torch.allclose(net(y, t), net(y + 1, t))
    assert not torch.allclose(net(y, t), net(y, t * 0.5))
    # a scalar time means the same time for the whole batch
    assert torch.allclose(net(y, 0.3), net(y, torch.full((5,), 0.3)))


def test_examples_do_not_interact():
    torch.manual_seed(1)
    net = MLP(hidden=16)
    torch.nn.init.normal_(net.output.weight)
    y, t = torch.randn(6, 2), torch.rand(6)
    full = net(y, t)
    assert torch.allclose(full[2:3], net(y[2:3], t[2:3]), atol=1e-6)


def test_trains_inside_the_model():
    torch.manual_seed(2)
    model = PluginReverseSDE(VPSDE(), MLP(hidden=32), parameterization="noise")
    x = torch.randn(64, 2) * 0.5 + 1
    loss = sdeflow.dsm(model, x, generator=torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.net.output.weight.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="hidden"):
        MLP(hidden=0)
    with pytest.raises(ValueError, match=r"y must have shape \(B, 2\)"):
        MLP()(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="t must have shape"):
        MLP()(torch.zeros(4, 2), torch.zeros(3))
