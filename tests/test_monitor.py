"""Fleet-monitoring summaries on the device (``edgepack_runtime.monitor``) and their wiring.

Bundles are small signed ones in the real format (``tests/bundles.py``) plus a
``stats/reference.json`` computed by the build's own :func:`edgepack.build.stats.reference_stats`.
Summaries are checked against a numpy recomputation; the daemon is the real
``edgepack-runtime serve`` in a subprocess; check-ins go to a minimal fake OTA server
that records every body.
"""

from __future__ import annotations

import http.client
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import bundles
import numpy as np
import pytest
from edgepack_runtime.bundle import load_public_key
from edgepack_runtime.cache import CacheConfig
from edgepack_runtime.model import RuntimeConfig, install, load
from edgepack_runtime.monitor import (
    VALUES_PER_RECORD,
    Monitor,
    Shadow,
    load_candidate,
    monitor_for,
)

from edgepack.build.stats import reference_stats, stats_json
from edgepack.bundle import write_bundle
from net import free_port

DEVICE, TOKEN = "dev-m", "token-m"
SUMMARY_KEYS = {"version", "digest", "variant", "window", "inputs", "outputs", "latency_ms", "errors", "rejects", "shadow", "labels"}


def _reference_raw(n: int = 400) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 128, (n, 4)).astype(np.uint8)  # "normal" inputs live in the lower half


def make_bundle(out_dir: Path, key: Path, version: str, model, name: str = "toy") -> Path:
    """tests/bundles.py's bundle plus reference statistics, as `edgepack build` writes them."""
    import onnxruntime as ort

    raw = np.random.default_rng(1).integers(0, 256, (8, 4)).astype(np.uint8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"raw": raw})[0]
    ref_raw = _reference_raw()
    ref_scores = sess.run(None, {"raw": ref_raw})[0]
    variant = "onnx-fp32"
    manifest = {
        "format_version": 1, "name": name, "version": version,
        "io": {"inputs": [{"name": "raw", "dtype": "uint8", "shape": [None, 4], "value_range": [0, 255]}],
               "outputs": [{"name": "scores", "dtype": "float32", "shape": [None, 3], "labels": ["a", "b", "c"]}]},
        "variants": [{"id": variant, "file": f"models/{variant}.onnx", "engine": "onnxruntime", "precision": "fp32",
                      "min_runtime": "0.1.0", "devices": ["x86-gateway"]}],
        "golden": {"file": "golden/vectors.npz", "tolerances": {variant: {"scores": 1e-4}}},
        "reference_stats": {"file": "stats/reference.json"},
    }
    members = {
        f"models/{variant}.onnx": model.SerializeToString(),
        "golden/vectors.npz": bundles.npz_bytes({"input:raw": raw, f"output:{variant}:scores": expected}),
        "stats/reference.json": stats_json(reference_stats({"raw": ref_raw}, {variant: ref_scores}, ["a", "b", "c"])),
    }
    out = out_dir / f"{name}-{version}.epk"
    write_bundle(out, manifest, members, key, source_date_epoch=0)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    priv, pub = bundles.keys(root)
    a = make_bundle(root, priv, "1.0.0", bundles.raw_classifier(scale=1.0))
    b = make_bundle(root, priv, "1.1.0", bundles.raw_classifier(scale=3.0, seed=5))
    return {"root": root, "priv": priv, "pub": pub, "a": a, "b": b}


def _cache(world, where: Path) -> RuntimeConfig:
    config = RuntimeConfig(CacheConfig(root=where, trusted_keys=(load_public_key(world["pub"]),)))
    install(world["a"], config)
    (where / "keys").mkdir(parents=True, exist_ok=True)
    shutil.copy(world["pub"], where / "keys" / "test.pub")
    return config


def _expected_counts(values: np.ndarray, quantiles) -> tuple:
    edges = np.unique(np.asarray(quantiles, np.float64))
    return edges.tolist(), np.bincount(np.searchsorted(edges, values.astype(np.float64), side="left"), minlength=len(edges) + 1).tolist()


# ------------------------------------------------------------------ summaries


