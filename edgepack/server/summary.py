"""The dashboard's JSON: rollouts with per-step progress, devices, per-version health."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from .monitoring import staleness
from .orchestration import Orchestrator
from .rollout import FAILED
from .settings import ServerSettings
from .storage import DeviceRecord, Storage

__all__ = ["build_summary", "device_health", "rollout_failures"]


def device_health(device: DeviceRecord, now: float, stale_after_s: float) -> str:
    """``never`` (no check-in yet), ``stale``, ``unhealthy`` (not serving / non-finite outputs) or ``ok``."""
    if device.last_seen is None:
        return "never"
    if now - device.last_seen > stale_after_s:
        return "stale"
    health = device.health or {}
    if health.get("serving") is False or (health.get("nonfinite") or 0) > 0:
        return "unhealthy"
    return "ok"


def _bundle_created(storage: Storage, digest: Any, cache: dict) -> Any:
    """When the server received the bundle ``digest`` (None if unknown); memoized per summary."""
    if not digest:
        return None
    if digest not in cache:
        bundle = storage.get_bundle_by_digest(digest)
        cache[digest] = bundle.created_at if bundle is not None else None
    return cache[digest]


def build_summary(settings: ServerSettings, storage: Storage, orchestrator: Orchestrator, clock: Callable[[], float],
                  monitor: Any = None) -> dict[str, Any]:
    now = clock()
    devices = storage.list_devices()
    versions: dict[tuple, dict[str, Any]] = {}
    created: dict[str, Any] = {}
    device_rows = []
    for d in devices:
        cur = d.current or {}
        health = d.health or {}
        device_rows.append({
            "id": d.id, "group": d.group, "tags": d.tags, "profile": d.profile, "name": cur.get("name"),
            "version": cur.get("version"), "digest": cur.get("digest"), "state": d.state, "last_seen": d.last_seen,
            "health": device_health(d, now, settings.stale_after_s), "metrics": health,
            **staleness(now, _bundle_created(storage, cur.get("digest"), created), d.last_seen),
        })
        if d.current:
            key = (cur.get("name"), cur.get("version"), cur.get("digest"))
            agg = versions.setdefault(key, {"name": key[0], "version": key[1], "digest": key[2], "devices": 0,
                                            "requests": 0, "errors": 0, "_p95": [], "nonfinite": 0})
            agg["devices"] += 1
            agg["requests"] += int(health.get("requests") or 0)
            agg["errors"] += int(health.get("errors") or 0)
            agg["nonfinite"] += int(health.get("nonfinite") or 0)
            if isinstance(health.get("p95_ms"), (int, float)):
                agg["_p95"].append(float(health["p95_ms"]))
    version_rows = []
    for agg in versions.values():
        p95 = agg.pop("_p95")
        agg["error_rate"] = agg["errors"] / agg["requests"] if agg["requests"] else None
        agg["p95_ms_median"] = statistics.median(p95) if p95 else None
        agg["p95_ms_max"] = max(p95) if p95 else None
        version_rows.append(agg)
    version_rows.sort(key=lambda a: (str(a["name"]), str(a["version"])))
    rollouts = []
    for r in reversed(storage.list_rollouts()):
        view = orchestrator.view(r, with_members=False)
        view["failures"] = rollout_failures(storage, r.id)
        rollouts.append(view)
    out = {"generated_at": now, "rollouts": rollouts, "devices": device_rows, "versions": version_rows}
    if monitor is not None:  # drift per group/version/feature, prediction distributions, open alerts
        out["monitoring"] = monitor.dashboard()
    return out


def rollout_failures(storage: Storage, rollout_id: str) -> list[dict[str, Any]]:
    """The failed members of a rollout with what their devices reported (the dashboard's halt details)."""
    return [{"device_id": m.device_id, "step_index": m.step_index, "code": m.failure_code, "detail": m.failure_detail,
             "at": m.updated_at}
            for m in storage.list_members(rollout_id) if m.state == FAILED]
