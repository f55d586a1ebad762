"""What sdeflow keeps on disk: files written whole or not at all (:mod:`~sdeflow.storage.files`) and
checkpoints and run directories (:mod:`~sdeflow.storage.checkpoints`: safe loading, the newest
complete checkpoint, pruning, and a model rebuilt from its checkpoint)."""

from .files import CheckpointWriteError, atomic_write_bytes
from .checkpoints import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, load_model,
                          save_checkpoint)

__all__ = ["atomic_write_bytes", "CheckpointWriteError", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "list_checkpoints", "latest_checkpoint", "load_model"]
