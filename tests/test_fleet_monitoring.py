"""Fleet simulation: a real `edgepack server run` process and simulated devices that post real summaries.

Every simulated device holds a real :class:`edgepack_runtime.monitor.Monitor` fed with real
inputs and the real outputs of a bundle loaded in-process with ``edgepack_runtime`` (installed
into a device cache, so it passes its self-test exactly like on a device). The bundles carry
``stats/reference.json`` computed by ``edgepack.build.stats`` from the validation data.

* Drift: group A sees the validation distribution, group B a brightness-scaled one (x 0.6).
  B must raise an input-drift alert within one check-in window; A must raise none over 50
  windows, and the measured per-evaluation false-positive rate is reported.
* ML gate: a v3 whose predictions collapse to one class (it passes its self-test) is rolled
  out with a prediction-shift gate; it halts at the canary step and the control cohort never
  gets it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from bundles import keys, npz_bytes
from onnx import TensorProto, helper, numpy_helper

from edgepack.build.stats import reference_stats, stats_json
from edgepack.bundle import write_bundle
from net import running_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "fleet-monitoring-admin-token-0123"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
LABELS = ["a", "b", "c"]
VARIANT = "onnx-fp32"
ROWS_PER_WINDOW, BATCH = 200, 10
LOC, SCALE = np.array([100, 128, 150, 90]), np.array([30, 40, 25, 50])
REPORT = ROOT / "test-artifacts" / "fleet-monitoring.json"

# ------------------------------------------------------------------ bundles


def linear_model(w: np.ndarray) -> onnx.ModelProto:
    """uint8 [N,4] raw → /255 → MatMul(w) → scores [N,3]."""
    nodes = [helper.make_node("Cast", ["raw"], ["f"], to=TensorProto.FLOAT), helper.make_node("Div", ["f", "k"], ["x"]),
             helper.make_node("MatMul", ["x", "w"], ["scores"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("raw", TensorProto.UINT8, ["N", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(np.array(255.0, np.float32), "k")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


GOOD = np.array([[2.0, 0, 0], [0, 1.6, 0], [0, 0, 1.2], [0, 0, 0]])
COLLAPSED = np.array([[10.0, -10, -10]] * 4)  # class "a" wins for every non-zero input


def draw(rng: np.random.Generator, n: int, brightness: float = 1.0) -> np.ndarray:
    x = np.clip(rng.normal(LOC, SCALE, (n, 4)), 0, 255) * brightness
    return np.clip(x.round(), 0, 255).astype(np.uint8)


def build_bundle(out: Path, key: Path, version: str, w: np.ndarray) -> tuple[Path, dict]:
    """A signed bundle with golden vectors (so it passes its self-test) and reference statistics."""
    import onnxruntime as ort

    model = linear_model(w)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    val = draw(np.random.default_rng(123), 10_000)
    reference = reference_stats({"raw": val}, {VARIANT: sess.run(None, {"raw": val})[0]}, LABELS)
    golden = val[:8]
    manifest = {
        "format_version": 1, "name": "sim", "version": version,
        "io": {"inputs": [{"name": "raw", "dtype": "uint8", "shape": [None, 4], "value_range": [0, 255]}],
               "outputs": [{"name": "scores", "dtype": "float32", "shape": [None, 3], "labels": LABELS}]},
        "variants": [{"id": VARIANT, "file": f"models/{VARIANT}.onnx", "engine": "onnxruntime", "precision": "fp32",
                      "min_runtime": "0.1.0", "devices": ["x86-gateway"]}],
        "golden": {"file": "golden/vectors.npz", "tolerances": {VARIANT: {"scores": 1e-4}}},
    }
    members = {f"models/{VARIANT}.onnx": model.SerializeToString(),
               "golden/vectors.npz": npz_bytes({"input:raw": golden, f"output:{VARIANT}:scores": sess.run(None, {"raw": golden})[0]}),
               "stats/reference.json": stats_json(reference)}
    path = out / f"sim-{version}.epk"
    write_bundle(path, manifest, members, key, source_date_epoch=0)
    return path, reference


def load_on_device(bundle: Path, pub: Path, cache: Path):
    """Install (verify + self-test) and load ``bundle`` the way the device runtime does."""
    from edgepack_runtime.bundle import load_public_key
    from edgepack_runtime.cache import CacheConfig
    from edgepack_runtime.model import RuntimeConfig, install, load

    config = RuntimeConfig(CacheConfig(root=cache, trusted_keys=(load_public_key(pub),)))
    install(bundle, config)
    return load(config)


# ------------------------------------------------------------------ server


@pytest.fixture
def live_server(tmp_path, db_url):
    priv, pub = keys(tmp_path)
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN + "\n")
    # Fast ticks and windows so a long run fits in a test; no rate limit for 60 devices.
    env = {"EDGEPACK_SERVER_TICK_INTERVAL_S": "0.2", "EDGEPACK_SERVER_MONITOR_WINDOW_S": "120",
           "EDGEPACK_SERVER_DEVICE_RATE_LIMIT": "0", "EDGEPACK_SERVER_POLL_INTERVAL_S": "1",
           "EDGEPACK_SERVER_DRIFT_RECORD_INTERVAL_S": "0.001", "EDGEPACK_SERVER_DB_URL": db_url}
    with running_server(tmp_path, pub, token_file, env) as (base, log_path):
        yield base, priv, pub, log_path


def _upload(client: httpx.Client, path: Path) -> dict:
    r = client.post("/v1/admin/bundles", content=path.read_bytes(), headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status_code in (200, 201), r.text
    return r.json()


# ------------------------------------------------------------------ devices


class Version:
    def __init__(self, info: dict, model, reference: dict) -> None:
        self.info, self.model, self.reference = info, model, reference
        self.ref = {"name": info["name"], "version": info["version"], "digest": info["digest"]}


class SimDevice:
    """A device: a real Monitor over a real model, posting real summaries in its check-ins."""

    def __init__(self, client: httpx.Client, device_id: str, group: str, version: Version, seed: int,
                 brightness: float = 1.0) -> None:
        r = client.post("/v1/admin/devices", json={"id": device_id, "group": group, "profile": "sim"}, headers=AUTH)
        assert r.status_code == 201, r.text
        self.client, self.id, self.group, self.token = client, device_id, group, r.json()["token"]
        self.rng, self.brightness, self.seq = np.random.default_rng(seed), brightness, 0
        self.previous: Version | None = None
        self.directed: list[str] = []
        self.switch(version)

    def switch(self, version: Version) -> None:
        from edgepack_runtime.monitor import Monitor

        self.version = version
        self.monitor = Monitor(version.reference, dict(version.model.manifest.get("io") or {}), VARIANT,
                               version.info["digest"])

    def run_window(self, labels: int = 0) -> None:
        for i in range(ROWS_PER_WINDOW // BATCH):
            x = draw(self.rng, BATCH, self.brightness)
            t0 = time.perf_counter()
            out = self.version.model.predict(x)
            self.monitor.record({"raw": x}, out, time.perf_counter() - t0)
            if i < labels:  # ground truth for one row of the batch: the "true" class of the unshifted rule
                truth = int(np.argmax((x[:1] / 255.0) @ GOOD))
                self.monitor.labels.add(f"{self.id}-{self.seq}-{i}", LABELS[truth],
                                        LABELS[int(np.argmax(out["scores"][0]))], self.version.info["digest"])

    def checkin(self) -> dict:
        self.seq += 1
        summary = self.monitor.summary()
        body = {"seq": self.seq, "state": "idle", "current": self.version.ref,
                "previous": self.previous.ref if self.previous else None,
                "health": {"serving": True, "requests": ROWS_PER_WINDOW, "errors": 0, "p95_ms": 0.5, "nonfinite": 0},
                "runtime_version": "0.1.0", "engines": ["onnxruntime"], "summaries": {"window": summary}}
        r = self.client.post(f"/v1/devices/{self.id}/checkin", json=body, headers={"Authorization": f"Bearer {self.token}"})
        assert r.status_code == 200, r.text
        self.monitor.labels.ack(summary["labels"])
        return r.json()

    def events(self, *items: dict) -> None:
        batch = []
        for item in items:
            self.seq += 1
            batch.append({"seq": self.seq, "at": time.time(), **item})
        r = self.client.post(f"/v1/devices/{self.id}/events", json={"events": batch},
                             headers={"Authorization": f"Bearer {self.token}"})
        assert r.status_code == 200, r.text


def wait_for_tick(client: httpx.Client, after: int, timeout: float = 5.0) -> dict:
    """The drift view once the server's tick evaluated at least one (group, version) beyond ``after``."""
    deadline = time.monotonic() + timeout
    while True:
        view = client.get("/v1/admin/drift", params={"history": 0}, headers=AUTH).json()
        if view["evaluations"] > after or time.monotonic() > deadline:
            return view
        time.sleep(0.05)


