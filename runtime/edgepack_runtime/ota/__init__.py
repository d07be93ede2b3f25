"""Over-the-air updates for the device (``docs/ota-protocol.md``), standard library only.

* :mod:`.machine` — the explicit state machine (TRANSITIONS, RESUME, loop guard).
* :mod:`.client` — the polling loop, downloads (Range, deltas), install, probation.
* :mod:`.probation` — ProbationMonitor (fed by the predict path) and the verdict.
* :mod:`.events` — the on-disk event queue.
* :mod:`.http` — http.client wrapper; errors become DownloadError / UpdateError.
"""

from __future__ import annotations

from .client import OtaClient, OtaOptions
from .machine import RESUME, STATES, TRANSITIONS, Machine
from .probation import InProcessMonitor, Policy, ProbationMonitor

__all__ = ["InProcessMonitor", "Machine", "OtaClient", "OtaOptions", "Policy", "ProbationMonitor", "RESUME", "STATES", "TRANSITIONS"]
