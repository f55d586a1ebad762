"""Why training stopped: the exceptions of the loop (importable without it)."""

from __future__ import annotations

import signal

__all__ = ["TrainingError", "NonFiniteError", "TrainingInterrupted"]


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (message says what happened)."""


class NonFiniteError(TrainingError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class TrainingInterrupted(TrainingError):
    """SIGTERM / SIGINT received: a checkpoint of the current step was written."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"received {name} at step {step}: checkpoint written to {checkpoint}")
