"""Crash-safe file replacement for the device (temp file, fsync, rename, fsync dir)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional


def fsync_dir(directory: Path) -> None:
    """Make a rename or new entry in ``directory`` durable (best effort where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, before_replace: Optional[Callable[[], None]] = None) -> None:
    """Replace ``path`` with ``data`` so a reader (or a reboot) sees old or new, never half.

    ``before_replace`` runs once the temp file is written and fsynced, just before the
    rename (the power-loss tests stop the process there).

    Raises:
        OSError: Writing failed; ``path`` is unchanged and no temp file remains.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
