"""Devices: provisioning, authentication, check-ins and events.

Check-ins and event batches are each one transaction: the seq check, the device's
reported state, membership updates, auto-halt/advancement and new memberships are
committed together or not at all.

With several replicas, the transaction starts by locking the device's row (so two
requests of one device are applied one after the other and the seq check holds), and
changes a rollout's members only under that rollout's row lock (see
:mod:`.orchestration`); a deadlock between replicas rolls the transaction back and it
is run again.
"""

from __future__ import annotations

import dataclasses
import hmac
import random
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from . import rollout as logic
from .blobs import BlobStore
from .delta import ensure_delta
from .http_errors import ApiError
from .orchestration import Orchestrator, may_advance
from .schemas import CheckinRequest, DeviceCreate, DeviceUpdate, EventsRequest
from .settings import ServerSettings, hash_token
from .signing import sign_url
from .storage import DeviceRecord, EventRecord, MemberRecord, RolloutRecord, Storage, StorageConflict, TokenOwner

__all__ = ["Fleet"]


#: Rollout statuses in which a member's check-in health can still count as a failure.
_WATCHED = (logic.ACTIVE, logic.PAUSED, logic.COMPLETED)


def _not_found(device_id: str) -> ApiError:
    return ApiError(404, "unknown_device", f"There is no device {device_id!r} for this token.")


# How long a group's previous-model latency baseline is reused before it is recomputed.
BASELINE_TTL_S = 10.0

#: Attempts of one check-in / event batch when replicas collide (StorageConflict).
ATTEMPTS = 4


def _retrying(fn: Callable[[], Any]) -> Any:
    """Run the transaction ``fn`` again when the database rolled it back because of another replica."""
    for attempt in range(ATTEMPTS):
        try:
            return fn()
        except StorageConflict:
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(random.uniform(0.002, 0.02) * (attempt + 1))  # jitter: the colliding replica goes first
    raise AssertionError("unreachable")


