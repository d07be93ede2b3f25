"""The device OTA client (``edgepack_runtime.ota``) against a FAKE OTA server.

The real server (``edgepack server run``) is being written from the same contract,
``docs/ota-protocol.md``, at the same time, so these tests run the client against
:class:`FakeServer`: a small ``http.server`` on 127.0.0.1 in a thread of the test
process that implements the documented device API — bearer token, 404 for another
device id, ``POST .../checkin`` answering a directive, ``GET .../bundles/<digest>``
and ``GET .../deltas/<from>/<to>`` with ``Range: bytes=N-`` (206 + Content-Range),
``POST .../events`` with 409 for a replayed seq — plus knobs to misbehave (drop the
connection mid-body, send too many bytes, corrupt bytes, refuse events, go offline).
Once the real server exists, an integration test should replay these cases against it.

In-process tests drive :class:`OtaClient` directly (probation with ``wait=False``, so
traffic is fed deterministically between two cycles). The power-loss matrix runs the
real entry point ``edgepack-runtime ota --once`` in a subprocess that SIGKILLs itself
(``EDGEPACK_RUNTIME_KILL_AT``) at each state, restarts it, and checks that it resumed
or rolled back and that the cache opens a verified model. Every wait has a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bundles
from edgepack_runtime.bundle import load_public_key
from edgepack_runtime.cache import CacheConfig
from edgepack_runtime.model import RuntimeConfig, load
from edgepack_runtime.ota import RESUME, STATES, TRANSITIONS
from edgepack_runtime.ota.client import OtaClient, OtaOptions

# A dependency of edgepack itself: missing, it must fail the suite, not skip the whole state machine.
import zstandard  # noqa: E402

DEVICE, TOKEN = "dev-1", "device-token-1"
RAW = np.array([[0, 255, 10, 20], [1, 2, 3, 4], [200, 100, 50, 25]], np.uint8)
PAD_FLOATS = 150_000  # ~600 KB shared by every bundle: several 64 KiB chunks, and deltas are small
NO_PROBATION = {"requests": 0, "seconds": 0, "max_error_rate": 0.05, "max_latency_ratio": 3.0}
FIVE_REQUESTS = {"requests": 5, "seconds": 30, "max_error_rate": 0.05, "max_latency_ratio": 3.0}
CLI_PROBATION = {"requests": 50, "seconds": 0.3, "max_error_rate": 0.05, "max_latency_ratio": 3.0}


# ------------------------------------------------------------------ fake server


class FakeServer:
    """The device half of docs/ota-protocol.md, in memory (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.blobs = {}          # URL path -> bytes
        self.directive = {"action": "none", "rollout_id": None, "bundle": None, "delta": None, "probation": None,
                          "poll_interval_s": 60}
        self.checkins, self.gets, self.accepted = [], [], []
        self.last_seq = 0
        self.drop_after = {}     # path -> bytes to send before dropping the connection (once)
        self.extra = {}          # path -> bytes appended beyond the real body
        self.events_down = False
        self.httpd = None
        self.port = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, code, slug):
                self._json(code, {"error": {"code": slug, "message": f"{slug}."}})

            def _auth(self):
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._error(401, "unauthorized")
                    return False
                parts = self.path.split("/")
                if len(parts) < 4 or parts[3] != DEVICE:
                    self._error(404, "not_found")
                    return False
                return True

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                if not self._auth():
                    return
                if self.path.endswith("/checkin"):
                    with server.lock:
                        server.checkins.append(body)
                        directive = json.loads(json.dumps(server.directive))
                    return self._json(200, directive)
                if self.path.endswith("/events"):
                    if server.events_down:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    seqs = [e["seq"] for e in body["events"]]
                    with server.lock:
                        if min(seqs) <= server.last_seq or seqs != sorted(seqs):
                            return self._error(409, "replay")
                        server.last_seq = max(seqs)
                        server.accepted.extend(body["events"])
                    return self._json(200, {"accepted": len(seqs)})
                self._error(404, "not_found")

            def do_GET(self):
                if not self._auth():
                    return
                with server.lock:
                    server.gets.append((self.path, self.headers.get("Range")))
                    blob = server.blobs.get(self.path)
                    drop = server.drop_after.pop(self.path, None)
                    extra = server.extra.get(self.path, b"")
                if blob is None:
                    return self._error(404, "not_found")
                body = blob + extra
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if drop is not None:
                    self.wfile.write(body[start:start + drop])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port or 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def offer(self, info: dict, action: str = "update", delta: dict | None = None, probation: dict | None = None) -> None:
        url = f"/v1/devices/{DEVICE}/bundles/{info['digest']}"
        self.blobs[url] = info["bytes"]
        self.directive = {"action": action, "rollout_id": "r_test",
                          "bundle": {"name": info["name"], "version": info["version"], "digest": info["digest"],
                                     "size": len(info["bytes"]), "url": url},
                          "delta": delta, "probation": probation or NO_PROBATION, "poll_interval_s": 60}

    def offer_delta(self, old: dict, new: dict, patch: bytes, digest: str | None = None) -> dict:
        url = f"/v1/devices/{DEVICE}/deltas/{old['digest']}/{new['digest']}"
        self.blobs[url] = patch
        return {"from_digest": old["digest"], "digest": digest or hashlib.sha256(patch).hexdigest(), "size": len(patch), "url": url}

    def event_types(self) -> list:
        return [e["type"] for e in self.accepted]


