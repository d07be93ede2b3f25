"""Content-addressed blob directory: ``<dir>/sha256/<aa>/<digest>``.

Writes go to a temp file in the same directory, are fsynced and renamed into place
(then the directory is fsynced), so a blob either exists complete or not at all.
Deltas are cached under ``<dir>/deltas/<from>.<to>.zst`` with the same discipline.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Optional

from ..errors import ServerError

__all__ = ["BlobStore", "iter_file_range", "parse_range"]

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def parse_range(header: Optional[str], size: int) -> Optional[tuple[int, int]]:
    """Parse a single ``Range: bytes=…`` header into an inclusive (start, end).

    Returns None when there is no usable range (serve the whole file).

    Raises:
        ValueError: The range cannot be satisfied (answer 416).
    """
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not match or (not match.group(1) and not match.group(2)):
        return None  # multiple or malformed ranges: RFC 9110 lets us ignore them
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if start >= size or (last and int(last) < start):
            raise ValueError("unsatisfiable range")
        return start, end
    suffix = int(last)
    if suffix == 0 or size == 0:
        raise ValueError("unsatisfiable range")
    return max(0, size - suffix), size - 1


def iter_file_range(path: Path, start: int, end: int) -> Iterator[bytes]:
    """Yield bytes ``start..end`` (inclusive) of a file in 1 MiB chunks (nothing if end < start)."""
    with open(path, "rb") as fh:
        fh.seek(start)
        remaining = end - start + 1
        while remaining > 0:
            chunk = fh.read(min(_CHUNK, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


class BlobStore:
    """Blobs named by the sha256 of their bytes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("sha256", "deltas", "tmp"):
            try:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ServerError(f"Cannot create the blob directory {self.root / sub}: {exc.strerror or exc}.") from exc
        self.swept = self.sweep_orphans()

    def sweep_orphans(self) -> int:
        """Delete temp files no live writer holds: the ``.part`` of an upload whose server was killed.

        A writer holds an exclusive ``flock`` on its temp file for as long as it writes
        (:meth:`temp_file`), and the kernel drops it when the process dies. So a file whose
        lock can be taken belongs to nobody, even with other replicas sharing this store
        and uploading right now. Returns how many files were deleted.
        """
        removed = 0
        for path in (self.root / "tmp").glob("*.part"):
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue  # gone already (adopted or removed by its writer)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # a live upload
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        return removed

    def path(self, digest: str) -> Path:
        if not _DIGEST_RE.fullmatch(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / "sha256" / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    @contextlib.contextmanager
    def temp_file(self) -> Iterator[tuple[BinaryIO, Path]]:
        """A temp file inside the store (same filesystem, so adopt() is a rename); removed unless adopted."""
        while True:
            fd, name = tempfile.mkstemp(dir=self.root / "tmp", suffix=".part")
            # Held until the file is closed: marks it live for sweep_orphans in other processes.
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                break
            os.close(fd)  # a sweeper took it between mkstemp and flock: make another
        path = Path(name)
        try:
            with os.fdopen(fd, "w+b") as fh:
                yield fh, path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def adopt(self, temp_path: Path, digest: str) -> Path:
        """Move a fully written and fsynced temp file into place as blob ``digest``."""
        target = self.path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(temp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(temp_path, target)
        _fsync_dir(target.parent)
        return target

    def put_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self.exists(digest):
            with self.temp_file() as (fh, path):
                fh.write(data)
                fh.flush()
                self.adopt(path, digest)
        return digest

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    # ----------------------------------------------------------------- deltas

    def delta_path(self, from_digest: str, to_digest: str) -> Path:
        for d in (from_digest, to_digest):
            if not _DIGEST_RE.fullmatch(d):
                raise ValueError(f"not a sha256 digest: {d!r}")
        return self.root / "deltas" / f"{from_digest}.{to_digest}.zst"

    def delta_marker(self, from_digest: str, to_digest: str) -> Path:
        """Exists when a delta was computed and found not worth offering."""
        return self.delta_path(from_digest, to_digest).with_suffix(".none")

    def write_atomic(self, target: Path, data: bytes) -> None:
        with self.temp_file() as (fh, path):
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            os.replace(path, target)
        _fsync_dir(target.parent)
