"""Fleet monitoring: aggregate device summaries, judge drift, raise alerts, evaluate ML rollout gates.

The check-in path only appends the raw ``summaries`` to an in-memory inbox
(:meth:`FleetMonitor.ingest`, O(1)); everything else runs in the periodic tick
(:meth:`FleetMonitor.tick`): the inbox is drained into each device's latest window,
windows older than ``monitor_window_s`` expire, and every (group, bundle) whose
windows changed is re-evaluated with :mod:`.monitoring` (pure statistics):

* input drift per feature: PSI + chi-square goodness of fit of the summed bin counts
  against the reference deciles (``stats/reference.json`` stored at upload);
* prediction drift: predicted-class counts against the reference class distribution;
* live accuracy from ground-truth labels (cumulative), shadow agreement (cumulative),
  staleness (age of the running bundle).

Each evaluation is stored (``drift_stats``) and drives alerts (:mod:`.alerts`). Rollouts
with ML ``gates`` get a verdict (pass / wait / fail) cached for the orchestrator: a step
does not advance before its gates pass, and a failed gate marks the rollout's running
members failed and halts it, like install failures (their devices are told to roll back).
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
from .storage import DriftStat, RolloutRecord, Storage

__all__ = ["FleetMonitor"]

log = logging.getLogger("edgepack.server.monitor")

INBOX_SIZE = 200_000
PRUNE_EVERY_S = 600.0


@dataclass
class Window:
    """One device's latest summary, reduced to what the aggregates need."""
    at: float
    group: str
    digest: str
    variant: Optional[str]
    predictions: int
    features: dict[str, tuple[list[float], list[float]]]   # "input/feature" -> (edges, counts)
    classes: dict[str, float]
    confidence: Optional[tuple[list[float], list[float]]] = None


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
    return Window(now, group, digest, summary.get("variant") if isinstance(summary.get("variant"), str) else None,
                  int(predictions) if _num(predictions) else int(sum(classes.values())), features, classes, confidence)


