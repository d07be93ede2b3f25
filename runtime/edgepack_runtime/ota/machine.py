"""The OTA update state machine: explicit states, a transition table, a resume map.

Every state the device can be in during an update is a row here, and every change of
state goes through :meth:`Machine.fire`, which looks the (state, event) pair up in
:data:`TRANSITIONS` (an unknown pair is a bug and raises) and persists the new state
with ``atomic_write`` to ``CACHE/ota/state.json`` *before* the step of that state
runs. After power loss the process reads that file and :data:`RESUME` says what the
step left half-done means and how to finish it::

    idle ──poll──▶ checking ──update──▶ downloading ──downloaded──▶ verifying
      ▲               │  none/refused/offline ─▶ idle                     │ verified
      │               └─rollback_previous─▶ rolling_back                   ▼
      │                                                                installing
      │                                                                    │ installed
      │                                                                    ▼
      │                 committed ◀──probation_passed── probation ◀── self_testing
      │ done ◀──────────────┘                               │ failed        │ failed
      │                                                     ▼               ▼
      └── done ◀── rolled_back ◀──rolled_back── rolling_back ◀──────────────┘

The loop guard (Mender/RAUC "boot counter"): every process start that finds an update
half-done increments ``boots``; past ``max_boots`` the update is abandoned — rolled
back if the device already switched to it, dropped otherwise — and its digest counts
as one more failed attempt. A digest that failed ``max_attempts`` times is refused
until the server directs a different one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .._fs import atomic_write

IDLE = "idle"
CHECKING = "checking"
DOWNLOADING = "downloading"
VERIFYING = "verifying"
INSTALLING = "installing"
SELF_TESTING = "self_testing"
PROBATION = "probation"
COMMITTED = "committed"
ROLLING_BACK = "rolling_back"
ROLLED_BACK = "rolled_back"

STATES: Tuple[str, ...] = (IDLE, CHECKING, DOWNLOADING, VERIFYING, INSTALLING, SELF_TESTING, PROBATION, COMMITTED,
                           ROLLING_BACK, ROLLED_BACK)

#: (state, event) -> next state. Nothing else moves the machine.
TRANSITIONS: Dict[Tuple[str, str], str] = {
    (IDLE, "poll"): CHECKING,
    (CHECKING, "none"): IDLE,               # action "none", or already on the target
    (CHECKING, "offline"): IDLE,            # server unreachable: keep serving, back off
    (CHECKING, "refused"): IDLE,            # older than current, too big, failed too often
    (CHECKING, "update"): DOWNLOADING,      # action "update" (or "rollback" to a bundle not in the previous slot)
    (CHECKING, "rollback_previous"): ROLLING_BACK,  # action "rollback" to the previous slot: a pointer swap
    (DOWNLOADING, "interrupted"): DOWNLOADING,      # connection lost mid-body: resume with Range later
    (DOWNLOADING, "downloaded"): VERIFYING,
    (DOWNLOADING, "download_failed"): IDLE,         # size cap, sha256 mismatch, 4xx
    (DOWNLOADING, "gave_up"): IDLE,                 # loop guard
    (VERIFYING, "verified"): INSTALLING,
    (VERIFYING, "verify_failed"): IDLE,
    (VERIFYING, "missing"): DOWNLOADING,            # the staged file vanished: fetch it again
    (VERIFYING, "gave_up"): IDLE,
    (INSTALLING, "installed"): SELF_TESTING,
    (INSTALLING, "install_failed"): IDLE,           # bad signature/hash, or golden self-test before the switch
    (INSTALLING, "gave_up_switched"): ROLLING_BACK,  # loop guard after the switch happened
    (INSTALLING, "gave_up"): IDLE,
    (SELF_TESTING, "self_test_passed"): PROBATION,
    (SELF_TESTING, "self_test_passed_no_probation"): COMMITTED,  # server-directed rollback targets
    (SELF_TESTING, "self_test_failed"): ROLLING_BACK,
    (SELF_TESTING, "crashed"): ROLLING_BACK,        # process restarted mid self-test
    (PROBATION, "probation_passed"): COMMITTED,
    (PROBATION, "probation_failed"): ROLLING_BACK,
    (PROBATION, "crashed"): ROLLING_BACK,           # process restarted in probation: crash loop
    (COMMITTED, "done"): IDLE,
    (ROLLING_BACK, "rolled_back"): ROLLED_BACK,
    (ROLLED_BACK, "done"): IDLE,
}

#: What a process that starts and finds ``state.json`` in a state does first.
RESUME: Dict[str, str] = {
    IDLE: "nothing to finish; poll the server",
    CHECKING: "nothing changed on the device; back to idle and poll again",
    DOWNLOADING: "truncate download.partial to the fsynced offset in state.json and resume with Range: bytes=N-",
    VERIFYING: "re-hash and re-verify the staged .epk (missing: download again)",
    INSTALLING: "re-run Cache.install on the staged .epk (idempotent: a finished switch is detected)",
    SELF_TESTING: "not committed: roll back (reason crash_loop)",
    PROBATION: "not committed: roll back (reason crash_loop)",
    COMMITTED: "the update stuck; record it and go idle",
    ROLLING_BACK: "finish the rollback (idempotent: current is compared with the saved previous digest)",
    ROLLED_BACK: "the rollback finished; go idle",
}

#: States in which a restart counts against the loop guard.
GUARDED = (DOWNLOADING, VERIFYING, INSTALLING)


class TransitionError(RuntimeError):
    """An event that is not allowed in the current state (a programming error)."""


def _blank() -> Dict[str, Any]:
    return {
        "format": 1,
        "state": IDLE,
        "seq": 0,                 # last seq handed out (check-ins and events share it)
        "directive": None,        # the directive being carried out
        "target": None,           # {"digest", "name", "version", "size"}
        "previous_digest": None,  # current slot's digest when the update started
        "source": None,           # "delta" | "full" | "local"
        "offset": 0,              # fsynced bytes of download.partial
        "boots": 0,               # process starts that found this update half-done
        "attempts": {},           # digest -> failed attempts (loop guard across cycles)
        "reason": None,           # structured reason of a failure / rollback in progress
        "rollback_from": None,    # digest to leave (current when the rollback started)
        "rollback_to": None,      # digest to return to
        "reserved": 0,            # seq numbers up to here may have been used (reserved in blocks)
        "probation": None,        # counters and baseline while in probation
        "outbox": [],             # events created by the last transition (re-queued after a crash)
        "updated_at": 0.0,
    }


class Machine:
    """The persisted state of one device's OTA client.

    Attributes:
        path: ``CACHE/ota/state.json``.
        data: The state document (see :func:`_blank` for the fields).
    """

    def __init__(self, path: Path, fault: Callable[[str], None] = lambda step: None) -> None:
        self.path = Path(path)
        self.fault = fault
        self.data = self._load()

    def _load(self) -> Dict[str, Any]:
        data = _blank()
        try:
            stored = json.loads(self.path.read_bytes())
            if isinstance(stored, dict) and stored.get("state") in STATES:
                data.update(stored)
                # seq numbers handed out in memory since the last save lie at or below "reserved"
                data["seq"] = max(int(data.get("seq") or 0), int(data.get("reserved") or 0))
        except (FileNotFoundError, ValueError, OSError):
            pass  # no file or an unreadable one: start idle (the cache itself is always consistent)
        return data

    @property
    def state(self) -> str:
        return str(self.data["state"])

    def save(self) -> None:
        self.data["updated_at"] = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(self.data, sort_keys=True, indent=1).encode())

    def update(self, **changes: Any) -> None:
        """Persist field changes without a state change (download offset, counters)."""
        self.data.update(changes)
        self.save()

    def next_seq(self, block: int = 64) -> int:
        """A fresh seq for a check-in. Reserved on disk in blocks of ``block`` before use, so a
        restart never reuses one and an offline device does not write on every poll."""
        seq = int(self.data.get("seq") or 0) + 1
        if seq > int(self.data.get("reserved") or 0):
            self.data["reserved"] = seq + block - 1
            self.data["seq"] = seq
            self.save()
        self.data["seq"] = seq
        return seq

    def fire(self, event: str, outbox: Optional[List[Dict[str, Any]]] = None, persist: bool = True, **changes: Any) -> str:
        """Move to TRANSITIONS[(state, event)], persist, then call the fault hook ``ota:<state>``.

        ``outbox`` events (seq already assigned) are saved in the same write, so an event
        is never lost between the state change and its append to the queue. ``persist``
        off is only for transitions that change nothing on the device (idle ⇄ checking):
        the file then keeps saying idle, which is the truth.

        Raises:
            TransitionError: The event is not allowed in the current state.
        """
        key = (self.state, event)
        if key not in TRANSITIONS:
            raise TransitionError(f"OTA state machine: event {event!r} is not allowed in state {self.state!r}.")
        nxt = TRANSITIONS[key]
        self.data.update(changes)
        self.data["state"] = nxt
        self.data["outbox"] = list(outbox or [])
        if nxt == IDLE:
            for name in ("directive", "target", "previous_digest", "source", "reason", "probation", "rollback_from",
                         "rollback_to"):
                self.data[name] = None
            self.data["offset"] = 0
            self.data["boots"] = 0
        if persist or outbox:
            self.save()
        self.fault(f"ota:{nxt}")
        return nxt

    def allocate(self, n: int) -> List[int]:
        """``n`` consecutive seq numbers (not yet persisted: pass them to :meth:`fire`)."""
        start = int(self.data.get("seq") or 0)
        self.data["seq"] = start + n
        return list(range(start + 1, start + n + 1))
