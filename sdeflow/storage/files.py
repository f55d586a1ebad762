"""Files that are whole or absent: every write of sdeflow (checkpoints, JSON, figures, caches) goes
through :func:`atomic_write_bytes`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "CheckpointWriteError", "TMP_PREFIX"]

#: The prefix of a write's temporary file (run directories clear stale ones on resume).
TMP_PREFIX = ".ckpt-writing-"


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, directory unwritable); the previous files are intact.

    ``errno`` is the operating system's error number; ``str()`` is the one-line message."""

    def __init__(self, errno_: int | None, message: str):
        super().__init__(errno_, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk; not every OS allows
    # opening a directory, which is harmless to skip.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    Raises :class:`CheckpointWriteError` (an ``OSError``) naming the path if any step fails; the
    temporary file is removed and whatever ``path`` held before is untouched.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_directory(directory)
    except OSError as err:
        reason = err.strerror or str(err)
        raise CheckpointWriteError(err.errno, f"could not write {path}: {reason}") from err
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
