"""Versioned schema migrations, recorded in ``schema_migrations``.

Each migration is a list of plain SQL statements (TEXT / INTEGER / REAL columns, no
vendor extensions) applied in one transaction together with its
``schema_migrations`` row, so a crash never leaves a half-applied version. Both
backends run the same statements; the PostgreSQL backend maps the column types
(INTEGER → BIGINT, REAL → DOUBLE PRECISION) and also runs ``postgres_only``, the
tables it needs because it keeps no per-process state (see ``storage.postgres``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MIGRATIONS", "Migration", "latest_version"]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]
    postgres_only: tuple[str, ...] = ()


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", (
        """CREATE TABLE bundles (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL UNIQUE,
            size INTEGER NOT NULL, stage TEXT NOT NULL, key_id TEXT NOT NULL, manifest TEXT NOT NULL,
            created_at REAL NOT NULL, UNIQUE (name, version))""",
        """CREATE TABLE stage_history (
            bundle_id TEXT NOT NULL REFERENCES bundles(id), n INTEGER NOT NULL, from_stage TEXT, to_stage TEXT NOT NULL,
            at REAL NOT NULL, PRIMARY KEY (bundle_id, n))""",
        """CREATE TABLE devices (
            id TEXT PRIMARY KEY, grp TEXT NOT NULL, tags TEXT NOT NULL, profile TEXT, token_sha256 TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL, last_seen REAL, last_seq INTEGER NOT NULL, state TEXT, current TEXT,
            previous TEXT, health TEXT, runtime_version TEXT, engines TEXT NOT NULL)""",
        "CREATE INDEX devices_grp ON devices (grp)",
        """CREATE TABLE rollouts (
            id TEXT PRIMARY KEY, bundle_id TEXT NOT NULL REFERENCES bundles(id), grp TEXT NOT NULL, steps TEXT NOT NULL,
            soak_seconds REAL NOT NULL, min_devices_succeeded INTEGER NOT NULL, max_failure_rate REAL NOT NULL,
            halt_min_count INTEGER NOT NULL, probation TEXT NOT NULL, status TEXT NOT NULL, step_index INTEGER NOT NULL,
            step_started_at REAL NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
            halt_reasons TEXT NOT NULL, history TEXT NOT NULL)""",
        "CREATE INDEX rollouts_grp ON rollouts (grp, created_at)",
        """CREATE TABLE rollout_members (
            rollout_id TEXT NOT NULL REFERENCES rollouts(id), device_id TEXT NOT NULL REFERENCES devices(id),
            step_index INTEGER NOT NULL, state TEXT NOT NULL, from_digest TEXT, joined_at REAL NOT NULL,
            updated_at REAL NOT NULL, failure_code TEXT, failure_detail TEXT, PRIMARY KEY (rollout_id, device_id))""",
        "CREATE INDEX rollout_members_device ON rollout_members (device_id)",
        """CREATE TABLE grants (
            device_id TEXT NOT NULL REFERENCES devices(id), digest TEXT NOT NULL, at REAL NOT NULL,
            PRIMARY KEY (device_id, digest))""",
        """CREATE TABLE events (
            device_id TEXT NOT NULL REFERENCES devices(id), seq INTEGER NOT NULL, type TEXT NOT NULL, rollout_id TEXT,
            digest TEXT, version TEXT, reason_code TEXT, reason_detail TEXT, at REAL, received_at REAL NOT NULL,
            PRIMARY KEY (device_id, seq))""",
        "CREATE INDEX events_rollout ON events (rollout_id)",
    )),
    Migration(2, "fleet monitoring: references, drift statistics, alerts, rollout ML gates", (
        "ALTER TABLE rollouts ADD COLUMN gates TEXT NOT NULL DEFAULT '{}'",
        """CREATE TABLE bundle_references (
            digest TEXT PRIMARY KEY, reference TEXT NOT NULL, created_at REAL NOT NULL)""",
        """CREATE TABLE drift_stats (
            grp TEXT NOT NULL, digest TEXT NOT NULL, version TEXT, kind TEXT NOT NULL, feature TEXT NOT NULL,
            at REAL NOT NULL, value REAL, p_value REAL, n INTEGER NOT NULL, drifted INTEGER NOT NULL, detail TEXT)""",
        "CREATE INDEX drift_stats_key ON drift_stats (grp, version, at)",
        "CREATE INDEX drift_stats_at ON drift_stats (at)",
        """CREATE TABLE alerts (
            id TEXT PRIMARY KEY, kind TEXT NOT NULL, grp TEXT NOT NULL, version TEXT NOT NULL, feature TEXT NOT NULL,
            digest TEXT, status TEXT NOT NULL, message TEXT NOT NULL, value REAL, threshold REAL,
            first_at REAL NOT NULL, last_at REAL NOT NULL, count INTEGER NOT NULL, detail TEXT)""",
        "CREATE INDEX alerts_key ON alerts (kind, grp, version, feature, status)",
    )),
    Migration(3, "several server replicas: shared monitoring windows and gate verdicts", (
        # Each device's latest monitoring summary window, so every replica aggregates the whole fleet.
        """CREATE TABLE monitor_windows (
            device_id TEXT PRIMARY KEY, grp TEXT NOT NULL, digest TEXT NOT NULL, at REAL NOT NULL, data TEXT NOT NULL)""",
        "CREATE INDEX monitor_windows_at ON monitor_windows (at)",
        # The latest ML-gate verdict per rollout (the replica that evaluates writes it; all read it).
        """CREATE TABLE gate_verdicts (
            rollout_id TEXT PRIMARY KEY REFERENCES rollouts(id), verdict TEXT NOT NULL, at REAL NOT NULL)""",
    ), postgres_only=(
        # Member counts per rollout and state, kept in step with rollout_members by the backend
        # (SQLite caches them in memory instead); only changed under the rollout's row lock.
        """CREATE TABLE rollout_member_counts (
            rollout_id TEXT NOT NULL REFERENCES rollouts(id), state TEXT NOT NULL, n INTEGER NOT NULL,
            PRIMARY KEY (rollout_id, state))""",
        """INSERT INTO rollout_member_counts (rollout_id, state, n)
            SELECT rollout_id, state, COUNT(*) FROM rollout_members GROUP BY rollout_id, state""",
    )),
)


def latest_version() -> int:
    return MIGRATIONS[-1].version
