"""Pure rollout logic: cohorts, member transitions, halting, advancement, directives.

No I/O and no clock: every function takes what it needs and returns a decision, so
the rules are table-tested and the HTTP/storage layers only carry data around.

Definitions (see also docs/ota-protocol.md):

* position(device) = sha256(rollout_id + device_id) as a 256-bit integer, scaled to
  [0, 100). A device is in the cohort of step *k* when ``position < steps[k]``; steps
  are cumulative percentages, so a device never leaves the cohort as steps advance.
* A member is a device that was directed to the rollout's bundle; it remembers the
  step it joined at and the digest it ran before (the rollback target).
* Member states: ``directed → downloaded → installed → committed`` (success), or
  ``failed`` (with a failure kind), or ``reverted`` (the device reports running
  something else again, or rolled back on the server's order).
* Halt: among all members so far, ``failed >= halt_min_count`` and
  ``failed / members > max_failure_rate``.
* Advance from step k: soak time since the step started has elapsed, at least
  ``min(min_devices_succeeded, devices in the step's cohort)`` members committed, and
  the failure rate is within the limit. Advancing past the last step completes the
  rollout (completed rollouts keep directing newly eligible devices of the group, and
  can still be halted by failures that arrive later).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

__all__ = [
    "ACTIVE", "ABORTED", "COMPLETED", "DISTRIBUTING", "HALTED", "PAUSED", "ROLLED_BACK", "STATUSES",
    "Advance", "Directive", "Halt", "MemberView", "Policy", "StepProgress", "advance_decision", "cohort_position",
    "compute_directive", "failure_kind", "halt_decision", "health_failure", "in_cohort", "member_after_event",
    "member_after_report", "step_problems", "step_progress",
]

ACTIVE, PAUSED, HALTED, ABORTED, COMPLETED, ROLLED_BACK = "active", "paused", "halted", "aborted", "completed", "rolled_back"
STATUSES = (ACTIVE, PAUSED, HALTED, ABORTED, COMPLETED, ROLLED_BACK)
DISTRIBUTING = (ACTIVE, COMPLETED)
ROLLING_BACK = (HALTED, ROLLED_BACK)

DIRECTED, DOWNLOADED, INSTALLED, COMMITTED, FAILED, REVERTED = (
    "directed", "downloaded", "installed", "committed", "failed", "reverted")
IN_FLIGHT = (DIRECTED, DOWNLOADED, INSTALLED)

_DEFAULT_KIND = {"self_test_failed": "self_test", "install_failed": "install", "probation_failed": "probation",
                 "rolled_back": "rolled_back"}
_PROGRESS = {"downloaded": DOWNLOADED, "installed": INSTALLED, "committed": COMMITTED}
_ORDER = {DIRECTED: 0, DOWNLOADED: 1, INSTALLED: 2, COMMITTED: 3}


def cohort_position(rollout_id: str, device_id: str) -> float:
    """The device's deterministic place in [0, 100) for this rollout."""
    digest = hashlib.sha256((rollout_id + device_id).encode("utf-8")).digest()
    return int.from_bytes(digest, "big") * 100 / 2**256


def in_cohort(position: float, steps: Sequence[float], step_index: int) -> bool:
    return 0 <= step_index < len(steps) and position < steps[step_index]


def step_problems(steps: Sequence[float]) -> list[str]:
    """What is wrong with a list of step percentages (empty if fine)."""
    if not steps:
        return ["steps must list at least one percentage"]
    problems = [f"step {s!r} is not in (0, 100]" for s in steps if not 0 < s <= 100]
    if any(b <= a for a, b in zip(steps, steps[1:])):
        problems.append("steps must be strictly increasing cumulative percentages, e.g. [1, 10, 50, 100]")
    return problems


@dataclass(frozen=True)
class Policy:
    steps: tuple[float, ...]
    soak_seconds: float
    min_devices_succeeded: int
    max_failure_rate: float
    halt_min_count: int