def test_summary_counts_equal_a_numpy_recomputation(world, tmp_path):
    config = _cache(world, tmp_path / "cache")
    model = load(config)
    monitor = monitor_for(model)
    reference = json.loads((model.directory / "stats" / "reference.json").read_text())
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, 256, (1 if i % 3 else 4, 4)).astype(np.uint8) for i in range(150)]
    scores = []
    for x in batches:
        out = model.predict(x)
        scores.append(out["scores"])
        monitor.record({"raw": x}, out, 0.001 + len(scores) * 1e-6)
    monitor.record_reject("raw")
    monitor.record_error("engine")
    summary = monitor.summary()
    json.dumps(summary, allow_nan=False)
    assert set(summary) == SUMMARY_KEYS
    assert summary["digest"] == model.slot.digest and summary["variant"] == "onnx-fp32"
    assert summary["window"]["predictions"] == 150 and summary["latency_ms"]["count"] == 150
    assert summary["latency_ms"]["max"] == pytest.approx(1.15, abs=1e-3)
    assert summary["errors"] == {"engine": 1} and summary["rejects"] == {"raw": 1}
    assert summary["shadow"] is None and summary["labels"] == []
    live = np.concatenate(batches)
    feats = summary["inputs"]["raw"]
    assert feats["per"] == "column"
    for j, feature in enumerate(feats["features"]):
        edges, counts = _expected_counts(live[:, j], reference["inputs"]["raw"]["features"][j]["quantiles"])
        assert feature["edges"] == edges and feature["counts"] == counts
        assert feature["sampled"] == len(live) and feature["missing"] == 0
    all_scores = np.concatenate(scores)
    winners = np.bincount(all_scores.argmax(1), minlength=3)
    assert summary["outputs"]["class_counts"] == {"a": int(winners[0]), "b": int(winners[1]), "c": int(winners[2])}
    e = np.exp(all_scores - all_scores.max(1, keepdims=True))
    conf = (e / e.sum(1, keepdims=True)).max(1)
    ref_edges = reference["predictions"]["onnx-fp32"]["confidence_histogram"]["edges"]
    assert summary["outputs"]["confidence"]["edges"] == ref_edges
    assert summary["outputs"]["confidence"]["counts"] == np.histogram(conf, bins=np.asarray(ref_edges))[0].tolist()
    # reset: a new, empty window
    again = monitor.summary()
    assert again["window"]["predictions"] == 0 and again["window"]["start"] >= summary["window"]["end"] - 1e-3
    assert sum(again["inputs"]["raw"]["features"][0]["counts"]) == 0 and again["errors"] == {"engine": 0}


def test_image_channels_are_subsampled_at_a_fixed_stride_and_merge_duplicate_edges():
    rng = np.random.default_rng(0)
    ref_images = rng.integers(0, 256, (20, 32, 32, 3)).astype(np.uint8)
    ref_images[..., 2] = np.where(ref_images[..., 2] < 128, 0, 255)  # discrete channel: repeated deciles
    reference = json.loads(stats_json(reference_stats({"image": ref_images}, {"v": rng.random((20, 5)).astype(np.float32)}, None)))
    assert len(set(reference["inputs"]["image"]["features"][2]["quantiles"])) < 11
    monitor = Monitor(reference, {}, "v", "d" * 64)
    live = rng.integers(0, 256, (10, 1, 32, 32, 3)).astype(np.uint8)
    live[..., 0] = 255  # channel 0 saturates at the reference max
    for image in live:
        monitor.record({"image": image}, {"scores": rng.random((1, 5)).astype(np.float32)}, 0.002)
    summary = monitor.summary()
    step = math.ceil(32 * 32 / VALUES_PER_RECORD)
    for c, feature in enumerate(summary["inputs"]["image"]["features"]):
        assert feature["name"] == str(c)
        values = np.concatenate([image.reshape(-1, 3)[::step, c] for image in live])
        edges, counts = _expected_counts(values, reference["inputs"]["image"]["features"][c]["quantiles"])
        assert feature["edges"] == edges and feature["counts"] == counts
        assert feature["sampled"] == len(values) == 10 * VALUES_PER_RECORD
        assert len(feature["counts"]) == len(feature["edges"]) + 1
    assert summary["inputs"]["image"]["features"][2]["edges"] == [0.0, 255.0]
    assert sum(summary["outputs"]["class_counts"].values()) == 10


def test_a_shifted_input_distribution_moves_the_histogram(world, tmp_path):
    model = load(_cache(world, tmp_path / "cache"))
    monitor = monitor_for(model)
    rng = np.random.default_rng(11)

    def upper_share(low: int, high: int) -> float:
        for _ in range(200):
            x = rng.integers(low, high, (1, 4)).astype(np.uint8)
            monitor.record({"raw": x}, model.predict(x), 0.001)
        feature = monitor.summary()["inputs"]["raw"]["features"][0]
        return feature["counts"][-1] / feature["sampled"]  # above the reference max

    normal = upper_share(0, 128)
    shifted = upper_share(100, 256)
    assert normal < 0.02 and shifted > 0.5


