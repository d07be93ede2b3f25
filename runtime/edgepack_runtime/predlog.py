"""Prediction log: sampled inputs/outputs and ground-truth labels in a size-capped ring.

Layout: ``DIR/<12-digit sequence>.eplog`` segment files, oldest first. Each segment
is a run of self-delimiting records::

    b"EPLR" | u32 payload length | u32 crc32(payload) | payload          (little endian)
    payload = u32 meta length | meta (UTF-8 JSON) | .npy blobs named by meta["arrays"]

``meta["kind"]`` is ``"prediction"`` (``id``, ``t``, ``model``, ``arrays`` as
``[["input"|"output", name, nbytes], ...]``) or ``"label"`` (``id``, ``t``,
``label``). A crash can only leave a torn record at the *end* of the segment being
written; readers stop reading that segment at the first record that is short or
fails its CRC and go on with the next one, and a restarted writer always opens a new
segment, so a torn tail never blocks reading. The ring deletes whole segments,
oldest first, so the directory stays at or under its byte cap.

Writing happens on one background thread fed by a bounded queue; when the queue is
full a sampled prediction is dropped (and counted) rather than slowing a request.
"""

from __future__ import annotations

import io
import json
import queue
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

MAGIC = b"EPLR"
_HEAD = struct.Struct("<4sII")
_META = struct.Struct("<I")
SUFFIX = ".eplog"
MAX_RECORD_BYTES = 256 * 1024**2


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_record(meta: Dict[str, Any], arrays: List[Tuple[str, str, np.ndarray]] = ()) -> bytes:
    """One framed record; ``arrays`` are (role, name, array) with role input/output."""
    blobs = [_npy(a) for _, _, a in arrays]
    meta = dict(meta, arrays=[[role, name, len(b)] for (role, name, _), b in zip(arrays, blobs)])
    meta_bytes = json.dumps(meta, separators=(",", ":"), allow_nan=False, default=str).encode()
    payload = b"".join([_META.pack(len(meta_bytes)), meta_bytes, *blobs])
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes, with_arrays: bool) -> Dict[str, Any]:
    (meta_len,) = _META.unpack_from(payload, 0)
    meta = json.loads(payload[_META.size:_META.size + meta_len])
    record: Dict[str, Any] = {k: v for k, v in meta.items() if k != "arrays"}
    if meta.get("kind") == "prediction":
        record["inputs"], record["outputs"] = {}, {}
        if with_arrays:
            offset = _META.size + meta_len
            for role, name, size in meta.get("arrays", []):
                blob = payload[offset:offset + size]
                offset += size
                target = record["inputs"] if role == "input" else record["outputs"]
                target[name] = np.lib.format.read_array(io.BytesIO(blob), allow_pickle=False)
    return record


def read_segment(path: Path, with_arrays: bool = True) -> Iterator[Dict[str, Any]]:
    """Records of one segment, stopping quietly at a torn or corrupt tail."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return
    pos = 0
    while pos + _HEAD.size <= len(data):
        magic, length, crc = _HEAD.unpack_from(data, pos)
        start = pos + _HEAD.size
        if magic != MAGIC or length > len(data) - start:
            return
        payload = data[start:start + length]
        if zlib.crc32(payload) != crc:
            return
        try:
            yield _decode_payload(payload, with_arrays)
        except (ValueError, KeyError, TypeError, struct.error, EOFError):
            pass  # well-framed but unreadable: skip just this record
        pos = start + length


def segments(directory: Path) -> List[Tuple[int, Path]]:
    """(sequence, path) of the ring's segments, oldest first."""
    found = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return []
    for path in entries:
        if path.suffix == SUFFIX and path.stem.isdigit():
            found.append((int(path.stem), path))
    return sorted(found)


def read_log(directory: Path, with_arrays: bool = True) -> Iterator[Dict[str, Any]]:
    """Every readable record of the ring, oldest first."""
    for _, path in segments(directory):
        yield from read_segment(path, with_arrays)


def labeled(directory: Path) -> List[Tuple[Dict[str, Any], Any]]:
    """(prediction record, latest label) for every logged prediction that has a label."""
    predictions: Dict[str, Dict[str, Any]] = {}
    labels: Dict[str, Any] = {}
    for record in read_log(directory):
        if record.get("kind") == "prediction":
            predictions[record["id"]] = record
        elif record.get("kind") == "label":
            labels[record["id"]] = record.get("label")
    return [(predictions[i], label) for i, label in labels.items() if i in predictions]


class UnknownPrediction(KeyError):
    """A label names an id that is not (or no longer) in the log."""


