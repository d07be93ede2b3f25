"""Fleet monitoring: aggregate device summaries, judge drift, raise alerts, evaluate ML rollout gates.

Several server replicas may share one database, each receiving a part of the fleet's
check-ins, so the evidence lives in the database, not in a process:

* The check-in path only appends the raw ``summaries`` to this replica's in-memory inbox
  (:meth:`FleetMonitor.ingest`, O(1), no database write).
* Every tick (:meth:`FleetMonitor.tick`) reads the whole fleet's windows
  (``storage.list_monitor_windows`` over the last ``monitor_window_s``; incrementally, into
  a cache refreshed in full every ``FULL_RELOAD_S``, see ``_load``), folds the inbox
  into them — one :class:`Window` per device: its latest summary plus its cumulative label
  and shadow counters — and writes the devices it received back in one batch
  (``put_monitor_windows``).
* Every (group, bundle) whose windows changed since this replica last evaluated it is
  evaluated with :mod:`.monitoring` (pure statistics) from those fleet-wide windows:

  - input drift per feature: PSI + chi-square goodness of fit of the summed bin counts
    against the reference deciles (``stats/reference.json`` stored at upload);
  - prediction drift: predicted-class counts against the reference class distribution;
  - live accuracy from ground-truth labels and shadow agreement (cumulative per device,
    summed over the devices reporting within the window; a device silent for longer than
    the window starts from zero), staleness (age of the bundle).

  Rollouts with ML ``gates`` get a verdict (pass / wait / fail): a step does not advance
  before its gates pass, and a failed gate marks the rollout's running members failed and
  halts it, like install failures (their devices are told to roll back).

The statistics are computed outside any transaction (on SQLite a transaction holds the
single write lock, which every check-in needs). Their outcome — drift rows, alerts, gate
verdicts (``save_gate_verdict``, read by every replica's :meth:`FleetMonitor.gate_verdict`),
halts — is written in one short transaction by the replica that takes the transaction-scoped
``fleet-monitor`` lock; a replica that finds it taken skips writing for this tick (its
windows were flushed all the same). Two replicas that write one after the other stay
consistent: alerts are de-duplicated against storage, a (group, bundle) gets drift rows at
most once per ``drift_record_interval_s`` whoever wrote them, a gate verdict never replaces a
newer one, and halts decide on the locked rollout row, so a rollout is halted once however
many replicas judge it failed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from . import monitoring as stats
from . import rollout as logic
from .alerts import Alerter
from .orchestration import Orchestrator
from .settings import ServerSettings
from .storage import DriftStat, MonitorWindowRecord, RolloutRecord, Storage

__all__ = ["FleetMonitor"]

log = logging.getLogger("edgepack.server.monitor")

INBOX_SIZE = 200_000
PRUNE_EVERY_S = 600.0
#: How often a replica re-reads every stored window instead of only the recent ones (see ``_load``).
FULL_RELOAD_S = 60.0
#: How far replicas' clocks may disagree when deciding which stored windows are new.
CLOCK_SKEW_S = 5.0
#: The transaction-scoped lock the replica that writes an evaluation holds (see the module docstring).
MONITOR_LOCK = "fleet-monitor"


@dataclass
class Window:
    """One device's latest summary, reduced to what the aggregates need, and its label and shadow counts."""
    at: float
    group: str
    digest: str
    variant: Optional[str]
    predictions: int
    features: dict[str, tuple[list[float], list[float]]]   # "input/feature" -> (edges, counts)
    classes: dict[str, float]
    confidence: Optional[tuple[list[float], list[float]]] = None
    # Cumulative over this device's windows (each summary carries only what is new since the last one).
    labels: dict[str, list[int]] = field(default_factory=dict)      # digest -> [correct, total]
    shadow: dict[str, list[float]] = field(default_factory=dict)    # shadow digest -> [predictions, agreeing]


