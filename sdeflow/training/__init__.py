"""Training a model: the denoising score-matching loss with its weightings (:mod:`~sdeflow.training.losses`)
the settings of a run (:mod:`~sdeflow.training.config`) and the named objectives, recipes of model and loss
settings with the loss module they build (:mod:`~sdeflow.training.objectives`).
The loop that runs it, with checkpoints, EMA and faults, is :mod:`sdeflow.engine`."""

from .losses import WEIGHTINGS, dsm, register_weighting
from .config import TrainConfig
from .objectives import OBJECTIVES, DSMObjective, Objective, build_objective, register_objective

__all__ = ["dsm", "WEIGHTINGS", "register_weighting", "TrainConfig", "Objective", "OBJECTIVES", "register_objective",
           "build_objective", "DSMObjective"]
