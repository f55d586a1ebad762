r"""Training and evaluation of image diffusion models: the loop, EMA, checkpoints, resume, DDP, bits/dim.

The loop minimises the per-example denoising score matching loss of :meth:`PluginReverseSDE.dsm`
with Adam (optional linear warm-up, cosine decay and gradient clipping) and keeps an exponential
moving average (EMA) of the parameters, :math:`\bar\theta \leftarrow \beta\bar\theta + (1-\beta)\theta`,
used for evaluation and sampling by default. Buffers are never averaged (they are copied).

Reliability (issue 7):

- Checkpoints ``RUN/ckpt-<step>.pt`` are written atomically (:mod:`sdeflow.checkpoint`) every
  ``checkpoint_every`` steps and at the end; the last ``keep_checkpoints`` are kept. A checkpoint
  holds the model, the EMA, the optimizer, the step, the data position and every RNG state (torch
  CPU and CUDA, numpy, Python, per rank), so a resumed run reproduces the uninterrupted one bit for
  bit on the CPU. The randomness of each step (data-order permutation, dequantisation noise, flips,
  diffusion time and noise) is drawn from generators seeded by (seed, step, rank), so it does not
  depend on what ran before.
- A step whose loss or gradient norm is not finite is skipped (no optimizer or EMA update) and
  counted; ``max_bad_steps`` consecutive bad steps stop training with :class:`NonFiniteError`, the
  last good checkpoint left in place.
- SIGTERM and SIGINT set a flag checked after every step: a checkpoint of the current step is
  written, then :class:`TrainingInterrupted` is raised.
- A failed checkpoint write (disk full, directory unwritable) raises
  :class:`~sdeflow.checkpoint.CheckpointWriteError`; the previous checkpoint is untouched.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init_distributed` starts
``torch.distributed`` (NCCL on CUDA, gloo on CPU), the global batch is split evenly across ranks
and gradients are averaged by DDP; rank 0 writes checkpoints, logs and grids. The same code runs on
one process without it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt
from .model import PluginReverseSDE, TIME_SAMPLINGS, WEIGHTINGS, PARAMETERIZATIONS
from .samplers import sample as sample_model
from .sdes import SubVPSDE, VESDE, VPSDE
from .utils import check_choice

__all__ = [
    "TrainConfig", "TrainingError", "NonFiniteError", "TrainingInterrupted", "EMA",
    "default_model_config", "build_model", "load_model", "train", "evaluate_bpd", "sample_images",
    "save_image_grid", "init_distributed", "world_info", "PRECISIONS", "LR_SCHEDULES", "SDES",
]

PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
LOG_NAME = "metrics.jsonl"


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (message says what happened)."""


