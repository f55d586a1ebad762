"""Image diffusion models: the model configuration, the data path uint8 → model space and back,
loading checkpoints, training with the one loop and drawing samples.

Data flows one way: uint8 images → :class:`~sdeflow.data.transforms.Preprocess` (dequantise,
flip, transform, with its log-determinant) → model → loss / ELBO → bits/dim
(:mod:`sdeflow.evaluation`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..config import TrainConfig, build_model, model_config
from ..data.transforms import TRANSFORMS, Preprocess
from ..engine.state import make_generator
from ..nets.unet import DEFAULT_PRESET
from ..utils import check_choice, check_positive_int

__all__ = ["image_model_config", "check_images", "preprocess", "postprocess", "load_model", "resolve_checkpoint",
           "train_images", "sample_images"]


def image_model_config(dataset: str = "cifar10", preset: str = DEFAULT_PRESET, *, in_channels: int = 3,
                       image_size: int = 32, net_overrides: dict | None = None, sde: dict | str = "vp",
                       parameterization: str = "noise", transform: str = "logit", alpha: float = 0.05) -> dict:
    """The model configuration of a U-Net (:func:`sdeflow.nets.unet.make_unet` ``preset`` with
    ``net_overrides``) on images of ``in_channels`` × ``image_size``², stored in every checkpoint.
    ``sde``: a registered name or {"name", **parameters}; ``transform``: "logit" (α = ``alpha``),
    "centered" or "identity" (:mod:`sdeflow.data.transforms`)."""
    check_choice("transform", transform, TRANSFORMS)
    net = {"name": "unet", "preset": preset, "in_channels": int(in_channels), "image_size": int(image_size)}
    net.update(sorted((net_overrides or {}).items()))
    return model_config(dataset=dataset, net=net, sde=sde, parameterization=parameterization,
                        data={"transform": transform, "alpha": float(alpha)})


def check_images(images, config: dict, name: str = "images") -> torch.Tensor:
    """Refuse anything but a uint8 tensor (N, C, H, W) of the model's shape."""
    if not torch.is_tensor(images):
        images = torch.as_tensor(np.asarray(images))
    if images.dtype != torch.uint8:
        raise ValueError(f"{name} must hold raw 8-bit levels (dtype uint8), not {images.dtype}: they are "
                         f"dequantized here, and bits/dim of data that was not dequantized is meaningless")
    c, s = config["net"]["in_channels"], config["net"]["image_size"]
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
        raise ValueError(f"{name} must have shape (N, {c}, {s}, {s}) for this model; got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return images


def _preprocessor(data_config: dict, flip: bool = False) -> Preprocess:
    return Preprocess(data_config["transform"], alpha=data_config["alpha"], flip=flip)


def preprocess(images: torch.Tensor, data_config: dict, generator: torch.Generator | None, flip: bool = False):
    """uint8 (B, C, H, W) → :class:`sdeflow.data.transforms.Preprocessed` (model input ``y``,
    ``logdet`` = log|det ∂y/∂x| from the dequantised x ∈ [0, 1]^D), by the configured
    :class:`~sdeflow.data.transforms.Preprocess`; random flips only when ``flip`` (training)."""
    return _preprocessor(data_config, flip)(images, train=flip, generator=generator)


def postprocess(y: torch.Tensor, data_config: dict) -> torch.Tensor:
    """Model space → uint8 images (the inverse transform, then quantised)."""
    return _preprocessor(data_config).to_uint8(y)


def resolve_checkpoint(path) -> Path:
    """A ``ckpt-*.pt`` file, or the newest one in a run directory; ``ValueError`` if there is none."""
    path = Path(path)
    if path.is_dir():
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"checkpoint {path} is a folder with no ckpt-*.pt file")
        return latest
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    return path


