r"""diffusers models: a ``UNet2DModel`` (or any module with its call ``unet(x, timestep)``) with the
config of its ``DDPMScheduler`` / ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` as an sdeflow model.

The scheduler config gives the SDE (:class:`~sdeflow.noise_schedules.DiscreteVPSDE` of
``beta_schedule``, ``beta_start``, ``beta_end``, ``num_train_timesteps`` or ``trained_betas``) and what the
network predicts (``prediction_type``); diffusers' image models see pixels in [−1, 1], sdeflow's
``"centered"`` transform (:data:`DATA_CONFIG`), so bits/dim carry its log-determinant D·log 2.
Inference-only settings of a scheduler (timestep spacing, clipping, thresholding) do not change the model.
"""

from __future__ import annotations

from typing import Mapping

from torch import nn

from ..data.transforms import ALPHA
from ..model import PluginReverseSDE
from ..noise_schedules import DiscreteVPSDE
from ..sdes import sde_config
from .discrete import PREDICTION_TYPES, adapt_discrete

__all__ = ["DATA_CONFIG", "INSTALL_HINT", "sde_from_scheduler_config", "adapt_diffusers", "load_diffusers"]

#: How diffusers' image pipelines scale 8-bit pixels: x ↦ 2x − 1, sdeflow's "centered".
DATA_CONFIG = {"transform": "centered", "alpha": ALPHA}
INSTALL_HINT = "diffusers is not installed: pip install sdeflow[diffusers]"


def _scheduler_config(scheduler) -> Mapping:
    config = getattr(scheduler, "config", scheduler)
    if not isinstance(config, Mapping):
        raise ValueError(f"scheduler must be a diffusers scheduler or its config (a mapping); got "
                         f"{type(scheduler).__name__}")
    return config


def sde_from_scheduler_config(scheduler) -> DiscreteVPSDE:
    """The :class:`DiscreteVPSDE` of a diffusers scheduler (or its config): its β table by name, or
    ``trained_betas`` as a given ᾱ table. ValueError for a zero-terminal-SNR table (ᾱ_N = 0: the
    log-SNR is −∞ at T)."""
    import torch

    config = _scheduler_config(scheduler)
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("scheduler has rescale_betas_zero_snr=True: ᾱ_N = 0 has no finite log-SNR; "
                         "sdeflow's SDEs need ᾱ_N > 0")
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        return DiscreteVPSDE("given", alphas_cumprod=torch.cumprod(1 - betas, 0).tolist())
    return DiscreteVPSDE(config.get("beta_schedule", "linear"), config.get("beta_start", 1e-4),
                         config.get("beta_end", 0.02), num_train_timesteps)


def adapt_diffusers(unet: nn.Module, scheduler) -> PluginReverseSDE:
    """The sdeflow model of ``unet(x, timestep)`` trained with ``scheduler`` (a diffusers scheduler or
    its config): ``adapt_discrete(unet, sde_from_scheduler_config(scheduler), prediction_type)``, with
    the learned variance kept when the scheduler's ``variance_type`` is "learned_range" (improved
    DDPM's; diffusers' "learned", a log-variance, is read for its mean only)."""
    config = _scheduler_config(scheduler)
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"scheduler's prediction_type must be one of {', '.join(PREDICTION_TYPES)}; "
                         f"got {prediction_type!r}")
    learned = config.get("variance_type") == "learned_range"
    return adapt_discrete(unet, sde_from_scheduler_config(config), prediction_type, learned_variance=learned)


def _load(loader, path: str, subfolder: str):
    # A pipeline folder (save_pretrained of DDPMPipeline, most hub ids) keeps the parts in subfolders;
    # a model saved on its own keeps them at the top.
    try:
        return loader(path, subfolder=subfolder)
    except (OSError, ValueError):
        return loader(path)


def load_diffusers(path: str, device=None, dtype=None) -> tuple[PluginReverseSDE, dict]:
    """``UNet2DModel.from_pretrained`` and the scheduler config of a folder written by ``save_pretrained``
    (a pipeline's or the UNet's own, with ``scheduler_config.json``) or a hub id, as (model, config):
    config is shaped like sdeflow's image model config, {"dataset": None, "net": {"in_channels",
    "image_size", "source"}, "data": :data:`DATA_CONFIG`, "sde": its config, "parameterization",
    "prediction_type", "bound_start": t₁}. ImportError saying how to install diffusers without it."""
    try:
        from diffusers import DDPMScheduler, UNet2DModel
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    unet = _load(UNet2DModel.from_pretrained, path, "unet")
    scheduler_config = _load(DDPMScheduler.load_config, path, "scheduler")
    model = adapt_diffusers(unet, scheduler_config)
    model = model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model
    size = unet.config.sample_size
    image_size = size if isinstance(size, int) else int(size[0])
    config = {"dataset": None,
              "net": {"in_channels": int(unet.config.in_channels), "image_size": image_size,
                      "source": f"diffusers:{path}"},
              "data": dict(DATA_CONFIG), "sde": sde_config(model.sde) if model.sde.alphas_cumprod is None else None,
              "parameterization": model.parameterization, "prediction_type": model.net.prediction_type,
              "bound_start": model.net.first_trained_time()}
    return model.eval(), config