def test_record_cost_stays_small():
    rng = np.random.default_rng(0)
    reference = json.loads(stats_json(reference_stats({"image": rng.integers(0, 256, (4, 224, 224, 3)).astype(np.uint8)},
                                                     {"v": rng.random((4, 10)).astype(np.float32)}, None)))
    monitor = Monitor(reference, {}, "v", "d" * 64)
    feed = {"image": rng.integers(0, 256, (1, 224, 224, 3)).astype(np.uint8)}
    out = {"scores": rng.random((1, 10)).astype(np.float32)}
    for _ in range(200):
        monitor.record(feed, out, 0.001)
    n = 3000
    t0 = time.perf_counter()
    for _ in range(n):
        monitor.record(feed, out, 0.001)
    per_record_us = (time.perf_counter() - t0) / n * 1e6
    print(f"record() of a 224x224x3 image: {per_record_us:.1f} us")
    assert per_record_us < 500  # behaviour check only (the measured number is reported, not asserted)
    assert monitor.summary()["window"]["predictions"] == n + 200


# --------------------------------------------------------------------- shadow


def test_shadow_agreement_in_process(world, tmp_path):
    config = _cache(world, tmp_path / "cache")
    served = load(config)
    rng = np.random.default_rng(5)
    inputs = [rng.integers(0, 256, (1, 4)).astype(np.uint8) for _ in range(60)]
    for bundle, check in ((world["a"], lambda a: a == 1.0), (world["b"], lambda a: a < 1.0)):
        candidate = load_candidate(config, bundle)
        assert (config.cache.root / "shadow" / candidate.slot.digest).is_dir()
        shadow = Shadow(candidate.predict, candidate.slot.digest, candidate.variant["id"], sample=1.0, queue_size=len(inputs))
        monitor = monitor_for(served)
        monitor.shadow = shadow
        for x in inputs:
            out = served.predict(x)
            before = out["scores"].copy()
            monitor.record({"raw": x}, out, 0.001)
            shadow.offer({"raw": x}, out)
            assert np.array_equal(out["scores"], before)
        assert shadow.wait_idle(10)
        s = monitor.summary()["shadow"]
        assert s["digest"] == candidate.slot.digest and s["predictions"] == 60 and s["errors"] == 0
        assert check(s["agreement"]), s
        assert s["p95_ms"] is not None and s["p95_ms"] > 0
        shadow.close()
    assert load(config).slot.digest == served.slot.digest  # the cache's current slot never moved


# ------------------------------------------------------------- daemon + OTA


class CheckinServer:
    """Answers check-ins (directive "none", short poll interval) and keeps every body."""

    def __init__(self) -> None:
        self.bodies = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    code, reply = 401, {"error": {"code": "unauthorized", "message": "no."}}
                elif self.path.endswith("/checkin"):
                    with server.lock:
                        server.bodies.append(json.loads(data))
                    code, reply = 200, {"action": "none", "rollout_id": None, "bundle": None, "delta": None,
                                        "probation": None, "poll_interval_s": 0.2}
                else:
                    code, reply = 200, {"accepted": 0}
                body = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def snapshot(self) -> list:
        with self.lock:
            return list(self.bodies)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()




