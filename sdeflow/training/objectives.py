"""Training objectives: what a model is trained to be good at, as a value. An :class:`Objective` is a
named recipe, the model's choices (``transform``, ``parameterization``) and the loss's settings
(:class:`~sdeflow.training.TrainConfig` fields) that go together, with ``build(model, config,
data_config)`` giving the loss module that :func:`sdeflow.engine.fit` minimises: its ``forward(y,
generator, order=1)`` returns the batch's scalar loss (``order`` 2 in the last
``second_order_fraction`` of the steps) and its parameters are the model's, so that DDP's gradient
hooks see them. ``OBJECTIVES`` holds them (:func:`register_objective` adds one; ``sdeflow train
--objective NAME`` picks one):

- "likelihood" wins bits/dim: logit pixels, the ELBO's weighting g²/σ², time drawn ∝ that weighting
  (the loss is the ELBO's integrand);
- "samples" wins samples: DDPM's recipe, centered pixels, the ε-loss ‖ε̂ − ε‖² unweighted, uniform time.

Both build :class:`DSMObjective` (the DSM loss of :func:`sdeflow.training.losses.dsm`, plus, for a
network with a variance head, the discrete bound's terms that train it). README, "Samples": both
measured at equal CPU time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..discrete import LearnedVariance, PixelBins, forward_chain, variance_loss
from ..nets.classes import null_label
from ..nets.heads import has_variance_head
from ..samplers.guidance import guided
from ..utils import check_choice, check_new_name
from .config import TRAIN_GROUPS, TrainConfig
from .losses import dsm

__all__ = ["Objective", "DSMObjective", "OBJECTIVES", "register_objective", "build_objective"]

#: The settings an objective may fix: the model configuration's and TrainConfig's loss fields.
MODEL_SETTINGS = ("transform", "parameterization")
LOSS_SETTINGS = TRAIN_GROUPS["loss"]


class DSMObjective(nn.Module):
    """The mean DSM loss (1/B)·Σᵢ ℓ_dsm(yᵢ) as a module's forward, so that DDP's gradient hooks see it.
    For a model whose network outputs a reverse variance beside the mean
    (:class:`~sdeflow.nets.MeanAndVariance`), plus ``vlb_weight`` times the mean of
    :func:`sdeflow.discrete.variance_loss` on a ``chain_steps``-step chain, drawn on the first
    ``variance_batch_fraction`` of the batch (improved DDPM's hybrid loss with sdeflow's DSM as the
    mean's part), its decoder term the discretized one of 8-bit images when the model configuration
    has a data transform. With ``labels`` (B,) (a class-conditional network) the DSM loss is that of the
    model at those labels, each dropped to the null class with probability ``p_uncond`` (the variance's
    terms stay those of the null class)."""

    def __init__(self, model, config: TrainConfig, data_config: dict | None = None):
        super().__init__()
        self.model = model
        self.time_sampling, self.weighting = config.time_sampling, config.weighting
        self.second_order_weight = config.second_order_weight
        self.t_min, self.stratified = config.loss_t_min, config.stratified_time
        self.p_uncond = config.p_uncond
        self.variance = None
        if has_variance_head(model):
            data = data_config or {}
            self.variance = LearnedVariance.of(model)
            self.chain = forward_chain(model.sde, chain_steps=config.chain_steps)
            self.bins = PixelBins(data["transform"], data["alpha"]) if "transform" in data else None
            self.vlb_weight, self.fraction = config.vlb_weight, config.variance_batch_fraction

    def forward(self, y: torch.Tensor, generator: torch.Generator, order: int = 1, labels=None) -> torch.Tensor:
        kwargs = {"order": 2, "second_order_weight": self.second_order_weight} if order == 2 else {}
        model = self.model
        if labels is not None:  # a class-conditional model: labels dropped to the null class at p_uncond
            dropped = torch.rand(labels.shape, generator=generator, device=labels.device) < self.p_uncond
            model = guided(model, torch.where(dropped, null_label(model.net.num_classes), labels))
        loss = dsm(model, y, time_sampling=self.time_sampling, weighting=self.weighting, generator=generator,
                   t_min=self.t_min, stratified_time=self.stratified, **kwargs).mean()
        if self.variance is None:
            return loss
        # On the batch's first share (its order is random); the decoder's bins hold the 8-bit image,
        # whose centre stands for the dequantized value.
        x = y[:max(1, round(self.fraction * y.shape[0]))]
        x = x if self.bins is None else self.bins.centres.to(x.device, x.dtype)[self.bins.level(x)]
        vlb = variance_loss(self.model, self.variance, x, self.chain, bins=self.bins, generator=generator)
        return loss + self.vlb_weight * vlb.mean()


@dataclass(frozen=True)
class Objective:
    """A registered training objective: ``settings`` (model choices of ``MODEL_SETTINGS`` and TrainConfig
    loss fields of ``LOSS_SETTINGS``; a flag given explicitly wins over them), ``build(model, config,
    data_config) -> nn.Module`` the loss, and one line of ``description``."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    build: Callable[..., nn.Module] = None
    description: str = ""

    def __post_init__(self):
        unknown = sorted(set(self.settings) - set(MODEL_SETTINGS) - set(LOSS_SETTINGS))
        if unknown:
            raise ValueError(f"settings may fix {', '.join(MODEL_SETTINGS + LOSS_SETTINGS)}; got {', '.join(unknown)}")
        if not callable(self.build):
            raise ValueError(f"build must be callable as build(model, config, data_config); got {self.build!r}")
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))


#: name → :class:`Objective`. Add entries with :func:`register_objective`.
OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, settings: Mapping[str, Any], build: Callable[..., nn.Module] = None, *,
                       description: str = "") -> Objective:
    """Register the training objective ``name`` (see :class:`Objective`; ``build`` defaults to
    :class:`DSMObjective`): ``sdeflow train --objective`` and :func:`build_objective` then accept it.
    ``ValueError`` if the name is taken, a setting is not one an objective fixes, or ``build`` is not
    callable."""
    check_new_name(name, OBJECTIVES, "objective")
    OBJECTIVES[name] = Objective(settings, DSMObjective if build is None else build, description)
    return OBJECTIVES[name]


def build_objective(name: str, model, config: TrainConfig, data_config: dict | None = None) -> nn.Module:
    """The loss module of the registered objective ``name`` for ``model`` (to pass to
    :func:`sdeflow.engine.fit`); ``ValueError`` naming the registered ones."""
    check_choice("objective", name, tuple(OBJECTIVES))
    loss = OBJECTIVES[name].build(model, config, data_config)
    if not isinstance(loss, nn.Module):
        raise ValueError(f"objective {name!r} must build a torch.nn.Module; got {type(loss).__name__}")
    return loss


register_objective("likelihood", {"transform": "logit", "parameterization": "noise", "weighting": "likelihood",
                                  "time_sampling": "importance"}, description="wins bits/dim")
register_objective("samples", {"transform": "centered", "parameterization": "noise", "weighting": "noise",
                               "time_sampling": "uniform"}, description="wins samples (DDPM's recipe)")
