r"""Divergence of a vector field, shared by the ELBO and the ODE likelihood.

For :math:`F: \mathbb{R}^{D} \to \mathbb{R}^{D}` applied per example,
:math:`\nabla\cdot F(y) = \operatorname{tr} \partial F / \partial y`.

- ``"hutchinson"``: :math:`v^\top (\partial F/\partial y) v` with a probe v of identity covariance,
  Rademacher (±1, lower variance: exact for a diagonal Jacobian) or Gaussian; one
  vector-Jacobian product.
- ``"exact"``: the full trace, D vector-Jacobian products; for low-dimensional data, where it
  is cheap and removes the probe noise.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..utils import check_choice, sum_except_batch

__all__ = ["divergence", "make_probe", "DIVERGENCES", "PROBES"]

#: The ways to take a divergence (the ``kind`` of :func:`divergence`; ``divergence=`` everywhere else).
DIVERGENCES = ("hutchinson", "exact")
PROBES = ("rademacher", "gaussian")


def make_probe(like: torch.Tensor, probe: str = "rademacher",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """A random v shaped like ``like`` with E[v vᵀ] = I: Rademacher (±1) or standard Gaussian."""
    check_choice("probe", probe, PROBES)
    if probe == "gaussian":
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


def divergence(fn: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, *,
               kind: str = "hutchinson", probe: str = "rademacher",
               noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
               create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate F = fn(y) and its divergence per example.

    Args:
        fn: maps y of shape (B, ...) to a tensor of the same shape; examples must not interact.
        y: (B, ...) points.
        kind: ``"hutchinson"`` or ``"exact"``.
        probe: ``"rademacher"`` or ``"gaussian"`` (Hutchinson only).
        noise: a fixed probe v shaped like y (e.g. one per ODE solve); drawn fresh if None.
        create_graph: keep the graph so the result can be differentiated (training on it).

    Returns:
        (F(y), div F(y)) with shapes (B, ...) and (B,).
    """
    check_choice("kind", kind, DIVERGENCES)
    with torch.enable_grad():
        y = y if (y.requires_grad and create_graph) else y.detach().requires_grad_(True)
        out = fn(y)
        if kind == "hutchinson":
            v = make_probe(y, probe, generator) if noise is None else noise
            (vjp,) = torch.autograd.grad(out, y, v, create_graph=create_graph)
            div = sum_except_batch(vjp * v)
        else:
            flat_out = out.reshape(out.shape[0], -1)
            terms = []
            for i in range(flat_out.shape[1]):
                (grad_i,) = torch.autograd.grad(flat_out[:, i].sum(), y, retain_graph=True,
                                                create_graph=create_graph)
                terms.append(grad_i.reshape(grad_i.shape[0], -1)[:, i])
            div = torch.stack(terms, dim=1).sum(dim=1)
    if not create_graph:
        out, div = out.detach(), div.detach()
    return out, div
