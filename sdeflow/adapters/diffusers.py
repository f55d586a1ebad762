r"""diffusers models: a ``UNet2DModel`` (or any module with its call ``unet(x, timestep)``) with the
config of its ``DDPMScheduler`` / ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` as an sdeflow model.

The scheduler config gives the SDE (:class:`~sdeflow.sdes.noise_levels.DiscreteVPSDE` of
``beta_schedule``, ``beta_start``, ``beta_end``, ``num_train_timesteps`` or ``trained_betas``) and what the
network predicts (``prediction_type``); diffusers' image models see pixels in [−1, 1], sdeflow's
``"centered"`` transform (:data:`DATA_CONFIG`), so bits/dim carry its log-determinant D·log 2.
Inference-only settings of a scheduler (timestep spacing, clipping, thresholding) do not change the model.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Mapping

from torch import nn

from ..data.transforms import ALPHA
from ..model import PluginReverseSDE
from ..nets.heads import has_variance_head
from ..sdes.noise_levels import DiscreteVPSDE
from ..sdes.linear import sde_config
from .discrete import PREDICTION_TYPES, adapt_discrete

__all__ = ["DATA_CONFIG", "INSTALL_HINT", "sde_from_scheduler_config", "adapt_diffusers", "load_diffusers",
           "PickledWeightsError"]

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


def _num_class_embeds(unet: nn.Module) -> int:
    """The class table of a diffusers UNet (``num_class_embeds``; 0 without one). ValueError for class
    embeddings that are not a table of classes (``class_embed_type`` "timestep", "identity", ...)."""
    config = getattr(unet, "config", None)
    count = int(getattr(config, "num_class_embeds", None) or 0)
    kind = getattr(config, "class_embed_type", None)
    if kind is not None:
        raise ValueError(f"the UNet's class_embed_type is {kind!r}: sdeflow reads class labels from a table of "
                         f"classes (num_class_embeds) only")
    return count


def adapt_diffusers(unet: nn.Module, scheduler, *, null_class: bool = False) -> PluginReverseSDE:
    """The sdeflow model of ``unet(x, timestep)`` trained with ``scheduler`` (a diffusers scheduler or
    its config): ``adapt_discrete(unet, sde_from_scheduler_config(scheduler), prediction_type)``, with
    the learned variance kept when the scheduler's ``variance_type`` is "learned_range" (improved
    DDPM's; diffusers' "learned", a log-variance, is read for its mean only).

    A UNet with ``num_class_embeds`` K is class-conditional, called ``unet(x, timestep, class_labels=y)``:
    K classes, or, with ``null_class=True`` (trained with label dropout to its last embedding), K − 1
    classes and the null class K − 1 that guidance needs (:mod:`sdeflow.adapters.discrete`)."""
    config = _scheduler_config(scheduler)
    embeds = _num_class_embeds(unet)
    if null_class and embeds < 2:
        raise ValueError(f"null_class needs a UNet with at least 2 class embeddings (num_class_embeds); it has {embeds}")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"scheduler's prediction_type must be one of {', '.join(PREDICTION_TYPES)}; "
                         f"got {prediction_type!r}")
    learned = config.get("variance_type") == "learned_range"
    return adapt_discrete(unet, sde_from_scheduler_config(config), prediction_type, learned_variance=learned,
                          num_classes=embeds - int(bool(null_class)), null_class=bool(null_class))


class PickledWeightsError(ValueError):
    """A diffusers model whose weights are pickled (``diffusion_pytorch_model.bin``, written by
    ``save_pretrained(safe_serialization=False)``) and not also in safetensors: unpickling a file can run
    any code it holds, so :func:`load_diffusers` reads one only with ``allow_pickle=True``. ``location``
    is the folder or hub id, ``detail`` what was found there."""

    def __init__(self, location: str, detail: str):
        self.location, self.detail = location, detail
        super().__init__(f"{location}: {detail}; pickled weights can run code when read, so they are read "
                         f"only with allow_pickle=True, for a model whose source you trust")


@contextlib.contextmanager
def _quiet():
    """The logging of diffusers (its advice to install accelerate, its report of the weights file it did
    not find) and of huggingface_hub (its retries) and Python warnings silenced, progress bars hidden; all
    restored afterwards. What goes wrong reaches the caller as the exception, once."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging

    levels = [(module, module.get_verbosity()) for module in (diffusers_logging, hub_logging)]
    bars_enabled = diffusers_logging.is_progress_bar_enabled()
    for module, _ in levels:
        module.set_verbosity(logging.CRITICAL)
    diffusers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for module, level in levels:
            module.set_verbosity(level)
        if bars_enabled:
            diffusers_logging.enable_progress_bar()


