r"""Score networks s(x, label) with score_sde's time labels (Song et al. 2021) as sdeflow models.

score_sde conditions its networks on a label computed from t in [0, T] (``TIME_LABELS``, N = ``n_labels``):

* ``"time"``: t itself (a network trained in sdeflow's convention);
* ``"ddpm"``: :math:`(N-1)\,t/T`, the DDPM step index of its VP models (continuous and discrete);
* ``"sigma"``: the noise level :math:`\tilde\sigma = \mathrm{std}/m`, of its continuous VE models (NCSN++);
* ``"ncsn"``: :math:`\mathrm{round}((N-1)(T - t)/T)`, the integer index into NCSN's decreasing σ's.

``output``: "score" (s itself, score_sde's VE models) or "noise" (its VP models return ε̂ and the
score is −ε̂/std).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..model import PluginReverseSDE
from ..sdes.linear import SDE
from ..utils import check_choice, check_positive_int
from .discrete import network_output

__all__ = ["TIME_LABELS", "OUTPUTS", "LabelledScoreNet", "adapt_score_network"]


def _ncsn_index(sde: SDE, t: torch.Tensor, n_labels: int) -> torch.Tensor:
    return torch.round((n_labels - 1) * (sde.T - t) / sde.T).long()


#: name → label(sde, t, n_labels): what a score_sde network is conditioned on at time t (B,).
TIME_LABELS: dict[str, Callable[[SDE, torch.Tensor, int], torch.Tensor]] = {
    "time": lambda sde, t, n_labels: t,
    "ddpm": lambda sde, t, n_labels: (n_labels - 1) * t / sde.T,
    "sigma": lambda sde, t, n_labels: torch.exp(-0.5 * sde.log_snr(t)),
    "ncsn": _ncsn_index,
}
OUTPUTS = {"score": "score", "noise": "noise"}


class LabelledScoreNet(nn.Module):
    """``net(y, t)`` for sdeflow from ``net(x, label)`` with label = ``TIME_LABELS[labels](sde, t, n_labels)``."""

    def __init__(self, net: nn.Module, sde: SDE, labels: str = "time", n_labels: int = 1000):
        super().__init__()
        check_choice("labels", labels, tuple(TIME_LABELS))
        self.net, self.sde, self.labels = net, sde, labels
        self.n_labels = check_positive_int("n_labels", n_labels)

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        label = TIME_LABELS[self.labels](self.sde, t.double(), self.n_labels)
        return network_output(self.net(y, label if label.dtype == torch.long else label.to(y.dtype)), y)


def adapt_score_network(net: nn.Module, sde: SDE, labels: str = "time", output: str = "score",
                        n_labels: int = 1000) -> PluginReverseSDE:
    """The sdeflow model of a score_sde network ``net(x, label)`` on ``sde`` (e.g. ``VPSDE(0.1, 20)`` for
    its DDPM++ models with ``labels="ddpm", output="noise"``; ``VESDE(0.01, 50)`` for NCSN++ with
    ``labels="sigma"``), returning the score or ε̂ per ``output``."""
    check_choice("output", output, tuple(OUTPUTS))
    return PluginReverseSDE(sde, LabelledScoreNet(net, sde, labels, n_labels), OUTPUTS[output])