class FleetMonitor:
    def __init__(self, settings: ServerSettings, storage: Storage, orchestrator: Orchestrator, alerter: Alerter,
                 clock: Callable[[], float]) -> None:
        self.settings, self.storage, self.orchestrator, self.alerter, self.clock = (
            settings, storage, orchestrator, alerter, clock)
        self._inbox: collections.deque = collections.deque(maxlen=INBOX_SIZE)
        self._lock = threading.RLock()
        self._latest: dict[str, Window] = {}
        self._by_key: dict[tuple[str, str], set[str]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._labels: dict[tuple[str, str], list[int]] = {}        # (group, digest) -> [correct, total]
        self._shadow: dict[tuple[str, str], list[float]] = {}      # (group, shadow digest) -> [predictions, agreeing]
        self._snapshots: dict[tuple[str, str], dict[str, Any]] = {}
        self._gates: dict[str, dict[str, Any]] = {}
        self._refs: dict[str, Optional[dict]] = {}
        self._last_prune = 0.0
        self._recorded: dict[tuple[str, str], float] = {}
        self.evaluations = 0
        orchestrator.gate_check = self.gate_verdict

    # ------------------------------------------------------------ check-in path

    def ingest(self, device_id: str, group: str, current_digest: Optional[str], summaries: Any, now: float) -> None:
        """Queue a check-in's ``summaries`` (called after the check-in committed; O(1))."""
        if summaries:
            self._inbox.append((device_id, group, current_digest, summaries, now))

    def gate_verdict(self, r: RolloutRecord) -> dict[str, Any]:
        """The cached ML-gate verdict of ``r`` (``wait`` until the tick computed one)."""
        return self._gates.get(r.id) or {"verdict": "wait", "waiting": ["no monitoring data evaluated yet"], "checks": []}

    # --------------------------------------------------------------------- tick

    def tick(self) -> None:
        now = self.clock()
        with self._lock:
            self._drain(now)
            self._expire(now)
            rows: list[DriftStat] = []
            for key in sorted(self._dirty):
                evaluated = self._evaluate(key, now)
                if evaluated and now - self._recorded.get(key, -1e18) >= self.settings.drift_record_interval_s:
                    self._recorded[key] = now  # bounded history; alerts and gates used this evaluation anyway
                    rows.extend(evaluated)
            self._dirty.clear()
        self.storage.add_drift_stats(rows)
        self._evaluate_gates(now)
        if now - self._last_prune > PRUNE_EVERY_S:
            self._last_prune = now
            self.storage.prune_drift_stats(now - self.settings.drift_retention_s)

    def _drain(self, now: float) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            try:
                self._take(*item)
            except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a malformed summary never stops the tick
                log.warning("ignored a malformed monitoring summary from device %s: %s", item[0], exc)

    def _take(self, device_id: str, group: str, current: Optional[str], summaries: Any, at: float) -> None:
        if not isinstance(summaries, Mapping):
            return
        summary = summaries.get("window")
        window = parse_window(summary, group, current, at)
        if window is None:
            return
        for item in summary.get("labels") or []:
            if isinstance(item, Mapping) and item.get("label") is not None and item.get("predicted") is not None:
                d = item.get("digest") if isinstance(item.get("digest"), str) else window.digest
                c = self._labels.setdefault((group, d), [0, 0])
                c[0] += int(str(item["label"]) == str(item["predicted"]))
                c[1] += 1
        shadow = summary.get("shadow")
        if isinstance(shadow, Mapping) and isinstance(shadow.get("digest"), str) and _num(shadow.get("predictions")) \
                and _num(shadow.get("agreement")):
            s = self._shadow.setdefault((group, shadow["digest"]), [0.0, 0.0])
            s[0] += float(shadow["predictions"])
            s[1] += float(shadow["predictions"]) * float(shadow["agreement"])
        old = self._latest.get(device_id)
        if old is not None:
            self._by_key.get((old.group, old.digest), set()).discard(device_id)
            self._dirty.add((old.group, old.digest))
        self._latest[device_id] = window
        self._by_key.setdefault((group, window.digest), set()).add(device_id)
        self._dirty.add((group, window.digest))

    def _expire(self, now: float) -> None:
        horizon = now - self.settings.monitor_window_s
        for device_id in [d for d, w in self._latest.items() if w.at < horizon]:
            w = self._latest.pop(device_id)
            self._by_key.get((w.group, w.digest), set()).discard(device_id)
            self._dirty.add((w.group, w.digest))

    def aggregate(self, key: tuple[str, str]) -> Aggregate:
        agg = Aggregate()
        for device_id in self._by_key.get(key, ()):
            w = self._latest[device_id]
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
        return agg

    def _reference(self, digest: str) -> Optional[dict]:
        if digest not in self._refs:
            self._refs[digest] = self.storage.get_reference(digest)
        return self._refs[digest]

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

    def _evaluate(self, key: tuple[str, str], now: float) -> list[DriftStat]:
        group, digest = key
        s = self.settings
        bundle = self.storage.get_bundle_by_digest(digest)
        version = bundle.version if bundle is not None else digest[:12]
        agg = self.aggregate(key)
        self.evaluations += 1
        rows: list[DriftStat] = []
        snapshot: dict[str, Any] = {"group": group, "digest": digest, "version": version,
                                    "name": bundle.name if bundle else None, "devices": agg.devices,
                                    "predictions": agg.predictions, "evaluated_at": now, "features": [],
                                    "classes": agg.classes, "reference_classes": None, "prediction_drift": None}
        if agg.devices == 0:
            self._snapshots.pop(key, None)
            return rows
        quantiles = self._quantiles(digest)
        for name, (edges, counts) in sorted(agg.features.items()):
            shift = stats.feature_drift(edges, counts, quantiles.get(name))
            drifted = shift.drifted(s.psi_alert, s.p_value_alert, s.min_drift_samples)
            rows.append(DriftStat(group, digest, version, "input_drift", name, now, shift.psi, shift.p_value, shift.n,
                                  drifted, {"devices": agg.devices}))
            snapshot["features"].append({"feature": name, "psi": shift.psi, "p_value": shift.p_value, "n": shift.n,
                                         "drifted": drifted})
            self._alert(drifted, shift.n >= s.min_drift_samples, "input_drift", group, version, name, digest,
                        f"input drift on {name}: PSI {shift.psi:.3f} > {s.psi_alert:g} (p={shift.p_value:.2g}, "
                        f"{shift.n} values from {agg.devices} devices)", shift.psi, s.psi_alert, now)
        ref_classes = self._reference_classes(digest, agg.variant, agg.classes)
        if ref_classes and agg.classes:
            shift = stats.reference_prediction_shift(ref_classes, agg.classes)
            drifted = shift.drifted(s.psi_alert, s.p_value_alert, s.min_drift_samples)
            rows.append(DriftStat(group, digest, version, "prediction_drift", "", now, shift.psi, shift.p_value, shift.n,
                                  drifted, {"classes": agg.classes}))
            snapshot["reference_classes"] = ref_classes
            snapshot["prediction_drift"] = {"psi": shift.psi, "p_value": shift.p_value, "n": shift.n, "drifted": drifted}
            self._alert(drifted, shift.n >= s.min_drift_samples, "prediction_drift", group, version, "", digest,
                        f"prediction distribution drift: PSI {shift.psi:.3f} > {s.psi_alert:g} against the reference "
                        f"(p={shift.p_value:.2g}, {shift.n} predictions)", shift.psi, s.psi_alert, now)
        correct, total = self._labels.get(key, [0, 0])
        acc, _se = stats.accuracy(correct, total)
        snapshot["accuracy"] = {"accuracy": acc, "labels": total}
        if total:
            worse = [(d, c) for (g, d), c in self._labels.items() if g == group and d != digest and c[1] >= s.min_labels
                     and total >= s.min_labels and stats.accuracy_worse((correct, total), tuple(c), s.accuracy_drop_alert)]
            rows.append(DriftStat(group, digest, version, "accuracy", "", now, acc, None, total, bool(worse)))
            self._alert(bool(worse), total >= s.min_labels, "accuracy_drop", group, version, "", digest,
                        f"live accuracy {acc:.1%} over {total} labels is more than {s.accuracy_drop_alert:.0%} below "
                        "another version in the group", acc, None, now)
        if bundle is not None:
            age = stats.staleness(now, bundle.created_at, None)["bundle_age_s"]
            snapshot["bundle_age_s"] = age
            self._alert(age > s.model_max_age_s, True, "stale_model", group, version, "", digest,
                        f"the group runs bundle {version}, {age / 86400:.0f} days old (limit "
                        f"{s.model_max_age_s / 86400:.0f})", age, s.model_max_age_s, now)
        shadow = self._shadow.get((group, digest))
        if shadow and shadow[0] > 0:
            snapshot["shadow_agreement"] = shadow[1] / shadow[0]
        self._snapshots[key] = snapshot
        return rows

    def _alert(self, condition: bool, judged: bool, kind: str, group: str, version: str, feature: str, digest: str,
               message: str, value: Optional[float], threshold: Optional[float], now: float) -> None:
        if condition:
            self.alerter.fire(kind, group, version, feature, message, digest=digest, value=value, threshold=threshold,
                              now=now)
        elif judged:
            self.alerter.clear(kind, group, version, feature, now=now)

    # -------------------------------------------------------------------- gates

    def _gate_checks(self, r: RolloutRecord, digest: str) -> list[dict[str, Any]]:
        s, g = self.settings, r.gates
        checks: list[dict[str, Any]] = []
        with self._lock:
            keys = [k for k in self._by_key if k[0] == r.group and self._by_key[k]]
            canary = self.aggregate((r.group, digest))
            control = Aggregate()
            for k in keys:
                if k[1] != digest:
                    other = self.aggregate(k)
                    control.devices += other.devices
                    for c, v in other.classes.items():
                        control.classes[c] = control.classes.get(c, 0.0) + v
            labels_new = tuple(self._labels.get((r.group, digest), [0, 0]))
            labels_old = [0, 0]
            for (grp, d), c in self._labels.items():
                if grp == r.group and d != digest:
                    labels_old[0] += c[0]
                    labels_old[1] += c[1]
            shadow = self._shadow.get((r.group, digest))
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

    def _evaluate_gates(self, now: float) -> None:
        live = set()
        for r in self.storage.list_rollouts(statuses=[logic.ACTIVE, logic.PAUSED, logic.COMPLETED]):
            if not r.gates:
                continue
            live.add(r.id)
            bundle = self.storage.get_bundle(r.bundle_id)
            if bundle is None:
                continue
            checks = self._gate_checks(r, bundle.digest)
            verdicts = {c["verdict"] for c in checks}
            verdict = "fail" if "fail" in verdicts else "wait" if "wait" in verdicts else "pass"
            self._gates[r.id] = {"verdict": verdict, "checks": checks, "evaluated_at": now,
                                 "waiting": [c["detail"] for c in checks if c["verdict"] == "wait"]}
            if verdict == "fail":
                self._halt(r, bundle.digest, [c for c in checks if c["verdict"] == "fail"], now)
            elif verdict == "pass" and r.status == logic.ACTIVE:
                with self.storage.transaction():  # the step may advance now
                    fresh = self.storage.get_rollout(r.id)
                    if fresh is not None:
                        self.orchestrator.evaluate(fresh, now)
        for rid in [k for k in self._gates if k not in live]:
            gone = self.storage.get_rollout(rid)
            if gone is not None and gone.status in (logic.HALTED, logic.ABORTED, logic.ROLLED_BACK):
                continue  # keep the last verdict of a halted rollout for its view
            self._gates.pop(rid, None)

    def _halt(self, r: RolloutRecord, digest: str, failed: list[dict[str, Any]], now: float) -> None:
        message = "ML gate failed: " + "; ".join(c["detail"] for c in failed)
        with self.storage.transaction():
            fresh = self.storage.get_rollout(r.id)
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

    def drift_view(self, group: Optional[str] = None, version: Optional[str] = None, history: int = 200) -> dict[str, Any]:
        with self._lock:
            current = [dict(v) for (g, _d), v in sorted(self._snapshots.items())
                       if (group is None or g == group) and (version is None or v["version"] == version)]
            shadow = [{"group": g, "digest": d, "predictions": s[0], "agreement": s[1] / s[0] if s[0] else None}
                      for (g, d), s in sorted(self._shadow.items()) if group is None or g == group]
        rows = self.storage.list_drift_stats(group, version, limit=history)
        return {"thresholds": {"psi_alert": self.settings.psi_alert, "p_value_alert": self.settings.p_value_alert,
                               "min_drift_samples": self.settings.min_drift_samples},
                "current": current, "shadow": shadow, "history": [dataclasses.asdict(x) for x in rows],
                "evaluations": self.evaluations}

    def dashboard(self) -> dict[str, Any]:
        view = self.drift_view(history=0)
        return {"thresholds": view["thresholds"], "current": view["current"],
                "alerts": [dataclasses.asdict(a) for a in self.alerter.open_alerts()[:50]],
                "gates": {rid: g for rid, g in self._gates.items()}}
