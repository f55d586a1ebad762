"""Hooks of the training loop: what happens around the steps, without touching the steps.

A hook is any object with some of these methods (the :class:`Hook` base class has them all as
no-ops): ``on_start(trainer)``, ``on_step(trainer)`` after every step, ``on_record(trainer, record)``
for every log record, ``on_end(trainer)``, and ``state_dict()`` / ``load_state_dict(state)`` for
state that must survive a resume (saved in the checkpoint under the hook's ``name``). Hooks run on
rank 0 only unless ``all_ranks`` is True. The ``trainer`` (:class:`sdeflow.engine.loop.Trainer`)
exposes ``step``, ``config``, ``model``, ``ema``, ``run_dir``, ``device``, ``rank``, ``world``,
``emit(record)`` and ``stop(reason)``.

:data:`HOOKS` names the hooks a configuration can ask for by name; :func:`register_hook` adds one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from ..storage import checkpoints as ckpt
from ..utils import check_new_name

__all__ = ["Hook", "JSONLLog", "ProgressBar", "SampleFigures", "ElboMonitor", "SampleMetrics", "TimeBudget", "HOOKS",
           "register_hook", "make_hook", "LOG_NAME", "read_log"]

LOG_NAME = "metrics.jsonl"


class Hook:
    """No-op base class; override what you need."""
    name: str = "hook"
    all_ranks: bool = False

    def on_start(self, trainer) -> None:
        pass

    def on_step(self, trainer) -> None:
        pass

    def on_record(self, trainer, record: dict) -> None:
        pass

    def on_end(self, trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _append_jsonl(path: Path, record: dict) -> None:
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
    except OSError as err:
        raise ckpt.CheckpointWriteError(err.errno, f"could not append to {path}: {err.strerror or err}") from err


def read_log(path) -> list[dict]:
    """The records of a ``metrics.jsonl``, skipping a last line cut short by a kill."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class JSONLLog(Hook):
    """Appends every record to ``run_dir/metrics.jsonl``. On start, drops records of steps after the
    resumed checkpoint (written by a run killed after it), so that the log of a resumed run reads
    like one uninterrupted run."""
    name = "jsonl"

    def on_start(self, trainer) -> None:
        self.path = Path(trainer.run_dir) / LOG_NAME
        if self.path.is_file():
            kept = [json.dumps(r) for r in read_log(self.path) if r.get("step", 0) <= trainer.step]
            ckpt.atomic_write_bytes(self.path, ("\n".join(kept) + ("\n" if kept else "")).encode("utf-8"))

    def on_record(self, trainer, record: dict) -> None:
        _append_jsonl(self.path, record)


class ProgressBar(Hook):
    """A tqdm bar over the steps, showing the last loss, ELBO and skipped steps."""
    name = "progress"

    def __init__(self, desc: str = "train"):
        self.desc, self.bar, self.postfix = desc, None, {}

    def on_start(self, trainer) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.config.steps, initial=trainer.step, desc=self.desc, dynamic_ncols=True,
                        unit="step")

    def on_step(self, trainer) -> None:
        self.bar.update(1)

    def on_record(self, trainer, record: dict) -> None:
        if record.get("loss") is not None and "event" not in record:
            self.postfix.update(loss=f"{record['loss']:.4g}", skipped=record["skipped"])
        if record.get("event") == "schedule fitted":
            self.bar.total = record["steps"]
        if record.get("event") == "elbo":
            self.postfix["bpd" if record.get("unit") == "bits/dim" else "elbo"] = f"{record['running_elbo']:.4g}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def on_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class SampleFigures(Hook):
    """Every ``config.sample_every`` steps, ``draw(ema_model, path, step)`` writes a figure of EMA
    samples to ``run_dir/samples-<step>.png`` (the application says how to draw)."""
    name = "samples"

    def __init__(self, draw: Callable):
        self.draw = draw

    def on_step(self, trainer) -> None:
        every = trainer.config.sample_every
        if every and trainer.step % every == 0:
            self.draw(trainer.ema.model, Path(trainer.run_dir) / f"samples-{trainer.step:08d}.png", trainer.step)


class ElboMonitor(Hook):
    """Every ``config.monitor_every`` steps (and at the last), ``estimate(ema_model, step)`` gives the
    mean ELBO of the EMA model on a batch, in ``unit`` ("nats" per example, or "bits/dim", where
    lower is better); records {"event": "elbo", "step", "elbo", "running_elbo", "unit"}, the running
    value an exponential average 0.7·old + 0.3·new, which survives a resume. It runs on every rank,
    so that an estimate that is itself data-parallel (:mod:`sdeflow.likelihood.evaluation`) joins its collectives."""
    name = "elbo_monitor"
    all_ranks = True

    def __init__(self, estimate: Callable, unit: str = "nats"):
        self.estimate, self.unit, self.running = estimate, unit, None

    def on_step(self, trainer) -> None:
        every = trainer.config.monitor_every
        if not every or (trainer.step % every and trainer.step != trainer.config.steps):
            return
        value = float(self.estimate(trainer.ema.model, trainer.step))
        self.running = value if self.running is None else 0.7 * self.running + 0.3 * value
        trainer.emit({"event": "elbo", "step": trainer.step, "elbo": value, "running_elbo": self.running,
                      "unit": self.unit})

    def state_dict(self) -> dict:
        return {"running": self.running}

    def load_state_dict(self, state: dict) -> None:
        self.running = state.get("running")