class NonFiniteError(TrainingError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class TrainingInterrupted(TrainingError):
    """SIGTERM / SIGINT received: a checkpoint of the current step was written."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"received {name} at step {step}: checkpoint written to {checkpoint}; "
                         f"continue with --resume")


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train` (not part of the model configuration: they may change on resume).

    ``batch_size`` is global (split across ranks). ``grad_clip`` None or 0 disables clipping;
    ``warmup_steps`` ramps the learning rate linearly from lr/warmup to lr; ``lr_schedule="cosine"``
    then decays it to 0 at ``steps``. ``sample_every`` 0 disables sample grids. ``ema_decay`` is
    reached through a warm-up, β_n = min(β, (1 + n)/(10 + n)) after n updates, so short runs are not
    dominated by the initial weights. ``max_seconds`` stops (with a checkpoint) once that much
    wall-clock time has been spent in this call, e.g. to respect a cluster's time limit.
    """
    steps: int
    batch_size: int
    lr: float = 2e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    time_sampling: str = "importance"
    weighting: str = "likelihood"
    precision: str = "fp32"
    max_bad_steps: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    sample_every: int = 0
    sample_n: int = 64
    sample_steps: int = 200
    seed: int = 0
    flip: bool = True
    progress: bool = True
    max_seconds: float | None = None

    def validate(self) -> "TrainConfig":
        def positive_int(name, allow_zero=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if allow_zero else 1):
                raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer; got {value!r}")
        for name in ("steps", "batch_size", "max_bad_steps", "checkpoint_every", "keep_checkpoints",
                     "log_every", "sample_n", "sample_steps"):
            positive_int(name)
        for name in ("warmup_steps", "sample_every", "seed"):
            positive_int(name, allow_zero=True)
        if self.max_seconds is not None and not (self.max_seconds > 0):
            raise ValueError(f"max_seconds must be positive or None; got {self.max_seconds!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number; got {self.lr!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip must be a non-negative number (0: no clipping); got {self.grad_clip!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1); got {self.ema_decay!r}")
        check_choice("time_sampling", self.time_sampling, ("uniform", "importance"))
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        return self

    def lr_at(self, step: int) -> float:
        """Learning rate of the update that produces step ``step + 1``."""
        lr = self.lr
        if self.warmup_steps:
            lr *= min(1.0, (step + 1) / self.warmup_steps)
        if self.lr_schedule == "cosine":
            progress = min(1.0, max(0, step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
            lr *= 0.5 * (1.0 + math.cos(math.pi * progress))
        return lr


def default_model_config(dataset: str = "cifar10", preset: str = "small", *, in_channels: int = 3,
                         image_size: int = 32, net_overrides: dict | None = None, sde: str = "vp",
                         parameterization: str = "noise", transform: str = "logit", alpha: float = 0.05) -> dict:
    """The model configuration stored in every checkpoint and compared on load:
    {"dataset", "net": {"preset", "in_channels", "image_size", **overrides}, "sde": {"name", ...},
    "parameterization", "data": {"transform", "alpha"}}. Only plain types, so it survives weights_only.
    ``transform``: "logit" (α = ``alpha``), "centered" or "identity" (:mod:`sdeflow.data.transforms`)."""
    from .data.transforms import TRANSFORMS

    check_choice("transform", transform, TRANSFORMS)
    check_choice("sde", sde, tuple(SDES))
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    net = {"preset": preset, "in_channels": int(in_channels), "image_size": int(image_size)}
    for key, value in sorted((net_overrides or {}).items()):
        net[key] = list(value) if isinstance(value, (list, tuple)) else value
    return {"dataset": dataset, "net": net, "sde": {"name": sde}, "parameterization": parameterization,
            "data": {"transform": transform, "alpha": float(alpha)}}


def build_model(config: dict) -> PluginReverseSDE:
    """The :class:`PluginReverseSDE` (U-Net from :func:`sdeflow.nets.unet.make_unet`) of a model configuration."""
    from .nets.unet import make_unet

    net_cfg = dict(config["net"])
    preset = net_cfg.pop("preset")
    for key in ("channel_mult", "attn_resolutions"):
        if key in net_cfg:
            net_cfg[key] = tuple(net_cfg[key])
    net = make_unet(preset, **net_cfg)
    sde_cfg = dict(config["sde"])
    sde = SDES[sde_cfg.pop("name")](**sde_cfg)
    return PluginReverseSDE(sde, net, parameterization=config["parameterization"])


# ---------------------------------------------------------------------------------------------
# data: the one place that calls the transforms of sdeflow.data.transforms
# ---------------------------------------------------------------------------------------------
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


def _preprocessor(data_config: dict, flip: bool = False):
    from .data.transforms import Preprocess

    return Preprocess(data_config["transform"], alpha=data_config["alpha"], flip=flip)


def preprocess(images: torch.Tensor, data_config: dict, generator: torch.Generator | None,
               flip: bool = False):
    """uint8 (B, C, H, W) → :class:`sdeflow.data.transforms.Preprocessed` (model input ``y``,
    ``logdet`` = log|det ∂y/∂x| from the dequantised x ∈ [0, 1]^D), by the configured
    :class:`~sdeflow.data.transforms.Preprocess`; random flips only when ``flip`` (training)."""
    return _preprocessor(data_config, flip)(images, train=flip, generator=generator)


def postprocess(y: torch.Tensor, data_config: dict) -> torch.Tensor:
    """Model space → uint8 images (the inverse transform, then quantised)."""
    return _preprocessor(data_config).to_uint8(y)


# ---------------------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------------------
def world_info() -> tuple[int, int]:
    """(rank, world size): (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "cpu") -> tuple[int, int, torch.device]:
    """Start torch.distributed when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA (one GPU per
    local rank), gloo on the CPU. Returns (rank, world size, device of this rank)."""
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    rank, world = world_info()
    return rank, world, device


def _all_reduce(values: torch.Tensor, op=None) -> torch.Tensor:
    if world_info()[1] > 1:
        dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values


def _all_gather_objects(obj) -> list:
    rank, world = world_info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    # A fixed mixing of (seed, step, rank, stream) into 63 bits: every step's randomness is a pure
    # function of these, which makes resumption exact without storing generator states.
    value = (seed * 0x9E3779B1 + step * 0x85EBCA77 + rank * 0xC2B2AE3D + stream * 0x27D4EB2F) & ((1 << 63) - 1)
    return value


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------
class EMA:
    r"""An exponential moving average of a model's parameters, :math:`\bar\theta \leftarrow
    \beta\bar\theta + (1-\beta)\theta` after every optimizer step; buffers are copied, never averaged.

    ``EMA.model`` is a frozen copy of the model holding the averages (use it to evaluate/sample).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, num_updates: int | None = None) -> None:
        """One averaging step; with ``num_updates`` = n (updates before this one) the decay is
        min(β, (1 + n)/(10 + n)), a warm-up that forgets the initial weights quickly."""
        decay = self.decay if num_updates is None else min(self.decay, (1 + num_updates) / (10 + num_updates))
        for avg, live in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(live.detach(), 1.0 - decay)
        for avg_buf, live_buf in zip(self.model.buffers(), model.buffers()):
            avg_buf.copy_(live_buf)

    def state_dict(self) -> dict:
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        own = dict(self.model.named_parameters())
        if set(own) != set(state):
            raise ckpt.CheckpointError("EMA entries of the checkpoint do not match the model's parameters")
        for name, value in state.items():
            own[name].copy_(value)


# ---------------------------------------------------------------------------------------------
# RNG state (per rank) in a weights_only-safe form
# ---------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": _py_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def _py_state_to_plain(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------
# signals
# ---------------------------------------------------------------------------------------------
class _StopOnSignal:
    """Within the context, SIGTERM and SIGINT set ``self.signum`` instead of killing the process; a
    second SIGINT raises KeyboardInterrupt at once. Only the main thread can install handlers."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ---------------------------------------------------------------------------------------------
# logging and pictures
# ---------------------------------------------------------------------------------------------
def _append_jsonl(path: Path, record: dict) -> None:
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
    except OSError as err:
        raise ckpt.CheckpointWriteError(err.errno, f"could not append to {path}: {err.strerror or err}") from err


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records of steps after ``step`` (written by a run killed after its last checkpoint),
    so that the log of a resumed run reads like one uninterrupted run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= step:
            kept.append(line)
    ckpt.atomic_write_bytes(path, ("\n".join(kept) + ("\n" if kept else "")).encode("utf-8"))


def save_image_grid(images: torch.Tensor, path, title: str = "", ncols: int | None = None) -> Path:
    """Tile uint8 images (N, C, H, W) (C = 1 or 3) into a grid PNG written atomically with matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = images.detach().cpu()
    n, c, h, w = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    pad = 1
    grid = torch.full((c, nrows * (h + pad) + pad, ncols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    array = grid.permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(max(3.0, ncols * 0.6), max(3.0, nrows * 0.6) + 0.4), dpi=150)
    ax.imshow(array[..., 0] if c == 1 else array, cmap="gray" if c == 1 else None, vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return ckpt.save_figure(fig, path, bbox_inches="tight")


@torch.no_grad()
def sample_images(model: PluginReverseSDE, config: dict, n: int, *, n_steps: int = 1000, lmbd: float = 0.0,
                  seed: int = 0, device=None, batch_size: int = 256) -> torch.Tensor:
    """Draw ``n`` images with :func:`sdeflow.sample` (Euler–Maruyama on the λ-family, ``n_steps``
    steps) and map them back to uint8 (N, C, H, W). Deterministic given ``seed``."""
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer; got {n!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    c, s = config["net"]["in_channels"], config["net"]["image_size"]
    gen = _generator(device, seed)
    out = []
    try:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            y = sample_model(model, (count, c, s, s), n_steps=n_steps, lmbd=lmbd, generator=gen, device=device)
            out.append(postprocess(y.float(), config["data"]).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# checkpoint assembly
# ---------------------------------------------------------------------------------------------
def load_model(path, *, use_ema: bool = True, device="cpu", expected_config: dict | None = None):
    """Build the model stored in checkpoint ``path`` (EMA weights unless ``use_ema=False``).
    Returns (model in eval mode, its configuration, the checkpoint's step)."""
    state = ckpt.load_checkpoint(path, expected_config=expected_config)
    config = state["config"]
    try:
        model = build_model(config)
    except (KeyError, TypeError) as err:
        raise ckpt.CheckpointError(f"checkpoint {path} has an unusable model configuration ({err})") from None
    try:
        model.load_state_dict(state["model"])
        if use_ema:
            if state.get("ema") is None:
                raise ckpt.CheckpointError(f"checkpoint {path} has no EMA weights; pass --no-ema")
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


class _DSMLoss(nn.Module):
    """The mean DSM loss as a module's forward, so that DDP's gradient hooks see it."""

    def __init__(self, model: PluginReverseSDE, time_sampling: str, weighting: str):
        super().__init__()
        self.model = model
        self.time_sampling, self.weighting = time_sampling, weighting

    def forward(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.model.dsm(y, time_sampling=self.time_sampling, weighting=self.weighting,
                              generator=generator).mean()


class _DataOrder:
    """Global batches drawn without replacement from a permutation per epoch; the permutation of
    epoch e is a pure function of (seed, e), so (epoch, offset) is the whole state."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, offset: int = 0):
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the data set ({n} images)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = epoch, offset
        self._perm_epoch, self._perm = None, None

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            gen = _generator(torch.device("cpu"), _step_seed(self.seed, self.epoch, 0, stream=1))
            self._perm = torch.randperm(self.n, generator=gen)
            self._perm_epoch = self.epoch
        return self._perm

    def next(self) -> torch.Tensor:
        if self.offset + self.batch_size > self.n:
            self.epoch, self.offset = self.epoch + 1, 0
        indices = self._permutation()[self.offset:self.offset + self.batch_size]
        self.offset += self.batch_size
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def train(model: PluginReverseSDE, images: torch.Tensor, run_dir, config: TrainConfig, model_config: dict, *,
          resume: bool = False, device="cpu", on_event=None) -> dict:
    """Train ``model`` on uint8 ``images`` (N, C, H, W) for ``config.steps`` optimizer steps in total.

    Writes into ``run_dir``: ``ckpt-<step>.pt`` checkpoints, ``metrics.jsonl`` (one JSON record per
    ``log_every`` steps: step, loss (mean over the window and ranks), lr, grad_norm, skipped steps so
    far, images/s) and, every ``sample_every`` steps, ``samples-<step>.png`` from the EMA model.
    With ``resume=True`` continues from the newest checkpoint in ``run_dir`` (refused if it was written
    for another ``model_config``); without it, a ``run_dir`` that already holds checkpoints is refused
    so nothing is overwritten. ``on_event(record)``, if given, sees every log record (e.g. to print).

    Returns {"step", "checkpoint", "skipped", "seconds"}. Raises :class:`NonFiniteError`,
    :class:`TrainingInterrupted`, :class:`~sdeflow.checkpoint.CheckpointWriteError`, ``ValueError``.
    """
    from tqdm.auto import tqdm

    config.validate()
    rank, world = world_info()
    device = torch.device(device)
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} does not divide across {world} processes; "
                         f"use a multiple of {world}")
    local_batch = config.batch_size // world
    images = check_images(images, model_config)
    run_dir = Path(run_dir)
    log_path = run_dir / LOG_NAME

    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ckpt.CheckpointWriteError(err.errno, f"cannot create run directory {run_dir}: "
                                                       f"{err.strerror or err}") from err
    if world > 1:
        dist.barrier()
    existing = ckpt.latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise ValueError(f"{run_dir} already holds checkpoints (latest {existing.name}); pass --resume to "
                         f"continue that run or choose another output directory")
    if resume and existing is None:
        raise ValueError(f"no checkpoint to resume from in {run_dir}; start without --resume")

    model.to(device).train()
    ema = EMA(model, config.ema_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    data_order = _DataOrder(images.shape[0], config.batch_size, config.seed)
    step, skipped, bad_in_a_row = 0, 0, 0

    if resume:
        state = ckpt.load_checkpoint(existing, expected_config=model_config, map_location=device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        with torch.no_grad():  # buffers are not averaged: the EMA model uses the live ones
            for avg_buf, live_buf in zip(ema.model.buffers(), model.buffers()):
                avg_buf.copy_(live_buf)
        optimizer.load_state_dict(state["optimizer"])
        trainer = state["trainer"]
        step, skipped, bad_in_a_row = int(state["step"]), trainer["skipped"], trainer["bad_in_a_row"]
        data_order = _DataOrder(images.shape[0], config.batch_size, config.seed, **trainer["data_order"])
        rng = trainer["rng"]
        _set_rng_state(rng[rank] if len(rng) == world else rng[0])
        if rank == 0:
            ckpt.remove_stale_temporaries(run_dir)
            _truncate_log(log_path, step)
    elif rank == 0:
        _truncate_log(log_path, 0)  # records of an earlier attempt that never reached a checkpoint
    last_checkpoint = existing if resume else None

    net_module = _DSMLoss(model, config.time_sampling, config.weighting)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net_module = DistributedDataParallel(net_module, device_ids=[device] if device.type == "cuda" else None)

    def emit(record: dict) -> None:
        if rank == 0:
            _append_jsonl(log_path, record)
            if on_event is not None:
                on_event(record)

    def write_checkpoint() -> Path:
        # Every rank contributes its RNG state; rank 0 writes; all ranks learn whether it worked,
        # so a failed write stops every rank instead of leaving the others waiting.
        rngs = _all_gather_objects(_rng_state())
        path, error = ckpt.checkpoint_path(run_dir, step), None
        if rank == 0:
            state = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "config": model_config, "step": step,
                     "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "trainer": {"skipped": skipped, "bad_in_a_row": bad_in_a_row,
                                 "data_order": data_order.state_dict(), "rng": rngs,
                                 "train_config": asdict(config), "world_size": world}}
            try:
                ckpt.save_checkpoint(path, state)
                ckpt.prune_checkpoints(run_dir, config.keep_checkpoints)
            except ckpt.CheckpointWriteError as err:
                error = err
        failed = _all_reduce(torch.tensor([1.0 if error else 0.0], device=device), dist.ReduceOp.MAX if world > 1 else None)
        if error is not None:
            kept = f"; previous checkpoint {last_checkpoint} is intact" if last_checkpoint else ""
            raise ckpt.CheckpointWriteError(error.errno, f"{error}{kept}")
        if failed.item():
            raise TrainingError("rank 0 failed to write a checkpoint")
        return path

    if step == 0 and resume is False:
        emit({"event": "start", "step": 0, "world_size": world, "batch_size": config.batch_size,
              "parameters": sum(p.numel() for p in params)})
    else:
        emit({"event": "resume", "step": step, "checkpoint": str(existing)})

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    max_norm = config.grad_clip if config.grad_clip else float("inf")
    window_loss, window_count, window_start = 0.0, 0, time.perf_counter()
    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, disable=(not config.progress) or rank != 0,
               desc="train", dynamic_ncols=True)
    try:
        with _StopOnSignal() as stop:
            while step < config.steps:
                indices = data_order.next()[rank * local_batch:(rank + 1) * local_batch]
                gen = _generator(device, _step_seed(config.seed, step, rank))
                batch = images[indices].to(device)
                y = preprocess(batch, model_config["data"], gen, flip=config.flip).y
                for group in optimizer.param_groups:
                    group["lr"] = config.lr_at(step)
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = net_module(y, gen)
                loss = loss.float()
                # backward even for a non-finite loss: under DDP every rank must join the gradient
                # all-reduce; the NaN gradients it gives are discarded below.
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                # One collective per step: mean loss, and a max over ranks of "bad step" and "stop".
                stats = torch.stack([loss.detach(), grad_norm.detach().float().to(device),
                                     torch.tensor(float(stop.signum), device=device)])
                bad = torch.tensor([0.0 if torch.isfinite(stats[:2]).all() else 1.0], device=device)
                if world > 1:
                    summed = stats[:1].clone().nan_to_num(nan=float("inf"))
                    dist.all_reduce(summed)
                    flags = torch.cat([bad, stats[2:]])
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                    mean_loss, bad_flag, signum = summed.item() / world, flags[0].item(), int(flags[1].item())
                else:
                    mean_loss, bad_flag, signum = stats[0].item(), bad.item(), 0
                step += 1
                if bad_flag:
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    bad_in_a_row += 1
                    emit({"event": "skipped", "step": step, "loss": mean_loss if math.isfinite(mean_loss) else None,
                          "grad_norm": float(grad_norm) if torch.isfinite(grad_norm) else None,
                          "skipped": skipped, "bad_in_a_row": bad_in_a_row})
                    if bad_in_a_row >= config.max_bad_steps:
                        where = f"; last good checkpoint {last_checkpoint} is kept" if last_checkpoint else ""
                        raise NonFiniteError(f"{bad_in_a_row} consecutive steps had a non-finite loss or gradient "
                                             f"(last at step {step}); training stopped{where}. Lower --lr or "
                                             f"set --grad-clip")
                else:
                    optimizer.step()
                    ema.update(model, num_updates=step - 1 - skipped)
                    bad_in_a_row = 0
                    window_loss += mean_loss
                    window_count += 1
                bar.update(1)
                if step % config.log_every == 0 or step == config.steps:
                    now = time.perf_counter()
                    if window_count:
                        record = {"step": step, "loss": window_loss / window_count, "lr": config.lr_at(step - 1),
                                  "grad_norm": float(grad_norm), "skipped": skipped,
                                  "images_per_s": window_count * config.batch_size / max(now - window_start, 1e-9)}
                        emit(record)
                        bar.set_postfix(loss=f"{record['loss']:.4g}", skipped=skipped)
                    window_loss, window_count, window_start = 0.0, 0, now
                if config.sample_every and step % config.sample_every == 0 and rank == 0:
                    grid = sample_images(ema.model, model_config, config.sample_n, n_steps=config.sample_steps,
                                         seed=config.seed, device=device)
                    save_image_grid(grid, run_dir / f"samples-{step:08d}.png",
                                    title=f"EMA samples at step {step} ({config.sample_steps} Euler steps, λ=0)")
                # No periodic checkpoint inside a run of bad steps: keep_checkpoints must not push
                # the last good ones out while training may be diverging.
                if (step % config.checkpoint_every == 0 or step == config.steps) and not bad_in_a_row:
                    last_checkpoint = write_checkpoint()
                if config.max_seconds is not None and step < config.steps:
                    out_of_time = time.perf_counter() - started >= config.max_seconds
                    if world > 1:  # rank 0's clock decides, so that every rank stops at the same step
                        flag = torch.tensor([float(out_of_time)], device=device)
                        dist.broadcast(flag, 0)
                        out_of_time = bool(flag.item())
                    if out_of_time:
                        if last_checkpoint is None or ckpt.checkpoint_path(run_dir, step) != last_checkpoint:
                            last_checkpoint = write_checkpoint()
                        emit({"event": "time budget spent", "step": step})
                        break
                if world == 1:
                    # One process needs no agreement: notice a signal that came during this step's logging.
                    signum = stop.signum
                if signum:
                    if last_checkpoint is None or ckpt.checkpoint_path(run_dir, step) != last_checkpoint:
                        last_checkpoint = write_checkpoint()
                    emit({"event": "interrupted", "step": step, "signal": signal.Signals(signum).name})
                    raise TrainingInterrupted(signum, step, last_checkpoint)
    finally:
        bar.close()
    return {"step": step, "checkpoint": last_checkpoint, "skipped": skipped,
            "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------
# bits/dim evaluation
# ---------------------------------------------------------------------------------------------
def evaluate_bpd(model: PluginReverseSDE, images: torch.Tensor, config: dict, *, batch_size: int = 64,
                 n_slices: int = 1, time_sampling: str = "fitted", ode: bool = False, rtol: float = 1e-5,
                 atol: float = 1e-5, seed: int = 0, device=None, progress: bool = False) -> dict:
    r"""Bits per dimension of uint8 ``images`` (N, C, H, W) under ``model`` (pass it unwrapped, not DDP).

    Each image x is dequantised, u = (x + U)/256 with U ~ U[0,1)^D, mapped to model space y with
    log-determinant log|∂y/∂u|, and scored with log p(y) estimated by :meth:`PluginReverseSDE.elbo`
    (``n_slices`` draws, ``time_sampling`` "fitted" by default: the proposal is fitted once on a
    pilot batch of the first images, the lowest-variance unbiased option) or, with ``ode=True``, by
    :meth:`PluginReverseSDE.log_prob_ode` (``rtol``/``atol``). Then per image
    bpd = −(log p(y) + log|det ∂y/∂x|)/(D ln 2) + 8, by :func:`sdeflow.data.transforms.bits_per_dim`
    (which documents why the 8 is there and nothing else).

    Under torch.distributed the images are split across ranks (contiguous shards), each rank scores
    its own and the results are gathered, so every rank returns the same dictionary:
    {"bpd": mean, "bpd_se": std/√n, "n_images", "seconds", "nfe" (ODE: mean network evaluations
    per batch), "bpd_per_image": tensor (N,)}. Reproducible for a given seed, batch size and world size.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if not ode:
        check_choice("time_sampling", time_sampling, TIME_SAMPLINGS)
    images = check_images(images, config)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world = world_info()
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    n = images.shape[0]
    bounds = np.linspace(0, n, world + 1).astype(int)
    shard = range(bounds[rank], bounds[rank + 1])
    from .data.transforms import Preprocess

    results, nfes = [], []
    try:
        if not ode and time_sampling == "fitted":
            pilot_gen = _generator(device, _step_seed(seed, 0, 0, stream=2))
            pilot = preprocess(images[:min(n, 32)].to(device), config["data"], pilot_gen).y
            model.fit_time_proposal(pilot, generator=pilot_gen)
        from tqdm.auto import tqdm
        starts = list(range(shard.start, shard.stop, batch_size))
        for start in tqdm(starts, desc="eval", disable=(not progress) or rank != 0, dynamic_ncols=True):
            stop = min(start + batch_size, shard.stop)
            gen = _generator(device, _step_seed(seed, start, 0, stream=3))
            batch = preprocess(images[start:stop].to(device), config["data"], gen)
            if ode:
                log_py, info = model.log_prob_ode(batch.y, rtol=rtol, atol=atol, generator=gen, return_info=True)
                nfes.append(info["nfe"])
            else:
                log_py = model.elbo(batch.y, n_slices=n_slices, time_sampling=time_sampling, generator=gen)
            batch.logdet = batch.logdet.double()
            results.append(Preprocess.bits_per_dim(log_py.detach().double(), batch).cpu())
    finally:
        model.train(was_training)
    local = torch.cat(results) if results else torch.zeros(0, dtype=torch.float64)
    gathered = _all_gather_objects((local, nfes))
    bpd = torch.cat([part for part, _ in gathered])
    all_nfe = [x for _, part in gathered for x in part]
    if not torch.isfinite(bpd).all():
        raise TrainingError(f"{int((~torch.isfinite(bpd)).sum())} of {n} images got a non-finite bits/dim; "
                            f"the model has diverged")
    out = {"bpd": float(bpd.mean()), "bpd_se": float(bpd.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan"),
           "n_images": n, "seconds": time.perf_counter() - started, "bpd_per_image": bpd}
    if ode:
        out["nfe"] = float(np.mean(all_nfe))
    return out
