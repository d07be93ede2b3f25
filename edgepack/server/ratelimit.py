"""Per-key sliding-window rate limiting, in memory: each server process counts only the requests it
served, so N replicas behind a balancer allow up to N times the limit per device (a fleet-wide
limit belongs in the proxy in front, e.g. nginx limit_req; see docs/deployment.md)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """At most ``limit`` requests per ``window_s`` seconds per key (``limit`` 0: unlimited)."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> float | None:
        """Record a request; return None if allowed, else seconds until the next slot."""
        if self.limit <= 0:
            return None
        now = self._clock()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - self.window_s:
                hits.popleft()
            if len(hits) >= self.limit:
                return max(0.0, hits[0] + self.window_s - now)
            hits.append(now)
            return None
