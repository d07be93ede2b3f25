"""Rows <-> records, shared by the SQLite and PostgreSQL backends.

Both backends store the same schema (``migrations.py``) with JSON-ish fields as text, so
the column lists, the conversions and the statement shapes live here once; a backend
only supplies its placeholder (``?`` or ``%s``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Optional

from .base import AlertRecord, DeviceRecord, DriftStat, EventRecord, RolloutRecord

__all__ = [
    "ALERT_COLS", "DEVICE_COLS", "DRIFT_COLS", "EVENT_COLS", "MEMBER_COLS", "ROLLOUT_COLS", "alert_from_row", "alert_params",
    "device_from_row", "device_params", "drift_from_row", "drift_params", "dumps", "event_params", "insert_sql", "loads",
    "REPORT_COLS", "report_params", "rollout_from_row", "rollout_params", "update_sql", "where",
]


def dumps(value: Any) -> Optional[str]:
    """A JSON column's text (sorted keys, compact), or None."""
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


try:  # optional (the server extra): ~5x faster parsing of the JSON columns read on every check-in
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - without orjson the stdlib parses everything
    _fast_loads = json.loads

# orjson turns integers beyond 64 bits into floats: texts with a run of 19+ digits go to json.loads
# (digits mapped to "0", then a substring search: ~10x cheaper than a regular expression).
_DIGITS_TO_0 = bytes.maketrans(b"123456789", b"000000000")
_19_DIGITS = b"0" * 19


def loads(text: Optional[str]) -> Any:
    """A JSON column's value, or None."""
    if text is None:
        return None
    if _19_DIGITS not in text.encode("utf-8", "surrogatepass").translate(_DIGITS_TO_0):
        try:
            return _fast_loads(text)
        except ValueError:  # what orjson refuses but json.dumps may have written (NaN, Infinity, lone surrogates)
            pass
    return json.loads(text)


def _cols(text: str) -> list[str]:
    return [c.strip() for c in text.split(",")]


def insert_sql(table: str, cols: str, ph: str) -> str:
    return f"INSERT INTO {table} ({cols}) VALUES ({', '.join([ph] * len(_cols(cols)))})"


def update_sql(table: str, cols: str, ph: str, key: str = "id") -> str:
    """``UPDATE table SET <every column but the first> WHERE key = ph`` (params: row[1:] + (key,))."""
    return f"UPDATE {table} SET {', '.join(f'{c} = {ph}' for c in _cols(cols)[1:])} WHERE {key} = {ph}"


def where(ph: str, *conditions: tuple[str, Any]) -> tuple[str, list]:
    """(``WHERE a = ph AND …`` or "", params) for the conditions whose value is not None.

    Args:
        ph: The backend's placeholder.
        conditions: (``"column op"``, value) pairs, e.g. ``("grp =", group)``.
    """
    parts, params = [], []
    for test, value in conditions:
        if value is not None:
            parts.append(f"{test} {ph}")
            params.append(value)
    return (f"WHERE {' AND '.join(parts)}" if parts else ""), params


# ------------------------------------------------------------------ devices

DEVICE_COLS = ("id, grp, tags, profile, token_sha256, created_at, last_seen, last_seq, state, current, previous, "
               "health, runtime_version, engines")


def device_from_row(r: Sequence) -> DeviceRecord:
    return DeviceRecord(r[0], r[1], loads(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], loads(r[9]), loads(r[10]),
                        loads(r[11]), r[12], loads(r[13]))


def device_params(d: DeviceRecord) -> tuple:
    return (d.id, d.group, dumps(d.tags), d.profile, d.token_sha256, d.created_at, d.last_seen, d.last_seq, d.state,
            dumps(d.current), dumps(d.previous), dumps(d.health), d.runtime_version, dumps(d.engines))


REPORT_COLS = "last_seen, last_seq, state, current, previous, health, runtime_version, engines"


def report_params(d: DeviceRecord) -> tuple:
    """The check-in report columns (:data:`REPORT_COLS`) then the id, for an UPDATE."""
    return (d.last_seen, d.last_seq, d.state, dumps(d.current), dumps(d.previous), dumps(d.health), d.runtime_version,
            dumps(d.engines), d.id)


# ----------------------------------------------------------------- rollouts

ROLLOUT_COLS = ("id, bundle_id, grp, steps, soak_seconds, min_devices_succeeded, max_failure_rate, halt_min_count, "
                "probation, status, step_index, step_started_at, created_at, updated_at, halt_reasons, history, gates")
MEMBER_COLS = "rollout_id, device_id, step_index, state, from_digest, joined_at, updated_at, failure_code, failure_detail"


def rollout_from_row(r: Sequence) -> RolloutRecord:
    return RolloutRecord(r[0], r[1], r[2], loads(r[3]), r[4], r[5], r[6], r[7], loads(r[8]), r[9], r[10], r[11], r[12],
                         r[13], loads(r[14]), loads(r[15]), loads(r[16]) or {})


def rollout_params(x: RolloutRecord) -> tuple:
    return (x.id, x.bundle_id, x.group, dumps(x.steps), x.soak_seconds, x.min_devices_succeeded, x.max_failure_rate,
            x.halt_min_count, dumps(x.probation), x.status, x.step_index, x.step_started_at, x.created_at, x.updated_at,
            dumps(x.halt_reasons), dumps(x.history), dumps(x.gates or {}))


# ------------------------------------------------------------------- events

EVENT_COLS = "device_id, seq, type, rollout_id, digest, version, reason_code, reason_detail, at, received_at"


def event_params(e: EventRecord) -> tuple:
    return (e.device_id, e.seq, e.type, e.rollout_id, e.digest, e.version, e.reason_code, e.reason_detail, e.at,
            e.received_at)


# --------------------------------------------------------------- monitoring

DRIFT_COLS = "grp, digest, version, kind, feature, at, value, p_value, n, drifted, detail"


def drift_from_row(r: Sequence) -> DriftStat:
    return DriftStat(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], bool(r[9]), loads(r[10]))


def drift_params(d: DriftStat) -> tuple:
    return (d.group, d.digest, d.version, d.kind, d.feature, d.at, d.value, d.p_value, d.n, int(d.drifted), dumps(d.detail))


ALERT_COLS = "id, kind, grp, version, feature, digest, status, message, value, threshold, first_at, last_at, count, detail"


def alert_from_row(r: Sequence) -> AlertRecord:
    return AlertRecord(*r[:13], loads(r[13]))


def alert_params(a: AlertRecord) -> tuple:
    return (a.id, a.kind, a.group, a.version, a.feature, a.digest, a.status, a.message, a.value, a.threshold, a.first_at,
            a.last_at, a.count, dumps(a.detail))