# ---------------------------------------------------------------------- bundles


def _padded(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model plus a large unused initializer identical in every bundle (like shared weights)."""
    pad = np.random.default_rng(7).standard_normal(PAD_FLOATS).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(pad, "pad"))
    return model


def _fails_on_traffic() -> onnx.ModelProto:
    """Passes its golden self-test (8 rows) but fails on any other batch size: a hard-coded Reshape."""
    model = bundles.raw_classifier(scale=3.0)
    graph = model.graph
    graph.node[-1].output[0] = "mm"
    graph.node.append(helper.make_node("Reshape", ["mm", "shape"], ["scores"], name="fixed"))
    graph.initializer.append(numpy_helper.from_array(np.array([8, 3], np.int64), "shape"))
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ota")
    priv, pub = bundles.keys(tmp)

    def build(tag, version, model):
        out = tmp / tag
        out.mkdir()
        path = bundles.make_bundle(out, priv, version, _padded(model))
        data = path.read_bytes()
        return {"name": "toy", "version": version, "digest": hashlib.sha256(data).hexdigest(), "bytes": data, "path": path}

    w = {
        "tmp": tmp, "pub": pub,
        "v1": build("v1", "1.0.0", bundles.raw_classifier(scale=1.0)),
        "v2": build("v2", "2.0.0", bundles.raw_classifier(scale=2.0)),
        "v09": build("v09", "0.9.0", bundles.raw_classifier(scale=0.5)),
        "nan": build("nan", "2.0.0", bundles.raw_classifier(nan=True)),
        "err": build("err", "2.0.0", _fails_on_traffic()),
    }
    dictionary = zstandard.ZstdCompressionDict(w["v1"]["bytes"], dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    w["delta"] = zstandard.ZstdCompressor(dict_data=dictionary).compress(w["v2"]["bytes"])
    assert len(w["delta"]) < len(w["v2"]["bytes"]) / 2
    # The base cache: v1 installed over the air (so its .epk is kept as a delta base).
    server = FakeServer().start()
    try:
        base = tmp / "base-cache"
        (base / "keys").mkdir(parents=True)
        shutil.copy(pub, base / "keys" / "test.pub")
        server.offer(w["v1"])
        client = _client(w, base, server)
        assert client.run_once(wait=False) == "committed"
        assert client.model.version == "1.0.0"
        assert server.event_types() == ["downloaded", "installed", "committed"]
        w["base"] = base
    finally:
        server.stop()
    return w


def _client(world, cache: Path, server: FakeServer, **options) -> OtaClient:
    config = RuntimeConfig(CacheConfig(root=cache, trusted_keys=(load_public_key(world["pub"]),)))
    opts = dict(server=server.url, device_id=DEVICE, token=TOKEN, timeout_s=5.0, backoff_base_s=0.01, backoff_cap_s=0.08,
                probation_tick_s=0.01)
    opts.update(options)
    client = OtaClient(config, OtaOptions(**opts), sleep=lambda s: None, rng=random.Random(0), log=lambda msg: None)
    client.logs = []
    client.log = client.logs.append
    return client


@pytest.fixture
def server():
    fake = FakeServer().start()
    yield fake
    fake.stop()


@pytest.fixture
def cache(world, tmp_path):
    path = tmp_path / "cache"
    shutil.copytree(world["base"], path)
    return path


def _serving(world, cache: Path) -> str:
    """What a fresh start of the device serves (verified + self-tested), by version."""
    config = RuntimeConfig(CacheConfig(root=cache, trusted_keys=(load_public_key(world["pub"]),)))
    model = load(config)
    assert model.notes == [], model.notes
    model.predict(RAW)
    return model.version


# ------------------------------------------------------------------ state machine


def test_the_transition_table_and_resume_map_cover_every_state():
    assert set(RESUME) == set(STATES)
    reached = {m for (_, _), m in TRANSITIONS.items()} | {"idle"}
    assert reached == set(STATES)
    assert {s for s, _ in TRANSITIONS} == set(STATES)  # every state has a way out


# --------------------------------------------------------- scenarios in-process


def _good_traffic(client):
    for _ in range(5):
        client.predict(RAW)


def _failing_traffic(client):
    for _ in range(5):
        try:
            client.predict(RAW)
        except Exception:  # noqa: BLE001 - the engine error is the point
            pass


def _fast_baseline(client):
    for _ in range(20):
        client.monitor.record(0.001)


def _slow_traffic(client):
    for _ in range(5):
        client.monitor.record(0.050)  # what the daemon's predict path would report for a slow model


def _nothing(client):
    pass


def _offer(kind):
    """Directive builders: (server, world) -> None."""
    def update_v2(server, w):
        server.offer(w["v2"], probation=FIVE_REQUESTS)

    def older(server, w):
        server.offer(w["v09"])

    def older_rollback(server, w):
        server.offer(w["v09"], action="rollback")

    def oversize(server, w):
        server.offer(w["v2"])
        server.extra[server.directive["bundle"]["url"]] = b"\0" * 4096

    def too_big_for_device(server, w):
        server.offer(w["v2"])

    def sha_mismatch(server, w):
        server.offer(w["v2"])
        data = bytearray(w["v2"]["bytes"])
        data[len(data) // 2] ^= 0xFF
        server.blobs[server.directive["bundle"]["url"]] = bytes(data)

    def delta(server, w):
        server.offer(w["v2"], delta=server.offer_delta(w["v1"], w["v2"], w["delta"]))

    def corrupt_delta(server, w):
        bad = bytearray(w["delta"])
        bad[len(bad) // 2] ^= 0xFF  # its sha256 matches the directive; the patched result does not
        server.offer(w["v2"], delta=server.offer_delta(w["v1"], w["v2"], bytes(bad)))

    def nan(server, w):
        server.offer(w["nan"], probation=FIVE_REQUESTS)

    def err(server, w):
        server.offer(w["err"], probation=FIVE_REQUESTS)

    def slow(server, w):
        server.offer(w["v2"], probation=FIVE_REQUESTS)

    return locals()[kind]


# (id, directive, client options, before, traffic in probation, outcome, version served after,
#  events the server received, reason code of the failure event, GETs expected)
SCENARIOS = [
    ("happy-path", "update_v2", {}, _nothing, _good_traffic, "committed", "2.0.0",
     ["downloaded", "installed", "committed"], None, ["bundles"]),
    ("older-version-refused", "older", {}, _nothing, _nothing, "refused", "1.0.0", [], None, []),
    ("older-version-as-rollback-directive", "older_rollback", {}, _nothing, _nothing, "committed", "0.9.0",
     ["downloaded", "installed", "committed"], None, ["bundles"]),
    ("server-sends-more-than-directive-size", "oversize", {}, _nothing, _nothing, "failed", "1.0.0",
     ["install_failed"], "download", ["bundles"]),
    ("directive-size-over-device-cap", "too_big_for_device", {"max_download_bytes": 100_000}, _nothing, _nothing,
     "refused", "1.0.0", ["install_failed"], "download", []),
    ("sha256-mismatch", "sha_mismatch", {}, _nothing, _nothing, "failed", "1.0.0", ["install_failed"], "verify", ["bundles"]),
    ("delta-applied", "delta", {}, _nothing, _nothing, "committed", "2.0.0", ["downloaded", "installed", "committed"],
     None, ["deltas"]),
    ("corrupt-delta-falls-back-to-full", "corrupt_delta", {}, _nothing, _nothing, "committed", "2.0.0",
     ["downloaded", "installed", "committed"], None, ["deltas", "bundles"]),
    ("probation-error-rate", "err", {}, _nothing, _failing_traffic, "rolled_back", "1.0.0",
     ["downloaded", "installed", "probation_failed", "rolled_back"], "error_rate", ["bundles"]),
    ("probation-nonfinite-outputs", "nan", {}, _nothing, _good_traffic, "rolled_back", "1.0.0",
     ["downloaded", "installed", "probation_failed", "rolled_back"], "nonfinite", ["bundles"]),
    ("probation-latency-regression", "slow", {}, _fast_baseline, _slow_traffic, "rolled_back", "1.0.0",
     ["downloaded", "installed", "probation_failed", "rolled_back"], "latency_regression", ["bundles"]),
]


@pytest.mark.parametrize("directive,options,before,traffic,outcome,version,events,reason,gets",
                         [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_directive_scenarios(world, cache, server, directive, options, before, traffic, outcome, version, events, reason, gets):
    _offer(directive)(server, world)
    client = _client(world, cache, server, **options)
    client.start()
    before(client)
    got = client.run_once(wait=False)
    if got == "probation":
        assert client.cache.read_slot("current").digest == server.directive["bundle"]["digest"]
        traffic(client)
        got = client.run_once(wait=False)
    assert got == outcome, client.logs
    assert client.machine.state == "idle"
    assert client.model.version == version and _serving(world, cache) == version
    assert server.event_types() == events
    seqs = [c["seq"] for c in server.checkins] + [e["seq"] for e in server.accepted]
    assert len(set(seqs)) == len(seqs)
    assert [e["seq"] for e in server.accepted] == sorted(e["seq"] for e in server.accepted)
    assert all(e["seq"] > server.checkins[0]["seq"] for e in server.accepted)
    failures = [e for e in server.accepted if e["reason"]]
    if reason:
        assert failures and {e["reason"]["code"] for e in failures} == {reason}, failures
        assert all(e["reason"]["detail"] for e in failures)
    else:
        assert not failures
    assert [p.split("/")[4] for p, _ in server.gets] == gets
    assert not (cache / "ota" / "download.partial").exists() and not (cache / "ota" / "download.epk").exists()
    assert client.events.pending() == []
    # The next check-in reports what the device really runs (no ghost "installed").
    client.run_once(wait=False)
    assert server.checkins[-1]["current"]["version"] == version
    assert server.checkins[-1]["seq"] > max(seqs)


def test_a_failed_bundle_is_not_retried_and_previous_is_reported(world, cache, server):
    _offer("nan")(server, world)
    client = _client(world, cache, server)
    assert client.run_once(wait=False) == "probation"
    _good_traffic(client)
    assert client.run_once(wait=False) == "rolled_back"
    assert client.run_once(wait=False) == "refused"  # same directive again: the loop guard holds
    assert [p for p, _ in server.gets].count(server.directive["bundle"]["url"]) == 1
    assert server.checkins[-1]["previous"]["digest"] == world["nan"]["digest"]


def test_rollback_directive_to_previous_slot_swaps_without_downloading(world, cache, server):
    server.offer(world["v2"])
    client = _client(world, cache, server)
    assert client.run_once(wait=False) == "committed"
    server.offer(world["v1"], action="rollback")
    assert client.run_once(wait=False) == "directed_rollback"
    assert client.model.version == "1.0.0" and _serving(world, cache) == "1.0.0"
    assert [p.split("/")[4] for p, _ in server.gets] == ["bundles"]  # only v2 was ever fetched
    assert server.event_types()[-1] == "rolled_back" and server.accepted[-1]["digest"] == world["v1"]["digest"]


def test_offline_backs_off_capped_and_keeps_serving_without_touching_the_cache(world, cache, server):
    server.stop()  # nothing listens on the port any more: connection refused
    client = _client(world, cache, server, interval_s=30.0)
    client.start()
    before = {p: p.stat().st_mtime_ns for p in list((cache / "slots").iterdir()) + list((cache / "store").iterdir())}
    state_before = (cache / "ota" / "state.json").read_bytes()
    served = []
    client._sleep = lambda s: served.append(client.predict(RAW)["scores"].shape)  # keeps serving between attempts
    client.run_forever(cycles=8)
    assert len(client.delays) == 7 and len(served) == 7
    caps = [min(0.08, 0.01 * 2 ** k) for k in range(7)]
    assert all(0.5 * cap <= d <= cap for d, cap in zip(client.delays, caps)), client.delays
    assert max(client.delays[4:]) <= 0.08
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert sorted((cache / "slots").iterdir()) == sorted(p for p in before if p.parent.name == "slots")
    state_after = json.loads((cache / "ota" / "state.json").read_bytes())
    assert state_after["state"] == "idle" and json.loads(state_before)["state"] == "idle"
    assert client.model.version == "1.0.0"
    server.start()  # back online, same port
    server.offer(world["v2"])
    client.run_forever(cycles=1)
    assert client.model.version == "2.0.0"


def test_resumable_download_sends_range_and_ends_byte_exact(world, cache, server):
    server.offer(world["v2"])
    url = server.directive["bundle"]["url"]
    server.drop_after[url] = 200_000
    client = _client(world, cache, server)
    assert client.run_once(wait=False) == "interrupted"
    assert client.machine.state == "downloading" and client.machine.data["offset"] == 200_000
    assert (cache / "ota" / "download.partial").stat().st_size == 200_000
    assert client.model.version == "1.0.0"
    assert client.run_once(wait=False) == "committed"
    assert [r for p, r in server.gets if p == url] == [None, "bytes=200000-"]
    assert (cache / "ota" / "bundles" / f"{world['v2']['digest']}.epk").read_bytes() == world["v2"]["bytes"]
    assert _serving(world, cache) == "2.0.0"


def test_events_queue_offline_and_are_delivered_later_in_seq_order(world, cache, server):
    server.offer(world["v2"])
    server.events_down = True
    client = _client(world, cache, server)
    assert client.run_once(wait=False) == "committed"
    queued = client.events.pending()
    assert [e["type"] for e in queued] == ["downloaded", "installed", "committed"]
    assert server.accepted == []
    lines = (cache / "ota" / "events.jsonl").read_text().splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [e["seq"] for e in queued]
    checkins = len(server.checkins)
    assert client.run_once(wait=False) == "offline"  # events first: no check-in while they cannot go out
    assert len(server.checkins) == checkins
    server.stop()
    assert client.run_once(wait=False) == "offline"
    server.events_down = False
    server.start()
    assert client.run_once(wait=False) == "none"
    assert [e["seq"] for e in server.accepted] == [e["seq"] for e in queued]
    assert server.checkins[-1]["seq"] > queued[-1]["seq"]
    assert client.events.pending() == [] and (cache / "ota" / "events.jsonl").read_text() == ""
    # A replay (the server's answer was lost, the ack never written) is answered 409: acknowledged, not re-sent.
    client.events.acked_path.write_text("0")
    client.events.append(queued)
    assert len(client.events.pending()) == 3
    assert client.deliver() is True and client.events.pending() == []
    assert len(server.accepted) == 3


# ------------------------------------------------------------ power-loss matrix

LAST_RUN = None  # the run after the kills: no fault

# (id, kill points of successive runs, version served at the end, events the server got, reason code)
UPDATED = ["downloaded", "installed", "committed"]
CRASHED_IN_PROBATION = ["downloaded", "installed", "probation_failed", "rolled_back"]
KILL_MATRIX = [
    ("checking", ["ota:checking"], "2.0.0", UPDATED, None),
    ("downloading-before-first-byte", ["ota:downloading"], "2.0.0", UPDATED, None),
    ("downloading-mid-body", ["download:chunk#6"], "2.0.0", UPDATED, None),
    ("verifying", ["ota:verifying"], "2.0.0", UPDATED, None),
    ("installing", ["ota:installing"], "2.0.0", UPDATED, None),
    ("installing-mid-extract", ["extract:member#1"], "2.0.0", UPDATED, None),
    ("installing-mid-switch", ["switch:current"], "2.0.0", UPDATED, None),
    ("installing-after-switch", ["gc"], "2.0.0", UPDATED, None),
    ("self_testing", ["ota:self_testing"], "1.0.0", ["downloaded", "installed", "self_test_failed", "rolled_back"], "crash_loop"),
    ("probation", ["ota:probation"], "1.0.0", CRASHED_IN_PROBATION, "crash_loop"),
    ("committed", ["ota:committed"], "2.0.0", UPDATED, None),
    ("idle-after-commit", ["ota:idle"], "2.0.0", UPDATED, None),
    ("rolling_back", ["ota:probation", "ota:rolling_back"], "1.0.0", CRASHED_IN_PROBATION, "crash_loop"),
    ("rolled_back", ["ota:probation", "ota:rolled_back"], "1.0.0", CRASHED_IN_PROBATION, "crash_loop"),
    ("loop-guard-gives-up", ["selftest"] * 4, "1.0.0", ["downloaded", "install_failed"], "crash_loop"),
]


def _ota_cli(server: FakeServer, cache: Path, token_file: Path, kill_at: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEPACK_RUNTIME_KILL_AT", "EDGEPACK_CACHE")}
    if kill_at:
        env["EDGEPACK_RUNTIME_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "edgepack_runtime.cli", "ota", "--once", "--server", server.url,
                           "--device-id", DEVICE, "--token-file", str(token_file), "--cache", str(cache)],
                          capture_output=True, text=True, env=env, timeout=30)


@pytest.mark.parametrize("kills,version,events,reason", [k[1:] for k in KILL_MATRIX], ids=[k[0] for k in KILL_MATRIX])
def test_power_loss_at_every_state_resumes_or_rolls_back(world, cache, server, tmp_path, kills, version, events, reason):
    server.offer(world["v2"], probation=CLI_PROBATION)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    url = server.directive["bundle"]["url"]
    for kill_at in kills:
        died = _ota_cli(server, cache, token_file, kill_at)
        assert died.returncode == -signal.SIGKILL, f"not killed at {kill_at} (rc {died.returncode}):\n{died.stdout}\n{died.stderr}"
        assert not died.stdout
        # Whatever the kill left, a fresh start serves a verified model.
        assert _serving(world, cache) in ("1.0.0", "2.0.0")
    done = _ota_cli(server, cache, token_file, None)
    assert done.returncode in (0, 1), done.stderr
    assert "Traceback" not in done.stderr
    result = json.loads(done.stdout)
    assert result["state"] == "idle" and result["current"]["version"] == version, (result, done.stderr)
    assert _serving(world, cache) == version
    assert server.event_types() == events, done.stderr
    failures = [e for e in server.accepted if e["reason"]]
    assert {e["reason"]["code"] for e in failures} == ({reason} if reason else set())
    seqs = [e["seq"] for e in server.accepted]
    assert seqs == sorted(set(seqs))
    assert json.loads((cache / "ota" / "state.json").read_text())["state"] == "idle"
    leftovers = [p for p in cache.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    assert leftovers == []
    if kills == ["download:chunk#6"]:
        ranges = [r for p, r in server.gets if p == url]
        assert ranges == [None, "bytes=262144-"], ranges  # resumed from the last fsynced checkpoint
    elif version == "2.0.0":
        assert len([p for p, _ in server.gets if p == url]) <= 2


def test_power_cut_state_temp_files_are_swept_when_the_client_starts(world, cache, server):
    """A cut between atomic_write's temp file and its rename left ota/.state.json.*.tmp forever."""
    client = _client(world, cache, server)
    client.run_once(wait=False)
    state_dir = client.machine.path.parent
    leftovers = [state_dir / ".state.json.k1ll3d.tmp", state_dir / ".state.json.0ld.tmp"]
    for path in leftovers:
        path.write_bytes(b'{"state": "installing"')  # torn, as a cut would leave it
    before = client.machine.path.read_bytes()
    again = _client(world, cache, server)
    again.start()
    assert not any(p.exists() for p in leftovers)
    assert client.machine.path.read_bytes() == before  # the real state file is untouched
    assert (state_dir / "state.json").is_file()
