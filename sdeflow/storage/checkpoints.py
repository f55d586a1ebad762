"""Checkpoints that survive crashes and cannot run code.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers (dicts, lists,
tuples, str, int, float, bool, None):

    {"format": "sdeflow-checkpoint", "version": 1, "config": {...the model configuration...},
     "step": int, "model": state_dict, "ema": {name: tensor} | None, "optimizer": state_dict,
     "trainer": {...counters, data position, RNG states...}}

- :func:`save_checkpoint` writes atomically: a temporary file in the same directory, flushed and
  fsync'ed, then ``os.replace`` onto the final name and the directory fsync'ed. A process killed at
  any moment leaves either the old file set or the new one, never a half-written checkpoint under a
  checkpoint name (only a stray ``.tmp`` file, which :func:`remove_stale_temporaries` clears).
- :func:`load_checkpoint` reads with ``torch.load(weights_only=True)``, so a file crafted to run code
  when unpickled is refused before anything runs; truncated files and files written for another
  model configuration are refused with a :class:`CheckpointError` that says what is wrong.
- Run directories hold ``ckpt-<step>.pt`` files; :func:`latest_checkpoint` finds the newest complete
  one and :func:`prune_checkpoints` keeps the last K.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch

from .files import TMP_PREFIX as _TMP_PREFIX, CheckpointWriteError, atomic_write_bytes

__all__ = [
    "CheckpointError", "CheckpointWriteError", "FORMAT", "VERSION", "save_checkpoint", "load_checkpoint",
    "check_config", "checkpoint_path", "list_checkpoints", "latest_checkpoint", "prune_checkpoints",
    "remove_stale_temporaries", "resolve_checkpoint", "load_model", "load_averages", "check_run_dir",
]

FORMAT = "sdeflow-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, unsafe or for another model."""


def save_checkpoint(path, state: dict) -> Path:
    """Serialise ``state`` (tensors and plain containers only) and write it atomically to ``path``.

    The whole file is built in memory first so that a serialisation error never touches the disk.
    Returns the path. Raises :class:`CheckpointWriteError` when the disk refuses the write.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def load_checkpoint(path, *, expected_config: dict | None = None, map_location="cpu") -> dict:
    """Load a checkpoint safely (``torch.load(weights_only=True)``) and validate it.

    Raises :class:`CheckpointError` with a one-line reason when the file is missing, truncated or
    corrupt, holds objects other than tensors and plain containers (a pickle that would import or
    call anything is refused before it runs), is not an sdeflow checkpoint, or — when
    ``expected_config`` is given — was written for another model configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in first or "Unsupported global" in str(err) or "GLOBAL" in str(err):
            raise CheckpointError(
                f"checkpoint {path} was refused: it holds objects other than tensors and plain "
                f"containers, which could run code when loaded (loaded with weights_only=True)") from None
        raise CheckpointError(f"checkpoint {path} is corrupt ({first}); use another checkpoint") from None
    except Exception as err:  # garbage bytes reach the unpickler's every error path (IndexError, ...)
        text = str(err).strip().split(". ")[0][:120] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err).lower() or "Unsupported global" in str(err):
            raise CheckpointError(
                f"checkpoint {path} was refused: it holds objects other than tensors and plain "
                f"containers, which could run code when loaded (loaded with weights_only=True)") from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({text}); "
                              f"use an earlier checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an sdeflow checkpoint (no '{FORMAT}' format tag)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')!r}; "
                              f"this sdeflow reads version {VERSION}")
    for key in ("config", "step", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks its '{key}' entry")
    if expected_config is not None:
        check_config(state["config"], expected_config, source=str(path))
    return state


def _flatten(config, prefix=""):
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(config, (list, tuple)):
        return {prefix[:-1]: list(config)}
    return {prefix[:-1]: config}


def check_config(stored: dict, expected: dict, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` listing every entry where ``stored`` and ``expected`` differ."""
    a, b = _flatten(stored), _flatten(expected)
    diffs = [f"{key}: checkpoint has {a.get(key)!r}, asked for {b.get(key)!r}"
             for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    if diffs:
        raise CheckpointError(f"{source} was written for another model configuration ("
                              + "; ".join(diffs) + ")")


def checkpoint_path(run_dir, step: int) -> Path:
    """RUN/ckpt-<step, 8 digits>.pt: names sort by step."""
    return Path(run_dir) / f"ckpt-{int(step):08d}.pt"


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir) -> Path | None:
    """The newest checkpoint in ``run_dir`` (by step), or None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints; returns the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    found = list_checkpoints(run_dir)
    removed = []
    for _, path in found[:-keep]:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def remove_stale_temporaries(run_dir) -> list[Path]:
    """Remove half-written temporary files left by a process killed while saving."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for entry in run_dir.glob(f"{_TMP_PREFIX}*.tmp"):
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def check_run_dir(run_dir, resume: bool) -> Path | None:
    """The newest checkpoint of ``run_dir`` when ``resume`` (None for a fresh run), after checking that
    the run can start there: ValueError if ``run_dir`` is a file, if a fresh run would write over its
    checkpoints, or if there is nothing to resume. The one place these rules are written (the training
    loop and ``sdeflow train`` apply them before any work is spent)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir {run_dir} exists and is not a directory")
    existing = latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise ValueError(f"{run_dir} already holds checkpoints (latest {existing.name}); resume to continue "
                         f"that run or choose another run directory")
    if resume and existing is None:
        raise ValueError(f"no checkpoint to resume from in {run_dir}; start a fresh run instead")
    return existing


def resolve_checkpoint(path) -> Path:
    """A ``ckpt-*.pt`` file, or the newest one in a run directory; ``ValueError`` if there is none."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"checkpoint {path} is a folder with no ckpt-*.pt file")
        return latest
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    return path


@torch.no_grad()
def load_averages(model: torch.nn.Module, averages: dict) -> None:
    """Copy the averaged parameters ``averages`` ({name: tensor}, an EMA's state) into ``model``'s
    parameters; CheckpointError if the names do not match the model's."""
    own = dict(model.named_parameters())
    if set(own) != set(averages):
        raise CheckpointError("EMA entries of the checkpoint do not match the model's parameters")
    for name, value in averages.items():
        own[name].copy_(value)


def load_model(path, *, use_ema: bool = True, device="cpu", expected_config: dict | None = None):
    """Build the model stored in checkpoint ``path`` (a file or a run directory: its newest; EMA
    weights unless ``use_ema=False``). Returns (model in eval mode, its configuration, its step)."""
    from ..config import build_model

    path = resolve_checkpoint(path)
    state = load_checkpoint(path, expected_config=expected_config)
    config = state["config"]
    try:
        model = build_model(config)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an unusable model configuration ({err})") from None
    try:
        model.load_state_dict(state["model"])
        if use_ema:
            if state.get("ema") is None:
                raise CheckpointError(f"checkpoint {path} has no EMA weights; load it with use_ema=False")
            load_averages(model, state["ema"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit its own model configuration ({first})") from None
    return model.to(device).eval(), config, int(state["step"])