@dataclass
class Aggregate:
    devices: int = 0
    predictions: int = 0
    features: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    classes: dict[str, float] = field(default_factory=dict)
    variant: Optional[str] = None


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_window(summary: Any, group: str, fallback_digest: Optional[str], now: float) -> Optional[Window]:
    """A :class:`Window` from one ``Monitor.summary()`` document (None when unusable)."""
    if not isinstance(summary, Mapping):
        return None
    digest = summary.get("digest") if isinstance(summary.get("digest"), str) else fallback_digest
    if not digest:
        return None
    features: dict[str, tuple[list[float], list[float]]] = {}
    for input_name, spec in (summary.get("inputs") or {}).items():
        for f in (spec or {}).get("features") or [] if isinstance(spec, Mapping) else []:
            if not isinstance(f, Mapping):
                continue
            edges, counts = f.get("edges"), f.get("counts")
            if (isinstance(edges, list) and isinstance(counts, list) and len(counts) == len(edges) + 1
                    and all(_num(e) for e in edges) and all(_num(c) and c >= 0 for c in counts)):
                features[f"{input_name}/{f.get('name')}"] = ([float(e) for e in edges], [float(c) for c in counts])
    outputs = summary.get("outputs") or {}
    classes = {str(k): float(v) for k, v in (outputs.get("class_counts") or {}).items() if _num(v) and v >= 0}
    conf = outputs.get("confidence") or {}
    confidence = None
    if isinstance(conf.get("edges"), list) and isinstance(conf.get("counts"), list):
        confidence = ([float(e) for e in conf["edges"] if _num(e)], [float(c) for c in conf["counts"] if _num(c)])
    window = summary.get("window") or {}
    predictions = window.get("predictions") if isinstance(window, Mapping) else None
    labels: dict[str, list[int]] = {}
    for item in summary.get("labels") or []:
        if isinstance(item, Mapping) and item.get("label") is not None and item.get("predicted") is not None:
            c = labels.setdefault(item["digest"] if isinstance(item.get("digest"), str) else digest, [0, 0])
            c[0] += int(str(item["label"]) == str(item["predicted"]))
            c[1] += 1
    shadow: dict[str, list[float]] = {}
    sh = summary.get("shadow")
    if isinstance(sh, Mapping) and isinstance(sh.get("digest"), str) and _num(sh.get("predictions")) \
            and _num(sh.get("agreement")):
        shadow[sh["digest"]] = [float(sh["predictions"]), float(sh["predictions"]) * float(sh["agreement"])]
    return Window(now, group, digest, summary.get("variant") if isinstance(summary.get("variant"), str) else None,
                  int(predictions) if _num(predictions) else int(sum(classes.values())), features, classes, confidence,
                  labels, shadow)


def window_doc(w: Window) -> dict[str, Any]:
    """The JSON stored as ``MonitorWindowRecord.window`` (group, digest and time are columns)."""
    return {"variant": w.variant, "predictions": w.predictions,
            "features": {name: [edges, counts] for name, (edges, counts) in w.features.items()},
            "classes": w.classes, "confidence": list(w.confidence) if w.confidence else None,
            "labels": w.labels, "shadow": w.shadow}


def window_from_record(rec: MonitorWindowRecord) -> Optional[Window]:
    """The :class:`Window` a stored record holds (None for a record this version cannot read)."""
    doc = rec.window
    try:
        # The numbers were validated by parse_window before they were stored: only the shapes are restored
        # (every tick reads every window, so no per-number work here).
        conf = doc.get("confidence")
        return Window(rec.at, rec.group, rec.digest, doc.get("variant"), int(doc.get("predictions") or 0),
                      {k: (v[0], v[1]) for k, v in (doc.get("features") or {}).items()}, dict(doc.get("classes") or {}),
                      (conf[0], conf[1]) if conf else None, dict(doc.get("labels") or {}), dict(doc.get("shadow") or {}))
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):
        return None


def _add_counts(a: Mapping[str, list], b: Mapping[str, list]) -> dict[str, list]:
    out = {k: list(v) for k, v in a.items()}
    for k, v in b.items():
        have = out.setdefault(k, [0] * len(v))
        for i, x in enumerate(v):
            have[i] += x
    return out


def merge_window(stored: Optional[Window], received: Window) -> Window:
    """A device's window once ``received`` (from this replica's inbox) is folded into ``stored``.

    The counters add up. The distributions are the later check-in's: normally the received one,
    but another replica may already have stored a later check-in of the same device, and then
    that one stays (with this window's counts added).
    """
    if stored is None:
        return received
    labels, shadow = _add_counts(stored.labels, received.labels), _add_counts(stored.shadow, received.shadow)
    base = stored if stored.at > received.at else received
    return dataclasses.replace(base, labels=labels, shadow=shadow)


