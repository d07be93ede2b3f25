"""PostgreSQL implementation of :class:`~.base.Storage` (psycopg 3 + a connection pool).

Made for several server replicas on one database, so it keeps **no state between
calls** that another replica could change: every read goes to the database. The only
caches hold what never changes once written: a bundle's parsed manifest and its
:class:`BundleRef` (id, name, version, digest, size), by id and by digest.

Transactions: ``transaction()`` checks a connection out of the pool for the calling
thread and runs ``BEGIN … COMMIT`` on it at READ COMMITTED, so each statement sees
everything committed before it started. Exactly-once decisions (a step advancing, a
halt, a device joining a cohort) use the ``lock_*`` methods: ``SELECT … FOR UPDATE`` on
the device or rollout row, or ``pg_advisory_xact_lock`` on a named key, held to the end
of the transaction. Deadlocks and serialization failures become :class:`StorageConflict`
(the transaction was rolled back and can be retried whole).

Member counts per rollout and state live in ``rollout_member_counts`` and are updated
by :meth:`save_member` in the same transaction (callers change members only while
holding the rollout's row lock, so these rows see no extra contention).

Durability mirrors the SQLite backend: a transaction that only rewrote a device's
check-in report commits with ``synchronous_commit = off`` (a crash of the database
host may lose the last fraction of a second of such reports, never rollout state);
everything else commits synchronously. The sessions default to ``off`` and a durable
transaction switches it on just before its COMMIT, so the frequent report-only check-in
pays no extra round trip; a durable write outside a transaction gets one of its own.

Migrations take a transaction-scoped advisory lock, so replicas that start together
(or ``edgepack server migrate`` run twice) apply each version exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

from ...errors import ServerError
from .base import (AlertRecord, BundleRecord, BundleRef, DeviceRecord, DriftStat, EventRecord, MemberRecord, MonitorWindowRecord,
                   RolloutRecord, StageChange, StorageConflict, StorageUnavailable, TokenOwner)
from .migrations import MIGRATIONS, Migration
from .sqlite import _j, _u

__all__ = ["PostgresStorage"]

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError:  # pragma: no cover - exercised only without the extra
    psycopg = None  # type: ignore[assignment]

_MIGRATION_LOCK = 0x6564_6765  # "edge": advisory lock id serializing migrations across replicas


def _pg_types(statement: str) -> str:
    """The shared migration SQL with PostgreSQL column types (64-bit integers and doubles)."""
    statement = re.sub(r"\bINTEGER\b", "BIGINT", statement)
    statement = re.sub(r"\bREAL\b", "DOUBLE PRECISION", statement)
    # drift_stats has no primary key; SQLite orders equal timestamps by rowid, PostgreSQL by this column.
    return statement.replace("CREATE TABLE drift_stats (", "CREATE TABLE drift_stats (seq BIGSERIAL, ")


def _key_id(key: str) -> int:
    """A stable signed 64-bit advisory-lock id for a lock name (the same in every replica)."""
    return int.from_bytes(hashlib.blake2b(b"edgepack:" + key.encode("utf-8"), digest_size=8).digest(), "big", signed=True)


def _configure(conn: Any) -> None:
    """Every pooled session commits asynchronously unless a transaction asks otherwise (module docstring)."""
    conn.execute("SET synchronous_commit = off")


class _Tx:
    __slots__ = ("conn", "depth", "durable")

    def __init__(self, conn: Any) -> None:
        self.conn, self.depth, self.durable = conn, 0, False


class PostgresStorage:
    """Storage in a PostgreSQL database shared by any number of server processes."""

    inline_safe = False  # calls wait on the network and on other replicas' row locks

    def __init__(self, url: str, pool_size: int = 16, connect_timeout: float = 10.0) -> None:
        from . import redact_url

        self.url = url
        self._shown = redact_url(url)
        if psycopg is None:
            raise ServerError("PostgreSQL storage needs the 'postgres' extra: pip install 'edgepack[postgres]'.")
        self._local = threading.local()
        self._manifests: dict[str, dict[str, Any]] = {}  # bundle id -> parsed manifest (immutable per id)
        self._refs: dict[str, BundleRef] = {}  # bundle id and digest -> BundleRef (immutable)
        try:  # one plain connection first: it fails fast with the server's own reason (bad password, no database…)
            psycopg.connect(url, connect_timeout=max(1, int(connect_timeout))).close()
        except psycopg.Error as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ServerError(f"Cannot connect to the database {self._shown}: {reason}. Check that PostgreSQL is running "
                              "and the URL's host, port, user, password and database name.") from None
        try:
            self._pool = ConnectionPool(url, min_size=1, max_size=max(2, int(pool_size)), timeout=connect_timeout,
                                        kwargs={"autocommit": True}, open=False, name="edgepack",
                                        configure=_configure)
            self._pool.open(wait=True, timeout=connect_timeout)
        except (psycopg.Error, PoolTimeout) as exc:
            with contextlib.suppress(Exception):
                self._pool.close()
            raise ServerError(f"Cannot connect to the database {self._shown}: {exc}; check that PostgreSQL is running "
                              "and the URL's host, port, user, password and database name.") from None

    # ------------------------------------------------------------------ plumbing

    def _tx(self) -> Optional[_Tx]:
        return getattr(self._local, "tx", None)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        tx = self._tx()
        if tx is not None:  # nested: only the outermost transaction commits
            tx.depth += 1
            try:
                yield
            finally:
                tx.depth -= 1
            return
        with self._connection() as conn:
            tx = _Tx(conn)
            tx.depth = 1
            self._local.tx = tx
            try:
                with self._translated():
                    conn.execute("BEGIN")
                try:
                    yield
                except BaseException:
                    with contextlib.suppress(Exception):
                        conn.execute("ROLLBACK")
                    raise
                with self._translated():
                    if tx.durable:  # sessions default to off (see the module docstring)
                        conn.execute("SET LOCAL synchronous_commit = on")
                    conn.execute("COMMIT")
            finally:
                self._local.tx = None

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise StorageUnavailable(f"No database connection became free in time ({self._shown}); the database is "
                                     "overloaded or unreachable, or the pool is too small for the load.") from exc
        except psycopg.OperationalError as exc:
            raise StorageUnavailable(f"Lost the connection to the database {self._shown}: {exc}; check that PostgreSQL "
                                     "is running.") from exc

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """Translate the driver's errors into the server's (the one place that does it)."""
        try:
            yield
        except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure, pg_errors.LockNotAvailable) as exc:
            raise StorageConflict(f"Another server process changed the same rows ({type(exc).__name__}); "
                                  "the transaction was rolled back, retry it.") from exc
        except psycopg.OperationalError as exc:
            raise StorageUnavailable(f"Lost the connection to the database {self._shown}: {exc}; check that PostgreSQL "
                                     "is running.") from exc

    def _run(self, sql: str, params: tuple = (), fetch: bool = True, durable: bool = True) -> Any:
        tx = self._tx()
        if tx is None and durable:
            with self.transaction():  # a synchronous commit of its own
                return self._run(sql, params, fetch, durable)
        if tx is not None:
            if durable:
                tx.durable = True
            with self._translated():
                cur = tx.conn.execute(sql, params)
                return cur.fetchall() if fetch else cur.rowcount
        with self._connection() as conn, self._translated():
            cur = conn.execute(sql, params)
            return cur.fetchall() if fetch else cur.rowcount

    def _q(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self._run(sql, params, fetch=True, durable=False)

    def _x(self, sql: str, params: tuple = (), durable: bool = True) -> int:
        return self._run(sql, params, fetch=False, durable=durable)

    def _many(self, sql: str, rows: list[tuple], durable: bool = True) -> None:
        with self.transaction():
            tx = self._tx()
            tx.durable = tx.durable or durable
            with self._translated(), tx.conn.cursor() as cur:
                cur.executemany(sql, rows)

    def close(self) -> None:
        self._pool.close()

    # --------------------------------------------------------------------- locks

    def lock_device(self, device_id: str) -> Optional[DeviceRecord]:
        rows = self._q(f"SELECT {self._DEVICE_COLS} FROM devices WHERE id = %s FOR UPDATE", (device_id,))
        return self._device(rows[0]) if rows else None

    def lock_rollout(self, rollout_id: str) -> Optional[RolloutRecord]:
        rows = self._q(f"SELECT {self._ROLLOUT_COLS} FROM rollouts WHERE id = %s FOR UPDATE", (rollout_id,))
        return self._rollout(rows[0]) if rows else None

    def lock_key(self, key: str) -> None:
        self._q("SELECT pg_advisory_xact_lock(%s)", (_key_id(key),))

    def try_lock_key(self, key: str) -> bool:
        return bool(self._q("SELECT pg_try_advisory_xact_lock(%s)", (_key_id(key),))[0][0])

    # ---------------------------------------------------------------- migrations

    def schema_version(self) -> int:
        if not self._q("SELECT to_regclass('schema_migrations') IS NOT NULL")[0][0]:
            return 0
        return int(self._q("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")[0][0])

    def migrate(self) -> list[int]:
        applied: list[int] = []
        with self.transaction():  # DDL is transactional here: all pending versions or none
            self._q("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            self._x("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, "
                    "applied_at DOUBLE PRECISION NOT NULL)")
            current = self.schema_version()
            if current > MIGRATIONS[-1].version:
                raise ServerError(f"The database {self._shown} has schema version {current}, newer than this edgepack "
                                  f"supports ({MIGRATIONS[-1].version}); upgrade edgepack.")
            for migration in MIGRATIONS:
                if migration.version > current:
                    self._apply(migration)
                    applied.append(migration.version)
        return applied

    def _apply(self, migration: Migration) -> None:
        for statement in migration.statements + migration.postgres_only:
            self._x(_pg_types(statement))
        self._x("INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                (migration.version, migration.name, time.time()))

    # ------------------------------------------------------------------- bundles

    _BUNDLE_COLS = "id, name, version, digest, size, stage, key_id, created_at"

    def _bundle(self, row: tuple) -> BundleRecord:
        manifest = self._manifests.get(row[0])
        if manifest is None:
            manifest = _u(self._q("SELECT manifest FROM bundles WHERE id = %s", (row[0],))[0][0])
            self._manifests[row[0]] = manifest
        return BundleRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], manifest, row[7])

    def add_bundle(self, bundle: BundleRecord) -> None:
        with self.transaction():
            self._x("INSERT INTO bundles (id, name, version, digest, size, stage, key_id, manifest, created_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (bundle.id, bundle.name, bundle.version, bundle.digest, bundle.size, bundle.stage, bundle.key_id,
                     _j(bundle.manifest), bundle.created_at))
            self._x("INSERT INTO stage_history (bundle_id, n, from_stage, to_stage, at) VALUES (%s, 0, NULL, %s, %s)",
                    (bundle.id, bundle.stage, bundle.created_at))

    def _one_bundle(self, where: str, params: tuple) -> Optional[BundleRecord]:
        rows = self._q(f"SELECT {self._BUNDLE_COLS} FROM bundles WHERE {where}", params)
        return self._bundle(rows[0]) if rows else None

    def get_bundle(self, bundle_id: str) -> Optional[BundleRecord]:
        return self._one_bundle("id = %s", (bundle_id,))

    def get_bundle_by_digest(self, digest: str) -> Optional[BundleRecord]:
        return self._one_bundle("digest = %s", (digest,))

    def find_bundle(self, name: str, version: str) -> Optional[BundleRecord]:
        return self._one_bundle("name = %s AND version = %s", (name, version))

    def list_bundles(self) -> list[BundleRecord]:
        return [self._bundle(r) for r in self._q(f"SELECT {self._BUNDLE_COLS} FROM bundles ORDER BY created_at, id")]

    def set_bundle_stage(self, bundle_id: str, stage: str, at: float) -> None:
        with self.transaction():
            old = self._q("SELECT stage FROM bundles WHERE id = %s FOR UPDATE", (bundle_id,))
            if not old:
                raise KeyError(bundle_id)
            n = self._q("SELECT COALESCE(MAX(n), -1) + 1 FROM stage_history WHERE bundle_id = %s", (bundle_id,))[0][0]
            self._x("UPDATE bundles SET stage = %s WHERE id = %s", (stage, bundle_id))
            self._x("INSERT INTO stage_history (bundle_id, n, from_stage, to_stage, at) VALUES (%s, %s, %s, %s, %s)",
                    (bundle_id, n, old[0][0], stage, at))

    def _ref(self, where: str, key: str) -> Optional[BundleRef]:
        found = self._refs.get(key)
        if found is None:
            rows = self._q(f"SELECT id, name, version, digest, size FROM bundles WHERE {where}", (key,))
            if not rows:
                return None  # not cached: it may be uploaded any moment
            found = BundleRef(*rows[0])
            self._refs[found.id] = self._refs[found.digest] = found
        return found

    def bundle_ref(self, bundle_id: str) -> Optional[BundleRef]:
        return self._ref("id = %s", bundle_id)

    def bundle_ref_by_digest(self, digest: str) -> Optional[BundleRef]:
        return self._ref("digest = %s", digest)

    def stage_history(self, bundle_id: str) -> list[StageChange]:
        rows = self._q("SELECT bundle_id, from_stage, to_stage, at FROM stage_history WHERE bundle_id = %s ORDER BY n",
                       (bundle_id,))
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
        self._x(f"INSERT INTO devices ({self._DEVICE_COLS}) VALUES ({', '.join(['%s'] * 14)})", self._device_params(device))

    def save_device(self, device: DeviceRecord) -> None:
        cols = [c.strip() for c in self._DEVICE_COLS.split(",")][1:]
        params = self._device_params(device)
        if not self._x(f"UPDATE devices SET {', '.join(c + ' = %s' for c in cols)} WHERE id = %s", params[1:] + (device.id,)):
            raise KeyError(device.id)

    def save_device_report(self, device: DeviceRecord) -> None:
        d = device
        changed = self._x("UPDATE devices SET last_seen = %s, last_seq = %s, state = %s, current = %s, previous = %s, "
                          "health = %s, runtime_version = %s, engines = %s WHERE id = %s",
                          (d.last_seen, d.last_seq, d.state, _j(d.current), _j(d.previous), _j(d.health),
                           d.runtime_version, _j(d.engines), d.id), durable=False)
        if not changed:
            raise KeyError(device.id)

    def get_device(self, device_id: str) -> Optional[DeviceRecord]:
        rows = self._q(f"SELECT {self._DEVICE_COLS} FROM devices WHERE id = %s", (device_id,))
        return self._device(rows[0]) if rows else None

    def get_device_by_token_hash(self, token_sha256: str) -> Optional[DeviceRecord]:
        rows = self._q(f"SELECT {self._DEVICE_COLS} FROM devices WHERE token_sha256 = %s", (token_sha256,))
        return self._device(rows[0]) if rows else None

    def get_token_owner(self, token_sha256: str) -> Optional[TokenOwner]:
        rows = self._q("SELECT id, token_sha256 FROM devices WHERE token_sha256 = %s", (token_sha256,))
        return TokenOwner(rows[0][0], rows[0][1]) if rows else None

    def list_devices(self, group: Optional[str] = None) -> list[DeviceRecord]:
        if group is None:
            rows = self._q(f"SELECT {self._DEVICE_COLS} FROM devices ORDER BY id")
        else:
            rows = self._q(f"SELECT {self._DEVICE_COLS} FROM devices WHERE grp = %s ORDER BY id", (group,))
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
        self._x(f"INSERT INTO rollouts ({self._ROLLOUT_COLS}) VALUES ({', '.join(['%s'] * 17)})", self._rollout_params(rollout))

    def save_rollout(self, rollout: RolloutRecord) -> None:
        cols = [c.strip() for c in self._ROLLOUT_COLS.split(",")][1:]
        params = self._rollout_params(rollout)
        if not self._x(f"UPDATE rollouts SET {', '.join(c + ' = %s' for c in cols)} WHERE id = %s", params[1:] + (rollout.id,)):
            raise KeyError(rollout.id)

    def get_rollout(self, rollout_id: str) -> Optional[RolloutRecord]:
        rows = self._q(f"SELECT {self._ROLLOUT_COLS} FROM rollouts WHERE id = %s", (rollout_id,))
        return self._rollout(rows[0]) if rows else None

    def list_rollouts(self, group: Optional[str] = None, statuses: Optional[list[str]] = None) -> list[RolloutRecord]:
        where, params = [], []
        if group is not None:
            where.append("grp = %s")
            params.append(group)
        if statuses:
            where.append("status = ANY(%s)")
            params.append(list(statuses))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._q(f"SELECT {self._ROLLOUT_COLS} FROM rollouts {clause} ORDER BY created_at, id", tuple(params))
        return [self._rollout(r) for r in rows]

    _MEMBER_COLS = "rollout_id, device_id, step_index, state, from_digest, joined_at, updated_at, failure_code, failure_detail"

    def get_member(self, rollout_id: str, device_id: str) -> Optional[MemberRecord]:
        rows = self._q(f"SELECT {self._MEMBER_COLS} FROM rollout_members WHERE rollout_id = %s AND device_id = %s",
                       (rollout_id, device_id))
        return MemberRecord(*rows[0]) if rows else None

    def member_counts(self, rollout_id: str) -> dict[str, int]:
        rows = self._q("SELECT state, n FROM rollout_member_counts WHERE rollout_id = %s AND n <> 0", (rollout_id,))
        return {state: int(n) for state, n in rows}

    def list_members(self, rollout_id: str) -> list[MemberRecord]:
        rows = self._q(f"SELECT {self._MEMBER_COLS} FROM rollout_members WHERE rollout_id = %s ORDER BY device_id", (rollout_id,))
        return [MemberRecord(*r) for r in rows]

    def members_of_device(self, device_id: str) -> list[MemberRecord]:
        rows = self._q(f"SELECT {self._MEMBER_COLS} FROM rollout_members WHERE device_id = %s ORDER BY joined_at",
                       (device_id,))
        return [MemberRecord(*r) for r in rows]

    def memberships_of_device(self, device_id: str) -> list[tuple[MemberRecord, RolloutRecord]]:
        cols = ", ".join([f"m.{c.strip()}" for c in self._MEMBER_COLS.split(",")]
                         + [f"r.{c.strip()}" for c in self._ROLLOUT_COLS.split(",")])
        rows = self._q(f"SELECT {cols} FROM rollout_members m JOIN rollouts r ON r.id = m.rollout_id "
                       "WHERE m.device_id = %s ORDER BY m.joined_at", (device_id,))
        return [(MemberRecord(*row[:9]), self._rollout(row[9:])) for row in rows]

    def save_member(self, member: MemberRecord) -> None:
        m = member
        with self.transaction():
            old = self._q("SELECT state FROM rollout_members WHERE rollout_id = %s AND device_id = %s FOR UPDATE",
                          (m.rollout_id, m.device_id))
            if not old:
                self._x(f"INSERT INTO rollout_members ({self._MEMBER_COLS}) VALUES ({', '.join(['%s'] * 9)})",
                        (m.rollout_id, m.device_id, m.step_index, m.state, m.from_digest, m.joined_at, m.updated_at,
                         m.failure_code, m.failure_detail))
            else:
                self._x("UPDATE rollout_members SET step_index = %s, state = %s, from_digest = %s, joined_at = %s, "
                        "updated_at = %s, failure_code = %s, failure_detail = %s WHERE rollout_id = %s AND device_id = %s",
                        (m.step_index, m.state, m.from_digest, m.joined_at, m.updated_at, m.failure_code, m.failure_detail,
                         m.rollout_id, m.device_id))
            if not old or old[0][0] != m.state:
                self._count(m.rollout_id, m.state, 1)
                if old:
                    self._count(m.rollout_id, old[0][0], -1)

    def _count(self, rollout_id: str, state: str, delta: int) -> None:
        self._x("INSERT INTO rollout_member_counts (rollout_id, state, n) VALUES (%s, %s, %s) "
                "ON CONFLICT (rollout_id, state) DO UPDATE SET n = rollout_member_counts.n + excluded.n",
                (rollout_id, state, delta))

    def add_grant(self, device_id: str, digest: str, at: float) -> None:
        tx = self._tx()
        if tx is None:
            with self.transaction():
                return self.add_grant(device_id, digest, at)
        # One round trip; only a new grant makes the transaction durable (a check-in that merely
        # repeats a directive stays report-only).
        inserted = self._run("INSERT INTO grants (device_id, digest, at) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                             (device_id, digest, at), fetch=False, durable=False)
        if inserted:
            tx.durable = True

    def has_grant(self, device_id: str, digest: str) -> bool:
        return bool(self._q("SELECT 1 FROM grants WHERE device_id = %s AND digest = %s", (device_id, digest)))

    # -------------------------------------------------------------------- events

    _EVENT_COLS = "device_id, seq, type, rollout_id, digest, version, reason_code, reason_detail, at, received_at"

    def add_events(self, events: list[EventRecord]) -> None:
        if events:
            self._many(f"INSERT INTO events ({self._EVENT_COLS}) VALUES ({', '.join(['%s'] * 10)})",
                       [(e.device_id, e.seq, e.type, e.rollout_id, e.digest, e.version, e.reason_code, e.reason_detail,
                         e.at, e.received_at) for e in events])

    def list_events(self, device_id: Optional[str] = None, rollout_id: Optional[str] = None, limit: int = 100) -> list[EventRecord]:
        where, params = [], []
        if device_id is not None:
            where.append("device_id = %s")
            params.append(device_id)
        if rollout_id is not None:
            where.append("rollout_id = %s")
            params.append(rollout_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._q(f"SELECT {self._EVENT_COLS} FROM events {clause} ORDER BY received_at DESC, seq DESC LIMIT %s",
                       (*params, int(limit)))
        return [EventRecord(*r) for r in rows]

    # --------------------------------------------------------------- monitoring

    def set_reference(self, digest: str, reference: dict[str, Any], at: float) -> None:
        self._x("INSERT INTO bundle_references (digest, reference, created_at) VALUES (%s, %s, %s) ON CONFLICT (digest) "
                "DO UPDATE SET reference = excluded.reference, created_at = excluded.created_at", (digest, _j(reference), at))

    def get_reference(self, digest: str) -> Optional[dict[str, Any]]:
        rows = self._q("SELECT reference FROM bundle_references WHERE digest = %s", (digest,))
        return _u(rows[0][0]) if rows else None

    _DRIFT_COLS = "grp, digest, version, kind, feature, at, value, p_value, n, drifted, detail"

    def add_drift_stats(self, rows: list[DriftStat]) -> None:
        if rows:
            self._many(f"INSERT INTO drift_stats ({self._DRIFT_COLS}) VALUES ({', '.join(['%s'] * 11)})",
                       [(d.group, d.digest, d.version, d.kind, d.feature, d.at, d.value, d.p_value, d.n, int(d.drifted),
                         _j(d.detail)) for d in rows])

    def list_drift_stats(self, group: Optional[str] = None, version: Optional[str] = None, since: Optional[float] = None,
                         limit: int = 1000) -> list[DriftStat]:
        where, params = [], []
        for col, value in (("grp = %s", group), ("version = %s", version), ("at >= %s", since)):
            if value is not None:
                where.append(col)
                params.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._q(f"SELECT {self._DRIFT_COLS} FROM drift_stats {clause} ORDER BY at DESC, seq DESC LIMIT %s",
                       (*params, int(limit)))
        return [DriftStat(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], bool(r[9]), _u(r[10])) for r in rows]

    def prune_drift_stats(self, before: float) -> int:
        return self._x("DELETE FROM drift_stats WHERE at < %s", (before,))

    _ALERT_COLS = "id, kind, grp, version, feature, digest, status, message, value, threshold, first_at, last_at, count, detail"

    @staticmethod
    def _alert(r: tuple) -> AlertRecord:
        return AlertRecord(*r[:13], _u(r[13]))

    def save_alert(self, alert: AlertRecord) -> None:
        a = alert
        cols = [c.strip() for c in self._ALERT_COLS.split(",")]
        self._x(f"INSERT INTO alerts ({self._ALERT_COLS}) VALUES ({', '.join(['%s'] * 14)}) ON CONFLICT (id) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in cols[1:]),
                (a.id, a.kind, a.group, a.version, a.feature, a.digest, a.status, a.message, a.value, a.threshold,
                 a.first_at, a.last_at, a.count, _j(a.detail)))

    def open_alert(self, kind: str, group: str, version: str, feature: str) -> Optional[AlertRecord]:
        rows = self._q(f"SELECT {self._ALERT_COLS} FROM alerts WHERE kind = %s AND grp = %s AND version = %s AND feature = %s "
                       "AND status = 'open' ORDER BY first_at DESC LIMIT 1", (kind, group, version, feature))
        return self._alert(rows[0]) if rows else None

    def list_alerts(self, status: Optional[str] = None, group: Optional[str] = None, limit: int = 200) -> list[AlertRecord]:
        where, params = [], []
        for col, value in (("status = %s", status), ("grp = %s", group)):
            if value is not None:
                where.append(col)
                params.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._q(f"SELECT {self._ALERT_COLS} FROM alerts {clause} ORDER BY last_at DESC, id LIMIT %s",
                       (*params, int(limit)))
        return [self._alert(r) for r in rows]

    # ------------------------------------------------------- shared monitoring

    def put_monitor_windows(self, rows: list[MonitorWindowRecord]) -> None:
        if rows:
            # One statement per device in id order: two replicas flushing overlapping devices lock rows in the
            # same order and never deadlock.
            self._many("INSERT INTO monitor_windows (device_id, grp, digest, at, data) VALUES (%s, %s, %s, %s, %s) "
                       "ON CONFLICT (device_id) DO UPDATE SET grp = excluded.grp, digest = excluded.digest, at = excluded.at, "
                       "data = excluded.data WHERE excluded.at >= monitor_windows.at",
                       [(w.device_id, w.group, w.digest, w.at, _j(w.window)) for w in sorted(rows, key=lambda w: w.device_id)],
                       durable=False)

    def list_monitor_windows(self, since: float) -> list[MonitorWindowRecord]:
        rows = self._q("SELECT device_id, grp, digest, at, data FROM monitor_windows WHERE at >= %s ORDER BY device_id", (since,))
        return [MonitorWindowRecord(r[0], r[1], r[2], r[3], _u(r[4])) for r in rows]

    def prune_monitor_windows(self, before: float) -> int:
        return self._x("DELETE FROM monitor_windows WHERE at < %s", (before,), durable=False)

    def save_gate_verdict(self, rollout_id: str, verdict: dict[str, Any], at: float) -> None:
        self._x("INSERT INTO gate_verdicts (rollout_id, verdict, at) VALUES (%s, %s, %s) ON CONFLICT (rollout_id) DO UPDATE "
                "SET verdict = excluded.verdict, at = excluded.at", (rollout_id, _j(verdict), at), durable=False)

    def get_gate_verdict(self, rollout_id: str) -> Optional[dict[str, Any]]:
        rows = self._q("SELECT verdict FROM gate_verdicts WHERE rollout_id = %s", (rollout_id,))
        return _u(rows[0][0]) if rows else None
