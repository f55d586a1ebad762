"""Image diffusion models: the model configuration, training with the one loop and drawing samples.

Composition only: the data path uint8 → model space and back lives with the data
(:func:`sdeflow.data.transforms.preprocess`, ``postprocess``, ``check_images``), loading a trained
model with the checkpoints (:func:`sdeflow.storage.checkpoints.load_model`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import model_config
from ..training import TrainConfig
from ..data.transforms import TRANSFORMS, check_images, postprocess, preprocess
from ..engine.state import make_generator
from ..nets.unet import DEFAULT_PRESET
from ..utils import check_choice, check_positive_int

__all__ = ["image_model_config", "train_images", "sample_images", "CPU_BUDGET_RECIPE",
           "DEFAULT_SAMPLER", "CLIP_MEASURED_WORSE", "clips_by_default"]

#: The training settings ``sdeflow train`` starts from (with :class:`~sdeflow.training.TrainConfig`'s own
#: defaults for the rest): the recipe measured best for 12 minutes of training on 2 CPU cores (README,
#: "CIFAR-10 in 12 minutes"): batch 16, a 720-second budget with the schedule and the last step fitted
#: to the steps it affords; ``steps`` is only an upper bound.
CPU_BUDGET_RECIPE = {"steps": 1_000_000, "batch_size": 16, "max_seconds": 720.0, "fit_schedule": True}

#: The sampler of ``sdeflow sample`` and of the FID monitor unless told otherwise: chosen from the
#: measured FID-vs-NFE curves (README, "Samples"; benchmarks/samples.py).
DEFAULT_SAMPLER = {"method": "ancestral", "n_steps": 50, "clip": True}
#: Methods whose samples measured worse with x̂₀ clipped (MNIST, every budget: Euler–Maruyama of the
#: reverse SDE); ``sdeflow sample`` and ``sdeflow fid`` clip every other method by default.
CLIP_MEASURED_WORSE = ("euler",)


def clips_by_default(method: str) -> bool:
    """Whether the command line clips x̂₀ for ``method`` unless told: where clipping measured better."""
    return bool(DEFAULT_SAMPLER["clip"]) and method not in CLIP_MEASURED_WORSE



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


@torch.no_grad()
def sample_images(model, config: dict, n_samples: int, settings=None, *, seed: int = 0, device=None,
                  batch_size: int = 256, callback=None, labels=None, guidance: float = 0.0) -> torch.Tensor:
    """``n_samples`` images, uint8 (N, C, H, W): :func:`sdeflow.samplers.sample` with ``settings``
    (a :class:`~sdeflow.samplers.SamplerSettings`; None: its defaults) in batches of
    ``batch_size``, mapped back from model space. Deterministic given ``seed``. ``callback`` is
    the sampler's, called after every step of every batch (its "nfe" counts from 0 in each batch,
    so at a batch's last step it is the evaluations per image). ``labels`` (N,): the class of each
    image from a class-conditional ``model``, drawn with guidance scale ``guidance``
    (:func:`sdeflow.samplers.guided`); None: the model as it is."""
    from ..samplers import guided, sample as sample_model

    check_positive_int("n_samples", n_samples)
    check_positive_int("batch_size", batch_size)
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (n_samples,):
            raise ValueError(f"labels must hold one class per sample, shape ({n_samples},); got {tuple(labels.shape)}")
    elif guidance:
        raise ValueError("guidance needs labels: the classes to guide toward")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    c, s = config["net"]["in_channels"], config["net"]["image_size"]
    gen = make_generator(device, seed)
    out = []
    try:
        for start in range(0, n_samples, batch_size):
            count = min(batch_size, n_samples - start)
            drawn = model if labels is None else guided(model, labels[start:start + count].to(device), guidance)
            y = sample_model(drawn, (count, c, s, s), settings, generator=gen, device=device, callback=callback)
            out.append(postprocess(y.float(), config["data"]).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def train_images(model, images: torch.Tensor, run_dir, config: TrainConfig, model_config: dict, *,
                 resume: bool = False, device="cpu", hooks=(), objective=None, labels=None) -> dict:
    """Train ``model`` on uint8 ``images`` (N, C, H, W) with :func:`sdeflow.engine.fit`: batches
    drawn without replacement per epoch, dequantised, flipped (``config.flip``; None: if the data
    set is ``mirror_symmetric`` in :data:`sdeflow.data.DATASETS`) and transformed by
    the step's generator. Writes ``metrics.jsonl`` (:class:`~sdeflow.engine.JSONLLog`), checkpoints
    and, every ``config.sample_every`` steps, ``samples-<step>.png`` grids of EMA samples, plus
    whatever ``hooks`` do; ``objective``: the loss module to minimise (default: fit's); ``labels`` (N,):
    the images' classes, for a class-conditional network (label dropout: ``config.p_uncond``). Returns what
    :func:`~sdeflow.engine.fit` returns."""
    from ..data.transforms import data_range
    from ..engine import DatasetBatches, ElboMonitor, JSONLLog, SampleFigures, SampleMetrics, fit
    from ..samplers.clipping import describe_clipping
    from ..likelihood.evaluation import evaluate_bpd
    from ..likelihood.settings import LikelihoodSettings
    from ..plotting import save_image_grid

    from ..training.losses import MAX_SECOND_ORDER_DIM
    from ..samplers import SamplerSettings

    config.validate()
    images = check_images(images, model_config)
    dim = images[0].numel()
    if config.second_order_steps() and dim > MAX_SECOND_ORDER_DIM:
        raise ValueError(f"second_order_fraction must be 0 for these images: second-order DSM computes the exact "
                         f"Jacobian, for data of at most {MAX_SECOND_ORDER_DIM} dimensions; they have {dim}")
    data = model_config["data"]

    flip = config.flip if config.flip is not None else _mirror_symmetric(model_config["dataset"])

    def transform(batch, generator):
        return preprocess(batch, data, generator, flip=flip).y

    # x̂₀ kept in the transform's range with sample_clip, or thresholded within it at sample_threshold.
    clip = data_range(data) if config.sample_clip or config.sample_threshold is not None else None
    clipping = describe_clipping(clip, config.sample_threshold)

    def draw(ema_model, path, step):
        method = DEFAULT_SAMPLER["method"]
        settings = SamplerSettings(method=method, n_steps=config.sample_n_steps, clip=clip,
                                   threshold=config.sample_threshold)
        grid = sample_images(ema_model, model_config, config.sample_n_samples, settings, seed=config.seed,
                             device=device)
        save_image_grid(grid, path, title=f"EMA samples at step {step} ({config.sample_n_steps} {method} steps"
                                          f"{', ' + clipping if clipping else ''})")

    measure = None
    if config.fid_every:
        measure = _fid_monitor(images, model_config, config, clip, device, Path(run_dir))

    def estimate(ema_model, step):
        # Bits/dim of a fixed batch of training images, a new draw of the ELBO's noise each time.
        settings = LikelihoodSettings(n_slices=config.monitor_slices, time_sampling="importance")
        return evaluate_bpd(ema_model, images[:config.monitor_batch], model_config, settings, seed=step,
                            device=device)["bpd"]

    batches = DatasetBatches(images, config.batch_size, config.seed, transform, labels=labels)
    return fit(model, batches, config, run_dir, model_config, resume=resume, device=device, objective=objective,
               hooks=[JSONLLog(), SampleFigures(draw), ElboMonitor(estimate, unit="bits/dim"),
                      *([SampleMetrics(measure)] if measure else []), *hooks])


def _fid_monitor(images: torch.Tensor, model_config: dict, config: TrainConfig, clip, device, run_dir: Path):
    """``measure(ema_model, step)`` of :class:`~sdeflow.engine.SampleMetrics`: FID and KID of
    ``config.fid_n_samples`` EMA samples (the default sampler, x̂₀ as the figures') against the
    training ``images`` in the features ``config.fid_features`` names (a classifier file, or
    "inception"), their statistics computed once and cached in the run directory."""
    from ..metrics import image_metrics, load_classifier, make_features, reference_statistics
    from ..samplers import SamplerSettings

    if config.fid_features == "inception":
        net = make_features("inception").to(device)
    else:
        net = load_classifier(config.fid_features, device=device)
    settings = SamplerSettings(method=DEFAULT_SAMPLER["method"], n_steps=DEFAULT_SAMPLER["n_steps"], clip=clip,
                               threshold=config.sample_threshold)

    def measure(ema_model, step):
        # The run directory exists once training has started.
        reference = reference_statistics(net, images, cache=run_dir / "fid-reference.npz", device=device)
        samples = sample_images(ema_model, model_config, config.fid_n_samples, settings, seed=config.seed,
                                device=device)
        result = image_metrics(net, samples, reference, device=device,
                               generator=torch.Generator().manual_seed(config.seed))
        return {key: value for key, value in result.items() if key != "class_counts"}

    return measure


def _mirror_symmetric(dataset: str) -> bool:
    from ..data import DATASETS

    entry = DATASETS.get(dataset)
    return bool(entry is not None and entry.mirror_symmetric)
