"""The build's last step: the written bundle must pass ``edgepack verify`` before it exists.

The bundle is signed into a hidden temp file next to its destination, checked with
:func:`edgepack.bundle.check.check_bundle` (exactly what ``edgepack verify`` runs:
signature, member hashes, golden vectors on this host) and only then renamed into
place. A bundle that fails is deleted, so a signed bundle that fails its own
verification is never left on disk for someone to publish.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import GateError, OutputError

__all__ = ["write_verified"]


def _verify(path: Path, private_key_path: Any):
    """Check the written bundle with the public half of the key that signed it."""
    from ..bundle import load_private_key, public_key_of
    from ..bundle.check import check_bundle

    return check_bundle(path, public_key_of(load_private_key(private_key_path)))


def write_verified(out: Path, manifest: Mapping[str, Any], members: Mapping[str, Any], private_key_path: Any,
                   source_date_epoch: int | None, progress: Callable[[str], None] = lambda _: None) -> Path:
    """Sign and write ``out`` only if the written file verifies.

    Raises:
        GateError: The written bundle failed verification (nothing is left at ``out``'s
            temp path; an older file at ``out`` is untouched).
        OutputError: The bundle cannot be written.
    """
    from edgepack_runtime._fs import fsync_dir

    from ..bundle import write_bundle

    out = Path(out)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".unverified", dir=out.parent)
    except OSError as exc:
        raise OutputError(f"Cannot write bundle {out}: {exc.strerror or exc}. Choose a writable output directory.") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        write_bundle(tmp, manifest, members, private_key_path, source_date_epoch)
        progress("Verifying the written bundle")
        checked = _verify(tmp, private_key_path)
        if not checked.verified:
            raise GateError("The written bundle failed its own verification (what `edgepack verify` checks), so it was "
                            "deleted and nothing was written: " + "; ".join(checked.problems)
                            + ". This is a build defect; report it with the build log.")
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(out.parent)
    return out
