r"""The one training loop, for the toy example and the images alike.

:func:`fit` minimises the per-example denoising score matching loss of
:func:`sdeflow.training.losses.dsm` (second-order DSM added in the last ``second_order_fraction`` of the
steps; for a network with a variance head, plus the discrete bound's terms that train it, see
:class:`~sdeflow.training.objectives.DSMObjective`, or the objective passed in) with Adam, the learning rate of :meth:`TrainConfig.lr_at` and optional gradient clipping,
and keeps an :class:`~sdeflow.engine.ema.EMA` of the parameters. Around the steps:

- Checkpoints ``RUN/ckpt-<step>.pt`` are written atomically every ``checkpoint_every`` steps and at
  the end; the last ``keep_checkpoints`` are kept. A checkpoint holds the model, the EMA, the
  optimizer, the step, the batch source's position, every hook's state and every RNG state (per
  rank), so a resumed run reproduces the uninterrupted one bit for bit on the CPU.
- A step whose loss or gradient norm is not finite is skipped (no optimizer or EMA update) and
  counted; ``max_bad_steps`` consecutive bad steps stop training with :class:`NonFiniteError`, the
  last good checkpoint left in place.
- SIGTERM and SIGINT set a flag checked after every step: a checkpoint of the current step is
  written, then :class:`TrainingInterrupted` is raised. A hook may stop training the same way
  (:class:`~sdeflow.engine.hooks.TimeBudget`), without the exception.
- A failed checkpoint write raises :class:`~sdeflow.storage.checkpoints.CheckpointWriteError`; the previous
  checkpoint is untouched.
- Under torch.distributed the global batch is split evenly across ranks and gradients are averaged
  by DDP; rank 0 writes checkpoints and runs the hooks.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn

from ..storage import checkpoints as ckpt
from ..training import TrainConfig
from ..training.objectives import DSMObjective
from ..utils import check_t_min
from .distributed import all_gather_objects, all_reduce, check_batch_divides, world_info
from .ema import EMA
from .hooks import Hook, TimeBudget
from .errors import NonFiniteError, TrainingError, TrainingInterrupted
from .state import make_generator, rng_state, seed_everything, set_rng_state, step_seed

__all__ = ["fit", "Trainer", "TrainingError", "NonFiniteError", "TrainingInterrupted"]


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


def _prepare_run_dir(run_dir: Path, resume: bool, rank: int, world: int) -> Path | None:
    if rank == 0:
        ckpt.check_run_dir(run_dir, resume)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ckpt.CheckpointWriteError(err.errno, f"cannot create run directory {run_dir}: "
                                                       f"{err.strerror or err}") from err
    if world > 1:
        torch.distributed.barrier()
    return ckpt.check_run_dir(run_dir, resume)


class Trainer:
    """The state of one :func:`fit` call; hooks see it (see :mod:`sdeflow.engine.hooks`)."""

    def __init__(self, model, batches, config: TrainConfig, run_dir, model_config: dict, *, device, hooks,
                 objective: nn.Module | None = None):
        self.config, self.model, self.batches = config.validate(), model, batches
        if objective is not None and not isinstance(objective, nn.Module):
            raise ValueError(f"objective must be a torch.nn.Module (forward(y, generator, order) -> loss); "
                             f"got {type(objective).__name__}")
        self.objective = objective
        self.model_config, self.run_dir = model_config, Path(run_dir)
        self.rank, self.world = world_info()
        self.device = torch.device(device)
        check_t_min(config.loss_t_min, model.T, "loss_t_min")
        check_batch_divides(config.batch_size, self.world)
        self.hooks = [*hooks, TimeBudget()]
        self.step, self.skipped, self.bad_in_a_row = 0, 0, 0
        self.last_checkpoint, self.stop_reason = None, None

    # -- for hooks ---------------------------------------------------------------------------------
    def emit(self, record: dict) -> None:
        """Hand a log record to every hook (rank 0)."""
        if self.rank == 0:
            for hook in self.hooks:
                hook.on_record(self, record)

    def stop(self, reason: str) -> None:
        """End training after this step, with a checkpoint."""
        self.stop_reason = reason

    def _run_hooks(self, event: str) -> None:
        for hook in self.hooks:
            if self.rank == 0 or hook.all_ranks:
                getattr(hook, event)(self)

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, resume: bool) -> None:
        existing = _prepare_run_dir(self.run_dir, resume, self.rank, self.world)
        self.model.to(self.device).train()
        self.ema = EMA(self.model, self.config.ema_decay)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=self.config.lr)
        seed_everything(self.config.seed)
        if resume:
            self._restore(existing)
        self.last_checkpoint = existing if resume else None
        if self.objective is None:
            self.objective = DSMObjective(self.model, self.config, self.model_config.get("data"))
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.objective = DistributedDataParallel(
                self.objective, device_ids=[self.device] if self.device.type == "cuda" else None)
        self._run_hooks("on_start")
        if resume:
            self.emit({"event": "resume", "step": self.step, "checkpoint": str(existing)})
        else:
            self.emit({"event": "start", "step": 0, "world_size": self.world, "batch_size": self.config.batch_size,
                       "parameters": sum(p.numel() for p in self.params)})

    def _restore(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, expected_config=self.model_config, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.ema.copy_buffers(self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        trainer = state["trainer"]
        self.step, self.skipped, self.bad_in_a_row = int(state["step"]), trainer["skipped"], trainer["bad_in_a_row"]
        self.batches.load_state_dict(trainer["data_order"])
        for hook in self.hooks:
            hook.load_state_dict(trainer.get("hooks", {}).get(hook.name, {}))
        rng = trainer["rng"]
        set_rng_state(rng[self.rank] if len(rng) == self.world else rng[0])
        if self.rank == 0:
            ckpt.remove_stale_temporaries(self.run_dir)

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        """Write ``ckpt-<step>.pt``: every rank contributes its RNG state, rank 0 writes, and all ranks
        learn whether it worked, so a failed write stops every rank instead of leaving them waiting."""
        rngs = all_gather_objects(rng_state())
        path, error = ckpt.checkpoint_path(self.run_dir, self.step), None
        if self.rank == 0:
            state = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "config": self.model_config, "step": self.step,
                     "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                     "optimizer": self.optimizer.state_dict(),
                     "trainer": {"skipped": self.skipped, "bad_in_a_row": self.bad_in_a_row,
                                 "data_order": self.batches.state_dict(), "rng": rngs,
                                 "hooks": {hook.name: hook.state_dict() for hook in self.hooks},
                                 "train_config": self.config.to_dict(), "world_size": self.world}}
            try:
                ckpt.save_checkpoint(path, state)
                ckpt.prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
            except ckpt.CheckpointWriteError as err:
                error = err
        failed = all_reduce(torch.tensor([1.0 if error else 0.0], device=self.device),
                            torch.distributed.ReduceOp.MAX if self.world > 1 else None)
        if error is not None:
            kept = f"; previous checkpoint {self.last_checkpoint} is intact" if self.last_checkpoint else ""
            raise ckpt.CheckpointWriteError(error.errno, f"{error}{kept}")
        if failed.item():
            raise TrainingError("rank 0 failed to write a checkpoint")
        self.last_checkpoint = path
        return path

    def _checkpoint_unless_written(self) -> None:
        if self.last_checkpoint is None or ckpt.checkpoint_path(self.run_dir, self.step) != self.last_checkpoint:
            self.checkpoint()

    # -- one step ------------------------------------------------------------------------------------
    def train_step(self, stop_signum: int) -> tuple[float, float, bool, int]:
        """One optimizer step. Returns (mean loss over ranks, gradient norm, bad step?, signal number)."""
        config, step = self.config, self.step
        gen = make_generator(self.device, step_seed(config.seed, step, self.rank))
        y = self.batches.next(step, self.rank, self.world, self.device, gen)
        y, extra = (y[0], {"labels": y[1]}) if isinstance(y, tuple) else (y, {})  # a labelled batch
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        self.optimizer.zero_grad(set_to_none=True)
        order = 2 if step >= config.steps - config.second_order_steps() else 1
        if config.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.objective(y, gen, order, **extra).float()
        else:
            loss = self.objective(y, gen, order, **extra)
        # backward even for a non-finite loss: under DDP every rank must join the gradient
        # all-reduce; the NaN gradients it gives are discarded below.
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip or float("inf"))
        if self.world == 1:
            loss_value, norm = loss.item(), grad_norm.item()
            return loss_value, norm, not (math.isfinite(loss_value) and math.isfinite(norm)), 0
        # One collective per step: the mean loss, and a max over ranks of "bad step" and "stop".
        stats = torch.stack([loss.detach(), grad_norm.detach().float().to(self.device),
                             torch.tensor(float(stop_signum), device=self.device)])
        bad = torch.tensor([0.0 if torch.isfinite(stats[:2]).all() else 1.0], device=self.device)
        summed = stats[:1].clone().nan_to_num(nan=float("inf"))
        torch.distributed.all_reduce(summed)
        flags = torch.cat([bad, stats[2:]])
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return summed.item() / self.world, float(grad_norm), bool(flags[0].item()), int(flags[1].item())

    def _after_step(self, loss: float, grad_norm: float, bad: bool) -> None:
        self.step += 1
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.bad_in_a_row += 1
            self.emit({"event": "skipped", "step": self.step, "loss": loss if math.isfinite(loss) else None,
                       "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                       "skipped": self.skipped, "bad_in_a_row": self.bad_in_a_row})
            if self.bad_in_a_row >= self.config.max_bad_steps:
                where = f"; last good checkpoint {self.last_checkpoint} is kept" if self.last_checkpoint else ""
                raise NonFiniteError(f"{self.bad_in_a_row} consecutive steps had a non-finite loss or gradient "
                                     f"(last at step {self.step}); training stopped{where}. Lower the learning "
                                     f"rate or clip the gradient norm")
        else:
            self.optimizer.step()
            self.ema.update(self.model, num_updates=self.step - 1 - self.skipped)
            self.bad_in_a_row = 0
            self._window[0] += loss
            self._window[1] += 1

    def _log_window(self, grad_norm: float) -> None:
        config = self.config
        if self.step % config.log_every and self.step != config.steps:
            return
        now = time.perf_counter()
        total, count, start = self._window
        if count:
            self.emit({"step": self.step, "loss": total / count, "lr": config.lr_at(self.step - 1),
                       "grad_norm": grad_norm, "skipped": self.skipped,
                       "examples_per_s": count * config.batch_size / max(now - start, 1e-9)})
        self._window = [0.0, 0, now]

    def run(self) -> dict:
        """Train to ``config.steps`` (see :func:`fit`)."""
        started = time.perf_counter()
        self._window = [0.0, 0, started]
        try:
            with _StopOnSignal() as signals:
                while self.step < self.config.steps:
                    loss, grad_norm, bad, signum = self.train_step(signals.signum)
                    self._after_step(loss, grad_norm, bad)
                    self._log_window(grad_norm)
                    self._run_hooks("on_step")
                    # No periodic checkpoint inside a run of bad steps: keep_checkpoints must not push
                    # the last good ones out while training may be diverging.
                    if (self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps) \
                            and not self.bad_in_a_row:
                        self.checkpoint()
                    if self.world == 1:  # one process needs no agreement: see a signal that came late
                        signum = signals.signum
                    if signum:
                        self._checkpoint_unless_written()
                        self.emit({"event": "interrupted", "step": self.step, "signal": signal.Signals(signum).name})
                        raise TrainingInterrupted(signum, self.step, self.last_checkpoint)
                    if self.stop_reason:
                        self._checkpoint_unless_written()
                        self.emit({"event": self.stop_reason, "step": self.step})
                        break
        finally:
            self._run_hooks("on_end")
        return {"step": self.step, "checkpoint": self.last_checkpoint, "skipped": self.skipped,
                "seconds": time.perf_counter() - started, "ema_model": self.ema.model}


def fit(model, batches, config: TrainConfig, run_dir, model_config: dict, *, resume: bool = False,
        device="cpu", hooks: list[Hook] | tuple = (), objective: nn.Module | None = None) -> dict:
    """Train ``model`` (a :class:`~sdeflow.model.PluginReverseSDE`) on ``batches`` (a
    :mod:`sdeflow.engine.batches` source: ``next(step, rank, world, device, generator)`` gives the
    batch in model space) for ``config.steps`` optimizer steps in total, writing checkpoints of
    ``model_config`` into ``run_dir`` (see the module docstring). With ``resume=True`` continues
    from the newest checkpoint there (refused if it was written for another ``model_config``);
    without it, a ``run_dir`` that already holds checkpoints is refused, so nothing is overwritten.
    ``hooks`` (see :mod:`sdeflow.engine.hooks`) log, draw and monitor. ``objective``: what is minimised,
    a module whose ``forward(y, generator, order)`` gives the batch's scalar loss and whose parameters are
    the model's (default: :class:`~sdeflow.training.objectives.DSMObjective` with ``config``'s loss settings;
    :func:`sdeflow.training.objectives.build_objective` builds a registered one).

    Returns {"step", "checkpoint", "skipped", "seconds", "ema_model"}. Raises
    :class:`NonFiniteError`, :class:`TrainingInterrupted`,
    :class:`~sdeflow.storage.checkpoints.CheckpointWriteError`, ``ValueError``.
    """
    trainer = Trainer(model, batches, config, run_dir, model_config, device=device, hooks=list(hooks),
                      objective=objective)
    trainer.setup(resume)
    return trainer.run()
