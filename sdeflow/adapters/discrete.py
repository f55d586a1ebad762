r"""Discrete-time networks ε(x, n), x₀(x, n) or v(x, n) (DDPM, improved DDPM, diffusers) as sdeflow models.

Such a network was trained at DDPM's steps n = 1..N on :math:`x_n = \sqrt{\bar\alpha_n}\,x_0 +
\sqrt{1-\bar\alpha_n}\,\varepsilon` and takes the step's index n − 1 (diffusers' ``timesteps``). On the
:class:`~sdeflow.sdes.noise_levels.DiscreteVPSDE` of its table, y_t at :math:`t_n = nT/N` is exactly that
x_n, so the network is called at the fractional index :math:`Nt/T - 1` (an integer at the steps) and its
output is read per ``prediction_type``:

* ``"epsilon"``: ε̂ itself (sdeflow's "noise" parameterization);
* ``"v_prediction"``: :math:`\hat v = \sqrt{\bar\alpha}\,\varepsilon - \sqrt{1-\bar\alpha}\,x_0`, which is
  sdeflow's "velocity" for a VP SDE (c = 1 in :func:`sdeflow.model.velocity_coefficients`);
* ``"sample"``: x̂₀, turned into :math:`\hat\varepsilon = (y - m\,\hat x_0)/\mathrm{std}`.

A network that also outputs its variance (improved DDPM's learned Σ: 2C channels for C input channels)
contributes its first C channels, the mean's; with ``learned_variance=True`` (improved DDPM's and
diffusers' "learned_range": the other C channels r give :math:`v = (r + 1)/2` between log β̃ and log β)
the model keeps them as its variance head (:class:`sdeflow.nets.MeanAndVariance`), which the discrete
bound and the ancestral sampler read as the "learned" variance.

A class-conditional network (``num_classes`` C > 0) is called ``net(x, timestep, class_labels=labels)``,
diffusers' keyword, with sdeflow's labels (:mod:`sdeflow.nets.classes`): 0..C−1, and C, the null class
of classifier-free guidance, only where the network was trained with one (``null_class``: its C + 1-th
embedding). Without a null class the model has its classes only: guidance, the unconditional model and
an unlabelled call raise ValueError.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import MIN_STD, PluginReverseSDE
from ..nets.classes import check_labels, null_label
from ..nets.heads import MeanAndVariance
from ..sdes.noise_levels import DiscreteVPSDE
from ..utils import append_dims, check_choice

__all__ = ["PREDICTION_TYPES", "DiscreteTimeNet", "adapt_discrete", "network_output", "noise_from_data"]

#: diffusers' names of what a network predicts.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_PARAMETERIZATION = {"epsilon": "noise", "v_prediction": "velocity", "sample": "noise"}
# Fractional indices this close to an integer are the integer: t = nT/N rounds in floating point.
_SNAP = 1e-6


def _unwrap(out):
    """The tensor in a foreign network's return value: diffusers' ``.sample``, or a tuple's first."""
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


def network_output(out, like: torch.Tensor) -> torch.Tensor:
    """The prediction in a foreign network's return value: the ``.sample`` of diffusers' output
    objects, the first element of a tuple, and of 2C channels (a learned variance beside the mean) the
    first C, for ``like`` (B, C, ...). ValueError if it cannot be shaped like ``like``."""
    out = _unwrap(out)
    if (out.ndim == like.ndim and out.shape[0] == like.shape[0] and out.shape[2:] == like.shape[2:]
            and out.shape[1] == 2 * like.shape[1]):
        out = out[:, :like.shape[1]]
    if out.shape != like.shape:
        raise ValueError(f"net must return a tensor shaped like its input {tuple(like.shape)} (or with twice its "
                         f"channels: mean and variance); got {tuple(out.shape)}")
    return out