def alerts(client: httpx.Client, **params) -> list[dict]:
    r = client.get("/v1/admin/alerts", params=params, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------ tests


def test_fleet_simulation_drift_alerts_and_false_positive_rate(live_server, tmp_path):
    base, priv, pub, _log = live_server
    path, reference = build_bundle(tmp_path, priv, "1.0.0", GOOD)
    with httpx.Client(base_url=base, timeout=10) as client:
        v1 = Version(_upload(client, path), load_on_device(path, pub, tmp_path / "cache-v1"), reference)
        group_a = [SimDevice(client, f"a-{i:02d}", "A", v1, seed=i) for i in range(30)]
        group_b = [SimDevice(client, f"b-{i:02d}", "B", v1, seed=100 + i, brightness=0.6) for i in range(30)]
        fleet = group_a + group_b

        # window 1: every device posts one summary; B's drift must be flagged before window 2
        started = time.monotonic()
        evaluations = wait_for_tick(client, -1, 0)["evaluations"]
        for dev in fleet:
            dev.run_window(labels=5)
            dev.checkin()
        posted = time.monotonic()
        deadline = posted + 5.0
        while not [a for a in alerts(client, group="B") if a["kind"] == "input_drift"]:
            assert time.monotonic() < deadline, "no drift alert for the shifted group B within one check-in window"
            time.sleep(0.05)
        detected = time.monotonic()
        b_alerts = [a for a in alerts(client, group="B") if a["kind"] == "input_drift"]
        assert {a["feature"] for a in b_alerts} == {"raw/0", "raw/1", "raw/2", "raw/3"}
        assert all(a["version"] == "1.0.0" and a["value"] > 0.2 for a in b_alerts)

        # 49 more windows: group A (unshifted) must never alert
        windows = 50
        for _ in range(windows - 1):
            evaluations = wait_for_tick(client, evaluations)["evaluations"]
            for dev in fleet:
                dev.run_window(labels=2)
                dev.checkin()
        wait_for_tick(client, evaluations)
        time.sleep(0.5)

        a_alerts = alerts(client, group="A")
        history = client.get("/v1/admin/drift", params={"group": "A", "history": 10_000}, headers=AUTH).json()
        drift_b = client.get("/v1/admin/drift", params={"group": "B", "version": "1.0.0", "history": 10_000}, headers=AUTH).json()
        summary = client.get("/v1/admin/summary", headers=AUTH).json()

    rows = [h for h in history["history"] if h["kind"] == "input_drift"]
    flagged = [h for h in rows if h["drifted"]]
    psi_over = [h for h in rows if h["value"] > 0.2]
    p_under = [h for h in rows if h["p_value"] < 1e-3]
    pred_rows = [h for h in history["history"] if h["kind"] == "prediction_drift"]
    b_rows = [h for h in drift_b["history"] if h["kind"] == "input_drift"]
    report = {
        "devices": {"A": len(group_a), "B": len(group_b)}, "windows": windows, "rows_per_device_window": ROWS_PER_WINDOW,
        "group_A": {"alerts": len(a_alerts), "feature_evaluations": len(rows), "flagged": len(flagged),
                    "false_positive_rate": len(flagged) / max(1, len(rows)),
                    "psi_over_threshold_rate": len(psi_over) / max(1, len(rows)),
                    "p_below_threshold_rate": len(p_under) / max(1, len(rows)),
                    "max_psi": max(h["value"] for h in rows), "median_psi": float(np.median([h["value"] for h in rows])),
                    "prediction_evaluations": len(pred_rows),
                    "prediction_flagged": sum(h["drifted"] for h in pred_rows)},
        "group_B": {"detection_latency_s_after_window_1_posted": round(detected - posted, 3),
                    "detection_latency_s_from_window_1_start": round(detected - started, 3),
                    "detected_within_windows": 1, "min_psi": min(h["value"] for h in b_rows),
                    "flagged_rate": sum(h["drifted"] for h in b_rows) / max(1, len(b_rows))},
    }
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=1))
    print("\nFLEET MONITORING REPORT", json.dumps(report, indent=1))

    assert a_alerts == [], a_alerts
    assert len(rows) >= 4 * windows * 0.8  # every window was evaluated (a tick may merge two)
    assert report["group_A"]["false_positive_rate"] == 0.0
    assert report["group_B"]["flagged_rate"] == 1.0
    # live accuracy per version from ground truth, and the dashboard's monitoring section
    current_a = [c for c in history["current"] if c["version"] == "1.0.0"][0]
    assert current_a["accuracy"]["labels"] > 100 and current_a["accuracy"]["accuracy"] > 0.99
    mon = summary["monitoring"]
    assert all(d["bundle_age_s"] is not None and d["last_seen_s"] is not None for d in summary["devices"])  # staleness
    assert {(c["group"], c["version"]) for c in mon["current"]} == {("A", "1.0.0"), ("B", "1.0.0")}
    assert any(a["group"] == "B" and a["kind"] == "input_drift" for a in mon["alerts"])
    assert all(c["reference_classes"] and c["classes"] for c in mon["current"])

    # the dashboard renders drift and prediction-distribution charts per group and version
    from test_dashboard import CHROMIUM, _chromium, _finish

    if CHROMIUM.exists():
        import re
        import shutil

        shot = tmp_path / "dashboard-monitoring.png"
        dom_proc = _chromium(["--dump-dom"], f"{base}/dashboard#token={ADMIN}", tmp_path)
        shot_proc = _chromium([f"--screenshot={shot}"], f"{base}/dashboard#token={ADMIN}", tmp_path)
        dom = re.sub(r"<(script|style)\b.*?</\1>", "", _finish(dom_proc, "--dump-dom"), flags=re.DOTALL)
        _finish(shot_proc, "--screenshot")
        assert 'data-drift="A/1.0.0"' in dom and 'data-drift="B/1.0.0"' in dom, dom[:3000]
        assert 'data-alert="input_drift"' in dom and "Input drift (PSI per feature)" in dom
        assert "Prediction distribution" in dom and 'class="classes"' in dom
        shutil.copyfile(shot, REPORT.parent / "dashboard-monitoring.png")


