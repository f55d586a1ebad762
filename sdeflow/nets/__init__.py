"""Networks ``net(y, t)`` with t of shape (B,), returning a tensor shaped like y, and their registry.

:data:`NETS` maps a name to a builder, a callable ``builder(**params) -> nn.Module``;
:func:`make_net` builds one by name (the model configuration stored in checkpoints is
``{"name": ..., **params}``), :func:`register_net` adds one. A net built with
``learned_variance=True`` outputs a reverse variance beside the mean and comes wrapped in
:class:`~sdeflow.nets.heads.MeanAndVariance`.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from ..utils import check_new_name
from .heads import MeanAndVariance, has_variance_head
from .mlp import MLP
from .unet import make_unet

__all__ = ["NETS", "register_net", "make_net", "MeanAndVariance", "has_variance_head"]

#: name → builder(**params) -> nn.Module. "unet": :func:`~sdeflow.nets.unet.make_unet` (``preset``,
#: ``in_channels``, ``image_size`` and any of the preset's hyper-parameters); "mlp": :class:`~sdeflow.nets.mlp.MLP`.
NETS: dict[str, Callable[..., nn.Module]] = {"unet": make_unet, "mlp": MLP}


def register_net(name: str, builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Add ``builder(**params) -> nn.Module`` (a class or a function) to :data:`NETS` under ``name``
    and return it. ValueError if ``name`` is taken or ``builder`` is not callable."""
    check_new_name(name, NETS, "net")
    if not callable(builder):
        raise ValueError(f"builder must be callable (a class or a function); got {builder!r}")
    NETS[name] = builder
    return builder


def make_net(name: str, **params) -> nn.Module:
    """Build the net registered as ``name`` with ``params``. ValueError naming an unknown parameter
    (and listing the allowed ones) or a missing required one; a builder that takes ``**kwargs``
    checks those itself. With ``learned_variance=True`` (a parameter the builder must take), the net is
    returned wrapped in :class:`MeanAndVariance`."""
    if name not in NETS:
        raise ValueError(f"name must be one of {', '.join(repr(n) for n in NETS)}; got {name!r}")
    builder = NETS[name]
    signature = inspect.signature(builder)
    named = {p: param for p, param in signature.parameters.items()
             if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)}
    takes_kwargs = any(param.kind == param.VAR_KEYWORD for param in signature.parameters.values())
    unknown = [p for p in params if p not in named]
    if unknown and not takes_kwargs:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for the net {name!r}; "
                         f"allowed: {', '.join(named)}")
    missing = [p for p, param in named.items() if param.default is param.empty and p not in params]
    if missing:
        raise ValueError(f"the net {name!r} needs the parameter(s) {', '.join(missing)}")
    net = builder(**params)
    return MeanAndVariance(net) if params.get("learned_variance") else net
