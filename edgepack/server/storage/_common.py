"""The statements both backends run verbatim, as a mixin.

They are written with ``?`` placeholders; the PostgreSQL backend's ``_q``/``_x`` turn
them into ``%s``. A backend provides ``_q(sql, params) -> rows``, ``_x(sql, params,
durable=True) -> rowcount``, its bundle columns and row mapper (``_BUNDLE_COLS``,
``_bundle``), and :attr:`_DRIFT_TIEBREAK` (how equal drift timestamps are ordered).
What differs between the backends (caches, locks, upserts, counts) stays in each.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from ...errors import ServerError
from . import _rows as shared
from .base import (AlertRecord, BundleRecord, DeviceRecord, DriftStat, EventRecord, MemberRecord, MonitorWindowRecord,
                   RolloutRecord, StageChange, TokenOwner)
from .migrations import MIGRATIONS, Migration

__all__ = ["SharedStatements"]


class SharedStatements:
    """Reads and plain writes whose SQL is the same on SQLite and PostgreSQL."""

    _DRIFT_TIEBREAK = "rowid"  # SQLite's insertion order; PostgreSQL has a ``seq`` column instead
    _DEVICE_COLS = shared.DEVICE_COLS
    _ROLLOUT_COLS = shared.ROLLOUT_COLS
    _MEMBER_COLS = shared.MEMBER_COLS
    _device = staticmethod(shared.device_from_row)
    _rollout = staticmethod(shared.rollout_from_row)
    _REPORT_SQL = shared.update_sql("devices", "id, " + shared.REPORT_COLS, "?")

    # these come from the backend
    def _q(self, sql: str, params: tuple = ()) -> list[tuple]:  # pragma: no cover - interface
        raise NotImplementedError

    def _x(self, sql: str, params: tuple = (), durable: bool = True) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    _BUNDLE_COLS: str

    def _bundle(self, row: tuple) -> BundleRecord:  # pragma: no cover - interface
        raise NotImplementedError

    # ---------------------------------------------------------------- migrations

    _shown: str  # the database as named in messages (no password)
    _MIGRATIONS_TABLE: str  # CREATE TABLE IF NOT EXISTS schema_migrations, in the backend's types

    def schema_version(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def transaction(self) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def _lock_migrations(self) -> None:
        """Keep other processes out of the migration transaction (SQLite: BEGIN IMMEDIATE already does)."""

    def _migration_statements(self, migration: Migration) -> tuple[str, ...]:
        return migration.statements

    def migrate(self) -> list[int]:
        applied: list[int] = []
        # One transaction around reading the version and applying what is missing: processes that migrate
        # at once (replicas starting together, a server starting during `edgepack server migrate`) apply
        # each version once, and a crash leaves no half-applied version (DDL is transactional in both).
        with self.transaction():
            self._lock_migrations()
            self._x(self._MIGRATIONS_TABLE)
            current = self.schema_version()
            if current > MIGRATIONS[-1].version:
                raise ServerError(f"The database {self._shown} has schema version {current}, newer than this edgepack "
                                  f"supports ({MIGRATIONS[-1].version}); upgrade edgepack.")
            for migration in MIGRATIONS:
                if migration.version > current:
                    for statement in self._migration_statements(migration):
                        self._x(statement)
                    self._x("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                            (migration.version, migration.name, time.time()))
                    applied.append(migration.version)
        return applied

    # ------------------------------------------------------------------- bundles

    def _one_bundle(self, where: str, params: tuple) -> Optional[BundleRecord]:
        rows = self._q(f"SELECT {self._BUNDLE_COLS} FROM bundles WHERE {where}", params)
        return self._bundle(rows[0]) if rows else None

    def find_bundle(self, name: str, version: str) -> Optional[BundleRecord]:
        return self._one_bundle("name = ? AND version = ?", (name, version))

    def list_bundles(self) -> list[BundleRecord]:
        return [self._bundle(r) for r in self._q(f"SELECT {self._BUNDLE_COLS} FROM bundles ORDER BY created_at, id")]

    def stage_history(self, bundle_id: str) -> list[StageChange]:
        rows = self._q("SELECT bundle_id, from_stage, to_stage, at FROM stage_history WHERE bundle_id = ? ORDER BY n", (bundle_id,))
        return [StageChange(*r) for r in rows]

    # ------------------------------------------------------------------- devices

    def add_device(self, device: DeviceRecord) -> None:
        self._x(shared.insert_sql("devices", shared.DEVICE_COLS, "?"), shared.device_params(device))

    def save_device(self, device: DeviceRecord) -> None:
        params = shared.device_params(device)
        if not self._x(shared.update_sql("devices", shared.DEVICE_COLS, "?"), params[1:] + (device.id,)):
            raise KeyError(device.id)

    def save_device_report(self, device: DeviceRecord) -> None:
        # durable=False: only what a check-in reports (see each backend's durability notes)
        if not self._x(self._REPORT_SQL, shared.report_params(device), durable=False):
            raise KeyError(device.id)

    def get_device(self, device_id: str) -> Optional[DeviceRecord]:
        rows = self._q(f"SELECT {self._DEVICE_COLS} FROM devices WHERE id = ?", (device_id,))
        return self._device(rows[0]) if rows else None

    def get_device_by_token_hash(self, token_sha256: str) -> Optional[DeviceRecord]:
        rows = self._q(f"SELECT {self._DEVICE_COLS} FROM devices WHERE token_sha256 = ?", (token_sha256,))
        return self._device(rows[0]) if rows else None

    def get_token_owner(self, token_sha256: str) -> Optional[TokenOwner]:
        rows = self._q("SELECT id, token_sha256 FROM devices WHERE token_sha256 = ?", (token_sha256,))
        return TokenOwner(rows[0][0], rows[0][1]) if rows else None

    def list_devices(self, group: Optional[str] = None) -> list[DeviceRecord]:
        clause, params = shared.where("?", ("grp =", group))
        return [self._device(r) for r in self._q(f"SELECT {self._DEVICE_COLS} FROM devices {clause} ORDER BY id", tuple(params))]

    # ------------------------------------------------------------------ rollouts

    def add_rollout(self, rollout: RolloutRecord) -> None:
        self._x(shared.insert_sql("rollouts", shared.ROLLOUT_COLS, "?"), shared.rollout_params(rollout))

    def save_rollout(self, rollout: RolloutRecord) -> None:
        params = shared.rollout_params(rollout)
        if not self._x(shared.update_sql("rollouts", shared.ROLLOUT_COLS, "?"), params[1:] + (rollout.id,)):
            raise KeyError(rollout.id)

    def get_rollout(self, rollout_id: str) -> Optional[RolloutRecord]:
        rows = self._q(f"SELECT {self._ROLLOUT_COLS} FROM rollouts WHERE id = ?", (rollout_id,))
        return self._rollout(rows[0]) if rows else None

    def directive_rollouts(self, group: str) -> list[RolloutRecord]:
        rows = self._q(f"SELECT {self._ROLLOUT_COLS} FROM rollouts WHERE grp = ? AND (status IN ('halted', 'rolled_back') "
                       "OR id = (SELECT id FROM rollouts WHERE grp = ? ORDER BY created_at DESC, id DESC LIMIT 1)) "
                       "ORDER BY created_at, id", (group, group))
        return [self._rollout(r) for r in rows]

    def get_member(self, rollout_id: str, device_id: str) -> Optional[MemberRecord]:
        rows = self._q(f"SELECT {self._MEMBER_COLS} FROM rollout_members WHERE rollout_id = ? AND device_id = ?",
                       (rollout_id, device_id))
        return MemberRecord(*rows[0]) if rows else None

    def list_members(self, rollout_id: str) -> list[MemberRecord]:
        rows = self._q(f"SELECT {self._MEMBER_COLS} FROM rollout_members WHERE rollout_id = ? ORDER BY device_id", (rollout_id,))
        return [MemberRecord(*r) for r in rows]

    def members_of_device(self, device_id: str) -> list[MemberRecord]:
        rows = self._q(f"SELECT {self._MEMBER_COLS} FROM rollout_members WHERE device_id = ? ORDER BY joined_at", (device_id,))
        return [MemberRecord(*r) for r in rows]

    def has_grant(self, device_id: str, digest: str) -> bool:
        return bool(self._q("SELECT 1 FROM grants WHERE device_id = ? AND digest = ?", (device_id, digest)))

    # -------------------------------------------------------------------- events

    def list_events(self, device_id: Optional[str] = None, rollout_id: Optional[str] = None, limit: int = 100) -> list[EventRecord]:
        clause, params = shared.where("?", ("device_id =", device_id), ("rollout_id =", rollout_id))
        rows = self._q(f"SELECT {shared.EVENT_COLS} FROM events {clause} ORDER BY received_at DESC, seq DESC LIMIT ?",
                       (*params, int(limit)))
        return [EventRecord(*r) for r in rows]

    # --------------------------------------------------------------- monitoring

    def get_reference(self, digest: str) -> Optional[dict[str, Any]]:
        rows = self._q("SELECT reference FROM bundle_references WHERE digest = ?", (digest,))
        return shared.loads(rows[0][0]) if rows else None

    def list_drift_stats(self, group: Optional[str] = None, version: Optional[str] = None, since: Optional[float] = None,
                         limit: int = 1000) -> list[DriftStat]:
        clause, params = shared.where("?", ("grp =", group), ("version =", version), ("at >=", since))
        rows = self._q(f"SELECT {shared.DRIFT_COLS} FROM drift_stats {clause} ORDER BY at DESC, {self._DRIFT_TIEBREAK} DESC "
                       "LIMIT ?", (*params, int(limit)))
        return [shared.drift_from_row(r) for r in rows]

    def prune_drift_stats(self, before: float) -> int:
        return self._x("DELETE FROM drift_stats WHERE at < ?", (before,))

    def open_alert(self, kind: str, group: str, version: str, feature: str) -> Optional[AlertRecord]:
        rows = self._q(f"SELECT {shared.ALERT_COLS} FROM alerts WHERE kind = ? AND grp = ? AND version = ? AND feature = ? "
                       "AND status = 'open' ORDER BY first_at DESC LIMIT 1", (kind, group, version, feature))
        return shared.alert_from_row(rows[0]) if rows else None

    def list_alerts(self, status: Optional[str] = None, group: Optional[str] = None, limit: int = 200) -> list[AlertRecord]:
        clause, params = shared.where("?", ("status =", status), ("grp =", group))
        rows = self._q(f"SELECT {shared.ALERT_COLS} FROM alerts {clause} ORDER BY last_at DESC, id LIMIT ?",
                       (*params, int(limit)))
        return [shared.alert_from_row(r) for r in rows]

    def list_monitor_windows(self, since: float) -> list[MonitorWindowRecord]:
        rows = self._q("SELECT device_id, grp, digest, at, data FROM monitor_windows WHERE at >= ? ORDER BY device_id", (since,))
        return [MonitorWindowRecord(r[0], r[1], r[2], r[3], shared.loads(r[4])) for r in rows]

    def prune_monitor_windows(self, before: float) -> int:
        return self._x("DELETE FROM monitor_windows WHERE at < ?", (before,), durable=False)

    def get_gate_verdict(self, rollout_id: str) -> Optional[dict[str, Any]]:
        rows = self._q("SELECT verdict FROM gate_verdicts WHERE rollout_id = ?", (rollout_id,))
        return shared.loads(rows[0][0]) if rows else None
