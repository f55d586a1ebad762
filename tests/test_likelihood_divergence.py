import math

import pytest
import torch

from sdeflow.likelihood.divergence import divergence, make_probe


def _field():
    torch.manual_seed(0)
    A = torch.randn(4, 4, dtype=torch.float64)
    return A, (lambda y: torch.tanh(y @ A.T) + y ** 3)


def _exact_div(A, y):
    # d/dy_i [tanh(A y)_i + y_i³] = (1 − tanh²(A y)_i)·A_ii + 3 y_i²
    return ((1 - torch.tanh(y @ A.T) ** 2) * torch.diagonal(A) + 3 * y ** 2).sum(-1)


def test_exact_divergence_matches_closed_form():
    A, fn = _field()
    y = torch.randn(5, 4, dtype=torch.float64)
    out, div = divergence(fn, y, kind="exact")
    torch.testing.assert_close(out, fn(y))
    torch.testing.assert_close(div, _exact_div(A, y))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    A, fn = _field()
    y = torch.randn(3, 4, dtype=torch.float64).repeat(20000, 1)
    _, div = divergence(fn, y, probe=probe, generator=torch.Generator().manual_seed(1))
    est = div.reshape(20000, 3)
    err = (est.mean(0) - _exact_div(A, y[:3])).abs()
    assert (err < 5 * est.std(0) / math.sqrt(20000)).all()


def test_rademacher_is_exact_for_a_diagonal_jacobian():
    y = torch.randn(6, 2, 3, dtype=torch.float64)
    _, div = divergence(lambda z: torch.sin(z), y, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(div, torch.cos(y).flatten(1).sum(1))


def test_probe_has_identity_covariance():
    like = torch.empty(200000, 3, dtype=torch.float64)
    for probe in ("rademacher", "gaussian"):
        v = make_probe(like, probe, torch.Generator().manual_seed(3))
        torch.testing.assert_close(v.T @ v / len(v), torch.eye(3, dtype=torch.float64), atol=0.02, rtol=0)


def test_create_graph_allows_training_through_the_divergence():
    w = torch.tensor(2.0, requires_grad=True)
    y = torch.randn(4, 3)
    _, div = divergence(lambda z: w * z ** 2, y, kind="exact", create_graph=True)
    div.sum().backward()
    torch.testing.assert_close(w.grad, (2 * y).sum())


def test_bad_options_raise():
    with pytest.raises(ValueError, match="probe"):
        make_probe(torch.zeros(2), "uniform")
    with pytest.raises(ValueError, match="kind must be one of 'hutchinson', 'exact'"):
        divergence(lambda z: z, torch.zeros(2, 2), kind="approx")