@dataclass(frozen=True)
class MemberView:
    device_id: str
    step_index: int
    state: str
    failure_code: Optional[str] = None
    from_digest: Optional[str] = None


# ------------------------------------------------------------- member transitions


def failure_kind(event_type: str, reason_code: Optional[str]) -> Optional[str]:
    """The failure kind an event reports, or None for progress events."""
    if event_type not in _DEFAULT_KIND:
        return None
    return reason_code or _DEFAULT_KIND[event_type]


def member_after_event(state: str, event_type: str, reason_code: Optional[str], rollout_status: str) -> tuple[str, Optional[str]]:
    """(new state, failure kind or None) after a device event about this rollout.

    Progress only moves forward and never erases a failure; a failure overrides any
    state. ``rolled_back`` while the rollout is halted/rolled back is the device
    obeying the server (``reverted``), otherwise it is a device-side failure.
    """
    if event_type in _PROGRESS:
        new = _PROGRESS[event_type]
        if state in (FAILED, REVERTED) or _ORDER.get(new, 0) <= _ORDER.get(state, 0):
            return state, None
        return new, None
    if event_type == "rolled_back":
        if rollout_status in ROLLING_BACK or state == FAILED:
            return (REVERTED if state != FAILED else FAILED), None
        return FAILED, failure_kind(event_type, reason_code)
    kind = failure_kind(event_type, reason_code)
    if kind is None:
        return state, None
    return FAILED, kind


def member_after_report(state: str, current_digest: Optional[str], target_digest: str) -> str:
    """A member's state after a check-in: the server's view follows the device's report."""
    running_target = current_digest == target_digest
    if running_target and state in (DIRECTED, DOWNLOADED):
        return INSTALLED
    if not running_target and state in (INSTALLED, COMMITTED):
        return REVERTED
    return state


def health_failure(health: Optional[Mapping], probation: Optional[Mapping],
                   baseline_p95_ms: Optional[float]) -> Optional[tuple[str, str]]:
    """(failure kind, detail) when a member's check-in health, reported while it runs the
    rollout's bundle, shows a regression; else None.

    The rollout's ``probation`` terms are the limits: any non-finite output fails
    (``nonfinite``); once at least ``probation.requests`` (min 1) requests were served,
    an error rate above ``max_error_rate`` fails (``error_rate``), and so does a p95
    latency above ``max_latency_ratio`` x ``baseline_p95_ms`` (``latency_regression``;
    the baseline is the previous model's p95, skipped when unknown).
    """
    if not health:
        return None
    probation = probation or {}
    nonfinite = health.get("nonfinite") or 0
    requests = health.get("requests") or 0
    if nonfinite > 0:
        return "nonfinite", f"check-in health: {nonfinite} of {requests} requests returned NaN or Inf."
    if requests < max(1, int(probation.get("requests", 50) or 0)):
        return None
    errors = health.get("errors") or 0
    max_error_rate = float(probation.get("max_error_rate", 0.05))
    if errors / requests > max_error_rate:
        return "error_rate", f"check-in health: {errors} of {requests} requests failed (allowed {max_error_rate:.1%})."
    p95 = health.get("p95_ms")
    ratio = float(probation.get("max_latency_ratio", 3.0))
    if isinstance(p95, (int, float)) and baseline_p95_ms and p95 > ratio * baseline_p95_ms:
        return "latency_regression", (f"check-in health: p95 latency {p95:.3g} ms is over {ratio:g} x the previous "
                                      f"model's {baseline_p95_ms:.3g} ms.")
    return None


# --------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Halt:
    reasons: list[dict]
    message: str