def _one_line(err: BaseException) -> str:
    """diffusers' message on one line, with the root cause it chains when that says more (a file that is
    not a checkpoint: "Unable to load weights from checkpoint file ...", then the parser's own words)."""
    text = " ".join(str(err).split()) or type(err).__name__
    root, seen = err, set()
    while (root.__cause__ or root.__context__) is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__ or root.__context__
    reason = " ".join(str(root).split())
    return f"{text} ({reason})" if root is not err and reason and reason not in text else text


def _names_missing(err: BaseException, suffix: str) -> bool:
    """Whether diffusers' error says the hub id has no file ending in ``suffix`` (its words for it)."""
    text = str(err)
    return "does not appear to have a file named" in text and suffix in text


def _is_local(path: str) -> bool:
    """Whether ``path`` names a folder on this machine rather than a hub id ("namespace/name")."""
    return (Path(path).exists() or Path(path).expanduser().is_absolute() or str(path).startswith(".")
            or str(path).count("/") > 1 or "\\" in str(path))


def _local_subfolder(path: str, subfolder: str) -> str | None:
    # A pipeline folder (save_pretrained of DDPMPipeline) keeps each part in its subfolder; a model saved
    # on its own keeps it at the top.
    return subfolder if (Path(path) / subfolder).is_dir() else None


def _load(loader, path: str, subfolder: str, **options):
    """``loader`` on the part of ``path`` in ``subfolder`` (a pipeline, most hub ids) or at the top (a
    model saved on its own). A local folder is read where the part is, so its own error is the one
    raised, and never from the network; a hub id falls back to the top only when the subfolder has no
    config."""
    if _is_local(path):
        return loader(path, subfolder=_local_subfolder(path, subfolder), local_files_only=True, **options)
    try:
        return loader(path, subfolder=subfolder, **options)
    except OSError as err:
        if not _names_missing(err, "config.json"):
            raise
    return loader(path, **options)


def _refuse_pickled_weights(path: str, subfolder: str) -> None:
    """PickledWeightsError when the local part holds pickled weights and no safetensors file."""
    folder = Path(path) / (_local_subfolder(path, subfolder) or "")
    pickled = sorted(f.name for f in folder.glob("*.bin"))
    if pickled and not any(folder.glob("*.safetensors")):
        raise PickledWeightsError(str(path), f"its weights are pickled ({pickled[0]}), with no safetensors file")


def load_diffusers(path: str, device=None, dtype=None, *,
                   allow_pickle: bool = False) -> tuple[PluginReverseSDE, dict]:
    """``UNet2DModel.from_pretrained`` and the scheduler config of a folder written by ``save_pretrained``
    (a pipeline's or the UNet's own, with ``scheduler_config.json``) or a hub id, as (model, config):
    config is shaped like sdeflow's image model config, {"dataset": None, "net": {"in_channels",
    "image_size", "source", "num_classes"}, "data": :data:`DATA_CONFIG`, "sde": its config, "parameterization",
    "prediction_type", "bound_start": t₁}.

    Weights are read from safetensors only: pickled weights (a ``.bin`` file) can run code when read,
    and raise :class:`PickledWeightsError` unless ``allow_pickle=True`` (then safetensors are still
    preferred where both exist). A local folder is never looked up on the network. diffusers' logging
    and warnings are silenced while loading; what fails raises ValueError in one line with diffusers'
    reason (e.g. a corrupt weights file). ImportError saying how to install diffusers without it."""
    try:
        from diffusers import DDPMScheduler, UNet2DModel
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    if _is_local(path):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such folder (a diffusers model is a folder written by "
                                    f"save_pretrained, or a hub id like google/ddpm-cifar10-32)")
        if not allow_pickle:
            _refuse_pickled_weights(path, "unet")
    try:
        with _quiet():
            unet = _load(UNet2DModel.from_pretrained, path, "unet", use_safetensors=None if allow_pickle else True)
            scheduler_config = _load(DDPMScheduler.load_config, path, "scheduler")
    except (OSError, ValueError, RuntimeError) as err:
        if not allow_pickle and _names_missing(err, ".safetensors"):
            raise PickledWeightsError(str(path), "it has no safetensors weights") from None
        raise ValueError(f"cannot load the diffusers model {path}: {_one_line(err)}") from None
    model = adapt_diffusers(unet, scheduler_config)
    discrete = model.net.net if has_variance_head(model) else model.net  # the DiscreteTimeNet
    model = model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model
    size = unet.config.sample_size
    image_size = size if isinstance(size, int) else int(size[0])
    config = {"dataset": None,
              "net": {"in_channels": int(unet.config.in_channels), "image_size": image_size,
                      "source": f"diffusers:{path}", "num_classes": int(getattr(model.net, "num_classes", 0))},
              "data": dict(DATA_CONFIG), "sde": sde_config(model.sde) if model.sde.alphas_cumprod is None else None,
              "parameterization": model.parameterization, "prediction_type": discrete.prediction_type,
              "bound_start": discrete.first_trained_time()}
    return model.eval(), config