@contextmanager
def serve(cache: Path, work: Path, *extra: str):
    port = free_port()
    err = work / "daemon.err"
    cmd = [sys.executable, "-m", "edgepack_runtime.cli", "serve", "--cache", str(cache), "--socket", str(work / "d.sock"),
           "--http", f"127.0.0.1:{port}", *extra]
    with open(err, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, err.read_text()
            try:
                if _call(port, "GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        yield port, err
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _call(port: int, method: str, path: str, payload=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = None if payload is None else json.dumps(payload).encode()
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def _wait(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.parametrize("candidate,identical", [("a", True), ("b", False)])
def test_daemon_shadow_reports_agreement_and_serves_only_the_current_model(world, tmp_path, candidate, identical):
    config = _cache(world, tmp_path / "cache")
    served_model = load(config)
    rng = np.random.default_rng(9)
    inputs = [rng.integers(0, 256, (1, 4)).astype(np.uint8) for _ in range(40)]
    with serve(tmp_path / "cache", tmp_path, "--shadow", str(world[candidate]), "--shadow-sample", "1") as (port, _err):
        for x in inputs:
            status, answer = _call(port, "POST", "/predict", {"inputs": {"raw": x.tolist()}})
            assert status == 200
            assert answer["model"]["version"] == "1.0.0"
            assert np.allclose(answer["outputs"]["scores"], served_model.predict(x)["scores"], atol=1e-5)

        seen = []

        def shadow():  # the candidate runs in the background (bounded queue): wait until it settled
            s = _call(port, "GET", "/info")[1]["monitor"]["shadow"]
            seen.append(s)
            return s if len(seen) > 5 and s["predictions"] >= 20 and seen[-6]["predictions"] == s["predictions"] else None

        s = _wait(shadow, what="the shadow to run the sampled requests")
    assert s["errors"] == 0 and 20 <= s["predictions"] <= len(inputs)
    assert (s["agreement"] == 1.0) if identical else (s["agreement"] < 1.0), s
    assert load(config).slot.version == "1.0.0"


def _assert_nothing_raw(body: dict, raw_values: list) -> None:
    summaries = body["summaries"]
    assert set(summaries) <= {"window"}
    text = json.dumps(body)
    for values in raw_values:
        assert json.dumps(values) not in text
    window = summaries.get("window")
    if window is None:
        return
    assert set(window) == SUMMARY_KEYS
    for spec in window["inputs"].values():
        for feature in spec["features"]:
            assert set(feature) == {"name", "edges", "counts", "missing", "sampled"}
            assert all(isinstance(c, int) for c in feature["counts"])
    assert set(window["outputs"]) == {"class_counts", "confidence"}
    for label in window["labels"]:
        assert set(label) == {"id", "label", "predicted", "digest"}


def test_labels_travel_with_the_next_checkin_once_and_checkins_carry_only_summaries(world, tmp_path):
    _cache(world, tmp_path / "cache")
    server = CheckinServer()
    token = tmp_path / "token"
    token.write_text(TOKEN)
    sent = [[[1, 2, 3, 4]], [[200, 201, 202, 203]], [[17, 99, 5, 250]]]
    try:
        with serve(tmp_path / "cache", tmp_path, "--log-dir", str(tmp_path / "log"), "--log-sample", "1",
                   "--ota-server", server.url, "--device-id", DEVICE, "--token-file", str(token), "--ota-interval", "0.2") as (port, _err):
            ids = []
            for raw in sent:
                status, answer = _call(port, "POST", "/predict", {"inputs": {"raw": raw}})
                assert status == 200
                ids.append((answer["id"], int(np.argmax(answer["outputs"]["scores"][0]))))
            assert _call(port, "POST", "/predict", {"inputs": {"raw": [[1, 2, 3]]}})[0] == 400
            for pid, _ in ids[:2]:
                status, reply = _call(port, "POST", "/labels", {"id": pid, "label": 2})
                assert status == 200, reply

            def carried():
                for i, body in enumerate(server.snapshot()):
                    labels = (body["summaries"].get("window") or {}).get("labels") or []
                    if {x["id"] for x in labels} >= {ids[0][0], ids[1][0]}:
                        return i, body
                return None

            first, body = _wait(carried, what="a check-in carrying the labels")
            window = body["summaries"]["window"]
            by_id = {x["id"]: x for x in window["labels"]}
            digest = load(RuntimeConfig(CacheConfig(root=tmp_path / "cache", trusted_keys=(load_public_key(world["pub"]),)))).slot.digest
            for pid, winner in ids[:2]:
                assert by_id[pid] == {"id": pid, "label": 2, "predicted": winner, "digest": digest}
            assert ids[2][0] not in by_id
            # acknowledged: not carried again by later check-ins
            _wait(lambda: len(server.snapshot()) >= first + 3, what="later check-ins")
            for later in server.snapshot()[first + 1:]:
                assert not (later["summaries"].get("window") or {}).get("labels"), later
            # the windows, summed, saw every prediction and the reject
            bodies = server.snapshot()
            windows = [b["summaries"]["window"] for b in bodies if b["summaries"].get("window")]
            assert sum(w["window"]["predictions"] for w in windows) == len(sent)
            assert sum(w["rejects"].get("raw", 0) for w in windows) == 1
            assert sum(sum(w["outputs"]["class_counts"].values()) for w in windows) == len(sent)
    finally:
        server.stop()
    for body in server.snapshot():
        _assert_nothing_raw(body, [r[0] for r in sent])
