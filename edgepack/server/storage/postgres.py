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
import functools
import hashlib
import re
import threading
from collections.abc import Iterator
from typing import Any, Optional

from ...errors import ServerError
from . import _rows as shared
from ._common import SharedStatements
from .base import (AlertRecord, BundleRecord, BundleRef, DeviceRecord, DriftStat, EventRecord, MemberRecord, MonitorWindowRecord,
                   RolloutRecord, StorageConflict, StorageUnavailable)
from .migrations import Migration

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


@functools.lru_cache(maxsize=512)
def _pyformat(sql: str) -> str:
    """The shared statements' ``?`` placeholders as psycopg's ``%s`` (``_common``)."""
    return sql.replace("?", "%s")


def _configure(conn: Any) -> None:
    """Every pooled session commits asynchronously unless a transaction asks otherwise (module docstring)."""
    conn.execute("SET synchronous_commit = off")


class _Tx:
    __slots__ = ("conn", "depth", "durable")

    def __init__(self, conn: Any) -> None:
        self.conn, self.depth, self.durable = conn, 0, False


class PostgresStorage(SharedStatements):
    """Storage in a PostgreSQL database shared by any number of server processes."""

    inline_safe = False  # calls wait on the network and on other replicas' row locks
    _DRIFT_TIEBREAK = "seq"  # drift_stats' BIGSERIAL (PostgreSQL has no rowid)

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
        sql = _pyformat(sql)
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

    _MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, "
                         "applied_at DOUBLE PRECISION NOT NULL)")

    def _lock_migrations(self) -> None:
        self._q("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))

    def _migration_statements(self, migration: Migration) -> tuple[str, ...]:
        return tuple(_pg_types(s) for s in migration.statements + migration.postgres_only)

    # ------------------------------------------------------------------- bundles

    _BUNDLE_COLS = "id, name, version, digest, size, stage, key_id, created_at"

    def _bundle(self, row: tuple) -> BundleRecord:
        manifest = self._manifests.get(row[0])
        if manifest is None:
            manifest = shared.loads(self._q("SELECT manifest FROM bundles WHERE id = %s", (row[0],))[0][0])
            self._manifests[row[0]] = manifest
        return BundleRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], manifest, row[7])

    def add_bundle(self, bundle: BundleRecord) -> None:
        with self.transaction():
            self._x("INSERT INTO bundles (id, name, version, digest, size, stage, key_id, manifest, created_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (bundle.id, bundle.name, bundle.version, bundle.digest, bundle.size, bundle.stage, bundle.key_id,
                     shared.dumps(bundle.manifest), bundle.created_at))
            self._x("INSERT INTO stage_history (bundle_id, n, from_stage, to_stage, at) VALUES (%s, 0, NULL, %s, %s)",
                    (bundle.id, bundle.stage, bundle.created_at))

    def get_bundle(self, bundle_id: str) -> Optional[BundleRecord]:
        return self._one_bundle("id = %s", (bundle_id,))

    def get_bundle_by_digest(self, digest: str) -> Optional[BundleRecord]:
        return self._one_bundle("digest = %s", (digest,))

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

    # ------------------------------------------------------------------- devices

    # ------------------------------------------------------------------ rollouts

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

    def member_counts(self, rollout_id: str) -> dict[str, int]:
        rows = self._q("SELECT state, n FROM rollout_member_counts WHERE rollout_id = %s AND n <> 0", (rollout_id,))
        return {state: int(n) for state, n in rows}

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

    # -------------------------------------------------------------------- events

    def add_events(self, events: list[EventRecord]) -> None:
        if events:
            self._many(shared.insert_sql("events", shared.EVENT_COLS, "%s"), [shared.event_params(e) for e in events])

    # --------------------------------------------------------------- monitoring

    def set_reference(self, digest: str, reference: dict[str, Any], at: float) -> None:
        self._x("INSERT INTO bundle_references (digest, reference, created_at) VALUES (%s, %s, %s) ON CONFLICT (digest) "
                "DO UPDATE SET reference = excluded.reference, created_at = excluded.created_at", (digest, shared.dumps(reference), at))

    def add_drift_stats(self, stats: list[DriftStat]) -> None:
        if stats:
            self._many(shared.insert_sql("drift_stats", shared.DRIFT_COLS, "%s"), [shared.drift_params(d) for d in stats])

    _UPSERT_ALERT = (shared.insert_sql("alerts", shared.ALERT_COLS, "%s") + " ON CONFLICT (id) DO UPDATE SET "
                     + ", ".join(f"{c} = excluded.{c}" for c in shared.ALERT_COLS.split(", ")[1:]))

    def save_alert(self, alert: AlertRecord) -> None:
        self._x(self._UPSERT_ALERT, shared.alert_params(alert))

    # ------------------------------------------------------- shared monitoring

    def put_monitor_windows(self, rows: list[MonitorWindowRecord]) -> None:
        if rows:
            # One statement per device in id order: two replicas flushing overlapping devices lock rows in the
            # same order and never deadlock.
            self._many("INSERT INTO monitor_windows (device_id, grp, digest, at, data) VALUES (%s, %s, %s, %s, %s) "
                       "ON CONFLICT (device_id) DO UPDATE SET grp = excluded.grp, digest = excluded.digest, at = excluded.at, "
                       "data = excluded.data WHERE excluded.at >= monitor_windows.at",
                       [(w.device_id, w.group, w.digest, w.at, shared.dumps(w.window)) for w in sorted(rows, key=lambda w: w.device_id)],
                       durable=False)

    def save_gate_verdict(self, rollout_id: str, verdict: dict[str, Any], at: float) -> None:
        self._x("INSERT INTO gate_verdicts (rollout_id, verdict, at) VALUES (%s, %s, %s) ON CONFLICT (rollout_id) DO UPDATE "
                "SET verdict = excluded.verdict, at = excluded.at", (rollout_id, shared.dumps(verdict), at), durable=False)

