"""The settings of the training loop (:func:`sdeflow.engine.fit`): :class:`TrainConfig`. Each field's
``metadata["help"]`` says what it does, and the command line builds its flags from them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..utils import (check_choice, check_decay, check_fraction, check_nonneg_float, check_nonneg_int, check_positive_float,
                     check_positive_int, config_field, validate_fields)

__all__ = ["TrainConfig", "LR_SCHEDULES", "PRECISIONS", "TRAIN_GROUPS"]

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")


def _check_threshold(name: str, value):
    from ..samplers.clipping import check_threshold
    return check_threshold(name, value)


def _weightings():
    from .losses import WEIGHTINGS
    return tuple(WEIGHTINGS)


@dataclass
class TrainConfig:
    """Every setting of the training loop. Not part of the model configuration: may change on resume.

    The defaults are the images' recipe that measured best in a CPU time budget, chosen on a
    validation split (README, "CIFAR-10 in 12 minutes"): Adam at a constant 2e-3 after 100 warm-up
    steps (``lr_schedule="cosine"`` decays it to ``steps``; with ``fit_schedule``, to the steps
    ``max_seconds`` affords), gradients clipped to norm 1, EMA 0.995, importance-sampled time with
    the likelihood weighting. The toy example has its own
    (:data:`sdeflow.experiments.toy.TOY_TRAINING`)."""

    steps: int = config_field("total optimizer steps (a resumed run counts from its checkpoint)", check=check_positive_int)
    batch_size: int = config_field("global batch size (split evenly across processes)", check=check_positive_int)
    lr: float = config_field("peak Adam learning rate", default=2e-3, check=check_positive_float)
    warmup_steps: int = config_field("linear learning-rate warm-up steps", default=100, check=check_nonneg_int)
    lr_schedule: str = config_field("after warm-up: constant, or cosine decay to final_lr_fraction·lr at the last step",
                             choices=lambda: LR_SCHEDULES, default="constant")
    final_lr_fraction: float = config_field("where the cosine schedule ends, as a fraction of lr", default=0.0, check=check_fraction)
    grad_clip: float | None = config_field("clip the global gradient norm to this; 0 or None: no clipping", default=1.0, check=check_nonneg_float)
    ema_decay: float = config_field("decay of the weight average used to evaluate and sample, in [0, 1)", default=0.995,
                            check=check_decay)
    time_sampling: str = config_field("distribution of the diffusion time in the loss: uniform, or importance ∝ g²/σ²",
                               choices=lambda: ("uniform", "importance"), default="importance")
    weighting: str = config_field("DSM loss weighting: likelihood (the ELBO's) or noise (DDPM's ε-loss)",
                             choices=_weightings, default="likelihood")
    loss_t_min: float = config_field("the loss covers diffusion times in [loss_t_min, T], with the weighting exact above it "
                              "(the ELBO started there); 0: from t = 0, the weighting truncated below 10⁻³T "
                              "(sdeflow-light's)", default=0.0, check=check_nonneg_float)
    stratified_time: bool = config_field("draw the batch's diffusion times stratified, one per equal quantile range of the "
                                  "time distribution (a low-discrepancy sampler: less variance)", default=False)
    second_order_fraction: float = config_field("the last fraction of the steps adds second-order score matching "
                                         "(Lu et al. 2022; data of at most 64 dimensions)", default=0.0, check=check_fraction)
    second_order_weight: float = config_field("weight of the second-order term", default=0.3, check=check_nonneg_float)
    vlb_weight: float = config_field("with a learned variance (a net built with learned_variance): the weight of the "
                                     "discrete bound's terms that train it, beside the mean's loss (improved DDPM's "
                                     "hybrid loss; the mean's gradient is stopped in them)", default=1e-3,
                                     check=check_positive_float)
    p_uncond: float = config_field("class-conditional models: the share of each batch whose labels are dropped to "
                                   "the null class, training the unconditional model alongside (classifier-free "
                                   "guidance, Ho & Salimans 2022)", default=0.1, check=check_fraction)
    chain_steps: int = config_field("with a learned variance: the steps N of the discrete chain it is trained on",
                                       default=1000, check=check_positive_int)
    variance_batch_fraction: float = config_field("with a learned variance: the share of each batch its terms are "
                                                  "drawn on, at least one example (a draw of their own: they cost a "
                                                  "second pass of the network on that share)", default=0.25,
                                                  check=check_fraction)
    precision: str = config_field("fp32, or bf16 autocast for the network's forward pass",
                           choices=lambda: PRECISIONS, default="fp32")
    max_bad_steps: int = config_field("stop after this many consecutive steps with a non-finite loss or gradient",
                               default=10, check=check_positive_int)
    checkpoint_every: int = config_field("checkpoint period in steps (and one at the end)", default=1000, check=check_positive_int)
    keep_checkpoints: int = config_field("keep the newest K checkpoints", default=3, check=check_positive_int)
    log_every: int = config_field("period in steps of the records of metrics.jsonl", default=10, check=check_positive_int)
    sample_every: int = config_field("write a figure of EMA samples every N steps; 0: never", default=0, check=check_nonneg_int)
    sample_n_samples: int = config_field("samples per figure", default=64, check=check_positive_int)
    sample_n_steps: int = config_field("sampler steps per figure (the default sampler's method)", default=200,
                                       check=check_positive_int)
    sample_clip: bool = config_field("the figures' and the FID monitor's sampler clips x̂₀ into the data transform's "
                                     "range (better FID wherever measured: README, Samples)", default=True)
    sample_threshold: float | None = config_field("the figures' sampler thresholds x̂₀ dynamically (Imagen) within "
                                                  "the data transform's range at this percentile in (0, 100]; "
                                                  "None: no thresholding", default=None, check=_check_threshold)
    monitor_every: int = config_field("estimate the EMA model's ELBO on a fresh batch every N steps; 0: never", default=0, check=check_nonneg_int)
    monitor_batch: int = config_field("examples per monitoring ELBO", default=256, check=check_positive_int)
    monitor_slices: int = config_field("time draws per example of the monitoring ELBO", default=4, check=check_positive_int)
    fid_every: int = config_field("log the FID and KID of EMA samples against the training images every N steps (and "
                                  "at the last) to metrics.jsonl and fid.png; 0: never", default=0, check=check_nonneg_int)
    fid_n_samples: int = config_field("samples per FID, drawn by the default sampler with the figures' clipping",
                                      default=500, check=check_positive_int)
    fid_features: str | None = config_field("the FID's feature network: a classifier file written by `sdeflow "
                                            "classifier`, or 'inception' (the extra sdeflow[metrics] and its "
                                            "weights); needed with fid_every", default=None)
    flip: bool | None = config_field("random horizontal flips of images; None: where the data set is mirror-symmetric "
                                     "(CIFAR-10, not digits)", default=None)
    seed: int = config_field("seed of every random choice", default=0, check=check_nonneg_int)
    max_seconds: float | None = config_field("stop with a checkpoint after this many seconds of training in this call; "
                                             "0 or None: no limit", default=None, check=check_nonneg_float)
    fit_schedule: bool = config_field("with max_seconds: fit the schedule (cosine decay, second-order phase, last step) "
                               "to the steps the time affords, measured as training runs", default=False)

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first bad setting (each field's own rule); return self."""
        validate_fields(self)
        if self.fid_every and not self.fid_features:
            raise ValueError("fid_features must name the FID's feature network (a classifier file of `sdeflow "
                             "classifier`, or 'inception') when fid_every is set")
        return self

    def lr_at(self, step: int) -> float:
        r"""Learning rate of the update that produces step ``step + 1``: lr·min(1, (step + 1)/W) during
        the W warm-up steps, then constant or, for "cosine", lr·(φ + (1 − φ)·½(1 + cos πp)) with
        p = (step − W)/(steps − W) and φ = ``final_lr_fraction``."""
        lr = self.lr
        if self.warmup_steps:
            lr *= min(1.0, (step + 1) / self.warmup_steps)
        if self.lr_schedule == "cosine":
            progress = min(1.0, max(0, step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
            floor = self.final_lr_fraction
            lr *= floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return lr

    def second_order_steps(self) -> int:
        """How many of the last steps add second-order DSM: round(fraction × steps)."""
        return round(self.second_order_fraction * self.steps)

    def group(self, name: str) -> dict:
        """The settings of one of ``TRAIN_GROUPS`` ("loss", "optimizer", "run", "monitoring") as a dict."""
        check_choice("group", name, tuple(TRAIN_GROUPS))
        return {field: getattr(self, field) for field in TRAIN_GROUPS[name]}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: TrainConfig's fields by what they set: the loss (what the training objective reads), the optimizer
#: and its schedule, the run (length, batch, checkpoints, seed, time), and what is drawn and measured
#: along the way. ``sdeflow train --help`` lists the flags in these groups.
TRAIN_GROUPS = {
    "loss": ("time_sampling", "weighting", "loss_t_min", "stratified_time", "second_order_fraction",
             "second_order_weight", "vlb_weight", "chain_steps", "variance_batch_fraction", "p_uncond"),
    "optimizer": ("lr", "warmup_steps", "lr_schedule", "final_lr_fraction", "grad_clip", "ema_decay", "precision",
                  "max_bad_steps"),
    "run": ("steps", "batch_size", "seed", "max_seconds", "fit_schedule", "flip", "checkpoint_every",
            "keep_checkpoints", "log_every"),
    "monitoring": ("sample_every", "sample_n_samples", "sample_n_steps", "sample_clip", "sample_threshold",
                   "monitor_every", "monitor_batch", "monitor_slices", "fid_every", "fid_n_samples", "fid_features"),
}
TrainConfig.GROUPS = TRAIN_GROUPS
