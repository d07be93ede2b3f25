"""The inference daemon, run for real: ``python -m edgepack_runtime.cli serve`` in a subprocess.

Clients talk to it over its Unix socket (http.client with an AF_UNIX connection) and
over loopback HTTP. Every wait has a deadline and every daemon is killed in a
``finally``.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import pytest

import bundles
from edgepack_runtime import predlog
from edgepack_runtime.bundle import load_public_key
from edgepack_runtime.cache import CacheConfig
from edgepack_runtime.model import RuntimeConfig, install, load
from net import UnixHTTPConnection, free_port

X = np.array([[0, 255, 10, 20], [1, 2, 3, 4], [200, 100, 50, 25]], np.uint8)
LOG_CAP_MB = 0.03
BODY_CAP = 64 * 1024


# ------------------------------------------------------------------ clients






class Served:
    """A running daemon subprocess and clients for it."""

    def __init__(self, proc: subprocess.Popen, sock: Path, port: int, stderr: Path) -> None:
        self.proc = proc
        self.sock = str(sock)
        self.port = port
        self.stderr = stderr

    def unix(self) -> UnixHTTPConnection:
        return UnixHTTPConnection(self.sock)

    def http(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def request(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
                conn: Optional[http.client.HTTPConnection] = None) -> Tuple[int, Dict[str, str], bytes]:
        own = conn is None
        conn = conn or self.unix()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            if own:
                conn.close()

    def json(self, method: str, path: str, payload=None, conn=None) -> Tuple[int, dict]:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        status, _, data = self.request(method, path, body, headers, conn)
        return status, json.loads(data)

    def metrics(self) -> Dict[Tuple[str, frozenset], float]:
        status, headers, data = self.request("GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        return parse_prometheus(data.decode())

    def log(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""


def raw_request(path: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes over the Unix socket; everything the daemon answers until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else -1


def body_of(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# --------------------------------------------------------------- prometheus

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse_prometheus(text: str) -> Dict[Tuple[str, frozenset], float]:
    """Strict parse of the text format: every sample belongs to a family with a TYPE line."""
    assert text.endswith("\n")
    types: Dict[str, str] = {}
    samples: Dict[Tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in types, f"family {name} declared twice"
            types[name] = kind
            continue
        if line.startswith("#") or not line:
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        name, label_text, value = match.groups()
        labels = {}
        if label_text:
            pos = 0
            while pos < len(label_text):
                m = _LABEL.match(label_text, pos)
                assert m, f"bad labels in {line!r}"
                labels[m.group(1)] = m.group(2)
                pos = m.end()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if re.sub(r"_(bucket|sum|count)$", "", name) in types else name
        assert family in types, f"sample {name} has no TYPE line"
        key = (name, frozenset(labels.items()))
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)
    # histograms: cumulative buckets ending in +Inf == _count
    for (name, labels), value in samples.items():
        if name.endswith("_count") and types.get(name[:-6]) == "histogram":
            buckets = sorted(((float(dict(l)["le"]), v) for (n, l), v in samples.items()
                              if n == name[:-6] + "_bucket" and {(k, x) for k, x in l if k != "le"} == set(labels)))
            assert buckets and buckets[-1][0] == float("inf") and buckets[-1][1] == value
            assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), "buckets must be cumulative"
    return samples


def metric(samples, sample_name: str, /, **labels) -> float:
    return samples.get((sample_name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


# ------------------------------------------------------------------ daemons


def make_cache(root: Path, versions=("1.0.0",)) -> Tuple[RuntimeConfig, Path, Path]:
    """A device cache with ``versions`` installed (last one current) and the key pinned in it."""
    root.mkdir(parents=True, exist_ok=True)
    priv, pub = bundles.keys(root)
    config = RuntimeConfig(CacheConfig(root=root / "cache", trusted_keys=(load_public_key(pub),)))
    for i, version in enumerate(versions):
        install(bundles.make_bundle(root, priv, version, bundles.raw_classifier(scale=1.0 + i)), config)
    (root / "cache" / "keys").mkdir(parents=True, exist_ok=True)
    shutil.copy(pub, root / "cache" / "keys" / "test.pub")
    return config, priv, pub


@contextmanager
def serve(cache: Path, workdir: Path, *extra: str, env: Optional[Dict[str, str]] = None, ready_timeout: float = 20.0) -> Iterator[Served]:
    port = free_port()
    sock = workdir / "d.sock"
    stderr = workdir / "daemon.err"
    cmd = [sys.executable, "-m", "edgepack_runtime.cli", "serve", "--cache", str(cache), "--socket", str(sock),
           "--http", f"127.0.0.1:{port}", *extra]
    proc_env = dict(os.environ, **(env or {}))
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=proc_env)
    served = Served(proc, sock, port, stderr)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"daemon exited with {proc.returncode} before answering /healthz:\n{served.log()}")
            try:
                status, _, _ = served.request("GET", "/healthz", conn=served.http())
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"daemon did not answer /healthz within {ready_timeout}s:\n{served.log()}")
            time.sleep(0.05)
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcache")
    config, _, _ = make_cache(root)
    return root, config


@pytest.fixture(scope="module")
def daemon(cached, tmp_path_factory):
    root, _ = cached
    work = tmp_path_factory.mktemp("dwork")
    with serve(root / "cache", work, "--log-dir", str(work / "log"), "--log-sample", "1", "--log-max-mb", str(LOG_CAP_MB),
               env={"EDGEPACK_MAX_BODY_MB": str(BODY_CAP / 1024 / 1024)}) as served:
        served.log_dir = work / "log"
        yield served


# -------------------------------------------------------------------- tests


def test_json_predict_equals_the_in_process_model_over_socket_and_http(daemon, cached):
    _, config = cached
    expected = load(config).predict(X)["scores"]
    ids = set()
    for conn in (daemon.unix(), daemon.http()):
        for payload in ({"inputs": {"raw": X.tolist()}}, {"raw": X.tolist()}):
            status, out = daemon.json("POST", "/predict", payload, conn=conn)
            assert status == 200, out
            got = np.asarray(out["outputs"]["scores"], np.float32)
            np.testing.assert_array_equal(got, expected)
            assert out["model"] == {"name": "toy", "version": "1.0.0", "variant": "onnx-fp32"}
            ids.add(out["id"])
        conn.close()
    assert len(ids) == 4 and all(isinstance(i, str) and i for i in ids)


def test_keep_alive_serves_many_requests_on_one_connection(daemon):
    conn = daemon.unix()
    for _ in range(50):
        status, out = daemon.json("POST", "/predict", {"raw": [[1, 2, 3, 4]]}, conn=conn)
        assert status == 200
    conn.close()


def test_npy_predict_answers_json_or_npy(daemon, cached):
    _, config = cached
    expected = load(config).predict(X)["scores"]
    status, headers, data = daemon.request("POST", "/predict", npy(X), {"Content-Type": "application/x-npy"})
    assert status == 200 and headers["content-type"] == "application/json"
    np.testing.assert_array_equal(np.asarray(json.loads(data)["outputs"]["scores"], np.float32), expected)
    status, headers, data = daemon.request("POST", "/predict", npy(np.asfortranarray(X)),
                                           {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}, conn=daemon.http())
    assert status == 200 and headers["content-type"] == "application/x-npy"
    assert headers["x-model-version"] == "1.0.0" and headers["x-prediction-id"]
    got = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def _object_npy() -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buffer.getvalue()


J = {"Content-Type": "application/json"}
N = {"Content-Type": "application/x-npy"}
BAD_INPUTS = [
    # (body, headers, field named in the error)
    (json.dumps({"inputs": {"raw": [[1, 2, 3]]}}), J, "raw"),                        # wrong shape
    (json.dumps({"inputs": {"raw": [[1.5, 2, 3, 4]]}}), J, "raw"),                   # not integers
    (json.dumps({"inputs": {"raw": [[300, 2, 3, 4]]}}), J, "raw"),                   # out of uint8 range
    (json.dumps({"inputs": {"raw": [[-1, 2, 3, 4]]}}), J, "raw"),
    (json.dumps({"inputs": {"raw": "abcd"}}), J, "raw"),                             # wrong dtype
    (json.dumps({"inputs": {"raw": [[1, 2], [3]]}}), J, "raw"),                      # ragged
    (json.dumps({"inputs": {"raw": []}}), J, "raw"),                                 # empty
    (json.dumps({"inputs": {"raw": [[1, 2, 3, 4]], "extra": [1]}}), J, "extra"),     # unknown input
    (json.dumps({"inputs": {}}), J, "raw"),                                          # missing input
    (json.dumps({"inputs": {"raw": [[1, 2, 3, 4]]}, "junk": 1}), J, "junk"),         # unknown field
    (json.dumps({"inputs": 5}), J, "inputs"),
    (json.dumps([[1, 2, 3, 4]]), J, "body"),                                         # not an object
    ('{"inputs": {"raw": [[1, 2, 3, 4]]', J, "body"),                                # malformed JSON
    (b"\xff\xfe{}", J, "body"),                                                      # not UTF-8
    ("[" * 20000 + "]" * 20000, J, "body"),                                          # nested too deeply
    (json.dumps({"raw": [[[[[[1]]]]]]}), J, "raw"),
    (json.dumps({"raw": [[1, 2, 3, 4]]}), {"Content-Type": "text/plain"}, "Content-Type"),
    (json.dumps({"raw": [[1, 2, 3, 4]]}), {}, "Content-Type"),
    (npy(X.astype(np.float32)), N, "raw"),                                           # npy: wrong dtype
    (npy(X[:, :3].copy()), N, "raw"),                                                # npy: wrong shape
    (b"not an npy file at all", N, "body"),
    (npy(X)[:-3], N, "body"),                                                        # truncated
    (npy(X) + b"tail", N, "body"),                                                   # trailing bytes
    (_object_npy(), N, "body"),                                                      # pickled object array
    (b"x" * (BODY_CAP + 1), J, "body"),                                              # over the size cap (last)
]


def test_bad_input_is_a_400_naming_the_field_and_the_model_never_runs(daemon):
    before = daemon.metrics()
    for body, headers, field in BAD_INPUTS:
        data = body.encode() if isinstance(body, str) else body
        status, _, raw = daemon.request("POST", "/predict", data, headers)
        assert status == 400, (field, raw[:300])
        error = json.loads(raw)["error"]
        assert error["field"] == field and error["reason"], (field, error)
    after = daemon.metrics()
    assert metric(after, "edgepack_model_runs_total") == metric(before, "edgepack_model_runs_total")
    assert metric(after, "edgepack_errors_total", kind="validation") - metric(before, "edgepack_errors_total", kind="validation") == len(BAD_INPUTS) - 1
    assert metric(after, "edgepack_errors_total", kind="protocol") - metric(before, "edgepack_errors_total", kind="protocol") == 1  # the oversized body
    assert metric(after, "edgepack_requests_total", endpoint="/predict", code=400) - metric(before, "edgepack_requests_total", endpoint="/predict", code=400) == len(BAD_INPUTS) - 1


def test_malformed_http_is_answered_and_never_crashes_the_daemon(daemon):
    before = daemon.metrics()
    body = b'{"raw": [[1, 2, 3, 4]]}'
    cases = [
        (b"POST /predict HTTP/1.1\r\nContent-Type: application/json\r\n\r\n" + body, "Content-Length"),
        (b"POST /predict HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "Transfer-Encoding"),
        (b"POST /predict HTTP/1.1\r\nContent-Length: 12x\r\n\r\n", "Content-Length"),
        (b"POST /predict HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", "headers"),
        (b"NONSENSE\r\n\r\n", "request"),
        (b"GET /healthz HTTP/1.1\r\nbad header line\r\n\r\n", "headers"),
        (b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\n\r\n", "headers"),
    ]
    for data, field in cases:
        raw = raw_request(daemon.sock, data)
        assert status_of(raw) == 400, (data[:60], raw[:200])
        assert body_of(raw)["error"]["field"] == field
    # a client that sends half a request and hangs up
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(daemon.sock)
        s.sendall(b"POST /predict HTTP/1.1\r\nContent-Length: 100\r\nContent-Type: application/json\r\n\r\n{\"ra")
    assert metric(daemon.metrics(), "edgepack_model_runs_total") == metric(before, "edgepack_model_runs_total")
    assert daemon.request("GET", "/healthz")[0] == 200


def test_fuzzed_requests_never_crash_the_daemon_or_reach_the_model(daemon):
    rng = random.Random(1234)
    before = metric(daemon.metrics(), "edgepack_model_runs_total")
    atoms = [None, True, 1, -1, 256, 1.5, float("1e308"), "x", [], {}, [[1, 2, 3]], [[0] * 4] * 2]

    def junk(depth=0):
        kind = rng.randrange(4 if depth < 4 else 1)
        if kind == 0:
            return rng.choice(atoms)
        if kind == 1:
            return [junk(depth + 1) for _ in range(rng.randrange(4))]
        if kind == 2:
            return {rng.choice(["raw", "inputs", "x", ""]): junk(depth + 1) for _ in range(rng.randrange(3))}
        return [[rng.choice([-5, 0, 255, 999, 2.5]) for _ in range(rng.choice([3, 4, 5]))] for _ in range(rng.randrange(1, 3))]

    conn = daemon.unix()
    statuses = []
    for i in range(300):
        choice = i % 3
        if choice == 0:
            body, headers = json.dumps(junk()).encode(), J
        elif choice == 1:
            body, headers = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), rng.choice([J, N])
        else:
            good = bytearray(npy(X))
            for _ in range(rng.randrange(1, 4)):
                good[rng.randrange(len(good))] = rng.randrange(256)
            body, headers = bytes(good), N
        try:
            status, _, raw = daemon.request("POST", "/predict", body, headers, conn=conn)
        except (http.client.HTTPException, OSError):
            conn.close()
            conn = daemon.unix()
            continue
        statuses.append(status)
        assert status in (200, 400), raw[:300]
        if status == 400:
            assert "field" in json.loads(raw)["error"]
    conn.close()
    assert 400 in statuses
    assert daemon.proc.poll() is None
    assert daemon.request("GET", "/healthz")[0] == 200
    # the model ran exactly once per 200, never for a rejected request
    assert metric(daemon.metrics(), "edgepack_model_runs_total") - before == statuses.count(200)
    assert daemon.json("POST", "/predict", {"raw": [[1, 2, 3, 4]]})[0] == 200


def test_unknown_paths_are_404_and_wrong_methods_405(daemon):
    status, _, data = daemon.request("GET", "/nope")
    assert status == 404 and json.loads(data)["error"]["field"] == "path"
    status, headers, _ = daemon.request("GET", "/predict")
    assert status == 405 and headers["allow"] == "POST"
    status, headers, _ = daemon.request("POST", "/healthz", b"{}", J)
    assert status == 405 and headers["allow"] == "GET"
    assert daemon.request("GET", "/healthz?probe=1")[0] == 200
    assert daemon.request("HEAD", "/readyz")[0] == 200


def test_health_ready_and_info(daemon):
    assert daemon.json("GET", "/healthz") == (200, {"status": "ok"})
    status, ready = daemon.json("GET", "/readyz")
    assert status == 200 and ready["ready"] is True
    status, info = daemon.json("GET", "/info", conn=daemon.http())
    assert status == 200 and info["ready"] is True
    assert info["model"]["version"] == "1.0.0" and info["model"]["variant"] == "onnx-fp32" and info["model"]["engine"] == "onnxruntime"
    assert info["model"]["io"]["inputs"][0]["name"] == "raw"
    from edgepack_runtime.arith import host_class

    # Why this variant: the device's class and the reason (this test bundle predates per-class certification).
    choice = info["model"]["choice"]
    assert info["model"]["arith_class"] == choice["class"] == host_class() and choice["variant"] == "onnx-fp32"
    assert choice["class_source"] == "detected from /proc/cpuinfo" and "predates per-class certification" in choice["reason"]
    assert info["runtime"]["version"] and info["runtime"]["engine_version"]
    assert info["reload"]["last"]["ok"] is True and info["listen"]["socket"] == daemon.sock


def test_metrics_parse_as_prometheus_text_and_count_up(daemon):
    before = daemon.metrics()
    for _ in range(3):
        assert daemon.json("POST", "/predict", {"raw": X.tolist()})[0] == 200
    daemon.request("GET", "/nope")
    after = daemon.metrics()
    ok = ("edgepack_requests_total", frozenset({("endpoint", "/predict"), ("code", "200")}))
    assert after[ok] == before.get(ok, 0) + 3
    assert metric(after, "edgepack_errors_total", kind="not_found") == metric(before, "edgepack_errors_total", kind="not_found") + 1
    assert metric(after, "edgepack_model_runs_total") == metric(before, "edgepack_model_runs_total") + 3
    assert metric(after, "edgepack_request_duration_seconds_count", endpoint="/predict") >= 3
    assert metric(after, "edgepack_model_info", name="toy", version="1.0.0", variant="onnx-fp32", engine="onnxruntime",
                  digest=next(dict(l)["digest"] for (n, l) in after if n == "edgepack_model_info")) == 1
    assert metric(after, "edgepack_ready") == 1
    # class counts: argmax of scores, labelled with the manifest's class names
    classes = {dict(l)["class"]: v for (n, l), v in after.items() if n == "edgepack_predicted_class_total"}
    assert set(classes) <= {"a", "b", "c"} and sum(classes.values()) >= 9
    # per-input running statistics
    assert metric(after, "edgepack_input_samples_total", input="raw") >= 9
    assert metric(after, "edgepack_input_value_max", input="raw") == 255
    assert metric(after, "edgepack_input_value_min", input="raw") == 0
    assert metric(after, "edgepack_input_value_count", input="raw") > 0


def test_prediction_log_ring_stays_under_its_cap_and_labels_attach(daemon):
    ids = []
    conn = daemon.unix()
    for i in range(150):
        raw = [[i % 256, (2 * i) % 256, 7, 9]]
        status, out = daemon.json("POST", "/predict", {"raw": raw}, conn=conn)
        assert status == 200
        ids.append((out["id"], raw))
    conn.close()
    last_id, last_raw = ids[-1]
    assert daemon.json("POST", "/labels", {"id": last_id, "label": "b"}) == (200, {"id": last_id, "stored": True})
    status, err = daemon.json("POST", "/labels", {"id": ids[0][0], "label": "a"})  # rotated out long ago
    assert status == 400 and err["error"]["field"] == "id"
    status, err = daemon.json("POST", "/labels", {"id": "no-such-id", "label": "a"})
    assert status == 400 and err["error"]["field"] == "id"
    status, err = daemon.json("POST", "/labels", {"id": last_id})
    assert status == 400 and err["error"]["field"] == "label"
    cap = int(LOG_CAP_MB * 1024 * 1024)
    deadline = time.monotonic() + 10
    while True:
        pairs = predlog.labeled(daemon.log_dir)
        if pairs or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [(record["id"], label) for record, label in pairs] == [(last_id, "b")]
    record = pairs[0][0]
    np.testing.assert_array_equal(record["inputs"]["raw"], np.array(last_raw, np.uint8))
    assert record["outputs"]["scores"].shape == (1, 3) and record["model"]["version"] == "1.0.0"
    size = sum(p.stat().st_size for p in daemon.log_dir.iterdir())
    assert 0 < size <= cap
    logged = [r["id"] for r in predlog.read_log(daemon.log_dir, with_arrays=False) if r["kind"] == "prediction"]
    assert logged and logged[-1] == last_id and ids[0][0] not in logged


def test_prediction_log_reader_skips_a_torn_tail(tmp_path):
    log = predlog.PredictionLog(tmp_path, 1 << 20, 1.0)
    for i in range(3):
        log.log(f"id-{i}", {"name": "toy"}, {"raw": X}, {"scores": np.ones((3, 3), np.float32)})
    assert log.flush()
    log.close()
    segment = predlog.segments(tmp_path)[-1][1]
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])  # a crash mid-record
    assert [r["id"] for r in predlog.read_log(tmp_path)] == ["id-0", "id-1"]
    reopened = predlog.PredictionLog(tmp_path, 1 << 20, 1.0)  # never appends to the torn segment
    reopened.log("id-3", {"name": "toy"}, {"raw": X}, {})
    assert reopened.flush()
    reopened.close()
    assert [r["id"] for r in predlog.read_log(tmp_path)] == ["id-0", "id-1", "id-3"]


def test_empty_cache_starts_but_answers_503_until_a_first_install_and_sighup(tmp_path):
    priv, pub = bundles.keys(tmp_path)
    with serve(tmp_path / "empty", tmp_path, "--key", str(pub)) as served:
        status, ready = served.json("GET", "/readyz")
        assert status == 503 and ready["ready"] is False and "install" in ready["reason"]
        status, err = served.json("POST", "/predict", {"raw": [[1, 2, 3, 4]]})
        assert status == 503 and "no verified model" in err["error"]["reason"]
        assert served.json("GET", "/healthz")[0] == 200
        status, info = served.json("GET", "/info")
        assert status == 200 and info["ready"] is False and info["model"] is None
        samples = served.metrics()
        assert metric(samples, "edgepack_ready") == 0 and metric(samples, "edgepack_errors_total", kind="unavailable") == 1
        # the first bundle arrives (e.g. from a USB stick); a reload makes the daemon ready
        config = RuntimeConfig(CacheConfig(root=tmp_path / "empty", trusted_keys=(load_public_key(pub),)))
        install(bundles.make_bundle(tmp_path, priv), config)
        served.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served.json("GET", "/readyz")[0] != 200:
            assert time.monotonic() < deadline, served.log()
            time.sleep(0.05)
        status, out = served.json("POST", "/predict", {"raw": X.tolist()})
        assert status == 200 and out["model"]["version"] == "1.0.0"


def test_stale_socket_file_is_replaced(tmp_path):
    config, _, _ = make_cache(tmp_path / "c")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "d.sock"))
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves behind
    with serve(tmp_path / "c" / "cache", tmp_path) as served:
        assert served.json("GET", "/readyz")[0] == 200
        assert (os.stat(served.sock).st_mode & 0o777) == 0o660


def test_sighup_reloads_v2_and_a_failed_reload_keeps_serving_then_sigterm_drains(tmp_path):
    config, priv, _ = make_cache(tmp_path / "c")
    cache = tmp_path / "c" / "cache"
    with serve(cache, tmp_path) as served:
        assert served.json("GET", "/info")[1]["model"]["version"] == "1.0.0"
        # --- install v2 (what `edgepack-runtime install` does), then SIGHUP
        install(bundles.make_bundle(tmp_path / "c", priv, "2.0.0", bundles.raw_classifier(scale=3.0)), config)
        expected_v2 = load(config).predict(X)["scores"]
        served.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served.json("GET", "/info")[1]["model"]["version"] != "2.0.0":
            assert time.monotonic() < deadline, served.log()
            time.sleep(0.05)
        status, out = served.json("POST", "/predict", {"raw": X.tolist()})
        assert status == 200 and out["model"]["version"] == "2.0.0"
        np.testing.assert_array_equal(np.asarray(out["outputs"]["scores"], np.float32), expected_v2)
        # --- a reload that fails (the store is gone) keeps v2 serving and says so
        (cache / "store").rename(cache / "store-away")
        served.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served.json("GET", "/info")[1]["reload"]["failure"] < 1:
            assert time.monotonic() < deadline, served.log()
            time.sleep(0.05)
        info = served.json("GET", "/info")[1]
        assert info["ready"] and info["model"]["version"] == "2.0.0"
        assert info["reload"]["last"]["ok"] is False and info["reload"]["last"]["error"]
        samples = served.metrics()
        assert metric(samples, "edgepack_reloads_total", result="failure") == 1
        assert metric(samples, "edgepack_last_reload_success") == 0
        assert served.json("POST", "/predict", {"raw": X.tolist()})[1]["model"]["version"] == "2.0.0"
        (cache / "store-away").rename(cache / "store")

        # --- SIGTERM while a request is in flight (a slow upload): it completes, exit 0
        idle = served.unix()  # an idle keep-alive connection must not hold up the exit
        assert served.request("GET", "/healthz", conn=idle)[0] == 200
        body = json.dumps({"raw": X.tolist()}).encode()
        slow = socket.socket(socket.AF_UNIX)
        slow.settimeout(10)
        slow.connect(served.sock)
        slow.sendall(b"POST /predict HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
        time.sleep(0.2)
        served.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while os.path.exists(served.sock):  # stops accepting: the socket goes away
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)
        assert served.proc.poll() is None, "the daemon must wait for the in-flight request"
        slow.sendall(body[10:])
        response = b""
        while b"\r\n\r\n" not in response or len(response.split(b"\r\n\r\n", 1)[1]) < int(re.search(rb"Content-Length: (\d+)", response).group(1)):
            chunk = slow.recv(65536)
            assert chunk, response
            response += chunk
        slow.close()
        assert status_of(response) == 200 and b"Connection: close" in response
        np.testing.assert_array_equal(np.asarray(body_of(response)["outputs"]["scores"], np.float32), expected_v2)
        t0 = time.monotonic()
        assert served.proc.wait(5) == 0
        assert time.monotonic() - t0 < 5
        idle.close()
        assert "stopped" in served.log()


def test_non_loopback_http_is_refused_without_the_explicit_switch(tmp_path):
    config, _, _ = make_cache(tmp_path / "c")
    cmd = [sys.executable, "-m", "edgepack_runtime.cli", "serve", "--cache", str(tmp_path / "c" / "cache"),
           "--socket", str(tmp_path / "d.sock"), "--http", "0.0.0.0:0"]
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_HTTP_ANY"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 2 and "loopback" in result.stderr