def noise_from_data(sde, y: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """ε̂ = (y − m(t)·x̂₀)/std(t) (std at least ``MIN_STD``) of a data prediction x̂₀; shapes of y."""
    m = append_dims(sde.mean_weight(t), y.ndim).to(y.dtype)
    std = append_dims(sde.std(t), y.ndim).clamp_min(MIN_STD).to(y.dtype)
    return (y - m * x0) / std


class DiscreteTimeNet(nn.Module):
    """``net(y, t[, labels])`` for sdeflow from a network ``net(x, timestep)`` trained on ``sde``'s discrete
    steps (timestep = diffusers' index Nt/T − 1, a float tensor (B,)); returns ε̂ for "epsilon" and
    "sample", v̂ for "v_prediction" (see the module docstring). ``first_trained_time()`` is t₁ = T/N.
    ``num_classes`` > 0: a class-conditional network, with a null class if ``null_class``."""

    def __init__(self, net: nn.Module, sde: DiscreteVPSDE, prediction_type: str = "epsilon",
                 learned_variance: bool = False, num_classes: int = 0, null_class: bool = False):
        super().__init__()
        self.learned_variance = bool(learned_variance)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if not isinstance(sde, DiscreteVPSDE):
            raise ValueError(f"sde must be a sdeflow.sdes.noise_levels.DiscreteVPSDE; got {type(sde).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int; got {num_classes!r}")
        if null_class and not num_classes:
            raise ValueError("null_class needs a class-conditional network (num_classes > 0)")
        self.net, self.sde, self.prediction_type = net, sde, prediction_type
        self.num_classes, self.has_null_class = num_classes, bool(null_class)

    def first_trained_time(self) -> float:
        return self.sde.first_step_time()

    def _call(self, y: torch.Tensor, step: torch.Tensor, labels):
        if not self.num_classes:
            if labels is not None:
                check_labels(labels, 0, y.shape[0])  # raises: labels for an unconditional network
            return self.net(y, step)
        if labels is None and not self.has_null_class:
            raise ValueError(f"this network has {self.num_classes} classes and no null class: give labels "
                             f"(sdeflow.guided(model, k)); the unconditional model needs a null class")
        labels = check_labels(labels, self.num_classes, y.shape[0], y.device)
        if not self.has_null_class and bool((labels == null_label(self.num_classes)).any()):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}]: this network has no null class "
                             f"(label {self.num_classes}), so no guidance and no unconditional model")
        return self.net(y, step, class_labels=labels)

    def forward(self, y: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        step = self.sde.timestep(t.double())
        nearest = step.round()
        step = torch.where((step - nearest).abs() < _SNAP, nearest, step)
        raw = self._call(y, step.to(y.dtype), labels)
        if not self.learned_variance:
            out = network_output(raw, y)
            return noise_from_data(self.sde, y, t, out) if self.prediction_type == "sample" else out
        out = _unwrap(raw)
        if out.shape[1:2] != (2 * y.shape[1],) or out.shape[0] != y.shape[0] or out.shape[2:] != y.shape[2:]:
            raise ValueError(f"learned_variance needs a net that returns twice the channels of its input "
                             f"{tuple(y.shape)} (mean, then variance); got {tuple(out.shape)}")
        mean, r = out.chunk(2, dim=1)
        mean = noise_from_data(self.sde, y, t, mean) if self.prediction_type == "sample" else mean
        return torch.cat([mean, r], dim=1)


def adapt_discrete(net: nn.Module, sde: DiscreteVPSDE, prediction_type: str = "epsilon",
                   learned_variance: bool = False, num_classes: int = 0, null_class: bool = False) -> PluginReverseSDE:
    """The sdeflow model of a discrete-time network ``net(x, timestep)`` trained on ``sde``'s table,
    predicting ``prediction_type`` (one of ``PREDICTION_TYPES``): a
    :class:`~sdeflow.model.PluginReverseSDE` with every estimator and sampler of sdeflow. With
    ``learned_variance`` the network's 2C channels are the mean's and improved DDPM's learned range, kept
    as the model's variance head; with ``num_classes`` > 0 it is class-conditional, with a null class if
    ``null_class`` (see the module docstring)."""
    wrapped = DiscreteTimeNet(net, sde, prediction_type, learned_variance, num_classes, null_class)
    if learned_variance:
        wrapped = MeanAndVariance(wrapped)
    return PluginReverseSDE(sde, wrapped, _PARAMETERIZATION[prediction_type])
