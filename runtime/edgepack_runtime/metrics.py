"""Daemon metrics in the Prometheus text exposition format (version 0.0.4), stdlib + numpy.

The request path pays for one lock, a dict update and a bisect. Statistics over
inputs and predicted classes are not computed per request: each prediction only
appends references to its arrays to a bounded pending list, which is folded into
the running statistics in one vectorized pass every ``FLUSH_EVERY`` predictions
(or ``FLUSH_BYTES`` of pending input), and on every scrape.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections import deque
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

#: Request latency buckets in seconds (50 µs .. 1 s); one overflow bucket (+Inf) follows.
LATENCY_BUCKETS: Tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)
#: Equal-width buckets of an input's value histogram across its declared value_range.
INPUT_HISTOGRAM_BUCKETS = 10
FLUSH_EVERY = 256
FLUSH_BYTES = 4 * 1024**2

#: Error kinds counted in ``edgepack_errors_total`` (always exported, even at zero).
ERROR_KINDS = ("validation", "protocol", "not_found", "method", "unavailable", "overload", "engine", "internal")


def escape(value: Any) -> str:
    """A Prometheus label value, escaped."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Sequence[Tuple[str, Any]]) -> str:
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in pairs) + "}" if pairs else ""


def _num(value: float) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(value)


class _Writer:
    """Collects metric families; each family gets one HELP and one TYPE line."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Sequence[Tuple[str, Any]], value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def histogram(self, name: str, labels: Sequence[Tuple[str, Any]], bounds: Sequence[float], counts: Sequence[int], total: float) -> None:
        """``counts`` per bucket (not cumulative) with the +Inf overflow last."""
        running = 0
        for bound, count in zip(bounds, counts):
            running += count
            self.sample(name + "_bucket", [*labels, ("le", _num(float(bound)))], running)
        running += counts[len(bounds)]
        self.sample(name + "_bucket", [*labels, ("le", "+Inf")], running)
        self.sample(name + "_sum", labels, total)
        self.sample(name + "_count", labels, running)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class _InputStats:
    """Running count/sum/min/max (and a fixed-bucket histogram) of one input's values."""

    __slots__ = ("samples", "count", "total", "low", "high", "nonfinite", "edges", "buckets")

    def __init__(self, edges: Optional[Tuple[float, ...]]) -> None:
        self.samples = 0
        self.count = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.nonfinite = 0
        self.edges = edges
        self.buckets = [0] * (len(edges) + 1) if edges else None

    def add(self, arrays: List[np.ndarray]) -> None:
        self.samples += sum(int(a.shape[0]) if a.ndim else 1 for a in arrays)
        flat = np.concatenate([a.reshape(-1) for a in arrays]) if len(arrays) > 1 else arrays[0].reshape(-1)
        if flat.dtype.kind not in "iufb":
            return
        if flat.dtype.kind == "f":
            finite = np.isfinite(flat)
            if not finite.all():
                self.nonfinite += int(flat.size - np.count_nonzero(finite))
                flat = flat[finite]
        if not flat.size:
            return
        self.count += int(flat.size)
        self.total += float(flat.sum(dtype=np.float64))
        self.low = min(self.low, float(flat.min()))
        self.high = max(self.high, float(flat.max()))
        if self.edges:
            # Histogram over a bounded strided sample, so huge inputs stay cheap.
            step = max(1, flat.size // 65536)
            idx = np.searchsorted(np.asarray(self.edges), flat[::step], side="left")
            for i, n in enumerate(np.bincount(idx, minlength=len(self.edges) + 1).tolist()):
                self.buckets[i] += n * step


def input_edges(spec: Dict[str, Any]) -> Optional[Tuple[float, ...]]:
    """Histogram bucket upper bounds for an input spec with a finite value_range, else None."""
    value_range = spec.get("value_range")
    if not value_range or len(value_range) != 2:
        return None
    low, high = value_range
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return None
    width = (float(high) - float(low)) / INPUT_HISTOGRAM_BUCKETS
    return tuple(float(low) + width * (i + 1) for i in range(INPUT_HISTOGRAM_BUCKETS))


class Metrics:
    """All counters of one daemon process. Thread-safe."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        self._lock = threading.Lock()
        self._requests: Dict[Tuple[str, int], int] = {}
        self._errors: Dict[str, int] = {kind: 0 for kind in ERROR_KINDS}
        nb = len(LATENCY_BUCKETS)
        # per endpoint: [bucket counts..., +Inf count, sum of seconds]
        self._latency: Dict[str, List[float]] = {e: [0] * (nb + 1) + [0.0] for e in endpoints}
        self.model_runs = 0  # folded runs; the pending ones are added at render time
        # deque.append / popleft are atomic, so the request path takes no lock here
        self._pending: "deque[Tuple[Any, Dict[str, np.ndarray], List[np.ndarray]]]" = deque()
        self._pending_bytes = 0  # approximate (unlocked); only decides when to flush early
        self._flush_lock = threading.Lock()
        self._inputs: Dict[str, _InputStats] = {}
        self._classes: Dict[Tuple[str, str, str, str], int] = {}
        self.started = time.time()

    # ------------------------------------------------------------ hot path

    def request(self, endpoint: str, code: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, code)
            self._requests[key] = self._requests.get(key, 0) + 1
            row = self._latency.get(endpoint)
            if row is None:
                row = self._latency[endpoint] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
            row[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            row[-1] += seconds

    def error(self, kind: str) -> None:
        with self._lock:
            self._errors[kind] = self._errors.get(kind, 0) + 1

    def prediction(self, state: Any, feed: Dict[str, np.ndarray], outputs: List[np.ndarray], nbytes: int) -> None:
        """Count a model run and queue its arrays for the batched statistics (no lock)."""
        pending = self._pending
        pending.append((state, feed, outputs))
        self._pending_bytes += nbytes
        if len(pending) >= FLUSH_EVERY or self._pending_bytes >= FLUSH_BYTES:
            self.flush()

    # ---------------------------------------------------------- batch work

    def flush(self) -> None:
        """Fold pending predictions into the input and class statistics."""
        with self._flush_lock:
            self._pending_bytes = 0
            pending = []
            take = self._pending.popleft
            while True:
                try:
                    pending.append(take())
                except IndexError:
                    break
            if not pending:
                return
            with self._lock:
                self.model_runs += len(pending)
            groups: Dict[int, Tuple[Any, List[Tuple[Dict[str, np.ndarray], List[np.ndarray]]]]] = {}
            for state, feed, outputs in pending:
                groups.setdefault(id(state), (state, []))[1].append((feed, outputs))
            for state, items in groups.values():
                try:
                    self._fold(state, items)
                except Exception:  # noqa: BLE001 - statistics must never break serving
                    pass

    def _fold(self, state: Any, items: List[Tuple[Dict[str, np.ndarray], List[np.ndarray]]]) -> None:
        for name, edges in state.stat_inputs:
            arrays = [feed[name] for feed, _ in items if name in feed]
            if not arrays:
                continue
            stats = self._inputs.get(name)
            if stats is None or stats.edges != edges:
                stats = self._inputs[name] = _InputStats(edges)
            stats.add(arrays)
        index = state.class_output_index(items[0][1])
        if index is None:
            return
        outs = [outputs[index] for _, outputs in items if outputs[index].ndim == 2]
        if not outs:
            return
        width = outs[0].shape[1]
        outs = [o for o in outs if o.shape[1] == width]
        winners = np.argmax(np.concatenate(outs) if len(outs) > 1 else outs[0], axis=1)
        counts = np.bincount(winners, minlength=width).tolist()
        labels = state.class_labels(index, width)
        output = state.output_names[index]
        for label, n in zip(labels, counts):
            if n:
                key = (state.name, state.version, output, label)
                self._classes[key] = self._classes.get(key, 0) + n

    # -------------------------------------------------------------- render

    def render(self, extra: Optional[List[Tuple[str, str, str, List[Tuple[List[Tuple[str, Any]], float]]]]] = None) -> str:
        """The exposition text; ``extra`` adds (name, type, help, [(labels, value)]) families."""
        self.flush()
        with self._lock:
            requests = dict(self._requests)
            errors = dict(self._errors)
            latency = {k: list(v) for k, v in self._latency.items()}
            runs = self.model_runs
        w = _Writer()
        w.family("edgepack_requests_total", "counter", "HTTP requests answered, by endpoint and status code.")
        for (endpoint, code), n in sorted(requests.items()):
            w.sample("edgepack_requests_total", [("endpoint", endpoint), ("code", code)], n)
        w.family("edgepack_errors_total", "counter", "Requests that failed, by kind (validation, protocol, not_found, method, unavailable, overload, engine, internal).")
        for kind, n in sorted(errors.items()):
            w.sample("edgepack_errors_total", [("kind", kind)], n)
        w.family("edgepack_request_duration_seconds", "histogram", "Time from a parsed request head to the response written, by endpoint.")
        nb = len(LATENCY_BUCKETS)
        for endpoint, row in sorted(latency.items()):
            if sum(row[: nb + 1]):
                w.histogram("edgepack_request_duration_seconds", [("endpoint", endpoint)], LATENCY_BUCKETS, row[: nb + 1], row[-1])
        w.family("edgepack_model_runs_total", "counter", "Inferences run (validated requests only; rejected input never reaches the model).")
        w.sample("edgepack_model_runs_total", [], runs)
        with self._flush_lock:
            classes = dict(self._classes)
            inputs = {k: (v.samples, v.count, v.total, v.low, v.high, v.nonfinite, v.edges, list(v.buckets or ())) for k, v in self._inputs.items()}
        w.family("edgepack_predicted_class_total", "counter", "Predictions by arg-max class of the first float [N,C] output.")
        for (name, version, output, label), n in sorted(classes.items()):
            w.sample("edgepack_predicted_class_total", [("model", name), ("version", version), ("output", output), ("class", label)], n)
        w.family("edgepack_input_samples_total", "counter", "Input rows (batch items) seen by the model, by input.")
        for name, s in sorted(inputs.items()):
            w.sample("edgepack_input_samples_total", [("input", name)], s[0])
        w.family("edgepack_input_values_total", "counter", "Finite input values seen by the model, by input.")
        for name, s in sorted(inputs.items()):
            w.sample("edgepack_input_values_total", [("input", name)], s[1])
        w.family("edgepack_input_nonfinite_total", "counter", "NaN or infinite input values seen by the model, by input.")
        for name, s in sorted(inputs.items()):
            w.sample("edgepack_input_nonfinite_total", [("input", name)], s[5])
        for metric, pos, text in (("edgepack_input_value_mean", None, "Mean"), ("edgepack_input_value_min", 3, "Minimum"), ("edgepack_input_value_max", 4, "Maximum")):
            w.family(metric, "gauge", f"{text} of all finite input values seen so far, by input.")
            for name, s in sorted(inputs.items()):
                if s[1]:
                    w.sample(metric, [("input", name)], (s[2] / s[1]) if pos is None else s[pos])
        w.family("edgepack_input_value", "histogram", "Input values over the declared value_range (10 equal buckets; sampled for large inputs), by input.")
        for name, s in sorted(inputs.items()):
            if s[6]:
                w.histogram("edgepack_input_value", [("input", name)], s[6], s[7], s[2])
        for name, kind, help_text, samples in extra or ():
            w.family(name, kind, help_text)
            for labels, value in samples:
                w.sample(name, labels, value)
        return w.text()
