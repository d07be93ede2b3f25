"""Fleet monitoring with several server replicas on one database (both backends).

Each "replica" is a :class:`FleetMonitor` with its own storage object opened on the same
database URL (for SQLite: two connections to one file), its own orchestrator and alerter,
fed a part of the fleet's check-ins as a load balancer would spread them.
"""

from __future__ import annotations

import threading

import pytest

from edgepack.server import monitoring as stats
from edgepack.server.alerts import Alerter
from edgepack.server.fleetmon import FleetMonitor
from edgepack.server.orchestration import Orchestrator
from edgepack.server.settings import ServerSettings
from edgepack.server.storage import (
    BundleRecord,
    DeviceRecord,
    MemberRecord,
    RolloutRecord,
    open_storage,
)

OLD, NEW = "a" * 64, "b" * 64
EDGES = [float(i) for i in range(11)]              # the reference deciles of "raw/0" are 0..10
SHIFTED = [0.0] * 8 + [4.0, 8.0, 8.0, 0.0]         # 20 values per window, all in the top deciles


class Replica:
    """One server process's monitoring stack on a shared database."""

    def __init__(self, db_url: str, settings: ServerSettings, clock) -> None:
        self.storage = open_storage(db_url)
        self.orchestrator = Orchestrator(self.storage, clock)
        self.alerter = Alerter(settings, self.storage, clock)
        self.monitor = FleetMonitor(settings, self.storage, self.orchestrator, self.alerter, clock)

    def close(self) -> None:
        self.alerter.close()
        self.storage.close()


@pytest.fixture
def world(db_url, tmp_path):
    """(settings overrides -> (setup storage, [replica A, replica B], clock)); closes everything."""
    opened: list = []

    def make(devices: int = 20, **overrides):
        now = [1000.0]
        clock = lambda: now[0]
        settings = ServerSettings.for_tests(tmp_path, "x" * 20, db_url=db_url, **overrides)
        setup = open_storage(db_url)
        opened.append(setup)
        setup.migrate()
        for digest, version in ((OLD, "1.0.0"), (NEW, "2.0.0")):
            setup.add_bundle(BundleRecord(f"b_{digest[:16]}", "toy", version, digest, 1, "staging", "k", {}, now[0]))
            setup.set_reference(digest, {"inputs": {"raw": {"features": [{"name": "0", "quantiles": EDGES}]}}}, now[0])
        for i in range(devices):
            setup.add_device(DeviceRecord(f"d{i:02d}", "g", [], None, f"{i:02d}" * 32, now[0]))
        replicas = [Replica(db_url, settings, clock), Replica(db_url, settings, clock)]
        opened.extend(replicas)
        return setup, replicas, clock

    yield make
    for thing in reversed(opened):
        thing.close()


def _drift_summary(digest: str, counts: list[float]) -> dict:
    return {"window": {"version": 1, "digest": digest, "variant": "v", "window": {"predictions": 20},
                       "inputs": {"raw": {"features": [{"name": "0", "edges": EDGES, "counts": counts}]}},
                       "outputs": {"class_counts": {}}, "shadow": None, "labels": []}}


def _class_summary(digest: str, classes: dict, labels=()) -> dict:
    return {"window": {"version": 1, "digest": digest, "variant": "v", "window": {"predictions": sum(classes.values())},
                       "inputs": {}, "outputs": {"class_counts": classes}, "shadow": None,
                       "labels": [{"id": str(i), "label": lab, "predicted": pred, "digest": digest}
                                  for i, (lab, pred) in enumerate(labels)]}}


def _gated_rollout(setup, gates: dict, now: float = 1000.0) -> RolloutRecord:
    r = RolloutRecord("r_1", f"b_{NEW[:16]}", "g", [50, 100], 0.0, 1, 0.5, 1, {}, "active", 0, now, now, now, gates=gates)
    setup.add_rollout(r)
    setup.save_member(MemberRecord("r_1", "d00", 0, "committed", OLD, now, now))
    return r


