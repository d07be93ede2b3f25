"""The storage interface the server uses, free of any database specifics.

Records are plain frozen dataclasses; JSON-ish fields are Python dicts/lists.
Every method that changes several rows is atomic on its own, and callers group
several calls into one atomic unit with ``with storage.transaction():``
(transactions nest: only the outermost one commits).

Several server processes may share one database (PostgreSQL replicas, or processes on
one SQLite file). The ``lock_*`` methods are how the coordinating code makes a
read-decide-write step happen exactly once across them: inside a transaction they
return the *current* committed row and hold it locked until the transaction ends
(PostgreSQL: ``SELECT … FOR UPDATE`` / advisory locks; SQLite: ``BEGIN IMMEDIATE``
already serializes every writer, so they are plain reads). A backend may raise
:class:`StorageConflict` (a deadlock between replicas); the whole transaction is then
rolled back and may simply be run again.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

from ...errors import ServerError


class StorageUnavailable(ServerError):
    """The database cannot be reached right now (connection lost, pool exhausted); nothing was committed."""


class StorageConflict(ServerError):
    """Two server processes collided on the same rows (e.g. a deadlock); the transaction was
    rolled back and can be retried as a whole."""

__all__ = [
    "BundleRef", "MonitorWindowRecord", "StorageConflict", "StorageUnavailable", "AlertRecord", "DriftStat", "BundleRecord", "DeviceRecord", "EventRecord", "MemberRecord", "RolloutRecord", "StageChange", "Storage",
    "TokenOwner",
]


@dataclass(frozen=True)
class BundleRecord:
    id: str
    name: str
    version: str
    digest: str
    size: int
    stage: str
    key_id: str
    manifest: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class BundleRef:
    """What never changes about an uploaded bundle (no stage, no manifest): safe to cache forever,
    in every replica, because bundle rows are never deleted and these columns never updated."""
    id: str
    name: str
    version: str
    digest: str
    size: int


@dataclass(frozen=True)
class StageChange:
    bundle_id: str
    from_stage: Optional[str]
    to_stage: str
    at: float


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    group: str
    tags: list[str]
    profile: Optional[str]
    token_sha256: str
    created_at: float
    last_seen: Optional[float] = None
    last_seq: int = -1
    state: Optional[str] = None
    current: Optional[dict[str, Any]] = None
    previous: Optional[dict[str, Any]] = None
    health: Optional[dict[str, Any]] = None
    runtime_version: Optional[str] = None
    engines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TokenOwner:
    """The device a token hash belongs to (what authentication needs, without the device's state)."""
    id: str
    token_sha256: str


@dataclass(frozen=True)
class RolloutRecord:
    id: str
    bundle_id: str
    group: str
    steps: list[float]
    soak_seconds: float
    min_devices_succeeded: int
    max_failure_rate: float
    halt_min_count: int
    probation: dict[str, Any]
    status: str
    step_index: int
    step_started_at: float
    created_at: float
    updated_at: float
    halt_reasons: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    gates: dict[str, Any] = field(default_factory=dict)  # ML gates (schemas.RolloutGates), {} for none


@dataclass(frozen=True)
class MemberRecord:
    rollout_id: str
    device_id: str
    step_index: int
    state: str
    from_digest: Optional[str]
    joined_at: float
    updated_at: float
    failure_code: Optional[str] = None
    failure_detail: Optional[str] = None


@dataclass(frozen=True)
class EventRecord:
    device_id: str
    seq: int
    type: str
    rollout_id: Optional[str]
    digest: Optional[str]
    version: Optional[str]
    reason_code: Optional[str]
    reason_detail: Optional[str]
    at: Optional[float]
    received_at: float


@dataclass(frozen=True)
class DriftStat:
    """One monitoring evaluation of (group, bundle) for one signal (``kind``: input_drift,
    prediction_drift, accuracy, shadow_agreement, staleness) and ``feature`` ("" when none)."""
    group: str
    digest: str
    version: Optional[str]
    kind: str
    feature: str
    at: float
    value: Optional[float]
    p_value: Optional[float]
    n: int
    drifted: bool
    detail: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class AlertRecord:
    """An alert, de-duplicated per (kind, group, version, feature) while ``status`` is ``open``."""
    id: str
    kind: str
    group: str
    version: str
    feature: str
    digest: Optional[str]
    status: str  # open | resolved
    message: str
    value: Optional[float]
    threshold: Optional[float]
    first_at: float
    last_at: float
    count: int
    detail: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class MonitorWindowRecord:
    """A device's latest monitoring summary window (``window`` is the parsed summary, JSON-ish)."""
    device_id: str
    group: str
    digest: str
    at: float
    window: dict[str, Any]


@runtime_checkable
class Storage(Protocol):
    """Persistence for the update server (SQLite or PostgreSQL)."""

    #: True when every call is short and never waits on another process (SQLite behind one
    #: lock): the server may then call it on its event loop instead of in a worker thread.
    inline_safe: bool

    # lifecycle
    def migrate(self) -> list[int]: """Apply pending schema migrations; return the versions applied."""
    def schema_version(self) -> int: ...
    def transaction(self) -> AbstractContextManager[None]: ...
    def close(self) -> None: ...

    # cross-process locks, held until the open transaction ends (see the module docstring)
    def lock_device(self, device_id: str) -> Optional[DeviceRecord]: ...
    def lock_rollout(self, rollout_id: str) -> Optional[RolloutRecord]: ...
    def lock_key(self, key: str) -> None:
        """Wait for an application lock named ``key`` (e.g. ``group:<name>``)."""
    def try_lock_key(self, key: str) -> bool:
        """Take the application lock ``key`` if no other transaction holds it."""

    # bundles and stage history
    def add_bundle(self, bundle: BundleRecord) -> None: ...
    def get_bundle(self, bundle_id: str) -> Optional[BundleRecord]: ...
    def get_bundle_by_digest(self, digest: str) -> Optional[BundleRecord]: ...
    def find_bundle(self, name: str, version: str) -> Optional[BundleRecord]: ...
    def list_bundles(self) -> list[BundleRecord]: ...
    def set_bundle_stage(self, bundle_id: str, stage: str, at: float) -> None: ...
    def bundle_ref(self, bundle_id: str) -> Optional[BundleRef]:
        """The immutable part of a bundle (the check-in path's lookup; may be served from a cache)."""
    def bundle_ref_by_digest(self, digest: str) -> Optional[BundleRef]: ...
    def stage_history(self, bundle_id: str) -> list[StageChange]: ...

    # devices (including the per-device event seq, ``last_seq``)
    def add_device(self, device: DeviceRecord) -> None: ...
    def get_device(self, device_id: str) -> Optional[DeviceRecord]: ...
    def get_device_by_token_hash(self, token_sha256: str) -> Optional[DeviceRecord]: ...
    def get_token_owner(self, token_sha256: str) -> Optional[TokenOwner]: ...
    def list_devices(self, group: Optional[str] = None) -> list[DeviceRecord]: ...
    def save_device(self, device: DeviceRecord) -> None: ...
    def save_device_report(self, device: DeviceRecord) -> None:
        """Write only what a check-in reports (last_seen, last_seq, state, current, previous, health,
        runtime_version, engines); the backend may defer its fsync (never past SIGKILL)."""

    # rollouts, memberships (cohort states) and download grants
    def add_rollout(self, rollout: RolloutRecord) -> None: ...
    def get_rollout(self, rollout_id: str) -> Optional[RolloutRecord]: ...
    def list_rollouts(self, group: Optional[str] = None, statuses: Optional[list[str]] = None) -> list[RolloutRecord]: ...
    def save_rollout(self, rollout: RolloutRecord) -> None: ...
    def directive_rollouts(self, group: str) -> list[RolloutRecord]:
        """What a check-in of ``group`` needs: its newest rollout and every halted or rolled-back one,
        oldest first (not the group's whole history, which grows with every release)."""
    def get_member(self, rollout_id: str, device_id: str) -> Optional[MemberRecord]: ...
    def list_members(self, rollout_id: str) -> list[MemberRecord]: ...
    def member_counts(self, rollout_id: str) -> dict[str, int]:
        """{state: number of members} of a rollout (states with none left out); includes the open transaction."""
    def members_of_device(self, device_id: str) -> list[MemberRecord]: ...
    def memberships_of_device(self, device_id: str) -> list[tuple[MemberRecord, RolloutRecord]]:
        """Each of the device's memberships with its rollout, oldest first (one query where possible)."""
    def save_member(self, member: MemberRecord) -> None: ...
    def add_grant(self, device_id: str, digest: str, at: float) -> None: ...
    def has_grant(self, device_id: str, digest: str) -> bool: ...

    # events
    def add_events(self, events: list[EventRecord]) -> None: ...
    def list_events(self, device_id: Optional[str] = None, rollout_id: Optional[str] = None, limit: int = 100) -> list[EventRecord]: ...

    # fleet monitoring: reference statistics per bundle, drift evaluations, alerts
    def set_reference(self, digest: str, reference: dict[str, Any], at: float) -> None: ...
    def get_reference(self, digest: str) -> Optional[dict[str, Any]]: ...
    def add_drift_stats(self, rows: list[DriftStat]) -> None: ...
    def list_drift_stats(self, group: Optional[str] = None, version: Optional[str] = None, since: Optional[float] = None,
                         limit: int = 1000) -> list[DriftStat]:
        """Newest first."""
    def prune_drift_stats(self, before: float) -> int: ...
    def save_alert(self, alert: AlertRecord) -> None:
        """Insert or replace by id."""
    def open_alert(self, kind: str, group: str, version: str, feature: str) -> Optional[AlertRecord]: ...
    def list_alerts(self, status: Optional[str] = None, group: Optional[str] = None, limit: int = 200) -> list[AlertRecord]:
        """Most recently updated first."""

    # shared monitoring state (what one replica ingests, every replica aggregates)
    def put_monitor_windows(self, rows: list[MonitorWindowRecord]) -> None:
        """Insert or replace each device's window (by device id), keeping a newer stored one."""
    def list_monitor_windows(self, since: float) -> list[MonitorWindowRecord]: ...
    def prune_monitor_windows(self, before: float) -> int: ...
    def save_gate_verdict(self, rollout_id: str, verdict: dict[str, Any], at: float) -> None: ...
    def get_gate_verdict(self, rollout_id: str) -> Optional[dict[str, Any]]: ...