def load_model(path, *, use_ema: bool = True, device="cpu", expected_config: dict | None = None):
    """Build the model stored in checkpoint ``path`` (a file or a run directory: its newest; EMA
    weights unless ``use_ema=False``). Returns (model in eval mode, its configuration, its step)."""
    path = resolve_checkpoint(path)
    state = ckpt.load_checkpoint(path, expected_config=expected_config)
    config = state["config"]
    try:
        model = build_model(config)
    except (KeyError, TypeError, ValueError) as err:
        raise ckpt.CheckpointError(f"checkpoint {path} has an unusable model configuration ({err})") from None
    try:
        model.load_state_dict(state["model"])
        if use_ema:
            if state.get("ema") is None:
                raise ckpt.CheckpointError(f"checkpoint {path} has no EMA weights; load it with use_ema=False")
            own = dict(model.named_parameters())
            if set(own) != set(state["ema"]):
                raise ckpt.CheckpointError(f"checkpoint {path}: EMA entries do not match the model")
            with torch.no_grad():
                for name, value in state["ema"].items():
                    own[name].copy_(value)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ckpt.CheckpointError(f"checkpoint {path} does not fit its own model configuration ({first})") from None
    return model.to(device).eval(), config, int(state["step"])


@torch.no_grad()
def sample_images(model, config: dict, n_samples: int, settings=None, *, seed: int = 0, device=None,
                  batch_size: int = 256, callback=None) -> torch.Tensor:
    """``n_samples`` images, uint8 (N, C, H, W): :func:`sdeflow.samplers.sample` with ``settings``
    (a :class:`~sdeflow.samplers.SamplerSettings`; None: its defaults) in batches of
    ``batch_size``, mapped back from model space. Deterministic given ``seed``. ``callback`` is
    the sampler's, called after every step of every batch (its "nfe" counts from 0 in each batch,
    so at a batch's last step it is the evaluations per image)."""
    from ..samplers import sample as sample_model

    check_positive_int("n_samples", n_samples)
    check_positive_int("batch_size", batch_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    c, s = config["net"]["in_channels"], config["net"]["image_size"]
    gen = make_generator(device, seed)
    out = []
    try:
        for start in range(0, n_samples, batch_size):
            count = min(batch_size, n_samples - start)
            y = sample_model(model, (count, c, s, s), settings, generator=gen, device=device, callback=callback)
            out.append(postprocess(y.float(), config["data"]).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def train_images(model, images: torch.Tensor, run_dir, config: TrainConfig, model_config: dict, *,
                 resume: bool = False, device="cpu", hooks=()) -> dict:
    """Train ``model`` on uint8 ``images`` (N, C, H, W) with :func:`sdeflow.engine.fit`: batches
    drawn without replacement per epoch, dequantised, flipped (``config.flip``) and transformed by
    the step's generator. Writes ``metrics.jsonl`` (:class:`~sdeflow.engine.JSONLLog`), checkpoints
    and, every ``config.sample_every`` steps, ``samples-<step>.png`` grids of EMA samples, plus
    whatever ``hooks`` do. Returns what :func:`~sdeflow.engine.fit` returns."""
    from ..engine import DatasetBatches, ElboMonitor, JSONLLog, SampleFigures, fit
    from ..evaluation import evaluate_bpd
    from ..plotting import save_image_grid

    from ..model import MAX_SECOND_ORDER_DIM
    from ..samplers import SamplerSettings

    config.validate()
    images = check_images(images, model_config)
    dim = images[0].numel()
    if config.second_order_steps() and dim > MAX_SECOND_ORDER_DIM:
        raise ValueError(f"second_order_fraction must be 0 for these images: second-order DSM computes the exact "
                         f"Jacobian, for data of at most {MAX_SECOND_ORDER_DIM} dimensions; they have {dim}")
    data = model_config["data"]

    def transform(batch, generator):
        return preprocess(batch, data, generator, flip=config.flip).y

    def draw(ema_model, path, step):
        grid = sample_images(ema_model, model_config, config.sample_n_samples,
                             SamplerSettings(n_steps=config.sample_n_steps), seed=config.seed, device=device)
        save_image_grid(grid, path, title=f"EMA samples at step {step} ({config.sample_n_steps} Euler steps, λ=0)")

    def estimate(ema_model, step):
        # Bits/dim of a fixed batch of training images, a new draw of the ELBO's noise each time.
        return evaluate_bpd(ema_model, images[:config.monitor_batch], model_config, n_slices=config.monitor_slices,
                            time_sampling="importance", seed=step, device=device)["bpd"]

    batches = DatasetBatches(images, config.batch_size, config.seed, transform)
    return fit(model, batches, config, run_dir, model_config, resume=resume, device=device,
               hooks=[JSONLLog(), SampleFigures(draw), ElboMonitor(estimate, unit="bits/dim"), *hooks])
