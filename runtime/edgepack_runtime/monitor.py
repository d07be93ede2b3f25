"""Windowed monitoring summaries: what leaves the device in check-ins (stdlib + numpy).

:class:`Monitor` keeps, for the model being served, per check-in window:

* ``inputs``: per raw input and feature (column of ``[N, F]``, channel = last axis of
  ``[N, ..., C]``, or all values of a 1-D input: the same split as the bundle's
  ``stats/reference.json``), counts of live values in the reference's decile bins.
  ``edges`` are the reference quantile edges with duplicates merged (discrete data);
  ``counts`` has ``len(edges) + 1`` entries with "upper bound inclusive" buckets::

      counts[0]  values <= edges[0]              (below the reference min, or at it)
      counts[i]  edges[i-1] < value <= edges[i]
      counts[-1] values >  edges[-1]             (above the reference max)

  so the reference share of bucket ``i`` is ``(last index of edges[i] in the 11
  reference quantiles) / 10`` minus the same for ``edges[i-1]`` (0 for bucket 0 of
  continuous data; the tail bucket's share is 0). Non-finite values count as
  ``missing``; ``sampled`` = values examined (``sum(counts) + missing``). Per record,
  at most :data:`VALUES_PER_RECORD` values per feature are examined, taken at a fixed
  stride from the start, so a 224x224 image costs microseconds.
* ``outputs``: predicted-class counts (arg-max of the first float output shaped
  ``[N, C]``, keyed like the reference ``class_distribution``) and a histogram of the
  top-1 confidence over the reference ``confidence_histogram`` edges (``counts`` has
  ``len(edges) - 1`` entries, ``numpy.histogram`` semantics; confidence = the row's max
  when the row is already a probability vector, else the max of its softmax, as in
  the reference).
* ``latency_ms`` (model run time; count and max exact, p50/p95 over a uniform
  reservoir of ``max_samples_per_window`` samples), ``errors`` by kind, ``rejects``
  (inputs refused by validation) by field.
* ``shadow``: agreement and latency of a candidate bundle run beside the served one
  (:class:`Shadow`), or null.
* ``labels``: ground truth posted for logged predictions (:class:`LabelQueue`), at
  most :data:`MAX_LABELS_PER_CHECKIN`; they stay queued until the server acknowledged
  the check-in that carried them.

Nothing raw (no input values, no outputs) is ever part of a summary.
"""

from __future__ import annotations

import math
import queue
import random
import threading
import time
from collections import deque
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

VERSION = 1
#: Values per feature examined per record (fixed stride from the first).
VALUES_PER_RECORD = 256
#: Records folded into the window at once.
FOLD_EVERY = 256
#: Labels carried by one check-in.
MAX_LABELS_PER_CHECKIN = 100
#: Labels waiting on the device before the oldest are dropped.
MAX_PENDING_LABELS = 10000
#: Distinct reject fields / error kinds tracked per window (then "other").
MAX_KINDS = 32
_DEFAULT_CONF_EDGES = [i / 10 for i in range(11)]


def _round(value: Optional[float], digits: int = 4) -> Optional[float]:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def _percentile(sorted_values: Sequence[float], q: float) -> Optional[float]:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, int(math.ceil(q * len(sorted_values))) - 1))]


def feature_matrix(array: np.ndarray) -> np.ndarray:
    """``[values, features]`` view of one raw input, split like the reference statistics."""
    if array.ndim <= 1:
        return array.reshape(-1, 1)
    if array.ndim == 2:
        return array
    return array.reshape(-1, array.shape[-1])


