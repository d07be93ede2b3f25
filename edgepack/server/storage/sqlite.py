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
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import astuple, fields
from pathlib import Path
from typing import Any, Optional

from ...errors import ServerError
from . import _rows as shared
from ._common import SharedStatements
from .base import (AlertRecord, BundleRecord, BundleRef, DeviceRecord, DriftStat, EventRecord, MemberRecord, MonitorWindowRecord,
                   RolloutRecord)

__all__ = ["SqliteStorage"]


_j, _u = shared.dumps, shared.loads


class SqliteStorage(SharedStatements):
    """Storage in one SQLite file."""

    inline_safe = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._shown = str(self.path)
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

    _MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                         "applied_at REAL NOT NULL)")

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

    # ------------------------------------------------------------------- devices

    # ------------------------------------------------------------------ rollouts

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

    # -------------------------------------------------------------------- events

    def add_events(self, events: list[EventRecord]) -> None:
        with self.transaction():
            for e in events:
                self._x(shared.insert_sql("events", shared.EVENT_COLS, "?"), shared.event_params(e))

    # --------------------------------------------------------------- monitoring

    def set_reference(self, digest: str, reference: dict[str, Any], at: float) -> None:
        self._x("INSERT OR REPLACE INTO bundle_references (digest, reference, created_at) VALUES (?, ?, ?)",
                (digest, _j(reference), at))

    def add_drift_stats(self, stats: list[DriftStat]) -> None:
        if not stats:
            return
        with self.transaction():
            self._conn.executemany(shared.insert_sql("drift_stats", shared.DRIFT_COLS, "?"), [shared.drift_params(d) for d in stats])
            self._durable = True

    def save_alert(self, alert: AlertRecord) -> None:
        self._x(shared.insert_sql("alerts", shared.ALERT_COLS, "?").replace("INSERT", "INSERT OR REPLACE", 1),
                shared.alert_params(alert))

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

    def save_gate_verdict(self, rollout_id: str, verdict: dict[str, Any], at: float) -> None:
        self._x("INSERT INTO gate_verdicts (rollout_id, verdict, at) VALUES (?, ?, ?) ON CONFLICT (rollout_id) DO UPDATE "
                "SET verdict = excluded.verdict, at = excluded.at", (rollout_id, _j(verdict), at), durable=False)

