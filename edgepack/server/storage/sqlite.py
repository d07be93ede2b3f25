"""SQLite implementation of :class:`~.base.Storage` (stdlib ``sqlite3``).

One connection shared by all threads behind a re-entrant lock (requests are short;
SQLite serializes writers anyway). Every multi-row change runs inside
``BEGIN IMMEDIATE … COMMIT``.

Durability: WAL journal. A COMMIT returns after SQLite wrote the transaction's WAL
frames with ``write()``, so a committed transaction always survives SIGKILL. For power
loss, every transaction that changes anything but a device's own check-in report
(rollouts, memberships, grants, events, bundles, devices' identity/group/token, ...)
is fsynced before ``transaction()`` returns, exactly like ``synchronous=FULL`` (which
fsyncs the WAL at every commit): the connection runs ``synchronous=NORMAL`` and such
transactions fsync the WAL file themselves right after COMMIT, still under the lock.
A transaction that only rewrote check-in report columns (:meth:`save_device_report`:
last_seen, last_seq, state, current, previous, health, runtime_version, engines)
skips that fsync; the WAL is append-only and the next fsync (the next durable commit
or a checkpoint) makes it durable too. So power loss can only lose a suffix of
report-only check-ins after the last durable commit (the device reports again at
its next poll); committed rollout state is never lost. Single-row writes outside a
transaction are fsynced too.

Member counts per rollout and state (:meth:`member_counts`) are cached in memory,
updated with the transaction that changes a member (discarded on rollback) and
dropped whenever another connection committed (``PRAGMA data_version``). Bundle
records are cached by id the same way (dropped on a stage change or a rollback).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import astuple, fields
from pathlib import Path
from typing import Any, Optional

from ...errors import ServerError
from .base import (AlertRecord, BundleRecord, BundleRef, DeviceRecord, DriftStat, EventRecord, MemberRecord, MonitorWindowRecord, RolloutRecord,
                   StageChange, TokenOwner)
from .migrations import MIGRATIONS, Migration

__all__ = ["SqliteStorage"]


def _j(value: Any) -> Optional[str]:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


try:  # optional (the server extra): ~5x faster parsing of the JSON columns read on every check-in
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - without orjson the stdlib parses everything
    _fast_loads = json.loads


# orjson turns integers beyond 64 bits into floats: texts with a run of 19+ digits go to json.loads
# (digits mapped to "0", then a substring search: ~10x cheaper than a regular expression).
_DIGITS_TO_0 = bytes.maketrans(b"123456789", b"000000000")
_19_DIGITS = b"0" * 19


def _u(text: Optional[str]) -> Any:
    if text is None:
        return None
    if _19_DIGITS not in text.encode("utf-8", "surrogatepass").translate(_DIGITS_TO_0):
        try:
            return _fast_loads(text)
        except ValueError:  # what orjson refuses but json.dumps may have written (NaN, Infinity, lone surrogates)
            pass
    return json.loads(text)


class SqliteStorage:
    """Storage in one SQLite file."""

    inline_safe = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            # NORMAL + an explicit WAL fsync after every durable commit (see the module docstring);
            # without WAL (e.g. a file system that cannot do it) keep FULL.
            self._relaxed_ok = str(mode).lower() == "wal"
            self._conn.execute(f"PRAGMA synchronous={'NORMAL' if self._relaxed_ok else 'FULL'}")
            self._conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise ServerError(f"Cannot open the database {self.path}: {exc}; check the path and permissions.") from exc
        self._lock = threading.RLock()
        self._depth = 0
        self._durable = False  # the open transaction wrote something that must be fsynced at commit
        self._wal_fd: Optional[int] = None
        self._wal_ino: Optional[int] = None
        # committed member counts {rollout_id: {state: n}} and the open transaction's changes to them
        self._counts: dict[str, dict[str, int]] = {}
        self._pending: dict[str, dict[str, int]] = {}
        self._data_version: Optional[int] = None
        # bundle records by id (immutable but for ``stage``); same invalidation as the counts
        self._bundles: dict[str, BundleRecord] = {}

    # ------------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._conn.execute("BEGIN IMMEDIATE")
                self._durable = False
                self._pending.clear()
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._pending.clear()
                    self._bundles.clear()  # it may hold what this transaction wrote
                    self._conn.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                try:
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._pending.clear()
                    self._counts.clear()
                    self._bundles.clear()
                    raise
                for rollout_id, delta in self._pending.items():
                    base = self._counts.get(rollout_id)
                    if base is not None:
                        for state, n in delta.items():
                            base[state] = base.get(state, 0) + n
                self._pending.clear()
                if self._durable:
                    self._sync_wal()

    def _sync_wal(self) -> None:
        """fsync the WAL file: what ``synchronous=FULL`` does at every commit (called under the lock)."""
        if not self._relaxed_ok:
            return  # the connection runs synchronous=FULL itself
        wal = f"{self.path}-wal"
        try:
            ino = os.stat(wal).st_ino
        except FileNotFoundError:
            return  # nothing in the WAL (it was checkpointed and removed): the database file itself was synced
        if self._wal_fd is None or self._wal_ino != ino:
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
            self._wal_fd = os.open(wal, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._wal_ino = os.fstat(self._wal_fd).st_ino
        os.fsync(self._wal_fd)

    def _q(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _x(self, sql: str, params: tuple = (), durable: bool = True) -> int:
        """Run a write; ``durable=False`` only for check-in report columns (see the module docstring)."""
        with self._lock:
            n = self._conn.execute(sql, params).rowcount
            if durable:
                if self._depth:
                    self._durable = True
                else:
                    self._sync_wal()  # autocommit: committed now
            return n

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None

    # --------------------------------------------------------------------- locks
    # BEGIN IMMEDIATE takes SQLite's write lock for the whole transaction, so every writer
    # (in this process or another on the same file) is already serialized: plain reads suffice.

    def lock_device(self, device_id: str) -> Optional[DeviceRecord]:
        return self.get_device(device_id)

    def lock_rollout(self, rollout_id: str) -> Optional[RolloutRecord]:
        return self.get_rollout(rollout_id)

    def lock_key(self, key: str) -> None:
        return None

    def try_lock_key(self, key: str) -> bool:
        return True

    # ---------------------------------------------------------------- migrations

    def schema_version(self) -> int:
        rows = self._q("SELECT name FROM sqlite_master WHERE type='table' AND name='schema_migrations'")
        if not rows:
            return 0
        return self._q("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")[0][0]

    def migrate(self) -> list[int]:
        applied = []
        # One BEGIN IMMEDIATE transaction around reading the version and applying what is missing: two
        # processes migrating the same file at once (a server starting during `edgepack server migrate`)
        # apply each version once, and a crash leaves no half-applied version.
        with self.transaction():
            self._x("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)")
            current = self.schema_version()
            if current > MIGRATIONS[-1].version:
                raise ServerError(
                    f"The database {self.path} has schema version {current}, newer than this edgepack supports "
                    f"({MIGRATIONS[-1].version}); upgrade edgepack."
                )
            for migration in MIGRATIONS:
                if migration.version > current:
                    self._apply(migration)
                    applied.append(migration.version)
        return applied

    def _apply(self, migration: Migration) -> None:
        with self.transaction():
            for statement in migration.statements:
                self._x(statement)
            self._x("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()))

    # ------------------------------------------------------------------- bundles

    _BUNDLE_COLS = "id, name, version, digest, size, stage, key_id, manifest, created_at"

    @staticmethod
    def _bundle(row: tuple) -> BundleRecord:
        return BundleRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], _u(row[7]), row[8])

    def add_bundle(self, bundle: BundleRecord) -> None:
        with self.transaction():
            self._x(f"INSERT INTO bundles ({self._BUNDLE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (bundle.id, bundle.name, bundle.version, bundle.digest, bundle.size, bundle.stage, bundle.key_id,
                     _j(bundle.manifest), bundle.created_at))
            self._x("INSERT INTO stage_history (bundle_id, n, from_stage, to_stage, at) VALUES (?, 0, NULL, ?, ?)",
                    (bundle.id, bundle.stage, bundle.created_at))

    def _one_bundle(self, where: str, params: tuple) -> Optional[BundleRecord]:
        rows = self._q(f"SELECT {self._BUNDLE_COLS} FROM bundles WHERE {where}", params)
        return self._bundle(rows[0]) if rows else None

    def get_bundle(self, bundle_id: str) -> Optional[BundleRecord]:
        # Read on every check-in (several times); the manifest is the costly part to parse.
        with self._lock:
            self._check_data_version()
            found = self._bundles.get(bundle_id)
            if found is None:
                found = self._one_bundle("id = ?", (bundle_id,))
                if found is not None:
                    self._bundles[bundle_id] = found
            return found

    def get_bundle_by_digest(self, digest: str) -> Optional[BundleRecord]:
        with self._lock:
            rows = self._q("SELECT id FROM bundles WHERE digest = ?", (digest,))
            return self.get_bundle(rows[0][0]) if rows else None

    def find_bundle(self, name: str, version: str) -> Optional[BundleRecord]:
        return self._one_bundle("name = ? AND version = ?", (name, version))

    def list_bundles(self) -> list[BundleRecord]:
        return [self._bundle(r) for r in self._q(f"SELECT {self._BUNDLE_COLS} FROM bundles ORDER BY created_at, id")]

    def set_bundle_stage(self, bundle_id: str, stage: str, at: float) -> None:
        with self.transaction():
            self._bundles.pop(bundle_id, None)
            old = self._q("SELECT stage FROM bundles WHERE id = ?", (bundle_id,))
            if not old:
                raise KeyError(bundle_id)
            n = self._q("SELECT COALESCE(MAX(n), -1) + 1 FROM stage_history WHERE bundle_id = ?", (bundle_id,))[0][0]
            self._x("UPDATE bundles SET stage = ? WHERE id = ?", (stage, bundle_id))
            self._x("INSERT INTO stage_history (bundle_id, n, from_stage, to_stage, at) VALUES (?, ?, ?, ?, ?)",
                    (bundle_id, n, old[0][0], stage, at))

    def bundle_ref(self, bundle_id: str) -> Optional[BundleRef]:
        b = self.get_bundle(bundle_id)  # cached by id already
        return None if b is None else BundleRef(b.id, b.name, b.version, b.digest, b.size)

    def bundle_ref_by_digest(self, digest: str) -> Optional[BundleRef]:
        b = self.get_bundle_by_digest(digest)
        return None if b is None else BundleRef(b.id, b.name, b.version, b.digest, b.size)

    def stage_history(self, bundle_id: str) -> list[StageChange]:
        rows = self._q("SELECT bundle_id, from_stage, to_stage, at FROM stage_history WHERE bundle_id = ? ORDER BY n", (bundle_id,))
        return [StageChange(*r) for r in rows]

    # ------------------------------------------------------------------- devices

    _DEVICE_COLS = ("id, grp, tags, profile, token_sha256, created_at, last_seen, last_seq, state, current, previous, "
                    "health, runtime_version, engines")

    @staticmethod
    def _device(r: tuple) -> DeviceRecord:
        return DeviceRecord(r[0], r[1], _u(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], _u(r[9]), _u(r[10]), _u(r[11]),
                            r[12], _u(r[13]))

    @staticmethod
    def _device_params(d: DeviceRecord) -> tuple:
        return (d.id, d.group, _j(d.tags), d.profile, d.token_sha256, d.created_at, d.last_seen, d.last_seq, d.state,
                _j(d.current), _j(d.previous), _j(d.health), d.runtime_version, _j(d.engines))

    def add_device(self, device: DeviceRecord) -> None:
        self._x(f"INSERT INTO devices ({self._DEVICE_COLS}) VALUES ({', '.join('?' * 14)})", self._device_params(device))

    def save_device(self, device: DeviceRecord) -> None:
        cols = [c.strip() for c in self._DEVICE_COLS.split(",")][1:]
        params = self._device_params(device)
        changed = self._x(f"UPDATE devices SET {', '.join(c + ' = ?' for c in cols)} WHERE id = ?", params[1:] + (device.id,))
        if not changed:
            raise KeyError(device.id)

    _REPORT_SQL = ("UPDATE devices SET last_seen = ?, last_seq = ?, state = ?, current = ?, previous = ?, health = ?, "
                   "runtime_version = ?, engines = ? WHERE id = ?")

    def save_device_report(self, device: DeviceRecord) -> None:
        d = device
        changed = self._x(self._REPORT_SQL, (d.last_seen, d.last_seq, d.state, _j(d.current), _j(d.previous), _j(d.health),
                                             d.runtime_version, _j(d.engines), d.id), durable=False)
        if not changed:
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
        if group is None:
            rows = self._q(f"SELECT {self._DEVICE_COLS} FROM devices ORDER BY id")
        else:
            rows = self._q(f"SELECT {self._DEVICE_COLS} FROM devices WHERE grp = ? ORDER BY id", (group,))
        return [self._device(r) for r in rows]

    # ------------------------------------------------------------------ rollouts

    _ROLLOUT_COLS = ("id, bundle_id, grp, steps, soak_seconds, min_devices_succeeded, max_failure_rate, halt_min_count, "
                     "probation, status, step_index, step_started_at, created_at, updated_at, halt_reasons, history, gates")

    @staticmethod
    def _rollout(r: tuple) -> RolloutRecord:
        return RolloutRecord(r[0], r[1], r[2], _u(r[3]), r[4], r[5], r[6], r[7], _u(r[8]), r[9], r[10], r[11], r[12],
                             r[13], _u(r[14]), _u(r[15]), _u(r[16]) or {})

    @staticmethod
    def _rollout_params(x: RolloutRecord) -> tuple:
        return (x.id, x.bundle_id, x.group, _j(x.steps), x.soak_seconds, x.min_devices_succeeded, x.max_failure_rate,
                x.halt_min_count, _j(x.probation), x.status, x.step_index, x.step_started_at, x.created_at, x.updated_at,
                _j(x.halt_reasons), _j(x.history), _j(x.gates or {}))

    def add_rollout(self, rollout: RolloutRecord) -> None:
        self._x(f"INSERT INTO rollouts ({self._ROLLOUT_COLS}) VALUES ({', '.join('?' * 17)})", self._rollout_params(rollout))

    def save_rollout(self, rollout: RolloutRecord) -> None:
        cols = [c.strip() for c in self._ROLLOUT_COLS.split(",")][1:]
        params = self._rollout_params(rollout)
        if not self._x(f"UPDATE rollouts SET {', '.join(c + ' = ?' for c in cols)} WHERE id = ?", params[1:] + (rollout.id,)):
            raise KeyError(rollout.id)

    def get_rollout(self, rollout_id: str) -> Optional[RolloutRecord]:
        rows = self._q(f"SELECT {self._ROLLOUT_COLS} FROM rollouts WHERE id = ?", (rollout_id,))
        return self._rollout(rows[0]) if rows else None

    def list_rollouts(self, group: Optional[str] = None, statuses: Optional[list[str]] = None) -> list[RolloutRecord]:
        where, params = [], []
        if group is not None:
            where.append("grp = ?")
            params.append(group)
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            params.extend(statuses)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._q(f"SELECT {self._ROLLOUT_COLS} FROM rollouts {clause} ORDER BY created_at, id", tuple(params))
        return [self._rollout(r) for r in rows]

    _MEMBER_COLS = "rollout_id, device_id, step_index, state, from_digest, joined_at, updated_at, failure_code, failure_detail"

    def get_member(self, rollout_id: str, device_id: str) -> Optional[MemberRecord]:
        rows = self._q(f"SELECT {self._MEMBER_COLS} FROM rollout_members WHERE rollout_id = ? AND device_id = ?",
                       (rollout_id, device_id))
        return MemberRecord(*rows[0]) if rows else None

    def _check_data_version(self) -> None:
        """Drop the caches when another connection committed (under the lock)."""
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._counts.clear()
            self._bundles.clear()
            self._data_version = version

    def member_counts(self, rollout_id: str) -> dict[str, int]:
        with self._lock:
            self._check_data_version()
            pending = self._pending.get(rollout_id, {})
            base = self._counts.get(rollout_id)
            if base is None:  # what is visible now includes the open transaction's changes
                rows = self._q("SELECT state, COUNT(*) FROM rollout_members WHERE rollout_id = ? GROUP BY state", (rollout_id,))
                now = dict(rows)
                base = {k: now.get(k, 0) - pending.get(k, 0) for k in set(now) | set(pending)}
                self._counts[rollout_id] = base
            out = {k: base.get(k, 0) + pending.get(k, 0) for k in set(base) | set(pending)}
            return {k: n for k, n in out.items() if n}

    def list_members(self, rollout_id: str) -> list[MemberRecord]:
        rows = self._q(f"SELECT {self._MEMBER_COLS} FROM rollout_members WHERE rollout_id = ? ORDER BY device_id", (rollout_id,))
        return [MemberRecord(*r) for r in rows]

    def members_of_device(self, device_id: str) -> list[MemberRecord]:
        rows = self._q(f"SELECT {self._MEMBER_COLS} FROM rollout_members WHERE device_id = ? ORDER BY joined_at", (device_id,))
        return [MemberRecord(*r) for r in rows]

    def memberships_of_device(self, device_id: str) -> list[tuple[MemberRecord, RolloutRecord]]:
        with self._lock:
            out = []
            for m in self.members_of_device(device_id):
                r = self.get_rollout(m.rollout_id)
                if r is not None:
                    out.append((m, r))
            return out

    def save_member(self, member: MemberRecord) -> None:
        values = astuple(member)
        names = [f.name for f in fields(MemberRecord)]
        with self.transaction():
            old = self._q("SELECT state FROM rollout_members WHERE rollout_id = ? AND device_id = ?",
                          (member.rollout_id, member.device_id))
            if not old:
                self._x(f"INSERT INTO rollout_members ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", values)
            else:
                self._x(f"UPDATE rollout_members SET {', '.join(n + ' = ?' for n in names[2:])} "
                        "WHERE rollout_id = ? AND device_id = ?", values[2:] + values[:2])
            if not old or old[0][0] != member.state:
                delta = self._pending.setdefault(member.rollout_id, {})
                delta[member.state] = delta.get(member.state, 0) + 1
                if old:
                    delta[old[0][0]] = delta.get(old[0][0], 0) - 1

    def add_grant(self, device_id: str, digest: str, at: float) -> None:
        with self._lock:
            if self._q("SELECT 1 FROM grants WHERE device_id = ? AND digest = ?", (device_id, digest)):
                return  # already granted: no write (a check-in that only repeats a directive stays report-only)
            self._x("INSERT OR IGNORE INTO grants (device_id, digest, at) VALUES (?, ?, ?)", (device_id, digest, at))

    def has_grant(self, device_id: str, digest: str) -> bool:
        return bool(self._q("SELECT 1 FROM grants WHERE device_id = ? AND digest = ?", (device_id, digest)))

    # -------------------------------------------------------------------- events

    _EVENT_COLS = "device_id, seq, type, rollout_id, digest, version, reason_code, reason_detail, at, received_at"

    def add_events(self, events: list[EventRecord]) -> None:
        with self.transaction():
            for e in events:
                self._x(f"INSERT INTO events ({self._EVENT_COLS}) VALUES ({', '.join('?' * 10)})", astuple(e))

    def list_events(self, device_id: Optional[str] = None, rollout_id: Optional[str] = None, limit: int = 100) -> list[EventRecord]:
        where, params = [], []
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        if rollout_id is not None:
            where.append("rollout_id = ?")
            params.append(rollout_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._q(f"SELECT {self._EVENT_COLS} FROM events {clause} ORDER BY received_at DESC, seq DESC LIMIT ?",
                       (*params, int(limit)))
        return [EventRecord(*r) for r in rows]

    # --------------------------------------------------------------- monitoring

    def set_reference(self, digest: str, reference: dict[str, Any], at: float) -> None:
        self._x("INSERT OR REPLACE INTO bundle_references (digest, reference, created_at) VALUES (?, ?, ?)",
                (digest, _j(reference), at))

    def get_reference(self, digest: str) -> Optional[dict[str, Any]]:
        rows = self._q("SELECT reference FROM bundle_references WHERE digest = ?", (digest,))
        return _u(rows[0][0]) if rows else None

    _DRIFT_COLS = "grp, digest, version, kind, feature, at, value, p_value, n, drifted, detail"

    def add_drift_stats(self, rows: list[DriftStat]) -> None:
        if not rows:
            return
        with self.transaction():
            self._conn.executemany(
                f"INSERT INTO drift_stats ({self._DRIFT_COLS}) VALUES ({', '.join('?' * 11)})",
                [(d.group, d.digest, d.version, d.kind, d.feature, d.at, d.value, d.p_value, d.n, int(d.drifted),
                  _j(d.detail)) for d in rows])
            self._durable = True

    def list_drift_stats(self, group: Optional[str] = None, version: Optional[str] = None, since: Optional[float] = None,
                         limit: int = 1000) -> list[DriftStat]:
        where, params = [], []
        for col, value in (("grp = ?", group), ("version = ?", version), ("at >= ?", since)):
            if value is not None:
                where.append(col)
                params.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._q(f"SELECT {self._DRIFT_COLS} FROM drift_stats {clause} ORDER BY at DESC, rowid DESC LIMIT ?",
                       (*params, int(limit)))
        return [DriftStat(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], bool(r[9]), _u(r[10])) for r in rows]

    def prune_drift_stats(self, before: float) -> int:
        return self._x("DELETE FROM drift_stats WHERE at < ?", (before,))

    _ALERT_COLS = "id, kind, grp, version, feature, digest, status, message, value, threshold, first_at, last_at, count, detail"

    @staticmethod
    def _alert(r: tuple) -> AlertRecord:
        return AlertRecord(*r[:13], _u(r[13]))

    def save_alert(self, alert: AlertRecord) -> None:
        a = alert
        self._x(f"INSERT OR REPLACE INTO alerts ({self._ALERT_COLS}) VALUES ({', '.join('?' * 14)})",
                (a.id, a.kind, a.group, a.version, a.feature, a.digest, a.status, a.message, a.value, a.threshold,
                 a.first_at, a.last_at, a.count, _j(a.detail)))

    def open_alert(self, kind: str, group: str, version: str, feature: str) -> Optional[AlertRecord]:
        rows = self._q(f"SELECT {self._ALERT_COLS} FROM alerts WHERE kind = ? AND grp = ? AND version = ? AND feature = ? "
                       "AND status = 'open' ORDER BY first_at DESC LIMIT 1", (kind, group, version, feature))
        return self._alert(rows[0]) if rows else None

    def list_alerts(self, status: Optional[str] = None, group: Optional[str] = None, limit: int = 200) -> list[AlertRecord]:
        where, params = [], []
        for col, value in (("status = ?", status), ("grp = ?", group)):
            if value is not None:
                where.append(col)
                params.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._q(f"SELECT {self._ALERT_COLS} FROM alerts {clause} ORDER BY last_at DESC, id LIMIT ?",
                       (*params, int(limit)))
        return [self._alert(r) for r in rows]

    # ------------------------------------------------------- shared monitoring

    def put_monitor_windows(self, rows: list[MonitorWindowRecord]) -> None:
        if not rows:
            return
        with self.transaction():
            self._conn.executemany(
                "INSERT INTO monitor_windows (device_id, grp, digest, at, data) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET grp = excluded.grp, digest = excluded.digest, at = excluded.at, "
                "data = excluded.data WHERE excluded.at >= monitor_windows.at",
                [(w.device_id, w.group, w.digest, w.at, _j(w.window)) for w in rows])
            # Windows are evidence for alerts and gates, rebuilt from devices' next check-ins if lost:
            # like check-in reports they need no fsync of their own.

    def list_monitor_windows(self, since: float) -> list[MonitorWindowRecord]:
        rows = self._q("SELECT device_id, grp, digest, at, data FROM monitor_windows WHERE at >= ? ORDER BY device_id", (since,))
        return [MonitorWindowRecord(r[0], r[1], r[2], r[3], _u(r[4])) for r in rows]

    def prune_monitor_windows(self, before: float) -> int:
        return self._x("DELETE FROM monitor_windows WHERE at < ?", (before,), durable=False)

    def save_gate_verdict(self, rollout_id: str, verdict: dict[str, Any], at: float) -> None:
        self._x("INSERT INTO gate_verdicts (rollout_id, verdict, at) VALUES (?, ?, ?) ON CONFLICT (rollout_id) DO UPDATE "
                "SET verdict = excluded.verdict, at = excluded.at", (rollout_id, _j(verdict), at), durable=False)

    def get_gate_verdict(self, rollout_id: str) -> Optional[dict[str, Any]]:
        rows = self._q("SELECT verdict FROM gate_verdicts WHERE rollout_id = ?", (rollout_id,))
        return _u(rows[0][0]) if rows else None
