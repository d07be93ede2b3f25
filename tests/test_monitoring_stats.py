"""Pure fleet-monitoring statistics (edgepack.server.monitoring) and alert delivery (edgepack.server.alerts)."""

from __future__ import annotations

import http.server
import json
import math
import random
import threading
import time

import pytest

from edgepack.server import monitoring as m


def _sf_even(x: float, df: int) -> float:
    """Closed form of the chi-square survival function for even df."""
    h = x / 2
    return math.exp(-h) * sum(h ** k / math.factorial(k) for k in range(df // 2))


@pytest.mark.parametrize("x,df,p", [
    (3.841458820694124, 1, 0.05),
    (6.634896601021213, 1, 0.01),
    (18.307038053275146, 10, 0.05),
    (15.086272469388987, 5, 0.01),
    (45.31474661812586, 20, 0.001),
    (124.34211340400407, 100, 0.05),
    (0.0, 3, 1.0),
])
def test_chi2_sf_matches_table_values(x, df, p):
    assert m.chi2_sf(x, df) == pytest.approx(p, rel=1e-9, abs=1e-15)


def test_chi2_sf_matches_closed_forms():
    for x in (0.01, 0.5, 1.0, 2.0, 5.5, 10.0, 30.0, 80.0, 200.0):
        assert m.chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-10, abs=1e-300)
        for df in (2, 4, 10, 30):
            assert m.chi2_sf(x, df) == pytest.approx(_sf_even(x, df), rel=1e-10, abs=1e-300)
    assert m.chi2_sf(100, 10) == pytest.approx(5.449701982920521e-17, rel=1e-9)  # deep in the tail (continued fraction)
    assert m.gammaincc(0.5, 2.0) == pytest.approx(math.erfc(math.sqrt(2.0)), rel=1e-12)
    assert m.chi2_sf(math.inf, 3) == 0.0 and m.chi2_sf(5, 0) == 1.0


def test_psi_known_values_and_epsilon():
    assert m.psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    expected = (0.6 - 0.5) * math.log(0.6 / 0.5) + (0.4 - 0.5) * math.log(0.4 / 0.5)
    assert m.psi([1, 1], [6, 4]) == pytest.approx(expected)          # counts are normalized
    assert math.isfinite(m.psi([0.5, 0.5, 0.0], [0.0, 0.5, 0.5]))     # empty bins: floored, finite
    assert m.psi([0.5, 0.5, 0.0], [0.0, 0.5, 0.5]) > 1.0


def test_bin_groups_merge_duplicate_and_outer_edges():
    assert m.bin_groups([0, 1, 2, 3]) == [[0, 1], [2], [3, 4]]
    # a run of equal edges (a point mass at 0) plus its neighbours is one bin
    assert m.bin_groups([0, 0, 0, 3, 5, 5, 7, 8, 9, 10, 12]) == [[0, 1, 2, 3], [4, 5, 6], [7], [8], [9], [10, 11]]
    shares = m.merge(m.expected_shares([0, 0, 0, 3, 5, 5, 7, 8, 9, 10, 12]),
                     m.bin_groups([0, 0, 0, 3, 5, 5, 7, 8, 9, 10, 12]))
    assert sum(shares) == pytest.approx(1.0) and shares[0] == pytest.approx(0.3) and shares[1] == pytest.approx(0.3)


def _counts(values, edges):
    import bisect
    out = [0] * (len(edges) + 1)
    for v in values:
        out[bisect.bisect_right(edges, v)] += 1
    return out


def test_feature_drift_separates_shift_from_noise():
    rng = random.Random(0)
    ref = sorted(rng.gauss(0, 1) for _ in range(10_000))
    edges = [ref[min(len(ref) - 1, int(q * len(ref)))] for q in [i / 10 for i in range(11)]]
    same = m.feature_drift(edges, _counts([rng.gauss(0, 1) for _ in range(2000)], edges))
    shifted = m.feature_drift(edges, _counts([rng.gauss(0.8, 1) for _ in range(2000)], edges))
    assert same.psi < 0.05 and same.p_value > 1e-3 and not same.drifted(0.2, 1e-3, 200)
    assert shifted.psi > 0.2 and shifted.p_value < 1e-12 and shifted.drifted(0.2, 1e-3, 200)
    small = m.feature_drift(edges, _counts([rng.gauss(0.8, 1) for _ in range(50)], edges))
    assert not small.drifted(0.2, 1e-3, 200)  # too few samples to judge


def test_false_positive_rate_of_the_feature_test_is_low():
    rng = random.Random(1)
    ref = sorted(rng.random() for _ in range(10_000))
    edges = [ref[min(len(ref) - 1, int(q * len(ref)))] for q in [i / 10 for i in range(11)]]
    flagged = sum(m.feature_drift(edges, _counts([rng.random() for _ in range(500)], edges)).drifted(0.2, 1e-3, 200)
                  for _ in range(200))
    assert flagged == 0


def test_prediction_shift_detects_collapse_not_noise():
    control = {"0": 340, "1": 330, "2": 330}
    assert not m.prediction_shift(control, {"0": 110, "1": 95, "2": 105}).drifted(0.2, 1e-3, 200)
    collapsed = m.prediction_shift(control, {"0": 300})
    assert collapsed.psi > 2 and collapsed.p_value < 1e-50 and collapsed.drifted(0.2, 1e-3, 200)
    stat, df, p = m.chi2_two_sample([10, 20, 30], [10, 20, 30])
    assert stat == pytest.approx(0.0) and df == 2 and p == pytest.approx(1.0)
    ref = m.reference_prediction_shift({"a": 0.5, "b": 0.5}, {"a": 500, "b": 0})
    assert ref.psi > 1 and ref.p_value < 1e-50


def test_accuracy_and_staleness():
    assert m.accuracy(90, 100)[0] == 0.9 and m.accuracy(0, 0)[0] is None
    assert m.accuracy_worse((60, 200), (180, 200))
    assert not m.accuracy_worse((178, 200), (180, 200))
    assert m.staleness(1000.0, 400.0, 990.0) == {"bundle_age_s": 600.0, "last_seen_s": 10.0}


# ------------------------------------------------------------------ alerts


class _Hook(http.server.BaseHTTPRequestHandler):
    fail_first = 2
    bodies: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        status = 503 if len(type(self).bodies) <= type(self).fail_first else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_alerts_deduplicate_and_webhook_retries_with_backoff(tmp_path, db_url):
    from edgepack.server.alerts import Alerter, WebhookSender
    from edgepack.server.settings import ServerSettings
    from edgepack.server.storage import open_storage

    _Hook.bodies = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    storage = open_storage(db_url)
    storage.migrate()
    settings = ServerSettings.for_tests(tmp_path, "x" * 20)
    hook = WebhookSender(f"http://127.0.0.1:{httpd.server_address[1]}/hook", retries=3, backoff_s=0.05)
    alerter = Alerter(settings, storage, time.time, webhook=hook)
    try:
        first = alerter.fire("input_drift", "B", "1.0.0", "raw/0", "PSI 0.9", value=0.9, threshold=0.2)
        assert first is not None
        assert alerter.fire("input_drift", "B", "1.0.0", "raw/0", "PSI 0.8", value=0.8) is None  # de-duplicated
        assert alerter.fire("input_drift", "B", "1.0.0", "raw/1", "PSI 0.7") is not None        # another feature
        deadline = time.monotonic() + 10
        while not (hook.idle() and hook.delivered == 2) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hook.delivered == 2 and hook.failed == 0 and hook.attempts == 4  # 2 refused + 2 accepted
        assert {b["alert"]["feature"] for b in _Hook.bodies} == {"raw/0", "raw/1"}
        stored = storage.list_alerts(status="open")
        assert len(stored) == 2 and {a.count for a in stored} == {1, 2}
        assert alerter.clear("input_drift", "B", "1.0.0", "raw/0") is not None
        assert len(storage.list_alerts(status="open")) == 1
        assert alerter.fire("input_drift", "B", "1.0.0", "raw/0", "again") is not None  # a recurrence reopens
    finally:
        alerter.close()
        httpd.shutdown()
        storage.close()


def test_expected_shares_follow_the_device_bucket_convention():
    # quantiles with a point mass at 0 (30 %); the device reports the unique edges, upper bound inclusive
    q = [0, 0, 0, 0, 3, 5, 7, 8, 9, 10, 12]
    edges = sorted(set(q))
    shares = m.expected_from_quantiles(edges, q)
    assert len(shares) == len(edges) + 1 and sum(shares) == pytest.approx(1.0)
    assert shares[0] == pytest.approx(0.3) and shares[1] == pytest.approx(0.1) and shares[-1] == 0.0
    assert m.expected_from_quantiles([1, 2, 3], [1, 2, 3]) == pytest.approx([0.0, 0.5, 0.5, 0.0])
    values = [0] * 30 + [2] * 10 + [4] * 10 + [6] * 10 + [7.5] * 10 + [8.5] * 10 + [9.5] * 10 + [11] * 10
    counts = [0] * (len(edges) + 1)
    import bisect
    for v in values:
        counts[bisect.bisect_left(edges, v)] += 1
    assert m.feature_drift(edges, [c * 10 for c in counts], q).psi < 0.01


# ------------------------------------------------------------------ gates (in process)


def _gate_setup(tmp_path, gates, db_url, request):
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

    now = [1000.0]
    clock = lambda: now[0]
    storage = open_storage(db_url)
    request.addfinalizer(storage.close)
    storage.migrate()
    settings = ServerSettings.for_tests(tmp_path, "x" * 20, min_drift_samples=100, min_labels=50)
    old, new = "a" * 64, "b" * 64
    for digest, version in ((old, "1.0.0"), (new, "2.0.0")):
        storage.add_bundle(BundleRecord(f"b_{digest[:16]}", "toy", version, digest, 1, "staging", "k", {}, now[0]))
    for i in range(4):
        storage.add_device(DeviceRecord(f"d{i}", "g", [], None, f"{i}" * 64, now[0]))
    rollout = RolloutRecord("r_1", f"b_{new[:16]}", "g", [50, 100], 0.0, 1, 0.5, 1, {}, "active", 0, now[0], now[0],
                            now[0], gates=gates)
    storage.add_rollout(rollout)
    storage.save_member(MemberRecord("r_1", "d0", 0, "committed", old, now[0], now[0]))
    orchestrator = Orchestrator(storage, clock)
    monitor = FleetMonitor(settings, storage, orchestrator, Alerter(settings, storage, clock), clock)
    return storage, monitor, orchestrator, old, new


def _summary(digest, classes, shadow=None, labels=()):
    return {"window": {"version": 1, "digest": digest, "variant": "v", "window": {"predictions": sum(classes.values())},
                       "inputs": {}, "outputs": {"class_counts": classes}, "shadow": shadow,
                       "labels": [{"id": str(i), "label": lab, "predicted": pred, "digest": digest}
                                  for i, (lab, pred) in enumerate(labels)]}}


def test_gates_wait_for_evidence_then_pass_or_halt(tmp_path, db_url, request):
    storage, monitor, orch, old, new = _gate_setup(tmp_path, {"max_prediction_shift_psi": 0.25,
                                                              "min_live_accuracy_vs_previous": True}, db_url, request)
    r = storage.get_rollout("r_1")
    assert monitor.gate_verdict(r)["verdict"] == "wait"
    monitor.ingest("d0", "g", new, _summary(new, {"a": 60, "b": 40}, labels=[("a", "a")] * 60), 1000.0)
    monitor.ingest("d1", "g", old, _summary(old, {"a": 30, "b": 20}, labels=[("a", "a")] * 60), 1000.0)
    monitor.tick()
    verdict = monitor.gate_verdict(r)
    assert verdict["verdict"] == "wait" and any("predictions" in w for w in verdict["waiting"])  # 50 < 100 control
    monitor.ingest("d2", "g", old, _summary(old, {"a": 65, "b": 35}), 1000.0)
    monitor.tick()
    assert monitor.gate_verdict(r)["verdict"] == "pass"
    assert "waiting_for" in orch.view(storage.get_rollout("r_1"))
    # the canary's accuracy collapses: the accuracy gate fails and halts the rollout
    monitor.ingest("d0", "g", new, _summary(new, {"a": 60, "b": 40}, labels=[("a", "b")] * 100), 1000.0)
    monitor.tick()
    after = storage.get_rollout("r_1")
    assert after.status == "halted" and after.halt_reasons[0]["code"] == "live_accuracy"
    assert storage.get_member("r_1", "d0").failure_code == "live_accuracy"


def test_shadow_agreement_gate_fails_below_threshold(tmp_path, db_url, request):
    storage, monitor, _orch, old, new = _gate_setup(tmp_path, {"min_shadow_agreement": 0.95}, db_url, request)
    for i in (1, 2):
        monitor.ingest(f"d{i}", "g", old, _summary(old, {"a": 50}, shadow={"digest": new, "predictions": 80,
                                                                             "agreement": 0.7}), 1000.0)
    monitor.tick()
    after = storage.get_rollout("r_1")
    assert after.status == "halted" and after.halt_reasons[0]["code"] == "shadow_agreement"
    assert "shadow agreement 70.0%" in after.halt_reasons[0]["detail"]