class SampleMetrics(Hook):
    """Every ``config.fid_every`` steps (and at the last), ``measure(ema_model, step)`` gives the
    sample metrics of the EMA model ({"fid", ...}, :func:`sdeflow.metrics.image_metrics`); records
    {"event": "fid", "step", **metrics} and redraws their curve, ``run_dir/fid.png``. The history
    survives a resume."""
    name = "sample_metrics"

    def __init__(self, measure: Callable):
        self.measure, self.history = measure, []

    def on_step(self, trainer) -> None:
        from ..plotting import plot_metric_curve

        every = trainer.config.fid_every
        if not every or (trainer.step % every and trainer.step != trainer.config.steps):
            return
        if self.history and self.history[-1][0] == trainer.step:
            return
        metrics = self.measure(trainer.ema.model, trainer.step)
        self.history = [*self.history, [trainer.step, float(metrics["fid"])]]
        trainer.emit({"event": "fid", "step": trainer.step, **metrics})
        steps, values = zip(*self.history)
        plot_metric_curve(list(steps), list(values), Path(trainer.run_dir) / "fid.png",
                          f"FID ({metrics.get('features', 'features')})",
                          f"EMA samples: {metrics.get('n_samples', '')} against the training images")

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = [list(entry) for entry in state.get("history", [])]


class TimeBudget(Hook):
    """Stops training (with a checkpoint) once ``config.max_seconds`` of wall-clock time have been
    spent in this call; rank 0's clock decides, so every rank stops at the same step.

    With ``config.fit_schedule`` it also fits the run to the budget: from the seconds per step
    measured so far (after ``WARMUP`` steps of this call) it plans the last step,
    S = min(steps, s + ⌊(budget − elapsed)/(seconds per step)⌋), at ``PLANS`` evenly spaced moments
    of the budget, and makes S the run's ``steps``, so the cosine decay, the second-order phase
    and the final checkpoint end where the time does. The plan is saved in checkpoints; a run
    fitted to a clock is not bit-reproducible, since the clock is not."""
    name = "time_budget"
    all_ranks = True
    WARMUP, PLANS = 3, 20

    def __init__(self):
        self.planned = None

    def on_start(self, trainer) -> None:
        self.started, self.start_step, self.next_plan = time.perf_counter(), trainer.step, 1
        self.requested = trainer.config.steps
        if self.planned is not None:  # a resumed run keeps the plan of the call that made it
            trainer.config = dataclasses.replace(trainer.config, steps=min(self.planned, self.requested))

    def on_step(self, trainer) -> None:
        from .distributed import broadcast_flag

        limit = trainer.config.max_seconds
        if not limit or trainer.step >= trainer.config.steps:  # None or 0: no limit
            return
        elapsed = time.perf_counter() - self.started
        if trainer.config.fit_schedule:
            self._plan(trainer, elapsed, limit)
        if broadcast_flag(elapsed >= limit, trainer.device):
            trainer.stop("time budget spent")

    def _plan(self, trainer, elapsed: float, limit: float) -> None:
        from .distributed import broadcast_flag, broadcast_int

        if trainer.step - self.start_step <= self.WARMUP:
            self.warm = (trainer.step, elapsed)
            return
        if broadcast_flag(elapsed < self.next_plan * limit / self.PLANS, trainer.device):
            return
        self.next_plan = int(elapsed * self.PLANS / limit) + 1
        warm_step, warm_elapsed = self.warm
        per_step = (elapsed - warm_elapsed) / (trainer.step - warm_step)
        planned = min(self.requested, trainer.step + max(1, int((limit - elapsed) / per_step)))
        planned = broadcast_int(planned, trainer.device)
        if planned != trainer.config.steps:
            self.planned = planned
            trainer.config = dataclasses.replace(trainer.config, steps=planned)
            trainer.emit({"event": "schedule fitted", "step": trainer.step, "steps": planned,
                          "seconds_per_step": per_step})

    def state_dict(self) -> dict:
        return {"planned": self.planned}

    def load_state_dict(self, state: dict) -> None:
        self.planned = state.get("planned")


#: Hooks a configuration or the command line can name.
HOOKS: dict[str, Callable[[], Hook]] = {"jsonl": JSONLLog, "progress": ProgressBar}


def register_hook(name: str, factory: Callable[[], Hook]) -> None:
    """Make ``factory()`` (a Hook class or a function returning a hook) available by ``name``."""
    check_new_name(name, HOOKS, "hook")
    if not callable(factory):
        raise ValueError(f"factory must be callable (a Hook class or a function returning a hook); got {factory!r}")
    HOOKS[name] = factory


def make_hook(name: str) -> Hook:
    """A new hook of the registered ``name``."""
    if name not in HOOKS:
        raise ValueError(f"hook must be one of {', '.join(map(repr, HOOKS))}; got {name!r}")
    return HOOKS[name]()
