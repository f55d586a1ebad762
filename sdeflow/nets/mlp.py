r"""A small MLP for 2-D (or any flat, low-dimensional) data: ``net(y, t)`` with y (B, D), t (B,).

Time enters through sinusoidal features of the normalised time τ = t/T,

.. math::  e(\tau) = \big(\sin(2\pi\omega_k\tau),\ \cos(2\pi\omega_k\tau)\big)_{k=1}^{K/2},
           \quad \omega_k \text{ geometric from } \omega_{min} \text{ to } \omega_{max},

projected linearly into the input and into every residual block (so time modulates each layer,
not only the input; the projections from the K features are cheap next to the W×W layers). The output layer starts at zero so the initial model predicts zero (drift, score
or noise: a calm start for every parameterization).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..utils import check_nonneg_int, check_positive_int
from .classes import ClassEmbedding, check_labels

__all__ = ["TimeEmbedding", "MLP"]


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t/T at ``dim // 2`` geometric frequencies in [min_freq, max_freq]:
    (B,) -> (B, dim)."""

    def __init__(self, dim: int = 32, T: float = 1.0, min_freq: float = 0.25, max_freq: float = 64.0):
        super().__init__()
        dim = check_positive_int("time_dim", dim)
        if dim % 2:
            raise ValueError(f"time_dim must be even (sine and cosine pairs); got {dim}")
        if not 0 < min_freq <= max_freq:
            raise ValueError(f"need 0 < min_freq <= max_freq; got {min_freq}, {max_freq}")
        self.T = float(T)
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2))
        self.register_buffer("freqs", 2 * math.pi * freqs)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        phase = (t.reshape(-1, 1) / self.T).to(self.freqs.dtype) * self.freqs
        return torch.cat([torch.sin(phase), torch.cos(phase)], dim=1)


class MLP(nn.Module):
    r"""A residual MLP with the time embedding E(t) added at the input and inside every block.

    With hidden width W, time features e = e(t) and h = W_in y + V_in e, each block l = 1..L does
    :math:`h \leftarrow h + W^{(2)}_l\,\sigma\big(W^{(1)}_l \sigma(h) + V_l e\big)`, σ = SiLU, and the
    output :math:`W_{out}\,\sigma(h)` with shape (B, D) like y.

    Args:
        dim: data dimension D.
        hidden: width W.
        n_blocks: number L of residual blocks (each two linear layers).
        time_dim: size of the sinusoidal time features.
        T: the SDE's end time (times are normalised by it).
        learned_variance: output (B, 2D), the mean's and then a learned reverse variance's
            (:mod:`sdeflow.nets.heads`; :func:`sdeflow.nets.make_net` wraps such a net).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, n_blocks: int = 2, time_dim: int = 32,
                 T: float = 1.0, fourier_features: int = 0, fourier_scale: float = 1.0,
                 learned_variance: bool = False, num_classes: int = 0):
        super().__init__()
        dim, hidden = check_positive_int("dim", dim), check_positive_int("hidden", hidden)
        n_blocks = check_positive_int("n_blocks", n_blocks)
        fourier_features = check_nonneg_int("fourier_features", fourier_features)
        self.dim = dim
        self.time_embedding = TimeEmbedding(time_dim, T)
        # Random Fourier features sin/cos(2π B y), B ~ N(0, scale²): let a small MLP draw the sharp
        # edges of a density (Tancik et al. 2020); directions are random, not aligned with any data.
        self.register_buffer("fourier_matrix", fourier_scale * torch.randn(dim, fourier_features))
        self.input = nn.Linear(dim + 2 * fourier_features, hidden)
        self.time_input = nn.Linear(time_dim, hidden)
        self.inner = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_blocks))
        self.time_proj = nn.ModuleList(nn.Linear(time_dim, hidden) for _ in range(n_blocks))
        self.outer = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_blocks))
        self.output = nn.Linear(hidden, dim * (2 if learned_variance else 1))
        self.act = nn.SiLU()
        # Class-conditional (num_classes > 0): a class's vector is added to the time embedding.
        self.num_classes = check_nonneg_int("num_classes", num_classes)
        self.class_embedding = ClassEmbedding(self.num_classes, time_dim) if self.num_classes else None
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, y: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        if y.ndim != 2 or y.shape[1] != self.dim:
            raise ValueError(f"y must have shape (B, {self.dim}); got {tuple(y.shape)}")
        t = torch.as_tensor(t, dtype=y.dtype, device=y.device)
        if t.ndim == 0:
            t = t.expand(y.shape[0])
        if t.shape != (y.shape[0],):
            raise ValueError(f"t must have shape ({y.shape[0]},) or be a scalar; got {tuple(t.shape)}")
        emb = self.time_embedding(t).to(y.dtype)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(labels, y.shape[0]).to(y.dtype)
        elif labels is not None:
            check_labels(labels, 0, y.shape[0])  # refuses: the network is unconditional
        features = y
        if self.fourier_matrix.shape[1]:
            phase = 2 * math.pi * y @ self.fourier_matrix.to(y.dtype)
            features = torch.cat([y, torch.sin(phase), torch.cos(phase)], dim=1)
        h = self.input(features) + self.time_input(emb)
        for inner, time_proj, outer in zip(self.inner, self.time_proj, self.outer):
            h = h + outer(self.act(inner(self.act(h)) + time_proj(emb)))
        return self.output(self.act(h))