def sample_rows(matrix: np.ndarray, limit: int = VALUES_PER_RECORD) -> np.ndarray:
    """At most ``limit`` rows of ``matrix``: every ``ceil(n / limit)``-th from the first."""
    n = matrix.shape[0]
    if n <= limit:
        return matrix
    return matrix[:: -(-n // limit)]


_TAKE: Dict[Tuple[int, int, int], np.ndarray] = {}
_random = random.random


def _sample(array: np.ndarray) -> np.ndarray:
    """What one record keeps of an input until the next fold: its feature matrix when small
    (a view: the daemon never modifies validated inputs), else a copy of every k-th row
    (see :func:`sample_rows`), so a large input is never kept alive."""
    if array.ndim <= 2:
        matrix = array if array.ndim == 2 else array.reshape(-1, 1)
        return matrix if matrix.shape[0] <= VALUES_PER_RECORD else sample_rows(matrix).copy()
    width = array.shape[-1]
    n = array.size // width if width else 0
    if n <= VALUES_PER_RECORD:
        return array.reshape(n, width).copy()
    step = -(-n // VALUES_PER_RECORD)
    key = (n, width, step)
    index = _TAKE.get(key)
    if index is None:
        if len(_TAKE) > 64:
            _TAKE.clear()
        index = _TAKE[key] = (np.arange(0, n, step, dtype=np.intp) * width)[:, None] + np.arange(width, dtype=np.intp)
    return array.reshape(-1).take(index)


def class_output(outputs: Mapping[str, Any]) -> Optional[str]:
    """Name of the first float output shaped [N, C]."""
    for name, value in outputs.items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.ndim == 2:
            return name
    return None


def confidences(scores: np.ndarray) -> np.ndarray:
    """Top-1 confidence per row (the max if rows are probabilities, else of their softmax)."""
    s = scores.astype(np.float64)
    if s.size and np.all(s >= 0) and np.allclose(s.sum(axis=1), 1.0, atol=1e-3):
        return s.max(axis=1)
    shifted = s - s.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=1, keepdims=True)).max(axis=1)


class _Reservoir:
    """Uniform sample of a stream (Algorithm R); count, max and sum exact."""

    __slots__ = ("size", "values", "count", "max", "total")

    def __init__(self, size: int) -> None:
        self.size = max(1, int(size))
        self.values: List[float] = []
        self.count = 0
        self.max = 0.0
        self.total = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            j = int(_random() * self.count)
            if j < self.size:
                self.values[j] = value

    def summary_ms(self) -> Dict[str, Any]:
        lat = sorted(self.values)
        return {"count": self.count, "p50": _round(_percentile(lat, 0.5) * 1000 if lat else None),
                "p95": _round(_percentile(lat, 0.95) * 1000 if lat else None),
                "max": _round(self.max * 1000 if self.count else None)}


class _InputHist:
    """Reference-binned counts of one raw input's features."""

    def __init__(self, name: str, spec: Mapping[str, Any]) -> None:
        self.name = name
        self.per = str(spec.get("per") or "column")
        features = [f for f in spec.get("features") or [] if isinstance(f, Mapping)]
        self.names = [str(f.get("name", i)) for i, f in enumerate(features)]
        self.edges: List[np.ndarray] = []
        for f in features:
            q = [float(v) for v in (f.get("quantiles") or []) if isinstance(v, (int, float)) and math.isfinite(v)]
            self.edges.append(np.unique(np.asarray(q, np.float64)))
        self.nfeat = len(features)
        width = max((len(e) for e in self.edges), default=0)
        self.width = width + 1  # buckets per feature in the flat count array
        self.counts = np.zeros(self.nfeat * self.width, np.int64)
        self._tables: List[Optional[np.ndarray]] = [None] * self.nfeat
        self.missing = np.zeros(self.nfeat, np.int64)
        self.sampled = np.zeros(self.nfeat, np.int64)

    def bucket(self, array: np.ndarray) -> Optional[Tuple[np.ndarray, Optional[np.ndarray], int]]:
        """(flat bucket counts, missing per feature or None, values per feature) of one array."""
        matrix = feature_matrix(array)
        if matrix.shape[1] != self.nfeat or not self.nfeat or array.dtype.kind not in "iufb":
            return None
        x = matrix  # already sampled per record (_sample)
        rows = x.shape[0]
        missing = None
        if x.dtype.kind == "f":
            finite = np.isfinite(x)
            if not finite.all():
                missing = (~finite).sum(axis=0)
            else:
                finite = None
        else:
            finite = None
        counts = np.zeros(self.counts.size, np.int64)
        small_int = x.dtype.kind in "ub" and x.dtype.itemsize == 1
        for j in range(self.nfeat):
            column = x[:, j]
            if finite is not None:
                column = column[finite[:, j]]
            if small_int:  # uint8/bool: one table lookup per value instead of a search
                table = self._tables[j]
                if table is None:
                    table = self._tables[j] = np.searchsorted(self.edges[j], np.arange(256, dtype=np.float64), side="left")
                idx = table.take(column)
            else:
                idx = np.searchsorted(self.edges[j], column, side="left")  # edges strictly below the value
            base = j * self.width
            counts[base: base + len(self.edges[j]) + 1] += np.bincount(idx, minlength=len(self.edges[j]) + 1)
        return counts, missing, rows

    def summary(self) -> Dict[str, Any]:
        features = []
        for j, name in enumerate(self.names):
            n = len(self.edges[j])
            base = j * self.width
            features.append({"name": name, "edges": [float(e) for e in self.edges[j]],
                             "counts": [int(c) for c in self.counts[base: base + n + 1]],
                             "missing": int(self.missing[j]), "sampled": int(self.sampled[j])})
        return {"per": self.per, "features": features}

    def reset(self) -> None:
        self.counts[:] = 0
        self.missing[:] = 0
        self.sampled[:] = 0


class LabelQueue:
    """Ground-truth labels waiting to travel with a check-in. Thread-safe, bounded.

    :meth:`peek` shows the oldest ones without removing them; :meth:`ack` removes the
    ones a check-in carried once the server answered it. A check-in that fails leaves
    them queued for the next one.
    """

    def __init__(self, capacity: int = MAX_PENDING_LABELS) -> None:
        self._lock = threading.Lock()
        self._items: "deque[Dict[str, Any]]" = deque(maxlen=max(1, int(capacity)))
        self.dropped = 0

    def add(self, prediction_id: str, label: Any, predicted: Any = None, digest: Optional[str] = None) -> None:
        with self._lock:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append({"id": prediction_id, "label": label, "predicted": predicted, "digest": digest})

    def peek(self, limit: int = MAX_LABELS_PER_CHECKIN) -> List[Dict[str, Any]]:
        with self._lock:
            return [dict(item) for item, _ in zip(self._items, range(max(0, limit)))]

    def ack(self, sent: Sequence[Mapping[str, Any]]) -> int:
        """Remove the labels a delivered check-in carried; returns how many were removed."""
        removed = 0
        with self._lock:
            for label in sent:
                for i, item in enumerate(self._items):
                    if item == label:
                        del self._items[i]
                        removed += 1
                        break
        return removed

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class Shadow:
    """A candidate model run beside the served one on a sample of live inputs.

    :meth:`offer` (request path) samples, then ``put_nowait``s into a bounded queue
    (dropped when full); one background thread runs the candidate and compares its
    arg-max classes (first float [N, C] output; without one, every output to 1e-4)
    with the served answer. It never delays or changes the served answer.

    Args:
        predict: Candidate inference, ``feed -> {output name: array}`` (validates itself).
        digest / variant: What the summary reports.
        sample: Share of live requests also run on the candidate.
        queue_size: Requests waiting for the candidate before new ones are dropped.
    """

    def __init__(self, predict: Callable[[Dict[str, np.ndarray]], Mapping[str, Any]], digest: str, variant: str,
                 sample: float = 1.0, queue_size: int = 16, max_samples: int = 256) -> None:
        self.predict = predict
        self.digest = digest
        self.variant = variant
        self.sample = min(max(float(sample), 0.0), 1.0)
        self._queue: "queue.Queue[Optional[Tuple[Dict[str, np.ndarray], Mapping[str, Any]]]]" = queue.Queue(max(1, queue_size))
        self._lock = threading.Lock()
        self._max_samples = max_samples
        self._done = threading.Condition(self._lock)
        self._pending = 0
        self._reset_locked()
        self._thread = threading.Thread(target=self._run, name="edgepack-shadow", daemon=True)
        self._thread.start()

    def _reset_locked(self) -> None:
        self.predictions = 0
        self.rows = 0
        self.agree = 0
        self.errors = 0
        self.dropped = 0
        self._latency = _Reservoir(self._max_samples)

    def offer(self, feed: Dict[str, np.ndarray], served: Mapping[str, Any]) -> None:
        sample = self.sample
        if sample <= 0.0 or (sample < 1.0 and random.random() >= sample):
            return
        with self._lock:
            self._pending += 1
        try:
            self._queue.put_nowait((feed, served))
        except queue.Full:
            with self._lock:
                self.dropped += 1
                self._pending -= 1

    def _run(self) -> None:
        perf = time.perf_counter
        while True:
            item = self._queue.get()
            if item is None:
                return
            feed, served = item
            t0 = perf()
            try:
                outputs = self.predict(feed)
                elapsed = perf() - t0
                rows, agree = _agreement(served, outputs)
                error = False
            except Exception:  # noqa: BLE001 - a failing candidate is reported, never raised
                elapsed, rows, agree, error = perf() - t0, 0, 0, True
            with self._lock:
                self.predictions += 1
                if error:
                    self.errors += 1
                else:
                    self.rows += rows
                    self.agree += agree
                    self._latency.add(elapsed)
                self._pending -= 1
                self._done.notify_all()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every queued request ran (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
        return True

    def summary(self, reset: bool = True) -> Dict[str, Any]:
        with self._lock:
            lat = sorted(self._latency.values)
            out = {"digest": self.digest, "variant": self.variant, "predictions": self.predictions,
                   "agreement": _round(self.agree / self.rows) if self.rows else None,
                   "p95_ms": _round(_percentile(lat, 0.95) * 1000) if lat else None, "errors": self.errors}
            if reset:
                self._reset_locked()
        return out

    def close(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass


def _agreement(served: Mapping[str, Any], candidate: Mapping[str, Any]) -> Tuple[int, int]:
    """(rows compared, rows that agree)."""
    a, b = class_output(served), class_output(candidate)
    if a is not None and b is not None:
        x, y = served[a], candidate[b]
        if x.shape != y.shape:
            return int(x.shape[0]), 0
        return int(x.shape[0]), int(np.count_nonzero(np.argmax(x, axis=1) == np.argmax(y, axis=1)))
    same = set(served) == set(candidate) and all(
        np.shape(served[k]) == np.shape(candidate[k]) and np.allclose(np.asarray(served[k], np.float64), np.asarray(candidate[k], np.float64), rtol=1e-4, atol=1e-4)
        for k in served)
    return 1, int(same)


class Monitor:
    """Window summaries for one served bundle. Thread-safe; :meth:`record` is cheap.

    Args:
        reference: The bundle's ``stats/reference.json`` (``{}`` when it has none).
        io: The manifest's ``io`` object (output class labels).
        variant_id: The variant being served (selects the reference predictions).
        digest: The bundle's sha256.
        max_samples_per_window: Latency samples kept per window for the percentiles.

    Attributes:
        shadow: A :class:`Shadow` whose summary goes into ``shadow`` (None: null).
        labels: The :class:`LabelQueue` whose oldest labels go into ``labels``; the
            daemon hands the same queue to the next Monitor when the model changes.
    """

    def __init__(self, reference: dict, io: dict, variant_id: str, digest: str, max_samples_per_window: int = 256) -> None:
        reference = reference if isinstance(reference, dict) else {}
        io = io if isinstance(io, dict) else {}
        self.digest = digest
        self.variant = variant_id
        self.max_samples = max(1, int(max_samples_per_window))
        self.shadow: Optional[Shadow] = None
        self.labels = LabelQueue()
        self._lock = threading.Lock()
        self._inputs: Dict[str, _InputHist] = {}
        for name, spec in (reference.get("inputs") or {}).items():
            if isinstance(spec, Mapping):
                self._inputs[str(name)] = _InputHist(str(name), spec)
        self._input_names = tuple(self._inputs)
        pred = (reference.get("predictions") or {}).get(variant_id)
        if not isinstance(pred, Mapping):
            pred = next((p for p in (reference.get("predictions") or {}).values() if isinstance(p, Mapping)), {})
        self._ref_classes = [str(k) for k in (pred.get("class_distribution") or {})]
        edges = (pred.get("confidence_histogram") or {}).get("edges") or _DEFAULT_CONF_EDGES
        self._conf_edges = np.asarray([float(e) for e in edges], np.float64)
        self._io_labels = {str(s.get("name")): s.get("labels") for s in (io.get("outputs") or []) if isinstance(s, Mapping)}
        self._class_name: Any = "unset"
        self._class_labels: Optional[List[str]] = None
        self._pending: "deque[Tuple[Optional[Dict[str, np.ndarray]], Any, float]]" = deque()
        self._fold_lock = threading.Lock()
        self._reset_locked(time.time())

    # ---------------------------------------------------------------- window

    def _reset_locked(self, now: float) -> None:
        self._start = now
        self._predictions = 0
        self._class_counts: Optional[np.ndarray] = None
        self._conf_counts = np.zeros(max(len(self._conf_edges) - 1, 1), np.int64)
        self._latency = _Reservoir(self.max_samples)
        self._errors: Dict[str, int] = {"engine": 0}
        self._rejects: Dict[str, int] = {}
        for hist in self._inputs.values():
            hist.reset()

    # -------------------------------------------------------------- hot path

    def record(self, inputs: dict, outputs: dict, latency_s: float) -> None:
        """One model run: its (validated) inputs, outputs by name, and run time.

        Costs a strided copy of at most :data:`VALUES_PER_RECORD` values per feature (small
        inputs are kept by reference: do not modify them afterwards) and one deque append (no lock); every :data:`FOLD_EVERY` records (and at summary
        time) the pending ones are folded into the window in one vectorized pass.
        """
        sampled = None
        for name in self._input_names:
            array = inputs.get(name)
            if array is not None and type(array) is np.ndarray:
                if sampled is None:
                    sampled = {}
                sampled[name] = _sample(array)
        key = self._class_name
        if key == "unset":
            key = self._class_name = class_output(outputs)
        scores = outputs.get(key) if key is not None else None
        pending = self._pending
        pending.append((sampled, scores, latency_s))
        if len(pending) >= FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        """Fold pending records into the window (vectorized; never raises)."""
        with self._fold_lock:
            items = []
            take = self._pending.popleft
            while True:
                try:
                    items.append(take())
                except IndexError:
                    break
            if not items:
                return
            folded = []
            for name, hist in self._inputs.items():
                arrays = [s[name] for s, _, _ in items if s is not None and name in s]
                if not arrays:
                    continue
                try:
                    got = hist.bucket(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
                except (ValueError, TypeError):
                    got = None
                if got is not None:
                    folded.append((hist, got))
            classes = conf_bins = None
            width = 0
            outs = [o for _, o, _ in items if isinstance(o, np.ndarray) and o.ndim == 2 and o.shape[0] and o.shape[1]]
            if outs:
                width = outs[-1].shape[1]
                outs = [o for o in outs if o.shape[1] == width]
                scores = np.concatenate(outs) if len(outs) > 1 else outs[0]
                try:
                    classes = np.bincount(np.argmax(np.nan_to_num(scores, nan=-np.inf), axis=1), minlength=width)
                    conf_bins = self._conf_bins(confidences(scores))
                except (ValueError, TypeError, FloatingPointError):
                    classes = conf_bins = None
            with self._lock:
                self._predictions += len(items)
                for _, _, latency in items:
                    self._latency.add(float(latency))
                for hist, (counts, missing, rows) in folded:
                    hist.counts += counts
                    hist.sampled += rows
                    if missing is not None:
                        hist.missing += missing
                if classes is not None:
                    if self._class_counts is None or self._class_counts.size != width:
                        self._class_counts = np.zeros(width, np.int64)
                        self._class_labels = self._labels_for(self._class_name, width)
                    self._class_counts += classes
                if conf_bins is not None:
                    self._conf_counts += conf_bins

    def record_reject(self, field: str) -> None:
        """An input refused by validation (it never reached the model)."""
        with self._lock:
            _bump(self._rejects, str(field))

    def record_error(self, kind: str) -> None:
        """A model run that failed (``"engine"``) or another error kind."""
        with self._lock:
            _bump(self._errors, str(kind))

    # --------------------------------------------------------------- helpers

    def _conf_bins(self, conf: np.ndarray) -> Optional[np.ndarray]:
        edges = self._conf_edges
        if len(edges) < 2:
            return None
        conf = conf[np.isfinite(conf)]
        idx = np.clip(np.searchsorted(edges, np.clip(conf, edges[0], edges[-1]), side="right") - 1, 0, len(edges) - 2)
        return np.bincount(idx, minlength=len(edges) - 1)

    def _labels_for(self, output: Optional[str], width: int) -> List[str]:
        labels = self._io_labels.get(str(output)) if output is not None else None
        if isinstance(labels, list) and len(labels) == width:
            return [str(v) for v in labels]
        if len(self._ref_classes) == width:
            return list(self._ref_classes)
        return [str(i) for i in range(width)]

    # --------------------------------------------------------------- summary

    def summary(self, reset: bool = True) -> dict:
        """The window so far as JSON-safe data (see the module docstring); ``reset`` starts a new window."""
        self._fold()
        now = time.time()
        with self._lock:
            inputs = {name: hist.summary() for name, hist in self._inputs.items()}
            counts = self._class_counts
            labels = self._class_labels or []
            class_counts = {} if counts is None else {label: int(n) for label, n in zip(labels, counts.tolist())}
            out = {
                "version": VERSION,
                "digest": self.digest,
                "variant": self.variant,
                "window": {"start": round(self._start, 3), "end": round(now, 3), "predictions": self._predictions},
                "inputs": inputs,
                "outputs": {"class_counts": class_counts,
                            "confidence": {"edges": [float(e) for e in self._conf_edges], "counts": [int(c) for c in self._conf_counts]}},
                "latency_ms": self._latency.summary_ms(),
                "errors": dict(self._errors),
                "rejects": dict(self._rejects),
            }
            if reset:
                self._reset_locked(now)
        shadow = self.shadow
        out["shadow"] = shadow.summary(reset) if shadow is not None else None
        out["labels"] = self.labels.peek(MAX_LABELS_PER_CHECKIN)
        return out


def _bump(counter: Dict[str, int], key: str) -> None:
    if key not in counter and len(counter) >= MAX_KINDS:
        key = "other"
    counter[key] = counter.get(key, 0) + 1



# ------------------------------------------------------------ daemon helpers


def reference_of(model: Any) -> dict:
    """The installed bundle's reference statistics (``{}`` when it has none or they are unreadable)."""
    import json

    entry = model.manifest.get("reference_stats") if hasattr(model.manifest, "get") else None
    name = entry.get("file") if isinstance(entry, Mapping) and isinstance(entry.get("file"), str) else "stats/reference.json"
    try:
        with open(model.directory / name, "rb") as fh:
            data = json.loads(fh.read(16 * 1024**2))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def monitor_for(model: Any, max_samples_per_window: int = 256) -> Monitor:
    """A Monitor for a loaded :class:`~.model.Model` (reference stats + manifest io)."""
    return Monitor(reference_of(model), dict(model.manifest.get("io") or {}), str(model.variant.get("id")),
                   model.slot.digest, max_samples_per_window)


def load_candidate(config: Any, bundle: Any) -> Any:
    """A shadow candidate: ``bundle`` (.epk) verified against the pinned keys, extracted to
    ``CACHE/shadow/<digest>`` (never a cache slot: current and previous are untouched),
    self-tested and loaded as a :class:`~.model.Model`.

    Raises:
        EdgepackError: The bundle does not verify, has no variant for this device, or
            fails its self-test.
    """
    import shutil
    from pathlib import Path

    from .bundle import extract_bundle, verify_extracted
    from .cache import Slot, file_sha256
    from .errors import EdgepackError
    from .model import Model, _tester

    path = Path(bundle)
    digest = file_sha256(path)
    root = Path(config.cache.root) / "shadow"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.name != digest:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    target = root / digest
    manifest = None
    if target.is_dir():
        try:
            manifest = verify_extracted(target, config.cache.trusted_keys, config.cache.limits)
        except EdgepackError:
            shutil.rmtree(target, ignore_errors=True)
    if manifest is None:
        extract_bundle(path, target, config.cache.trusted_keys, config.cache.limits)
        manifest = verify_extracted(target, config.cache.trusted_keys, config.cache.limits)
    loaded: dict = {}
    _tester(config, loaded, record=False)(target, manifest)  # the candidate's own best certified variant
    variant, session, choice = loaded[target]
    return Model(Slot(digest, manifest.name, manifest.version), target, manifest, variant, session, [], choice)
