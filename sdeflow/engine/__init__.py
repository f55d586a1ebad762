"""The engine under every application: one training loop (:func:`fit`), its hooks, state and
distributed helpers. See :mod:`sdeflow.engine.loop` for what a run writes and guarantees.

Names are loaded on first use, so that code that only needs :mod:`sdeflow.engine.distributed` or
:mod:`sdeflow.engine.state` (evaluation, ``sdeflow eval``) never imports the training loop.
"""

import importlib

_WHERE = {
    "fit": "loop", "Trainer": "loop", "TrainingError": "errors", "NonFiniteError": "errors",
    "TrainingInterrupted": "errors", "EMA": "ema", "DatasetBatches": "batches", "StreamBatches": "batches",
    "Hook": "hooks", "JSONLLog": "hooks", "ProgressBar": "hooks", "SampleFigures": "hooks", "ElboMonitor": "hooks", "SampleMetrics": "hooks",
    "TimeBudget": "hooks", "HOOKS": "hooks", "register_hook": "hooks", "make_hook": "hooks",
    "init_distributed": "distributed", "world_info": "distributed",
}

__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