def test_two_replicas_split_checkins_still_see_the_whole_fleet_drift(world):
    # 20 devices x 20 values: the whole fleet (400) is enough evidence to judge (300), either half (200) is not.
    setup, (a, b), _clock = world(min_drift_samples=300)
    for i in range(20):
        (a if i % 2 else b).monitor.ingest(f"d{i:02d}", "g", OLD, _drift_summary(OLD, SHIFTED), 1000.0)
    a.monitor.tick()
    b.monitor.tick()
    a.monitor.tick()  # A now sees B's half too

    expected = stats.feature_drift(EDGES, [c * 20 for c in SHIFTED], EDGES)
    assert expected.drifted(0.2, 1e-3, 300) and not stats.feature_drift(EDGES, [c * 10 for c in SHIFTED], EDGES).drifted(
        0.2, 1e-3, 300)
    for replica in (a, b):
        (current,) = replica.monitor.drift_view(group="g")["current"]
        assert current["devices"] == 20
        (feature,) = current["features"]
        assert feature["n"] == 400 and feature["drifted"]
        assert feature["psi"] == pytest.approx(expected.psi) and feature["p_value"] == pytest.approx(expected.p_value)
    drift_alerts = [x for x in setup.list_alerts(status="open") if x.kind == "input_drift"]
    assert len(drift_alerts) == 1, drift_alerts
    assert drift_alerts[0].feature == "raw/0" and drift_alerts[0].version == "1.0.0"
    assert "400 values from 20 devices" in drift_alerts[0].message
    stored = [row for row in setup.list_drift_stats(group="g") if row.kind == "input_drift"]
    assert stored and all(row.n == 400 for row in stored if row.drifted)


def test_alert_opened_by_one_replica_is_bumped_not_duplicated_by_the_other(world):
    setup, (a, b), _clock = world()
    assert a.alerter.fire("input_drift", "g", "1.0.0", "raw/0", "PSI 0.9", value=0.9) is not None
    assert b.alerter.fire("input_drift", "g", "1.0.0", "raw/0", "PSI 0.8", value=0.8) is None   # de-duplicated
    (alert,) = setup.list_alerts(status="open")
    assert alert.count == 2 and [x.id for x in b.alerter.open_alerts()] == [alert.id]
    assert b.alerter.clear("input_drift", "g", "1.0.0", "raw/0") is not None
    assert a.alerter.open_alerts() == []          # A does not keep a stale "open" copy ...
    again = a.alerter.fire("input_drift", "g", "1.0.0", "raw/0", "PSI 0.7")
    assert again is not None and again.id != alert.id   # ... so a recurrence opens a new alert
    assert len(setup.list_alerts()) == 2


def test_gate_verdict_from_one_replica_is_seen_by_the_other(world):
    setup, (a, b), _clock = world(min_drift_samples=100)
    r = _gated_rollout(setup, {"max_prediction_shift_psi": 0.25})
    assert a.monitor.gate_verdict(r)["verdict"] == b.monitor.gate_verdict(r)["verdict"] == "wait"
    a.monitor.ingest("d00", "g", NEW, _class_summary(NEW, {"a": 60, "b": 60}), 1000.0)
    a.monitor.ingest("d01", "g", OLD, _class_summary(OLD, {"a": 65, "b": 55}), 1000.0)
    a.monitor.tick()   # only A evaluated
    verdict = b.monitor.gate_verdict(setup.get_rollout("r_1"))
    assert verdict["verdict"] == "pass", verdict
    assert verdict == a.monitor.gate_verdict(r)
    # B's orchestrator (the check-in path) and views read the same verdict
    assert b.orchestrator.view(setup.get_rollout("r_1"))["gate_status"]["verdict"] == "pass"
    assert b.monitor.dashboard()["gates"]["r_1"]["verdict"] == "pass"


def test_prediction_shift_gate_halts_once_with_two_replicas(world):
    # Either replica's half of the control cohort (60 predictions) is too little evidence (100); together, 120.
    setup, (a, b), _clock = world(min_drift_samples=100)
    _gated_rollout(setup, {"max_prediction_shift_psi": 0.25})
    a.monitor.ingest("d00", "g", NEW, _class_summary(NEW, {"a": 120}), 1000.0)      # the canary collapsed
    a.monitor.ingest("d01", "g", OLD, _class_summary(OLD, {"a": 20, "b": 20, "c": 20}), 1000.0)
    b.monitor.ingest("d02", "g", OLD, _class_summary(OLD, {"a": 20, "b": 20, "c": 20}), 1000.0)
    barrier = threading.Barrier(2)
    errors: list = []

    def run(replica):
        try:
            barrier.wait(timeout=10)
            replica.monitor.tick()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(x,)) for x in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    a.monitor.tick()
    b.monitor.tick()   # by now both saw the whole fleet, and both judge the gate failed

    after = setup.get_rollout("r_1")
    assert after.status == "halted" and after.halt_reasons[0]["code"] == "prediction_shift"
    assert [h["event"] for h in after.history].count("halted") == 1
    assert setup.get_member("r_1", "d00").failure_code == "prediction_shift"
    gate_alerts = [x for x in setup.list_alerts() if x.kind == "rollout_gate"]
    assert len(gate_alerts) == 1 and gate_alerts[0].count == 1, gate_alerts
    for replica in (a, b):
        assert replica.monitor.gate_verdict(after)["verdict"] == "fail"


