"""Atomic file replacement: temp file in the same directory, fsync, os.replace."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from edgepack_runtime._fs import fsync_dir

from .errors import OutputError


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[BinaryIO]:
    """Open a temp file next to ``path``; on clean exit it replaces ``path`` atomically.

    On any exception the temp file is removed and ``path`` is left untouched, so a
    reader never sees a partial file.

    Raises:
        OutputError: The directory does not exist or is not writable.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise OutputError(f"Cannot write {target}: directory {directory} does not exist. Create it or choose another output path.")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"Cannot write {target}: {exc.strerror}. Choose a writable output path.") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    try:
        with atomic_writer(path, mode) as handle:
            handle.write(data)
    except OSError as exc:
        raise OutputError(f"Cannot write {path}: {exc.strerror or exc}. Choose a writable output path.") from exc
