"""Probation: the signals that decide whether a freshly switched model stays.

:class:`ProbationMonitor` is the interface the serving path feeds (one
:meth:`~ProbationMonitor.record` per request); :class:`InProcessMonitor` is the simple
implementation that wraps ``Model.predict`` itself. :func:`judge` is the pure decision.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ..validate import InputValidationError

#: Latency samples kept for the p95 (the most recent ones).
WINDOW = 2048
#: Fewest latency samples a latency verdict is based on.
MIN_LATENCY_SAMPLES = 5


@dataclass(frozen=True)
class Policy:
    """Probation terms from the directive (``probation`` object)."""

    requests: int = 50
    seconds: float = 30.0
    max_error_rate: float = 0.05
    max_latency_ratio: float = 3.0

    @classmethod
    def from_json(cls, obj: Optional[Mapping[str, Any]]) -> "Policy":
        obj = obj or {}
        d = cls()
        return cls(int(obj.get("requests", d.requests)), float(obj.get("seconds", d.seconds)),
                   float(obj.get("max_error_rate", d.max_error_rate)), float(obj.get("max_latency_ratio", d.max_latency_ratio)))


@dataclass(frozen=True)
class Snapshot:
    requests: int = 0
    errors: int = 0
    nonfinite: int = 0
    p95_ms: Optional[float] = None
    latency_samples: int = 0


class ProbationMonitor:
    """What the predict path reports; thread-safe. Subclass or feed :meth:`record`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.reset()

    def reset(self) -> None:
        """Start counting afresh (called right after a switch)."""
        with self._lock:
            self._requests = self._errors = self._nonfinite = 0
            self._latencies: deque = deque(maxlen=WINDOW)

    def record(self, latency_s: float, error: bool = False, nonfinite: bool = False) -> None:
        """One request served (``error``: the model failed on valid input)."""
        with self._lock:
            self._requests += 1
            self._errors += int(bool(error))
            self._nonfinite += int(bool(nonfinite))
            if not error:
                self._latencies.append(float(latency_s))

    def snapshot(self) -> Snapshot:
        with self._lock:  # copy under the lock, sort outside it: record() never waits for a sort
            lat = list(self._latencies)
            requests, errors, nonfinite = self._requests, self._errors, self._nonfinite
        lat.sort()
        p95 = lat[min(len(lat) - 1, int(math.ceil(0.95 * len(lat))) - 1)] * 1000.0 if lat else None
        return Snapshot(requests, errors, nonfinite, p95, len(lat))

    def health(self, serving: bool) -> Dict[str, Any]:
        """The check-in ``health`` object."""
        s = self.snapshot()
        return {"serving": serving, "requests": s.requests, "errors": s.errors,
                "p95_ms": None if s.p95_ms is None else round(s.p95_ms, 3), "nonfinite": s.nonfinite,
                "uptime_s": round(time.monotonic() - self._started, 1)}


def has_nonfinite(outputs: Mapping[str, Any]) -> bool:
    for value in outputs.values():
        arr = np.asarray(value)
        if arr.dtype.kind in "fc" and not bool(np.isfinite(arr).all()):
            return True
    return False


class InProcessMonitor(ProbationMonitor):
    """Wraps a model's ``predict``: counts engine errors, latency and non-finite outputs.

    Input that fails validation is the caller's fault, not the model's: it is re-raised
    and not counted.
    """

    def __init__(self, model: Any = None) -> None:
        super().__init__()
        self.model = model

    def attach(self, model: Any) -> None:
        self.model = model

    def predict(self, raw: Any) -> Dict[str, np.ndarray]:
        model = self.model
        if model is None:
            raise RuntimeError("No model is loaded.")
        start = time.perf_counter()
        try:
            outputs = model.predict(raw)
        except InputValidationError:
            raise
        except Exception:
            self.record(time.perf_counter() - start, error=True)
            raise
        self.record(time.perf_counter() - start, nonfinite=has_nonfinite(outputs))
        return outputs


def judge(s: Snapshot, policy: Policy, elapsed_s: float, baseline_p95_ms: Optional[float]) -> Tuple[str, Optional[Dict[str, str]]]:
    """("pending" | "passed" | "failed", reason) for the counters so far. Pure.

    Fails as soon as a failure is certain (any non-finite output; errors that exceed the
    allowed rate even if every remaining request succeeded); otherwise decides once
    ``policy.requests`` requests were seen or ``policy.seconds`` passed.
    """
    if s.nonfinite:
        return "failed", {"code": "nonfinite", "detail": f"{s.nonfinite} of {s.requests} probation requests returned NaN or Inf."}
    budget = max(policy.requests, s.requests, 1)
    if s.errors / budget > policy.max_error_rate:
        return "failed", {"code": "error_rate", "detail": f"{s.errors} of {s.requests} probation requests failed "
                          f"(allowed {policy.max_error_rate:.1%} of {budget})."}
    done = s.requests >= policy.requests or elapsed_s >= policy.seconds
    if not done:
        return "pending", None
    if s.requests and s.errors / s.requests > policy.max_error_rate:
        return "failed", {"code": "error_rate", "detail": f"{s.errors} of {s.requests} probation requests failed "
                          f"(allowed {policy.max_error_rate:.1%})."}
    if (baseline_p95_ms and s.p95_ms is not None and s.latency_samples >= MIN_LATENCY_SAMPLES
            and s.p95_ms > policy.max_latency_ratio * baseline_p95_ms):
        return "failed", {"code": "latency_regression", "detail": f"p95 latency {s.p95_ms:.3g} ms is over "
                          f"{policy.max_latency_ratio:g} x the previous model's {baseline_p95_ms:.3g} ms."}
    return "passed", None