class Fleet:
    """The fleet-wide windows of one tick, indexed for aggregation (no storage access)."""

    def __init__(self, windows: Mapping[str, Window]) -> None:
        self.windows = dict(windows)
        self.by_key: dict[tuple[str, str], list[str]] = {}
        self.labels: dict[tuple[str, str], list[int]] = {}        # (group, digest) -> [correct, total]
        self.shadow: dict[tuple[str, str], list[float]] = {}      # (group, shadow digest) -> [predictions, agreeing]
        for device_id, w in sorted(self.windows.items()):
            self.by_key.setdefault((w.group, w.digest), []).append(device_id)
            for d, c in w.labels.items():
                t = self.labels.setdefault((w.group, d), [0, 0])
                t[0], t[1] = t[0] + c[0], t[1] + c[1]
            for d, c in w.shadow.items():
                t2 = self.shadow.setdefault((w.group, d), [0.0, 0.0])
                t2[0], t2[1] = t2[0] + c[0], t2[1] + c[1]
        self._aggregates: dict[tuple[str, str], Aggregate] = {}

    def signature(self, key: tuple[str, str]) -> frozenset:
        """What the evaluation of ``key`` depends on among the windows: which devices, from when."""
        return frozenset((d, self.windows[d].at) for d in self.by_key.get(key, ()))

    def aggregate(self, key: tuple[str, str]) -> Aggregate:
        found = self._aggregates.get(key)
        if found is not None:
            return found
        agg = Aggregate()
        for device_id in self.by_key.get(key, ()):
            w = self.windows[device_id]
            agg.devices += 1
            agg.predictions += w.predictions
            agg.variant = agg.variant or w.variant
            for name, (edges, counts) in w.features.items():
                have = agg.features.get(name)
                if have is None:
                    agg.features[name] = (edges, list(counts))
                elif have[0] == edges:
                    for i, c in enumerate(counts):
                        have[1][i] += c
            for k, v in w.classes.items():
                agg.classes[k] = agg.classes.get(k, 0.0) + v
        self._aggregates[key] = agg
        return agg


@dataclass
class _Evaluation:
    """One (group, bundle)'s evaluation: what to store and which alerts to fire or clear."""
    signature: frozenset
    snapshot: Optional[dict[str, Any]]
    rows: list[DriftStat]
    alerts: list[tuple]   # the arguments of FleetMonitor._alert