def test_collapsing_v3_halts_at_canary_and_never_reaches_control(live_server, tmp_path):
    base, priv, pub, log_path = live_server
    p1, ref1 = build_bundle(tmp_path, priv, "1.0.0", GOOD)
    p3, ref3 = build_bundle(tmp_path, priv, "3.0.0", COLLAPSED)
    with httpx.Client(base_url=base, timeout=10) as client:
        v1 = Version(_upload(client, p1), load_on_device(p1, pub, tmp_path / "cache-v1"), ref1)
        info3 = _upload(client, p3)
        fleet = [SimDevice(client, f"c-{i:02d}", "C", v1, seed=200 + i) for i in range(40)]
        for dev in fleet:  # one normal window first (control data)
            dev.run_window()
            dev.checkin()
        r = client.post("/v1/admin/rollouts", headers=AUTH, json={
            "bundle_id": info3["id"], "group": "C", "steps": [20, 100], "soak_seconds": 0.5, "min_devices_succeeded": 1,
            "max_failure_rate": 0.5, "gates": {"max_prediction_shift_psi": 0.25}})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        assert r.json()["gates"] == {"max_prediction_shift_psi": 0.25}
        v3: Version | None = None
        ever_on_v3: set[str] = set()
        started = time.monotonic()
        status = None
        for _round in range(30):
            for dev in fleet:
                dev.run_window()
                directive = dev.checkin()
                if directive["action"] == "update":
                    dev.directed.append(directive["bundle"]["digest"])
                    if v3 is None:  # the device runtime installs it: verified and self-tested (it passes)
                        v3 = Version(info3, load_on_device(p3, pub, tmp_path / "cache-v3"), ref3)
                    ev = {"rollout_id": rid, "digest": info3["digest"], "version": "3.0.0"}
                    dev.events({"type": "downloaded", **ev}, {"type": "installed", **ev}, {"type": "committed", **ev})
                    dev.previous = v1
                    dev.switch(v3)
                    ever_on_v3.add(dev.id)
                elif directive["action"] == "rollback":
                    dev.events({"type": "rolled_back", "rollout_id": rid, "digest": info3["digest"], "version": "3.0.0"})
                    dev.switch(v1)
            view = client.get(f"/v1/admin/rollouts/{rid}", headers=AUTH).json()
            status = view["status"]
            if status == "halted" and all(d.version is v1 for d in fleet):
                break
            time.sleep(0.3)
        halted_after = time.monotonic() - started
        view = client.get(f"/v1/admin/rollouts/{rid}", headers=AUTH).json()
        summary = client.get("/v1/admin/summary", headers=AUTH).json()
        gate_alerts = [a for a in alerts(client, group="C") if a["kind"] == "rollout_gate"]

    from edgepack.server.rollout import cohort_position

    canary = {d.id for d in fleet if cohort_position(rid, d.id) < 20}
    assert status == "halted", (view["status"], view["waiting_for"], view.get("gate_status"), log_path.read_text()[-3000:])
    assert view["step_index"] == 0 and not [h for h in view["history"] if h["event"] == "advanced"]
    assert ever_on_v3 and ever_on_v3 <= canary                       # only the canary cohort ever ran v3
    assert {d.id for d in fleet if d.directed} == ever_on_v3          # nobody else was even directed to it
    assert all(d.version is v1 for d in fleet)                        # the canary rolled back
    reason = view["halt_reasons"][0]
    assert reason["code"] == "prediction_shift" and reason["value"] > 0.25 and set(reason["devices"]) <= canary
    assert "prediction-distribution shift" in view["halt_message"]
    assert gate_alerts and gate_alerts[0]["feature"] == "prediction_shift"
    rollout = [x for x in summary["rollouts"] if x["id"] == rid][0]
    assert rollout["failures"] and {f["code"] for f in rollout["failures"]} == {"prediction_shift"}
    print(f"\nv3 collapse: halted at step 0 after {halted_after:.1f}s; canary {len(ever_on_v3)} of {len(fleet)} devices; "
          f"PSI {reason['value']:.2f}")