def halt_decision(policy: Policy, members: Iterable[MemberView]) -> Optional[Halt]:
    """Halt when failures exceed the rate over at least ``halt_min_count`` devices."""
    members = list(members)
    failed = [m for m in members if m.state == FAILED]
    if not members or len(failed) < max(1, policy.halt_min_count):
        return None
    rate = len(failed) / len(members)
    if rate <= policy.max_failure_rate:
        return None
    by_kind: dict[str, list[str]] = {}
    for m in failed:
        by_kind.setdefault(m.failure_code or "unknown", []).append(m.device_id)
    reasons = [{"code": kind, "count": len(devs), "devices": sorted(devs)} for kind, devs in sorted(by_kind.items())]
    summary = ", ".join(f"{r['count']} {r['code']}" for r in reasons)
    message = (f"{len(failed)} of {len(members)} devices failed ({rate:.0%} > max_failure_rate "
               f"{policy.max_failure_rate:.0%}): {summary}")
    return Halt(reasons, message)


@dataclass(frozen=True)
class StepProgress:
    index: int
    percent: float
    eligible: int       # group devices whose position is below this step's percentage
    joined: int         # members that joined at this step
    succeeded: int
    failed: int
    in_flight: int
    reverted: int


def step_progress(policy: Policy, members: Iterable[MemberView], positions: Iterable[float]) -> list[StepProgress]:
    members, positions = list(members), list(positions)
    out = []
    for i, pct in enumerate(policy.steps):
        joined = [m for m in members if m.step_index == i]
        out.append(StepProgress(
            i, pct, sum(1 for p in positions if p < pct), len(joined),
            sum(1 for m in joined if m.state == COMMITTED), sum(1 for m in joined if m.state == FAILED),
            sum(1 for m in joined if m.state in IN_FLIGHT), sum(1 for m in joined if m.state == REVERTED),
        ))
    return out


@dataclass(frozen=True)
class Advance:
    action: Optional[str]  # "advance" | "complete" | None (wait)
    waiting_for: list[str] = field(default_factory=list)


def advance_decision(policy: Policy, step_index: int, step_started_at: float, now: float,
                     members: Iterable[MemberView], eligible_now: int) -> Advance:
    """Whether an active rollout may leave its current step (``eligible_now``: cohort size)."""
    members = list(members)
    waiting = []
    left = policy.soak_seconds - (now - step_started_at)
    if left > 0:
        waiting.append(f"soak time: {left:.0f}s left")
    succeeded = sum(1 for m in members if m.state == COMMITTED)
    required = min(policy.min_devices_succeeded, eligible_now)
    if succeeded < required:
        waiting.append(f"devices succeeded: {succeeded} of {required} required")
    failed = sum(1 for m in members if m.state == FAILED)
    if members and failed / len(members) > policy.max_failure_rate:
        waiting.append(f"failure rate {failed / len(members):.0%} above {policy.max_failure_rate:.0%}")
    if waiting:
        return Advance(None, waiting)
    return Advance("complete" if step_index >= len(policy.steps) - 1 else "advance")


@dataclass(frozen=True)
class Directive:
    action: str                    # "none" | "update" | "rollback"
    target: Optional[str] = None   # digest to install
    join: bool = False             # record a new membership at the current step


NONE = Directive("none")


def compute_directive(status: str, target_digest: str, steps: Sequence[float], step_index: int, position: float,
                      member: Optional[MemberView], current_digest: Optional[str]) -> Directive:
    """What one device should do about one rollout (its group's latest)."""
    if status in ROLLING_BACK:
        if (member is not None and member.from_digest and member.from_digest != target_digest
                and current_digest == target_digest):
            return Directive("rollback", member.from_digest)
        return NONE
    if status not in DISTRIBUTING or current_digest == target_digest:
        return NONE
    if member is not None:
        return Directive("update", target_digest) if member.state in IN_FLIGHT else NONE
    if in_cohort(position, steps, step_index):
        return Directive("update", target_digest, join=True)
    return NONE


def positions_of(rollout_id: str, device_ids: Iterable[str]) -> Mapping[str, float]:
    return {d: cohort_position(rollout_id, d) for d in device_ids}
