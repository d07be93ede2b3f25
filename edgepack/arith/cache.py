"""A content-addressed store of measurements made under emulation.

Emulating a class costs seconds per variant; rebuilding the same project (the usual edit
loop, and a test suite) would pay it again for the same bytes. A measurement is reused
only when everything that determines it is identical: the model file's sha256, the
validation and golden inputs' sha256, the class, how it was measured, the engine's
version and this store's format. So a reused number *was* measured, on exactly these
inputs; the build report marks it ``cached``.

Entries are written atomically (temp file in the same directory, fsync, rename) and a
damaged entry is ignored and re-measured.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

__all__ = ["MeasurementCache", "default_cache_dir"]

# 2: Numerics carries per-output and task results.
# 3: and the paired counts (class_samples, agreed, fp32_only, candidate_only) the gates decide on.
FORMAT = 3


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "edgepack" / "measurements"


def _digest_feed(feed: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(feed):
        a = np.ascontiguousarray(feed[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(memoryview(a).cast("B") if a.size else b"")
    return h.hexdigest()


def dataset_digest(dataset, batch: int) -> str:
    """sha256 over every validation batch as the build feeds it (streamed, bounded memory)."""
    h = hashlib.sha256()
    for start, feed in dataset.batches(batch):
        h.update(f"{start}:{_digest_feed(feed)}".encode())
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


class MeasurementCache:
    """Numerics and golden outputs of one (model, data, class, method, engine) measurement."""

    def __init__(self, root: Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def key(self, model_bytes: bytes, data: str, golden_feed: dict, klass: str, how: str, engine: str) -> str:
        import onnxruntime

        parts = [str(FORMAT), hashlib.sha256(model_bytes).hexdigest(), data, _digest_feed(golden_feed), klass, how, engine,
                 onnxruntime.__version__]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def get(self, key: str):
        from ..optimize.evaluate import Numerics

        if self.root is None:
            return None
        path = self.root / f"{key}.npz"
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(bytes(npz["meta"]).decode())
                golden = [npz[f"golden{i}"] for i in range(meta["golden"])]
            return Numerics(**meta["numerics"]), golden
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, numerics, golden: list[np.ndarray]) -> None:
        if self.root is None:
            return
        meta = {"numerics": asdict(numerics), "golden": len(golden)}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 **{f"golden{i}": g for i, g in enumerate(golden)})
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".npz")
            with os.fdopen(fd, "wb") as f:
                f.write(buffer.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / f"{key}.npz")
        except OSError:
            pass  # a read-only home only costs the next build the emulation again