class FleetMonitor:
    """Fleet monitoring of one server replica (see the module docstring).

    Args:
        settings: Thresholds and windows.
        storage: The database every replica shares.
        orchestrator: Gets :meth:`gate_verdict` as its ``gate_check``; halts and advances rollouts.
        alerter: Opens and resolves alerts.
        clock: Seconds since the epoch.
    """

    def __init__(self, settings: ServerSettings, storage: Storage, orchestrator: Orchestrator, alerter: Alerter,
                 clock: Callable[[], float]) -> None:
        self.settings, self.storage, self.orchestrator, self.alerter, self.clock = (
            settings, storage, orchestrator, alerter, clock)
        # Per replica by nature: the check-ins this replica received since its last tick.
        self._inbox: collections.deque = collections.deque(maxlen=INBOX_SIZE)
        self._unflushed: dict[str, Window] = {}   # drained windows whose flush failed (per replica, like the inbox)
        self._tick_lock = threading.Lock()   # one tick at a time
        self._lock = threading.RLock()       # the caches below, read by views while a tick runs
        # Caches of database data, at most one tick (tick_interval_s) old on a replica that ticks:
        # the latest evaluation per (group, bundle) computed from the fleet-wide windows (for the views;
        # rebuilt from the database by a view that finds it older than two ticks), the shadow totals of
        # the same windows, and when they were computed.
        self._snapshots: dict[tuple[str, str], dict[str, Any]] = {}
        self._shadow_view: list[dict[str, Any]] = []
        self._view_at = -1e18
        # Which windows this replica's last *written* evaluation of each (group, bundle) used: a key is
        # evaluated again when they change. Another replica's evaluations only make this replica
        # re-evaluate more often than needed, never less.
        self._evaluated: dict[tuple[str, str], frozenset] = {}
        # Every device's latest window (a cache of monitor_windows; see _load for how fresh).
        self._mirror: dict[str, Window] = {}
        self._mirror_seen = -1e18
        self._mirror_full_at = -1e18
        # Reference statistics per digest: stored once at upload and never changed (misses are not cached).
        self._refs: dict[str, dict] = {}
        self._last_prune = -1e18
        self.evaluations = 0   # (group, bundle) evaluations this replica computed (tests wait on it)
        orchestrator.gate_check = self.gate_verdict

    # ------------------------------------------------------------ check-in path

    def ingest(self, device_id: str, group: str, current_digest: Optional[str], summaries: Any, now: float) -> None:
        """Queue a check-in's ``summaries`` (called after the check-in committed; O(1), no database access)."""
        if summaries:
            self._inbox.append((device_id, group, current_digest, summaries, now))

    def gate_verdict(self, r: RolloutRecord) -> dict[str, Any]:
        """The ML-gate verdict of ``r`` as last written by whichever replica evaluated it.

        ``wait`` until one has (no evidence yet), so a step never advances on a verdict nobody computed.
        """
        return self.storage.get_gate_verdict(r.id) or {
            "verdict": "wait", "waiting": ["no monitoring data evaluated yet"], "checks": []}

    # --------------------------------------------------------------------- tick

    def tick(self) -> None:
        """Flush this replica's inbox to the shared windows, evaluate the fleet, write the outcome (if first)."""
        with self._tick_lock:
            now = self.clock()
            windows = self._load(now)
            received = self._drain()
            if received:
                # The counters are read here and written below without a lock, because on SQLite a transaction
                # around this read would stall every check-in for the whole listing. The one race it leaves: a
                # device whose check-ins reach two replicas within one tick can lose one window's label and
                # shadow counts (evidence only; every decision stays exactly-once).
                merged = {device_id: merge_window(windows.get(device_id), w) for device_id, w in sorted(received.items())}
                try:
                    self.storage.put_monitor_windows([MonitorWindowRecord(d, m.group, m.digest, m.at, window_doc(m))
                                                      for d, m in merged.items()])
                except BaseException:
                    self._unflushed = received  # the next tick tries again (the batch is one transaction)
                    raise
                windows.update(merged)  # only once stored: a retried flush must not count twice
            fleet = Fleet(dict(windows))
            evaluations = self._evaluate_fleet(fleet, now)
            gates = self._evaluate_gates(fleet, now)
            with self.alerter.after_commit(), self.storage.transaction():  # webhooks only for committed alerts
                wrote = self.storage.try_lock_key(MONITOR_LOCK)
                if wrote:
                    self._write(evaluations, gates, now)
                else:
                    log.debug("another replica is writing its fleet evaluation; this one skips writing this tick")
            if wrote:  # committed: these keys need no new evaluation until their windows change
                for key, ev in evaluations.items():
                    if ev.signature:
                        self._evaluated[key] = ev.signature
                    else:
                        self._evaluated.pop(key, None)
            if now - self._last_prune > PRUNE_EVERY_S:
                self._last_prune = now
                self.storage.prune_drift_stats(now - self.settings.drift_retention_s)
                self.storage.prune_monitor_windows(now - self.settings.monitor_window_s)

    def _drain(self) -> dict[str, Window]:
        """This replica's inbox as one window per device (several check-ins of one device add up)."""
        received, self._unflushed = self._unflushed, {}
        while self._inbox:
            device_id, group, current, summaries, at = self._inbox.popleft()
            try:
                summary = summaries.get("window") if isinstance(summaries, Mapping) else None
                window = parse_window(summary, group, current, at)
            except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a malformed summary never stops the tick
                log.warning("ignored a malformed monitoring summary from device %s: %s", device_id, exc)
                continue
            if window is not None:
                received[device_id] = merge_window(received.get(device_id), window)
        return received

    def _load(self, now: float) -> dict[str, Window]:
        """Every device's window within ``monitor_window_s``, whichever replica received it.

        Served from :attr:`_mirror`, a cache of ``monitor_windows`` refreshed incrementally: each tick
        re-reads only the windows stamped since the newest one it saw, minus how late another replica
        may store a window (up to a tick after receiving it, stamped with the receive time) and some
        clock skew; every :data:`FULL_RELOAD_S` it reads them all (which also catches a window merged
        without a newer stamp). A full read every tick cost ~0.6 s at 5,000 devices.
        """
        horizon = now - self.settings.monitor_window_s
        if now - self._mirror_full_at >= FULL_RELOAD_S:
            since, self._mirror, self._mirror_full_at = horizon, {}, now
        else:
            since = max(horizon, self._mirror_seen - 2 * self.settings.tick_interval_s - CLOCK_SKEW_S)
        for rec in self.storage.list_monitor_windows(since):
            w = window_from_record(rec)
            if w is not None:
                self._mirror[rec.device_id] = w
                self._mirror_seen = max(self._mirror_seen, min(now, rec.at))
        for device_id in [d for d, w in self._mirror.items() if w.at < horizon]:
            del self._mirror[device_id]  # went quiet: out of the window
        return self._mirror

    def _evaluate_fleet(self, fleet: Fleet, now: float) -> dict[tuple[str, str], _Evaluation]:
        """Evaluate the keys whose windows changed since this replica last wrote their evaluation (pure)."""
        evaluations = {}
        for key in sorted(set(fleet.by_key) | set(self._evaluated)):
            signature = fleet.signature(key)
            if self._evaluated.get(key) != signature:
                evaluations[key] = self._evaluate(key, fleet, signature, now)
                self.evaluations += 1
        with self._lock:
            for key, ev in evaluations.items():
                if ev.snapshot is None:
                    self._snapshots.pop(key, None)
                else:
                    self._snapshots[key] = ev.snapshot
            for key in [k for k in self._snapshots if k not in fleet.by_key]:
                self._snapshots.pop(key)  # all its devices moved on or went quiet
            self._shadow_view = [{"group": g, "digest": d, "predictions": c[0], "agreement": c[1] / c[0] if c[0] else None}
                                 for (g, d), c in sorted(fleet.shadow.items())]
            self._view_at = now
        return evaluations

    def _write(self, evaluations: dict[tuple[str, str], _Evaluation],
               gates: list[tuple[RolloutRecord, str, dict[str, Any]]], now: float) -> None:
        """Store one evaluation's outcome; inside the transaction that holds :data:`MONITOR_LOCK`."""
        interval = self.settings.drift_record_interval_s
        if any(ev.rows for ev in evaluations.values()):
            # Bounded history across replicas: a (group, bundle) recorded by anyone within the interval is not
            # recorded again (alerts and gates used this evaluation anyway).
            recent = {(d.group, d.digest) for d in self.storage.list_drift_stats(since=now - interval, limit=1_000_000)}
            self.storage.add_drift_stats([row for key, ev in sorted(evaluations.items()) if key not in recent
                                          for row in ev.rows])
        for ev in evaluations.values():
            for args in ev.alerts:
                self._alert(*args)
        for r, digest, verdict in gates:
            stored = self.storage.get_gate_verdict(r.id)
            if stored is not None and stored.get("evaluated_at", -1e18) > now:
                continue  # a replica that read newer windows already wrote its verdict
            self.storage.save_gate_verdict(r.id, verdict, now)
            if verdict["verdict"] == "fail":
                self._halt(r, digest, [c for c in verdict["checks"] if c["verdict"] == "fail"], now)
            elif verdict["verdict"] == "pass" and r.status == logic.ACTIVE:
                fresh = self.storage.get_rollout(r.id)  # the step may advance now (evaluate locks the row)
                if fresh is not None:
                    self.orchestrator.evaluate(fresh, now)

    # --------------------------------------------------------------- statistics

    def _reference(self, digest: str) -> Optional[dict]:
        found = self._refs.get(digest)
        if found is None:
            found = self.storage.get_reference(digest)
            if found is not None:
                self._refs[digest] = found
        return found

    def _quantiles(self, digest: str) -> dict[str, list[float]]:
        """"input/feature" -> the reference's 11 decile quantiles."""
        out: dict[str, list[float]] = {}
        for input_name, spec in ((self._reference(digest) or {}).get("inputs") or {}).items():
            for f in (spec or {}).get("features") or [] if isinstance(spec, Mapping) else []:
                q = f.get("quantiles") if isinstance(f, Mapping) else None
                if isinstance(q, list) and q and all(_num(x) for x in q):
                    out[f"{input_name}/{f.get('name')}"] = [float(x) for x in q]
        return out

    def _reference_classes(self, digest: str, variant: Optional[str], live: Mapping[str, float]) -> Optional[dict[str, float]]:
        """The reference class distribution keyed like the live class counts (labels or indices)."""
        ref = self._reference(digest)
        preds = (ref or {}).get("predictions") or {}
        doc = preds.get(variant) if variant in preds else next((v for v in preds.values() if v), None)
        dist = (doc or {}).get("class_distribution")
        if not isinstance(dist, Mapping) or not dist:
            return None
        names = list(dist)
        if live and not set(live) <= set(dist) and all(k.isdigit() and int(k) < len(names) for k in live):
            return {str(i): float(dist[n]) for i, n in enumerate(names)}  # devices count class indices
        return {str(k): float(v) for k, v in dist.items()}

    def _evaluate(self, key: tuple[str, str], fleet: Fleet, signature: frozenset, now: float) -> _Evaluation:
        group, digest = key
        s = self.settings
        agg = fleet.aggregate(key)
        out = _Evaluation(signature, None, [], [])
        if agg.devices == 0:
            return out
        bundle = self.storage.get_bundle_by_digest(digest)
        version = bundle.version if bundle is not None else digest[:12]
        rows, alerts = out.rows, out.alerts
        snapshot: dict[str, Any] = {"group": group, "digest": digest, "version": version,
                                    "name": bundle.name if bundle else None, "devices": agg.devices,
                                    "predictions": agg.predictions, "evaluated_at": now, "features": [],
                                    "classes": agg.classes, "reference_classes": None, "prediction_drift": None}
        quantiles = self._quantiles(digest)
        for name, (edges, counts) in sorted(agg.features.items()):
            shift = stats.feature_drift(edges, counts, quantiles.get(name))
            drifted = shift.drifted(s.psi_alert, s.p_value_alert, s.min_drift_samples)
            rows.append(DriftStat(group, digest, version, "input_drift", name, now, shift.psi, shift.p_value, shift.n,
                                  drifted, {"devices": agg.devices}))
            snapshot["features"].append({"feature": name, "psi": shift.psi, "p_value": shift.p_value, "n": shift.n,
                                         "drifted": drifted})
            alerts.append((drifted, shift.n >= s.min_drift_samples, "input_drift", group, version, name, digest,
                           (f"input drift on {name}: PSI {shift.psi:.3f} > {s.psi_alert:g} (p={shift.p_value:.2g}, "
                            f"{shift.n} values from {agg.devices} devices)"), shift.psi, s.psi_alert, now))
        ref_classes = self._reference_classes(digest, agg.variant, agg.classes)
        if ref_classes and agg.classes:
            shift = stats.reference_prediction_shift(ref_classes, agg.classes)
            drifted = shift.drifted(s.psi_alert, s.p_value_alert, s.min_drift_samples)
            rows.append(DriftStat(group, digest, version, "prediction_drift", "", now, shift.psi, shift.p_value, shift.n,
                                  drifted, {"classes": agg.classes}))
            snapshot["reference_classes"] = ref_classes
            snapshot["prediction_drift"] = {"psi": shift.psi, "p_value": shift.p_value, "n": shift.n, "drifted": drifted}
            alerts.append((drifted, shift.n >= s.min_drift_samples, "prediction_drift", group, version, "", digest,
                           (f"prediction distribution drift: PSI {shift.psi:.3f} > {s.psi_alert:g} against the reference "
                            f"(p={shift.p_value:.2g}, {shift.n} predictions)"), shift.psi, s.psi_alert, now))
        correct, total = fleet.labels.get(key, [0, 0])
        acc, _se = stats.accuracy(correct, total)
        snapshot["accuracy"] = {"accuracy": acc, "labels": total}
        if total:
            worse = [(d, c) for (g, d), c in fleet.labels.items() if g == group and d != digest and c[1] >= s.min_labels
                     and total >= s.min_labels and stats.accuracy_worse((correct, total), tuple(c), s.accuracy_drop_alert)]
            rows.append(DriftStat(group, digest, version, "accuracy", "", now, acc, None, total, bool(worse)))
            alerts.append((bool(worse), total >= s.min_labels, "accuracy_drop", group, version, "", digest,
                           (f"live accuracy {acc:.1%} over {total} labels is more than {s.accuracy_drop_alert:.0%} below "
                            "another version in the group"), acc, None, now))
        if bundle is not None:
            age = stats.staleness(now, bundle.created_at, None)["bundle_age_s"]
            snapshot["bundle_age_s"] = age
            alerts.append((age > s.model_max_age_s, True, "stale_model", group, version, "", digest,
                           (f"the group runs bundle {version}, {age / 86400:.0f} days old (limit "
                            f"{s.model_max_age_s / 86400:.0f})"), age, s.model_max_age_s, now))
        shadow = fleet.shadow.get((group, digest))
        if shadow and shadow[0] > 0:
            snapshot["shadow_agreement"] = shadow[1] / shadow[0]
        out.snapshot = snapshot
        return out

    def _alert(self, condition: bool, judged: bool, kind: str, group: str, version: str, feature: str, digest: str,
               message: str, value: Optional[float], threshold: Optional[float], now: float) -> None:
        if condition:
            self.alerter.fire(kind, group, version, feature, message, digest=digest, value=value, threshold=threshold,
                              now=now)
        elif judged:
            self.alerter.clear(kind, group, version, feature, now=now)

    # -------------------------------------------------------------------- gates

    def _gate_checks(self, r: RolloutRecord, digest: str, fleet: Fleet) -> list[dict[str, Any]]:
        s, g = self.settings, r.gates
        checks: list[dict[str, Any]] = []
        canary = fleet.aggregate((r.group, digest))
        control = Aggregate()
        for k in fleet.by_key:
            if k[0] == r.group and k[1] != digest:
                other = fleet.aggregate(k)
                control.devices += other.devices
                for c, v in other.classes.items():
                    control.classes[c] = control.classes.get(c, 0.0) + v
        labels_new = tuple(fleet.labels.get((r.group, digest), [0, 0]))
        labels_old = [0, 0]
        for (grp, d), c in fleet.labels.items():
            if grp == r.group and d != digest:
                labels_old[0] += c[0]
                labels_old[1] += c[1]
        shadow = fleet.shadow.get((r.group, digest))
        if g.get("min_shadow_agreement") is not None:
            want = float(g["min_shadow_agreement"])
            n = shadow[0] if shadow else 0.0
            check = {"gate": "min_shadow_agreement", "code": "shadow_agreement", "threshold": want, "n": n}
            if n < s.min_drift_samples:
                check.update(verdict="wait", detail=f"shadow predictions: {n:.0f} of {s.min_drift_samples} needed")
            else:
                value = shadow[1] / shadow[0]
                ok = value >= want
                check.update(verdict="pass" if ok else "fail", value=value,
                             detail=f"shadow agreement {value:.1%} {'≥' if ok else '<'} required {want:.1%} "
                                    f"over {n:.0f} predictions")
            checks.append(check)
        if g.get("max_prediction_shift_psi") is not None:
            limit = float(g["max_prediction_shift_psi"])
            check = {"gate": "max_prediction_shift_psi", "code": "prediction_shift", "threshold": limit}
            nc, nk = sum(canary.classes.values()), sum(control.classes.values())
            if nc < s.min_drift_samples or nk < s.min_drift_samples:
                check.update(verdict="wait", detail=f"predictions: canary {nc:.0f}, control {nk:.0f} "
                                                    f"({s.min_drift_samples} needed each)")
            else:
                shift = stats.prediction_shift(control.classes, canary.classes)
                bad = shift.psi > limit and shift.p_value < s.p_value_alert
                check.update(verdict="fail" if bad else "pass", value=shift.psi, p_value=shift.p_value,
                             canary=canary.classes, control=control.classes,
                             detail=f"prediction-distribution shift canary vs control: PSI {shift.psi:.3f} "
                                    f"{'>' if bad else '≤'} {limit:g} (p={shift.p_value:.2g}; {canary.devices} canary, "
                                    f"{control.devices} control devices)")
            checks.append(check)
        if g.get("min_live_accuracy_vs_previous"):
            check = {"gate": "min_live_accuracy_vs_previous", "code": "live_accuracy"}
            if labels_new[1] < s.min_labels or labels_old[1] < s.min_labels:
                check.update(verdict="wait", detail=f"labels: new {labels_new[1]}, previous {labels_old[1]} "
                                                    f"({s.min_labels} needed each)")
            else:
                worse = stats.accuracy_worse(labels_new, tuple(labels_old))
                a_new, a_old = labels_new[0] / labels_new[1], labels_old[0] / labels_old[1]
                check.update(verdict="fail" if worse else "pass", value=a_new, threshold=a_old,
                             detail=f"live accuracy {a_new:.1%} vs previous {a_old:.1%} "
                                    f"({labels_new[1]} / {labels_old[1]} labels)")
            checks.append(check)
        return checks

    def _evaluate_gates(self, fleet: Fleet, now: float) -> list[tuple[RolloutRecord, str, dict[str, Any]]]:
        """The verdict of every live rollout with ML gates (pure: :meth:`_write` stores and acts on them)."""
        out = []
        for r in self.storage.list_rollouts(statuses=[logic.ACTIVE, logic.PAUSED, logic.COMPLETED]):
            if not r.gates:
                continue
            bundle = self.storage.get_bundle(r.bundle_id)
            if bundle is None:
                continue
            checks = self._gate_checks(r, bundle.digest, fleet)
            verdicts = {c["verdict"] for c in checks}
            verdict = "fail" if "fail" in verdicts else "wait" if "wait" in verdicts else "pass"
            out.append((r, bundle.digest, {"verdict": verdict, "checks": checks, "evaluated_at": now,
                                           "waiting": [c["detail"] for c in checks if c["verdict"] == "wait"]}))
        return out

    def _halt(self, r: RolloutRecord, digest: str, failed: list[dict[str, Any]], now: float) -> None:
        message = "ML gate failed: " + "; ".join(c["detail"] for c in failed)
        with self.storage.transaction():
            # Decide on the current row, locked: another replica may have just halted it or advanced its step.
            fresh = self.storage.lock_rollout(r.id)
            if fresh is None or fresh.status not in (logic.ACTIVE, logic.PAUSED, logic.COMPLETED):
                return
            running = []
            for m in self.storage.list_members(r.id):
                device = self.storage.get_device(m.device_id)
                if m.state in (logic.INSTALLED, logic.COMMITTED) or (device and (device.current or {}).get("digest") == digest):
                    running.append(m.device_id)
                    if m.state not in (logic.FAILED, logic.REVERTED):
                        self.storage.save_member(dataclasses.replace(
                            m, state=logic.FAILED, updated_at=now, failure_code=failed[0]["code"],
                            failure_detail=failed[0]["detail"]))
            reasons = [{"code": c["code"], "count": len(running), "devices": sorted(running), "detail": c["detail"],
                        "value": c.get("value"), "threshold": c.get("threshold")} for c in failed]
            self.orchestrator.halt(fresh, reasons, message, now)
            bundle = self.storage.get_bundle(r.bundle_id)
            for c in failed:
                self.alerter.fire("rollout_gate", r.group, bundle.version if bundle else digest[:12], c["code"],
                                  f"rollout {r.id} halted: {c['detail']}", digest=digest, value=c.get("value"),
                                  threshold=c.get("threshold"), now=now, detail={"rollout_id": r.id})
        log.warning("rollout %s halted by its ML gates: %s", r.id, message)

    # -------------------------------------------------------------------- views

    def _fresh_view(self) -> None:
        """Rebuild the view caches from the database when this replica has not evaluated for two ticks."""
        now = self.clock()
        with self._lock:
            if now - self._view_at <= 2 * self.settings.tick_interval_s:
                return
        fleet = Fleet(self._load(now))
        snapshots = {key: ev.snapshot for key in fleet.by_key
                     if (ev := self._evaluate(key, fleet, frozenset(), now)).snapshot is not None}
        with self._lock:
            self._snapshots = snapshots
            self._shadow_view = [{"group": g, "digest": d, "predictions": c[0], "agreement": c[1] / c[0] if c[0] else None}
                                 for (g, d), c in sorted(fleet.shadow.items())]
            self._view_at = now

    def drift_view(self, group: Optional[str] = None, version: Optional[str] = None, history: int = 200) -> dict[str, Any]:
        """The latest evaluation per (group, bundle), shadow agreement, and the stored history (newest first)."""
        self._fresh_view()
        with self._lock:
            current = [dict(v) for (g, _d), v in sorted(self._snapshots.items())
                       if (group is None or g == group) and (version is None or v["version"] == version)]
            shadow = [dict(x) for x in self._shadow_view if group is None or x["group"] == group]
        rows = self.storage.list_drift_stats(group, version, limit=history)
        return {"thresholds": {"psi_alert": self.settings.psi_alert, "p_value_alert": self.settings.p_value_alert,
                               "min_drift_samples": self.settings.min_drift_samples},
                "current": current, "shadow": shadow, "history": [dataclasses.asdict(x) for x in rows],
                "evaluations": self.evaluations}

    def dashboard(self) -> dict[str, Any]:
        """The dashboard's monitoring section: current evaluations, open alerts, gate verdicts."""
        view = self.drift_view(history=0)
        gates = {}
        for r in self.storage.list_rollouts():
            verdict = self.storage.get_gate_verdict(r.id) if r.gates else None
            if verdict is not None:
                gates[r.id] = verdict
        return {"thresholds": view["thresholds"], "current": view["current"],
                "alerts": [dataclasses.asdict(a) for a in self.alerter.open_alerts(limit=50)],
                "gates": gates}
