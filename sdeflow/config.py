r"""The model configuration: a plain dict, stored in every checkpoint and compared on load::

    {"dataset": name, "net": {"name": "unet" | "mlp" | …, **parameters},
     "sde": {"name": "vp" | "subvp" | "ve" | …, **parameters},
     "parameterization": "noise" | "score" | "drift" | "velocity",
     "data": {"transform": …, "alpha": …}}

:func:`build_model` turns it into a :class:`~sdeflow.model.PluginReverseSDE` through the registries
that own each part (:data:`sdeflow.sdes.SDES`, :data:`sdeflow.nets.NETS`). Only plain types, so
configurations survive ``torch.load(weights_only=True)``. The training settings are
:class:`sdeflow.training.TrainConfig`.
"""

from __future__ import annotations

from .utils import check_choice

__all__ = ["model_config", "build_model"]


def model_config(*, dataset: str, net: dict, sde: dict | str = "vp", parameterization: str = "noise",
                 data: dict | None = None) -> dict:
    """A model configuration (see the module docstring) with every SDE parameter filled in from the
    SDE registry's defaults, so that the checkpoint records the whole process."""
    from .model import PARAMETERIZATIONS
    from .sdes.linear import make_sde, sde_config

    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    sde = {"name": sde} if isinstance(sde, str) else dict(sde)
    if "name" not in sde:
        raise ValueError("sde must name a registered SDE, e.g. {'name': 'vp'}")
    if "name" not in net:
        raise ValueError("net must name a registered network, e.g. {'name': 'unet', 'preset': 'small'}")
    sde = sde_config(make_sde(**sde))
    net = {key: (list(value) if isinstance(value, tuple) else value) for key, value in net.items()}
    return {"dataset": dataset, "net": net, "sde": sde, "parameterization": parameterization,
            "data": dict(data or {})}


def build_model(config: dict):
    """The :class:`~sdeflow.model.PluginReverseSDE` of a model configuration."""
    from .model import PluginReverseSDE
    from .nets import make_net
    from .sdes.linear import make_sde

    net = make_net(**config["net"])
    return PluginReverseSDE(make_sde(**config["sde"]), net, parameterization=config["parameterization"])
