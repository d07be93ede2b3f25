"""Rollout lifecycle: create, admin actions, transactional evaluation (halt/advance), views.

Decisions come from :mod:`.rollout` (pure); this module loads their inputs from
storage and writes their outcome back, inside the caller's transaction.

Several server replicas may evaluate the same rollout at once. Every decision that
changes it (halt, advance, complete, a device joining the cohort, an admin action) is
taken on the row returned by ``storage.lock_rollout`` — the current committed row, locked
until the transaction ends — so it happens exactly once: the replica that comes second
sees the first one's outcome and finds nothing left to do. Cheap checks on possibly
stale reads only decide whether taking the lock is worth it.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from typing import Any, Optional

from . import rollout as logic
from .http_errors import ApiError
from .schemas import RolloutCreate
from .storage import DeviceRecord, MemberRecord, RolloutRecord, Storage

__all__ = ["Orchestrator"]

_ACTIONS = {
    "pause": ((logic.ACTIVE,), logic.PAUSED),
    "resume": ((logic.PAUSED,), logic.ACTIVE),
    "abort": ((logic.ACTIVE, logic.PAUSED, logic.HALTED), logic.ABORTED),
    "rollback": ((logic.ACTIVE, logic.PAUSED, logic.HALTED, logic.COMPLETED), logic.ROLLED_BACK),
}
_BLOCKING = [logic.ACTIVE, logic.PAUSED, logic.HALTED]


def policy_of(r: RolloutRecord) -> logic.Policy:
    return logic.Policy(tuple(r.steps), r.soak_seconds, r.min_devices_succeeded, r.max_failure_rate, r.halt_min_count)


def member_view(m: MemberRecord) -> logic.MemberView:
    return logic.MemberView(m.device_id, m.step_index, m.state, m.failure_code, m.from_digest)


def may_advance(r: RolloutRecord, now: float) -> bool:
    """Whether ``r`` could advance now (active and its soak time over). Without a member change
    nothing else can change a rollout, so a check-in that changed no member evaluates only then."""
    return r.status == logic.ACTIVE and r.soak_seconds - (now - r.step_started_at) <= 0


def decision_due(r: RolloutRecord, policy: logic.Policy, counts: dict[str, int], now: float) -> bool:
    """False when :meth:`Orchestrator.evaluate` would surely leave ``r`` unchanged, judged from the
    member counts alone (the same thresholds as ``logic.halt_decision`` / ``logic.advance_decision``)."""
    total = sum(counts.values())
    failed = counts.get(logic.FAILED, 0)
    over_rate = total > 0 and failed / total > policy.max_failure_rate
    if over_rate and failed >= max(1, policy.halt_min_count):
        return True  # halt
    if r.status != logic.ACTIVE or over_rate:
        return False
    return policy.soak_seconds - (now - r.step_started_at) <= 0  # advance needs the soak time over


class Orchestrator:
    def __init__(self, storage: Storage, clock: Callable[[], float]) -> None:
        self.storage = storage
        self.clock = clock
        # rollout -> {"verdict": "pass" | "wait" | "fail", "reasons": [...], ...} for rollouts with ML gates
        # (set by the fleet monitor; cached there, so it is cheap enough for the check-in path)
        self.gate_check: Optional[Callable[[RolloutRecord], dict[str, Any]]] = None

    # ------------------------------------------------------------------ admin

    def get(self, rollout_id: str, lock: bool = False) -> RolloutRecord:
        """The rollout (404 if unknown); ``lock``: its current row, locked until the transaction ends."""
        found = self.storage.lock_rollout(rollout_id) if lock else self.storage.get_rollout(rollout_id)
        if found is None:
            raise ApiError(404, "unknown_rollout", f"There is no rollout {rollout_id!r}; list rollouts with GET /v1/admin/rollouts.")
        return found

    def create(self, req: RolloutCreate) -> RolloutRecord:
        problems = logic.step_problems(req.steps)
        if problems:
            raise ApiError(422, "invalid_steps", "; ".join(problems) + ".")
        with self.storage.transaction():
            # Two replicas creating rollouts for one group at once must not both pass the "no rollout in
            # progress" check below.
            self.storage.lock_key(f"group:{req.group}")
            bundle = self.storage.get_bundle(req.bundle_id)
            if bundle is None:
                raise ApiError(422, "unknown_bundle", f"There is no bundle {req.bundle_id!r}; upload it first.")
            if bundle.stage == "archived":
                raise ApiError(409, "bundle_archived", f"Bundle {bundle.id} is archived; move it back to staging or "
                               "production before rolling it out.")
            blocking = self.storage.list_rollouts(group=req.group, statuses=_BLOCKING)
            if blocking:
                raise ApiError(409, "rollout_in_progress", f"Group {req.group!r} already has rollout {blocking[-1].id} "
                               f"({blocking[-1].status}); complete, abort or roll it back first.")
            now = self.clock()
            record = RolloutRecord(
                id=f"r_{secrets.token_hex(8)}", bundle_id=bundle.id, group=req.group, steps=list(req.steps),
                soak_seconds=float(req.soak_seconds), min_devices_succeeded=req.min_devices_succeeded,
                max_failure_rate=float(req.max_failure_rate), halt_min_count=req.halt_min_count,
                probation=req.probation.model_dump(), status=logic.ACTIVE, step_index=0, step_started_at=now,
                created_at=now, updated_at=now,
                history=[{"at": now, "event": "created", "by": "admin", "detail": f"step 0 at {req.steps[0]}%"}],
                gates=req.gates.model_dump(exclude_defaults=True) if req.gates else {},
            )
            self.storage.add_rollout(record)
        return record

    def act(self, rollout_id: str, action: str) -> RolloutRecord:
        allowed, target = _ACTIONS[action]
        with self.storage.transaction():
            r = self.get(rollout_id, lock=True)
            if r.status not in allowed:
                raise ApiError(409, "invalid_transition", f"Rollout {r.id} is {r.status}; '{action}' needs it to be "
                               f"{' or '.join(allowed)}.")
            now = self.clock()
            r = dataclasses.replace(r, status=target, updated_at=now,
                                    history=r.history + [{"at": now, "event": action, "by": "admin", "detail": None}])
            self.storage.save_rollout(r)
            if target == logic.ACTIVE:
                r = self.evaluate(r, now)
        return r

    # -------------------------------------------------------------- evaluation

    def evaluate(self, r: RolloutRecord, now: Optional[float] = None) -> RolloutRecord:
        """Apply auto-halt and step advancement to ``r``; call inside a transaction."""
        now = self.clock() if now is None else now
        if r.status not in (logic.ACTIVE, logic.PAUSED, logic.COMPLETED):
            return r  # completed rollouts still distribute, so late failures can still halt them
        policy = policy_of(r)
        if not decision_due(r, policy, self.storage.member_counts(r.id), now):
            return r  # neither a halt nor an advance can happen: skip loading every member
        # Decide on the current row, locked: another replica may have just halted or advanced it.
        locked = self.storage.lock_rollout(r.id)
        if locked is None or locked.status not in (logic.ACTIVE, logic.PAUSED, logic.COMPLETED):
            return locked or r
        r, policy = locked, policy_of(locked)
        if not decision_due(r, policy, self.storage.member_counts(r.id), now):
            return r
        members = [member_view(m) for m in self.storage.list_members(r.id)]
        halt = logic.halt_decision(policy, members)
        if halt is not None:
            r = dataclasses.replace(r, status=logic.HALTED, halt_reasons=halt.reasons, updated_at=now,
                                    history=r.history + [{"at": now, "event": "halted", "by": "auto", "detail": halt.message}])
            self.storage.save_rollout(r)
            return r
        if r.status != logic.ACTIVE:
            return r
        if r.gates and self.gate_check is not None and self.gate_check(r).get("verdict") != "pass":
            return r  # ML gates not (yet) passed: the step waits (a failed gate halts from the monitor's tick)
        positions: Optional[list[float]] = None
        succeeded = sum(1 for m in members if m.state == logic.COMMITTED)
        for _ in range(len(r.steps)):
            # The cohort size only changes the decision once the soak time has elapsed and
            # fewer than min_devices_succeeded members committed; it hashes every device of
            # the group, so it is computed only then (any value gives the same decision else).
            if (policy.soak_seconds - (now - r.step_started_at) > 0
                    or succeeded >= policy.min_devices_succeeded):
                eligible = policy.min_devices_succeeded
            else:
                if positions is None:
                    positions = self._positions(r)
                eligible = sum(1 for p in positions if p < r.steps[r.step_index])
            decision = logic.advance_decision(policy, r.step_index, r.step_started_at, now, members, eligible)
            if decision.action is None:
                break
            if decision.action == "complete":
                r = dataclasses.replace(r, status=logic.COMPLETED, updated_at=now,
                                        history=r.history + [{"at": now, "event": "completed", "by": "auto", "detail": None}])
                self.storage.save_rollout(r)
                break
            nxt = r.step_index + 1
            r = dataclasses.replace(r, step_index=nxt, step_started_at=now, updated_at=now,
                                    history=r.history + [{"at": now, "event": "advanced", "by": "auto",
                                                          "detail": f"step {nxt} at {r.steps[nxt]}%"}])
            self.storage.save_rollout(r)
        return r

    def halt(self, r: RolloutRecord, reasons: list[dict], message: str, now: float) -> RolloutRecord:
        """Halt ``r`` for reasons found outside member failures (ML gates); inside a transaction."""
        if r.status not in (logic.ACTIVE, logic.PAUSED, logic.COMPLETED):
            return r
        r = dataclasses.replace(r, status=logic.HALTED, halt_reasons=reasons, updated_at=now,
                                history=r.history + [{"at": now, "event": "halted", "by": "auto", "detail": message}])
        self.storage.save_rollout(r)
        return r

    def tick(self) -> list[str]:
        """Evaluate every active rollout (soak-time advancement); returns ids that changed."""
        changed = []
        for r in self.storage.list_rollouts(statuses=[logic.ACTIVE, logic.PAUSED]):
            with self.storage.transaction():
                fresh = self.storage.get_rollout(r.id)
                if fresh is None:
                    continue
                after = self.evaluate(fresh)
                if after != fresh:
                    changed.append(r.id)
        return changed

    def _positions(self, r: RolloutRecord) -> list[float]:
        return [logic.cohort_position(r.id, d.id) for d in self.storage.list_devices(group=r.group)]

    # ---------------------------------------------------------------- directives

    def directive_for(self, device: DeviceRecord, current_digest: Optional[str],
                      members: Optional[dict[str, MemberRecord]] = None) -> tuple[logic.Directive, Optional[RolloutRecord]]:
        """The directive for a device (inside a transaction); records new memberships.

        Args:
            members: The device's member records by rollout id, current within this transaction,
                when the caller has them already (saves one query per candidate rollout).
        """
        rollouts = list(reversed(self.storage.directive_rollouts(device.group)))
        candidates = rollouts[:1] + [r for r in rollouts[1:] if r.status in (logic.HALTED, logic.ROLLED_BACK)]
        for r in candidates:
            bundle = self.storage.bundle_ref(r.bundle_id)
            if bundle is None:
                continue
            member = members.get(r.id) if members is not None else self.storage.get_member(r.id, device.id)
            decision = self._decide(r, bundle.digest, device.id, current_digest, member)
            if decision.join:
                # Joining the cohort is decided on the locked current row (another replica may have halted
                # the rollout or moved its step a moment ago), so a device joins at most once, at the right step.
                r = self.storage.lock_rollout(r.id) or r
                decision = self._decide(r, bundle.digest, device.id, current_digest, self.storage.get_member(r.id, device.id))
            if decision.action == "none":
                continue
            if decision.action == "rollback" and self.storage.bundle_ref_by_digest(decision.target) is None:
                continue  # the server cannot serve a bundle it never received
            now = self.clock()
            if decision.join:
                self.storage.save_member(MemberRecord(r.id, device.id, r.step_index, logic.DIRECTED, current_digest, now, now))
            self.storage.add_grant(device.id, decision.target, now)
            return decision, r
        return logic.NONE, None

    @staticmethod
    def _decide(r: RolloutRecord, digest: str, device_id: str, current_digest: Optional[str],
                member: Optional[MemberRecord]) -> logic.Directive:
        return logic.compute_directive(r.status, digest, r.steps, r.step_index, logic.cohort_position(r.id, device_id),
                                       member_view(member) if member else None, current_digest)

    # ---------------------------------------------------------------------- views

    def view(self, r: RolloutRecord, with_members: bool = True) -> dict[str, Any]:
        policy = policy_of(r)
        members = self.storage.list_members(r.id)
        views = [member_view(m) for m in members]
        positions = self._positions(r)
        progress = []
        for p in logic.step_progress(policy, views, positions):
            status = "done" if p.index < r.step_index or r.status == logic.COMPLETED else (
                "current" if p.index == r.step_index else "pending")
            progress.append({**dataclasses.asdict(p), "status": status})
        waiting: list[str] = []
        if r.status == logic.ACTIVE:
            eligible = sum(1 for p in positions if p < r.steps[r.step_index])
            waiting = logic.advance_decision(policy, r.step_index, r.step_started_at, self.clock(), views, eligible).waiting_for
        gate_status = self.gate_check(r) if r.gates and self.gate_check is not None else None
        if r.status == logic.ACTIVE and gate_status and gate_status.get("verdict") != "pass":
            waiting = waiting + [f"ML gates: {w}" for w in gate_status.get("waiting", [])]
        halts = [h for h in r.history if h.get("event") == "halted"]
        bundle = self.storage.get_bundle(r.bundle_id)
        return {
            **{f.name: getattr(r, f.name) for f in dataclasses.fields(r)},
            "bundle": None if bundle is None else {"id": bundle.id, "name": bundle.name, "version": bundle.version,
                                                   "digest": bundle.digest, "size": bundle.size},
            "current_percent": r.steps[r.step_index],
            "halt_message": halts[-1]["detail"] if halts and r.halt_reasons else None,
            "waiting_for": waiting,
            "gate_status": gate_status,
            "progress": progress,
            "members": [dataclasses.asdict(m) for m in members] if with_members else [],
        }
