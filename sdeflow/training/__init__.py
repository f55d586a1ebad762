"""Training a model: the denoising score-matching loss with its weightings (:mod:`~sdeflow.training.losses`)
and the settings of a run (:mod:`~sdeflow.training.config`).
The loop that runs it, with checkpoints, EMA and faults, is :mod:`sdeflow.engine`."""

from .losses import WEIGHTINGS, dsm, register_weighting
from .config import TrainConfig

__all__ = ["dsm", "WEIGHTINGS", "register_weighting", "TrainConfig"]