def test_labels_received_by_two_replicas_add_up_for_the_accuracy_gate(world):
    # The canary's two check-ins reach different replicas: 30 + 30 labels, 50 needed to judge.
    setup, (a, b), _clock = world(min_labels=50, min_drift_samples=10_000)
    _gated_rollout(setup, {"min_live_accuracy_vs_previous": True})
    a.monitor.ingest("d01", "g", OLD, _class_summary(OLD, {"a": 60}, labels=[("a", "a")] * 60), 1000.0)
    a.monitor.ingest("d00", "g", NEW, _class_summary(NEW, {"a": 30}, labels=[("a", "b")] * 30), 1000.0)
    a.monitor.tick()
    assert "labels: new 30" in a.monitor.gate_verdict(setup.get_rollout("r_1"))["waiting"][0]
    b.monitor.ingest("d00", "g", NEW, _class_summary(NEW, {"a": 30}, labels=[("a", "b")] * 30), 1001.0)
    b.monitor.tick()
    after = setup.get_rollout("r_1")
    assert after.status == "halted" and after.halt_reasons[0]["code"] == "live_accuracy"
    assert "(60 / 60 labels)" in after.halt_reasons[0]["detail"]
    a.monitor.tick()
    for replica in (a, b):
        (current,) = [c for c in replica.monitor.drift_view()["current"] if c["version"] == "2.0.0"]
        assert current["accuracy"] == {"accuracy": 0.0, "labels": 60}


def test_checkins_are_not_lost_when_a_flush_fails(world, monkeypatch):
    from edgepack.errors import ServerError

    setup, (a, _b), _clock = world(min_drift_samples=300)
    for i in range(20):
        a.monitor.ingest(f"d{i:02d}", "g", OLD, _drift_summary(OLD, SHIFTED), 1000.0)
    real = a.storage.put_monitor_windows

    def down(rows):
        raise ServerError("Lost the connection to the database (test).")

    monkeypatch.setattr(a.storage, "put_monitor_windows", down)
    with pytest.raises(ServerError):
        a.monitor.tick()
    monkeypatch.setattr(a.storage, "put_monitor_windows", real)
    a.monitor.tick()
    assert len(setup.list_monitor_windows(0.0)) == 20
    assert [x.kind for x in setup.list_alerts(status="open")] == ["input_drift"]


def test_windows_another_replica_stores_late_are_still_seen_between_full_reloads(world):
    """A replica refreshes its copy of the stored windows incrementally (by stamp); another replica stores a
    window up to a tick after it received it, stamped with the receive time, i.e. *older* than stamps this
    replica has already read. Such a window must still count before the next full reload."""
    from edgepack.server import fleetmon

    setup, (a, b), clock = world(min_drift_samples=300, tick_interval_s=5.0)
    now = [1000.0]
    a.monitor.clock = b.monitor.clock = lambda: now[0]
    for i in range(10):
        a.monitor.ingest(f"d{i:02d}", "g", OLD, _drift_summary(OLD, SHIFTED), 1000.0)
    a.monitor.tick()  # full load; A's first windows stored, stamped 1000
    now[0] = 1004.0
    for i in range(10, 15):
        a.monitor.ingest(f"d{i:02d}", "g", OLD, _drift_summary(OLD, SHIFTED), 1004.0)
    a.monitor.tick()
    now[0] = 1005.0
    a.monitor.tick()  # has read stamps up to 1004 now
    for i in range(15, 20):
        b.monitor.ingest(f"d{i:02d}", "g", OLD, _drift_summary(OLD, SHIFTED), 1001.0)  # received at 1001...
    now[0] = 1006.0
    b.monitor.tick()  # ...stored at 1006, stamped 1001: older than what A has seen
    now[0] = 1007.0
    assert now[0] - a.monitor._mirror_full_at < fleetmon.FULL_RELOAD_S  # A is still on incremental reads
    a.monitor.tick()
    (current,) = a.monitor.drift_view(group="g")["current"]
    assert current["devices"] == 20 and current["features"][0]["n"] == 400


def test_no_webhook_for_an_alert_whose_transaction_rolled_back(world):
    setup, (a, _b), _clock = world()
    sent = []

    class Recorder:
        def send(self, payload):
            sent.append(payload)

        def close(self):
            pass

    a.alerter.webhook = Recorder()
    with pytest.raises(RuntimeError):
        with a.alerter.after_commit(), a.storage.transaction():
            assert a.alerter.fire("input_drift", "g", "1.0.0", "raw/0", "PSI 0.9", value=0.9) is not None
            raise RuntimeError("the write transaction fails after the alert was opened")
    assert sent == [] and setup.list_alerts(status="open") == []
    with a.alerter.after_commit(), a.storage.transaction():
        a.alerter.fire("input_drift", "g", "1.0.0", "raw/0", "PSI 0.9", value=0.9)
        assert sent == []  # not before the commit
    assert [p["event"] for p in sent] == ["opened"] and len(setup.list_alerts(status="open")) == 1