class PredictionLog:
    """Writer side of the ring. Thread-safe; all disk writes happen on one thread.

    Args:
        directory: Where segments live (created if missing).
        max_bytes: Cap on the total size of all segments.
        sample: Share of predictions to record (0..1).
        queue_size: Records waiting for the writer before new ones are dropped.
    """

    def __init__(self, directory: Path, max_bytes: int, sample: float, queue_size: int = 1024) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max(int(max_bytes), 1024)
        self.segment_bytes = max(self.max_bytes // 8, min(4096, self.max_bytes))
        self.sample = min(max(float(sample), 0.0), 1.0)
        self._queue: "queue.Queue[Optional[Tuple[str, Any]]]" = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._ids: Dict[str, int] = {}  # logged prediction id -> segment sequence (-1: queued)
        self._segment_ids: Dict[int, List[str]] = {}
        self._sizes: Dict[int, int] = {}
        self.records = 0
        self.labels = 0
        self.dropped = 0
        self.write_errors = 0
        self.last_error: Optional[str] = None
        for seq, path in segments(self.directory):
            try:
                self._sizes[seq] = path.stat().st_size
            except OSError:
                continue
            ids = self._segment_ids.setdefault(seq, [])
            for record in read_segment(path, with_arrays=False):
                if record.get("kind") == "prediction" and isinstance(record.get("id"), str):
                    self._ids[record["id"]] = seq
                    ids.append(record["id"])
        # Never append to a segment a crash may have torn: always start a new one.
        self._seq = max(self._sizes, default=0) + 1
        self._file = None
        self._thread = threading.Thread(target=self._run, name="edgepack-predlog", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ callers

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def log(self, prediction_id: str, model: Mapping[str, Any], inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> bool:
        """Queue one prediction; False when it was dropped because the writer is behind."""
        with self._lock:
            self._ids[prediction_id] = -1
        try:
            self._queue.put_nowait(("prediction", (prediction_id, time.time(), model, inputs, outputs)))
            return True
        except queue.Full:
            with self._lock:
                self._ids.pop(prediction_id, None)
                self.dropped += 1
            return False

    def knows(self, prediction_id: str) -> bool:
        with self._lock:
            return prediction_id in self._ids

    def label(self, prediction_id: str, label: Any) -> None:
        """Record ground truth for a logged prediction.

        Raises:
            UnknownPrediction: The id was never logged or has rotated out of the ring.
            queue.Full: The writer is too far behind (retry later).
        """
        if not self.knows(prediction_id):
            raise UnknownPrediction(prediction_id)
        self._queue.put(("label", (prediction_id, time.time(), label)), timeout=2.0)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is on disk (True) or ``timeout`` passes."""
        done = threading.Event()
        try:
            self._queue.put(("flush", done), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (bounded wait) and stop the writer."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            return {
                "dir": str(self.directory), "sample": self.sample, "max_bytes": self.max_bytes,
                "bytes": sum(self._sizes.values()), "segments": len(self._sizes), "ids": len(self._ids),
                "records": self.records, "labels": self.labels, "dropped": self.dropped,
                "write_errors": self.write_errors, "last_error": self.last_error,
            }

    # ------------------------------------------------------------- writer

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            kind, data = item
            if kind == "flush":
                data.set()
                continue
            try:
                if kind == "prediction":
                    pid, t, model, inputs, outputs = data
                    arrays = [("input", k, v) for k, v in inputs.items()] + [("output", k, v) for k, v in outputs.items()]
                    record = encode_record({"kind": "prediction", "id": pid, "t": t, "model": dict(model)}, arrays)
                else:
                    pid, t, label = data
                    record = encode_record({"kind": "label", "id": pid, "t": t, "label": label})
                self._append(pid if kind == "prediction" else None, record)
                with self._lock:
                    if kind == "prediction":
                        self.records += 1
                    else:
                        self.labels += 1
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop serving
                with self._lock:
                    self.write_errors += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    if kind == "prediction":
                        self._ids.pop(data[0], None)
        if self._file is not None:
            self._file.close()
            self._file = None

    def _append(self, pid: Optional[str], record: bytes) -> None:
        size = len(record)
        if size > self.max_bytes or size > MAX_RECORD_BYTES:
            raise ValueError(f"record of {size} bytes exceeds the log cap of {self.max_bytes} bytes")
        current = self._sizes.get(self._seq, 0)
        if self._file is not None and current and current + size > self.segment_bytes:
            self._file.close()
            self._file = None
            self._seq += 1
        # Make room: drop whole segments, oldest first, until the record fits under the cap.
        while sum(self._sizes.values()) + size > self.max_bytes:
            oldest = min(self._sizes)
            if oldest == self._seq:
                if self._file is not None:
                    self._file.close()
                    self._file = None
                self._seq += 1
            self._delete(oldest)
        if self._file is None:
            self._file = open(self.directory / f"{self._seq:012d}{SUFFIX}", "ab", buffering=0)
            with self._lock:
                self._sizes.setdefault(self._seq, 0)
        view = memoryview(record)
        while view:
            written = self._file.write(view)
            view = view[written:]
        with self._lock:
            self._sizes[self._seq] = self._sizes.get(self._seq, 0) + size
            if pid is not None:
                if pid in self._ids:  # not rotated out while queued
                    self._ids[pid] = self._seq
                    self._segment_ids.setdefault(self._seq, []).append(pid)

    def _delete(self, seq: int) -> None:
        try:
            (self.directory / f"{seq:012d}{SUFFIX}").unlink()
        except FileNotFoundError:
            pass
        with self._lock:
            self._sizes.pop(seq, None)
            for pid in self._segment_ids.pop(seq, []):
                if self._ids.get(pid) == seq:
                    del self._ids[pid]