class Fleet:
    def __init__(self, settings: ServerSettings, storage: Storage, blobs: BlobStore, orchestrator: Orchestrator,
                 clock: Callable[[], float], monitor: Any = None) -> None:
        self.settings = settings
        self.monitor = monitor  # FleetMonitor: gets each check-in's summaries (O(1) enqueue)
        self.storage = storage
        self.blobs = blobs
        self.orchestrator = orchestrator
        self.clock = clock
        # (group, profile, digest) -> (computed at, baseline p95): the scan over a group is
        # far too costly to repeat on every check-in of a large fleet. A cache of database data,
        # at most BASELINE_TTL_S old; each replica keeps its own (they agree within that bound).
        self._baselines: dict[tuple, tuple[float, Optional[float]]] = {}

    # ------------------------------------------------------------------ admin

    def provision(self, req: DeviceCreate) -> tuple[DeviceRecord, str]:
        token = secrets.token_urlsafe(32)
        with self.storage.transaction():
            if self.storage.get_device(req.id) is not None:
                raise ApiError(409, "device_exists", f"Device {req.id!r} is already provisioned; choose another id.")
            device = DeviceRecord(id=req.id, group=req.group, tags=list(req.tags), profile=req.profile,
                                  token_sha256=hash_token(token), created_at=self.clock())
            self.storage.add_device(device)
        return device, token

    def get(self, device_id: str) -> DeviceRecord:
        device = self.storage.get_device(device_id)
        if device is None:
            raise ApiError(404, "unknown_device", f"There is no device {device_id!r}; list devices with GET /v1/admin/devices.")
        return device

    def update(self, device_id: str, req: DeviceUpdate) -> DeviceRecord:
        with self.storage.transaction():
            device = self.get(device_id)
            changes = {k: v for k, v in req.model_dump(exclude_unset=True).items() if v is not None}
            device = dataclasses.replace(device, **changes)
            self.storage.save_device(device)
        return device

    # ------------------------------------------------------------------- auth

    def authenticate(self, device_id: str, token: Optional[str]) -> TokenOwner:
        """The device (id and token hash) whose token this is, if it is ``device_id``; otherwise 401/404."""
        if not token:
            raise ApiError(401, "unauthorized", "Send the device token as 'Authorization: Bearer <token>'.",
                           {"WWW-Authenticate": "Bearer"})
        digest = hash_token(token)
        device = self.storage.get_token_owner(digest)  # id + hash only: the check-in reads the device once, later
        if device is None or not hmac.compare_digest(device.token_sha256, digest):
            raise ApiError(401, "unauthorized", "The device token is not valid; re-provision the device.",
                           {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(device.id.encode(), device_id.encode()):
            raise _not_found(device_id)
        return device

    # --------------------------------------------------------------- check-in

    def checkin(self, device_id: str, req: CheckinRequest, token: Optional[str] = None,
                admit: Optional[Callable[[str], None]] = None) -> Optional[dict[str, Any]]:
        """Apply a check-in and answer its directive.

        Args:
            device_id: The authenticated device, or the claimed one when ``token`` is given.
            token: Authenticate here, against the locked device row (saves the separate token
                lookup on the hot path); a token that is not ``device_id``'s returns None and
                changes nothing.
            admit: Called with the device id once authenticated, before any change (the rate
                limit); may raise :class:`ApiError`.
        """
        return _retrying(lambda: self._checkin(device_id, req, token, admit))

    def _checkin(self, device_id: str, req: CheckinRequest, token: Optional[str],
                 admit: Optional[Callable[[str], None]]) -> Optional[dict[str, Any]]:
        now = self.clock()
        current = req.current.digest if req.current else None
        with self.storage.transaction():
            device = self.storage.lock_device(device_id)
            if token is not None and (device is None or not hmac.compare_digest(device.token_sha256, hash_token(token))):
                return None  # nothing written yet: the transaction commits empty
            if admit is not None and device is not None:
                admit(device.id)
            if device is None:
                raise _not_found(device_id)
            self._check_seq(device, [req.seq])
            device = dataclasses.replace(
                device, last_seen=now, last_seq=req.seq, state=req.state,
                current=req.current.model_dump() if req.current else None,
                previous=req.previous.model_dump() if req.previous else None,
                health=req.health.model_dump(exclude_none=True) if req.health else None,
                runtime_version=req.runtime_version, engines=list(req.engines),
            )
            self.storage.save_device_report(device)  # only the reported columns (fsync deferred, see storage.sqlite)
            touched: dict[str, RolloutRecord] = {}
            known: dict[str, Any] = {}  # rollout id -> this device's member record, as of now
            for member, r in self.storage.memberships_of_device(device_id):
                known[r.id] = member
                bundle = self.storage.bundle_ref(r.bundle_id)
                if bundle is None or self._member_after_checkin(device, member, r, bundle.digest, current, now) is None:
                    continue
                # A change: decide again on the locked rollout and the member as they are now.
                r = self.storage.lock_rollout(r.id)
                member = self.storage.get_member(r.id, device_id)
                updated = self._member_after_checkin(device, member, r, bundle.digest, current, now)
                known[r.id] = updated or member
                if updated is not None:
                    self.storage.save_member(updated)
                    touched[r.id] = r
            for r in touched.values():
                self.orchestrator.evaluate(r, now)
            decision, rollout = self.orchestrator.directive_for(device, current, known)
            # A join adds a DIRECTED member (it can only lower the failure rate): what may be due now is
            # an advance, and only once the soak time is over.
            if rollout is not None and may_advance(rollout, now):
                self.orchestrator.evaluate(rollout, now)
        if req.summaries and self.monitor is not None:
            self.monitor.ingest(device_id, device.group, current, req.summaries, now)
        return self._directive_body(device_id, decision, rollout, current)

    def _member_after_checkin(self, device: DeviceRecord, member: MemberRecord, r: RolloutRecord, digest: str,
                              current: Optional[str], now: float) -> Optional[MemberRecord]:
        """``member`` as this check-in leaves it, or None when it does not change."""
        state = logic.member_after_report(member.state, current, digest)
        changes: dict[str, Any] = {}
        if state in (logic.INSTALLED, logic.COMMITTED) and current == digest and r.status in _WATCHED:
            failure = self._health_failure(device, r.probation, member.from_digest)
            if failure is not None:
                state = logic.FAILED
                changes = {"failure_code": failure[0], "failure_detail": failure[1]}
        if state == member.state:
            return None
        return dataclasses.replace(member, state=state, updated_at=now, **changes)

    def _health_failure(self, device: DeviceRecord, probation: Optional[dict], from_digest: Optional[str]):
        """A health regression in ``device``'s latest check-in (running a rollout's bundle), or None."""
        baseline = None
        if isinstance((device.health or {}).get("p95_ms"), (int, float)) and from_digest:
            baseline = self._baseline_p95(device, from_digest)
        return logic.health_failure(device.health, probation, baseline)

    def _baseline_p95(self, device: DeviceRecord, digest: str) -> Optional[float]:
        """The previous model's p95 for ``device``: the slowest p95 reported by the devices of its group
        and profile that still run ``digest`` (None if none do). The slowest, not the median, so that
        device-to-device noise never halts a rollout; only a clear regression does."""
        key = (device.group, device.profile, digest)
        now = self.clock()
        cached = self._baselines.get(key)
        if cached is not None and now - cached[0] < BASELINE_TTL_S:
            return cached[1]
        # ``device`` itself runs the new bundle, so it never counts towards the old one's baseline.
        values = [float(d.health["p95_ms"]) for d in self.storage.list_devices(device.group)
                  if d.profile == device.profile and (d.current or {}).get("digest") == digest
                  and isinstance((d.health or {}).get("p95_ms"), (int, float))]
        baseline = max(values) if values else None
        self._baselines[key] = (now, baseline)
        return baseline

    def _directive_body(self, device_id: str, decision: logic.Directive, rollout: Optional[RolloutRecord],
                        current: Optional[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"action": decision.action, "rollout_id": None, "bundle": None, "delta": None,
                                "probation": None, "poll_interval_s": self.settings.poll_interval_s}
        if decision.action == "none" or rollout is None:
            return body
        bundle = self.storage.bundle_ref_by_digest(decision.target)
        body.update(
            rollout_id=rollout.id,
            bundle={"name": bundle.name, "version": bundle.version, "digest": bundle.digest, "size": bundle.size,
                    "url": self._download_url(device_id, self.blobs.path(bundle.digest),
                                              f"/v1/devices/{device_id}/bundles/{bundle.digest}")},
            probation=rollout.probation if decision.action == "update" else None,
        )
        if current and current != bundle.digest:
            try:
                delta = ensure_delta(self.blobs, current, bundle.digest)
            except (OSError, MemoryError, ValueError):
                delta = None  # a delta is an optimization; the full download always works
            if delta is not None:
                body["delta"] = {"from_digest": current, "digest": delta.digest, "size": delta.size,
                                 "url": self._download_url(device_id, self.blobs.delta_path(current, bundle.digest),
                                                           f"/v1/devices/{device_id}/deltas/{current}/{bundle.digest}")}
        return body

    def _download_url(self, device_id: str, blob: Path, api_url: str) -> str:
        """A signed URL under ``download_base_url`` for the file ``blob``, or the API's own ``api_url``.

        Signing here, only for what this directive names, is the grant check: the proxy in front
        of the blob directory serves any path whose signature verifies and nothing else.
        """
        if not self.settings.download_base_url:
            return api_url
        expires = int(self.clock() + self.settings.download_url_ttl_s)
        blob_path = blob.relative_to(self.blobs.root).as_posix()  # the proxy serves blob_dir as is
        return sign_url(self.settings.download_base_url, blob_path, device_id, expires, self.settings.download_secret)

    # ----------------------------------------------------------------- events

    @staticmethod
    def _check_seq(device: DeviceRecord, seqs: list[int]) -> None:
        if seqs[0] <= device.last_seq:
            raise ApiError(409, "replayed_seq", f"seq {seqs[0]} is not greater than the last accepted seq "
                           f"{device.last_seq}; this batch was already delivered (nothing changed).")
        for a, b in zip(seqs, seqs[1:]):
            if b <= a:
                raise ApiError(409, "out_of_order", f"seq {b} follows seq {a} in the batch; events must be sent in "
                               "strictly increasing seq order (nothing changed).")

    def ingest_events(self, device_id: str, req: EventsRequest) -> dict[str, Any]:
        return _retrying(lambda: self._ingest_events(device_id, req))

    def _ingest_events(self, device_id: str, req: EventsRequest) -> dict[str, Any]:
        now = self.clock()
        with self.storage.transaction():
            device = self.storage.lock_device(device_id)
            if device is None:
                raise _not_found(device_id)
            self._check_seq(device, [e.seq for e in req.events])
            rollouts: dict[str, RolloutRecord] = {}
            for e in req.events:
                if e.rollout_id is not None and e.rollout_id not in rollouts:
                    r = self.storage.get_rollout(e.rollout_id)
                    if r is None:
                        raise ApiError(422, "unknown_rollout", f"Event seq {e.seq} names rollout {e.rollout_id!r}, which "
                                       "this server does not know (nothing changed).")
                    rollouts[r.id] = r
                if e.digest is not None and self.storage.bundle_ref_by_digest(e.digest) is None:
                    raise ApiError(422, "unknown_digest", f"Event seq {e.seq} names bundle digest {e.digest[:12]}…, "
                                   "which this server does not know (nothing changed).")
            self.storage.add_events([
                EventRecord(device_id, e.seq, e.type, e.rollout_id, e.digest, e.version,
                            e.reason.code if e.reason else None, e.reason.detail if e.reason else None,
                            float(e.at) if e.at is not None else None, now)
                for e in req.events
            ])
            touched: set[str] = set()
            for e in req.events:
                member = self._member_for(device_id, e.rollout_id, e.digest)
                if member is None:
                    continue
                r = self.storage.lock_rollout(member.rollout_id)  # members change only under the rollout's lock
                member = self.storage.get_member(member.rollout_id, device_id)
                state, kind = logic.member_after_event(member.state, e.type, e.reason.code if e.reason else None, r.status)
                if state != member.state or kind:
                    self.storage.save_member(dataclasses.replace(
                        member, state=state, updated_at=now,
                        failure_code=kind or member.failure_code,
                        failure_detail=(e.reason.detail if e.reason and kind else member.failure_detail),
                    ))
                    touched.add(r.id)
            self.storage.save_device(dataclasses.replace(device, last_seq=req.events[-1].seq, last_seen=now))
            for rid in sorted(touched):
                self.orchestrator.evaluate(self.storage.get_rollout(rid), now)
        return {"accepted": len(req.events), "last_seq": req.events[-1].seq}

    def _member_for(self, device_id: str, rollout_id: Optional[str], digest: Optional[str]):
        if rollout_id is not None:
            return self.storage.get_member(rollout_id, device_id)
        if digest is None:
            return None
        for member, r in reversed(self.storage.memberships_of_device(device_id)):
            bundle = self.storage.bundle_ref(r.bundle_id)
            if bundle is not None and bundle.digest == digest:
                return member
        return None

    # -------------------------------------------------------------- downloads

    def bundle_path(self, device_id: str, digest: str):
        if not self.storage.has_grant(device_id, digest) or not self.blobs.exists(digest):
            raise ApiError(404, "unknown_bundle", "This device has not been directed to that bundle.")
        return self.blobs.path(digest)

    def delta_path(self, device_id: str, from_digest: str, to_digest: str):
        if not self.storage.has_grant(device_id, to_digest):
            raise ApiError(404, "unknown_delta", "This device has not been directed to that bundle.")
        info = ensure_delta(self.blobs, from_digest, to_digest)
        if info is None:
            raise ApiError(404, "unknown_delta", "No delta is offered between these bundles; download the full bundle.")
        return self.blobs.delta_path(from_digest, to_digest)
