"""Training a model: the denoising score-matching loss with its weightings (:mod:`~sdeflow.training.losses`).
The loop that runs it, with checkpoints, EMA and faults, is :mod:`sdeflow.engine`."""

from .losses import WEIGHTINGS, dsm, register_weighting

__all__ = ["dsm", "WEIGHTINGS", "register_weighting"]
