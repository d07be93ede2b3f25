"""zstd "patch-from" deltas between bundles, computed lazily and cached.

A delta is one zstd frame compressed with the OLD bundle as a raw-content
dictionary. To apply it (this is all the device client needs, with ``zstandard``)::

    d = zstandard.ZstdCompressionDict(old_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    new = zstandard.ZstdDecompressor(dict_data=d, max_window_size=2**31).decompress(delta)
    assert hashlib.sha256(new).hexdigest() == expected_digest  # else: full download

The frame records the content size, so ``decompress`` needs no output size hint.
Deltas are offered only when smaller than half of the full bundle.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import zstandard

from .blobs import BlobStore

__all__ = ["DeltaInfo", "MAX_DELTA_INPUT", "MAX_WINDOW_SIZE", "apply_delta", "ensure_delta", "make_delta"]

MAX_WINDOW_SIZE = 2**31
MAX_DELTA_INPUT = 1 << 30  # bundles above 1 GiB are always sent whole
_LEVEL = 6
_DIGESTS: dict = {}  # delta path -> (sha256, size); deltas are immutable once written


def _log2_ceil(n: int) -> int:
    return max(10, (max(n, 1) - 1).bit_length())


def make_delta(old: bytes, new: bytes) -> bytes:
    """Compress ``new`` with ``old`` as raw-content dictionary (zstd patch-from)."""
    window_log = min(31, _log2_ceil(len(old) + len(new)))
    table_log = min(30, _log2_ceil(len(old)) + 1)
    params = zstandard.ZstdCompressionParameters.from_level(
        _LEVEL, window_log=window_log, hash_log=table_log, chain_log=table_log, enable_ldm=True,
        write_content_size=True, write_checksum=True,
    )
    dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params).compress(new)


def apply_delta(old: bytes, delta: bytes) -> bytes:
    """Rebuild the new bundle from the old one and a delta (the client's 3 lines)."""
    dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=MAX_WINDOW_SIZE).decompress(delta)


@dataclass(frozen=True)
class DeltaInfo:
    from_digest: str
    to_digest: str
    digest: str
    size: int


def ensure_delta(blobs: BlobStore, from_digest: str, to_digest: str) -> Optional[DeltaInfo]:
    """Return the cached delta from→to, computing it on first use; None if not worth it.

    A delta is "worth it" when it is smaller than half the full new bundle and it
    round-trips to the exact new digest (checked once, when it is computed).
    """
    if from_digest == to_digest or not (blobs.exists(from_digest) and blobs.exists(to_digest)):
        return None
    path, marker = blobs.delta_path(from_digest, to_digest), blobs.delta_marker(from_digest, to_digest)
    if marker.exists():
        return None
    if not path.exists():
        full = blobs.size(to_digest)
        if blobs.size(from_digest) > MAX_DELTA_INPUT or full > MAX_DELTA_INPUT:
            return None
        old, new = blobs.read(from_digest), blobs.read(to_digest)
        delta = make_delta(old, new)
        ok = len(delta) * 2 < full and hashlib.sha256(apply_delta(old, delta)).hexdigest() == to_digest
        if not ok:
            blobs.write_atomic(marker, b"")
            return None
        blobs.write_atomic(path, delta)
    known = _DIGESTS.get(path)
    if known is None:
        data = path.read_bytes()
        known = _DIGESTS[path] = (hashlib.sha256(data).hexdigest(), len(data))
    return DeltaInfo(from_digest, to_digest, known[0], known[1])
