"""The engine under every application: one training loop (:func:`fit`), its hooks, state and
distributed helpers. See :mod:`sdeflow.engine.loop` for what a run writes and guarantees."""

from .batches import DatasetBatches, StreamBatches
from .distributed import init_distributed, world_info
from .ema import EMA
from .hooks import HOOKS, ElboMonitor, Hook, JSONLLog, ProgressBar, SampleFigures, TimeBudget, make_hook, register_hook
from .loop import DSMObjective, NonFiniteError, Trainer, TrainingError, TrainingInterrupted, fit

__all__ = ["fit", "Trainer", "DSMObjective", "TrainingError", "NonFiniteError", "TrainingInterrupted", "EMA",
           "DatasetBatches", "StreamBatches", "Hook", "JSONLLog", "ProgressBar", "SampleFigures", "ElboMonitor",
           "TimeBudget", "HOOKS", "register_hook", "make_hook", "init_distributed", "world_info"]
