"""The OTA update server end to end (edgepack.server), per docs/ota-protocol.md.

Most tests use FastAPI's TestClient with a fake clock; one starts the real
``edgepack server run`` process, SIGKILLs it mid-rollout and restarts it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import zstandard
from bundles import keys, make_bundle, npz_bytes, raw_classifier
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from edgepack.bundle import generate_keypair, write_bundle
from edgepack.server.app import create_app
from edgepack.server.delta import apply_delta
from edgepack.server.rollout import cohort_position
from edgepack.server.settings import ServerSettings
from edgepack.server.storage import open_storage
from edgepack.server.storage.migrations import latest_version
from pg import sql_rows
from net import free_port

ADMIN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
ROOT = Path(__file__).resolve().parent.parent


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ bundles


def mlp(last_seed: int, width: int = 512, depth: int = 4) -> onnx.ModelProto:
    """float [N,width] → depth×(MatMul+Relu) → MatMul [width,8]: several MB; only the last layer depends on last_seed."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(depth):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) * 0.05).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"a{i}"])]
        x = f"a{i}"
    last = (np.random.default_rng(last_seed).standard_normal((width, 8))).astype(np.float32)
    inits.append(numpy_helper.from_array(last, "w_last"))
    nodes.append(helper.make_node("MatMul", [x, "w_last"], ["scores"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def make_mlp_bundle(out_dir: Path, key: Path, version: str, last_seed: int) -> Path:
    import onnxruntime as ort

    model = mlp(last_seed)
    x = np.random.default_rng(1).standard_normal((4, 512)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    manifest = {
        "format_version": 1, "name": "big", "version": version,
        "variants": [{"id": "onnx-fp32", "file": "models/onnx-fp32.onnx", "engine": "onnxruntime", "precision": "fp32"}],
        "golden": {"file": "golden/vectors.npz", "tolerances": {"onnx-fp32": {"scores": 1e-3}}},
    }
    members = {"models/onnx-fp32.onnx": model.SerializeToString(),
               "golden/vectors.npz": npz_bytes({"input:x": x, "output:onnx-fp32:scores": expected})}
    out = out_dir / f"big-{version}.epk"
    write_bundle(out, manifest, members, key, source_date_epoch=0)
    return out


def failed_gate_bundle(out_dir: Path, key: Path) -> Path:
    model = raw_classifier(scale=3.0)
    manifest = {
        "format_version": 1, "name": "toy", "version": "9.0.0",
        "variants": [{"id": "onnx-fp32", "file": "models/onnx-fp32.onnx", "engine": "onnxruntime", "precision": "fp32"}],
        "gates": {"passed": False, "results": {"onnx-fp32": {"passed": False, "accuracy": 0.1}}},
    }
    out = out_dir / "toy-9.0.0.epk"
    write_bundle(out, manifest, {"models/onnx-fp32.onnx": model.SerializeToString()}, key, source_date_epoch=0)
    return out


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    priv, pub = keys(d)
    other = tmp_path_factory.mktemp("other")
    other_priv, _ = generate_keypair(other, "rogue")
    v1 = make_bundle(d, priv, "1.0.0", raw_classifier(scale=1.0))
    v2 = make_bundle(d, priv, "2.0.0", raw_classifier(scale=2.0))
    untrusted = make_bundle(other, other_priv, "3.0.0", raw_classifier(scale=3.0))
    tampered = d / "toy-4.0.0-tampered.epk"
    data = bytearray(make_bundle(d, priv, "4.0.0", raw_classifier(scale=4.0)).read_bytes())
    data[-2048] ^= 0x01  # inside the last payload member
    tampered.write_bytes(bytes(data))
    return {"pub": pub, "v1": v1, "v2": v2, "untrusted": untrusted, "tampered": tampered,
            "gate": failed_gate_bundle(d, priv), "big1": make_mlp_bundle(d, priv, "1.0.0", 1),
            "big2": make_mlp_bundle(d, priv, "1.1.0", 2)}


# ------------------------------------------------------------------ harness


class Clock:
    def __init__(self) -> None:
        self.now = 1_764_000_000.0

    def __call__(self) -> float:
        return self.now


class Device:
    """A minimal device client: token, seq counter, and what it runs."""

    def __init__(self, client, device_id: str, token: str) -> None:
        self.client, self.id, self.token, self.seq = client, device_id, token, 0
        self.current = None

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def checkin(self, **extra):
        self.seq += 1
        body = {"seq": self.seq, "state": "idle", "current": self.current, "previous": None,
                "health": {"serving": True, "requests": 100, "errors": 1, "p95_ms": 2.0, "nonfinite": 0, "uptime_s": 10},
                "runtime_version": "0.1.0", "engines": ["onnxruntime"], "summaries": {}}
        body.update(extra)
        return self.client.post(f"/v1/devices/{self.id}/checkin", json=body, headers=self.headers)

    def events(self, *items: dict):
        batch = []
        for item in items:
            self.seq += 1
            batch.append({"seq": self.seq, "at": 1.0, **item})
        return self.client.post(f"/v1/devices/{self.id}/events", json={"events": batch}, headers=self.headers)

    def install(self, directive: dict, rollout_id: str) -> None:
        b = directive["bundle"]
        ev = {"rollout_id": rollout_id, "digest": b["digest"], "version": b["version"]}
        assert self.events({"type": "downloaded", **ev}, {"type": "installed", **ev}).status_code == 200
        self.current = {"name": b["name"], "version": b["version"], "digest": b["digest"]}


@pytest.fixture
def server(tmp_path, kit, db_url):
    clock = Clock()

    def make(**overrides):
        settings = ServerSettings.for_tests(tmp_path / "data", ADMIN, trusted_key_files=(kit["pub"],), db_url=db_url,
                                            **overrides)
        storage = open_storage(settings.db_url)
        client = TestClient(create_app(settings, storage, clock=clock, run_ticker=False))
        client.clock, client.settings, client.storage = clock, settings, storage
        return client

    return make


def upload(client, path: Path) -> dict:
    r = client.post("/v1/admin/bundles", content=path.read_bytes(), headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status_code in (200, 201), r.text
    return r.json()


def provision(client, device_id: str, group: str = "lab", current: dict | None = None) -> Device:
    r = client.post("/v1/admin/devices", json={"id": device_id, "group": group, "tags": ["t"], "profile": "rpi4"}, headers=AUTH)
    assert r.status_code == 201, r.text
    dev = Device(client, device_id, r.json()["token"])
    dev.current = current
    return dev


def ref(bundle: dict) -> dict:
    return {"name": bundle["name"], "version": bundle["version"], "digest": bundle["digest"]}


def rollout(client, bundle: dict, group: str = "lab", **kw) -> dict:
    body = {"bundle_id": bundle["id"], "group": group, "steps": [100], "soak_seconds": 0, "min_devices_succeeded": 0,
            "max_failure_rate": 0.1, "halt_min_count": 1, **kw}
    r = client.post("/v1/admin/rollouts", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()


def error_code(response) -> str:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]["code"]


# -------------------------------------------------------------------- tests


def test_upload_is_verified_and_gated(server, kit):
    c = server()
    assert c.post("/v1/admin/bundles", content=kit["v1"].read_bytes()).status_code == 401
    first = c.post("/v1/admin/bundles", content=kit["v1"].read_bytes(), headers=AUTH)
    assert first.status_code == 201
    b = first.json()
    assert b["digest"] == sha(kit["v1"].read_bytes()) and b["stage"] == "staging" and b["size"] == kit["v1"].stat().st_size
    assert c.post("/v1/admin/bundles", content=kit["v1"].read_bytes(), headers=AUTH).status_code == 200  # idempotent
    for name, code in (("tampered", "bundle_rejected"), ("untrusted", "bundle_rejected"), ("gate", "gate_failed")):
        r = c.post("/v1/admin/bundles", content=kit[name].read_bytes(), headers=AUTH)
        assert r.status_code == 422 and error_code(r) == code, (name, r.text)
    r = c.post("/v1/admin/bundles", content=b"not a bundle", headers=AUTH)
    assert r.status_code == 422 and "not an edgepack bundle" in r.json()["error"]["message"]
    assert "tmp" not in c.post("/v1/admin/bundles", content=kit["untrusted"].read_bytes(), headers=AUTH).json()["error"]["message"]
    assert [x["version"] for x in c.get("/v1/admin/bundles", headers=AUTH).json()] == ["1.0.0"]
    assert list((c.settings.blob_dir / "tmp").iterdir()) == []  # rejected uploads leave nothing behind

    r = c.post(f"/v1/admin/bundles/{b['id']}/stage", json={"stage": "production"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["stage"] == "production"
    assert c.post(f"/v1/admin/bundles/{b['id']}/stage", json={"stage": "gold"}, headers=AUTH).status_code == 422
    detail = c.get(f"/v1/admin/bundles/{b['id']}", headers=AUTH).json()
    assert [(h["from_stage"], h["to_stage"]) for h in detail["stage_history"]] == [(None, "staging"), ("staging", "production")]
    assert detail["manifest"]["name"] == "toy"
    assert c.get("/v1/admin/bundles/b_nope", headers=AUTH).status_code == 404
    assert "/v1/devices/{device_id}/checkin" in c.get("/openapi.json").json()["paths"]
    assert "/v1/admin/summary" in c.get("/dashboard").text


def test_provisioning_token_shown_once_and_only_its_hash_stored(server):
    c = server()
    r = c.post("/v1/admin/devices", json={"id": "pi-001", "group": "lab", "tags": ["floor-2"], "profile": "rpi4"}, headers=AUTH)
    assert r.status_code == 201
    token = r.json()["token"]
    assert len(token) >= 32
    shown = c.get("/v1/admin/devices/pi-001", headers=AUTH).json()
    assert token not in json.dumps(shown) and "token_sha256" not in shown and shown["tags"] == ["floor-2"]
    assert token not in c.get("/v1/admin/devices", headers=AUTH).text
    assert c.post("/v1/admin/devices", json={"id": "pi-001"}, headers=AUTH).status_code == 409
    r = c.patch("/v1/admin/devices/pi-001", json={"group": "field"}, headers=AUTH)
    assert r.json()["group"] == "field"
    c.storage.close()
    url = c.settings.db_url
    assert sql_rows(url, "SELECT token_sha256 FROM devices WHERE id='pi-001'") == [(sha(token.encode()),)]
    assert [row[0] for row in sql_rows(url, "SELECT version FROM schema_migrations ORDER BY version")] == \
        list(range(1, latest_version() + 1))
    assert not [r for r in sql_rows(url, "SELECT * FROM devices") if any(token in str(v) for v in r)]
    if url.startswith("sqlite:///"):
        for f in c.settings.sqlite_path.parent.glob("edgepack.db*"):
            assert token.encode() not in f.read_bytes()


def test_device_cannot_address_another_device(server, kit):
    c = server()
    v1 = upload(c, kit["v1"])
    a, b = provision(c, "dev-a"), provision(c, "dev-b")
    rollout(c, v1)
    assert b.checkin().json()["action"] == "update"
    body = {"seq": 99, "state": "idle"}
    assert error_code(c.post("/v1/devices/dev-b/checkin", json=body, headers=a.headers)) == "unknown_device"
    assert c.post("/v1/devices/dev-b/checkin", json=body, headers=a.headers).status_code == 404
    assert c.post("/v1/devices/nobody/checkin", json=body, headers=a.headers).status_code == 404
    assert c.post("/v1/devices/dev-b/events", json={"events": [{"seq": 99, "type": "downloaded"}]}, headers=a.headers).status_code == 404
    assert c.get(f"/v1/devices/dev-b/bundles/{v1['digest']}", headers=a.headers).status_code == 404
    assert c.get(f"/v1/devices/dev-a/bundles/{v1['digest']}", headers=a.headers).status_code == 404  # not directed yet
    assert c.post("/v1/devices/dev-b/checkin", json=body).status_code == 401
    assert c.post("/v1/devices/dev-b/checkin", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.get("/v1/admin/devices/dev-b", headers=AUTH).json()["last_seq"] == b.seq  # untouched by A


def test_range_download_resumes_byte_exact(server, kit):
    c = server()
    v1 = upload(c, kit["v1"])
    dev = provision(c, "pi-1")
    rollout(c, v1)
    d = dev.checkin().json()
    assert d["action"] == "update" and d["bundle"]["digest"] == v1["digest"] and d["bundle"]["size"] == v1["size"]
    assert d["delta"] is None and d["probation"]["requests"] == 50 and d["poll_interval_s"] == 60
    url, size = d["bundle"]["url"], v1["size"]
    first = c.get(url, headers={**dev.headers, "Range": "bytes=0-999"})
    assert first.status_code == 206 and first.headers["content-range"] == f"bytes 0-999/{size}" and len(first.content) == 1000
    rest = c.get(url, headers={**dev.headers, "Range": "bytes=1000-"})
    assert rest.status_code == 206 and rest.headers["content-range"] == f"bytes 1000-{size - 1}/{size}"
    assert sha(first.content + rest.content) == v1["digest"]
    full = c.get(url, headers=dev.headers)
    assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes" and sha(full.content) == v1["digest"]
    bad = c.get(url, headers={**dev.headers, "Range": f"bytes={size}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{size}" and error_code(bad)


def test_delta_for_last_layer_change_is_small_and_exact(server, kit):
    c = server()
    old, new = upload(c, kit["big1"]), upload(c, kit["big2"])
    assert new["size"] > 4_000_000
    dev = provision(c, "pi-1", current=ref(old))
    rollout(c, new)
    d = dev.checkin().json()
    delta = d["delta"]
    assert d["action"] == "update" and delta["from_digest"] == old["digest"]
    assert delta["size"] <= new["size"] * 0.10, (delta["size"], new["size"])
    assert delta["url"] == f"/v1/devices/pi-1/deltas/{old['digest']}/{new['digest']}"
    got = c.get(delta["url"], headers=dev.headers)
    assert got.status_code == 200 and sha(got.content) == delta["digest"] and len(got.content) == delta["size"]
    old_bytes = kit["big1"].read_bytes()
    assert sha(apply_delta(old_bytes, got.content)) == new["digest"]
    # what the device client does, with zstandard alone
    zd = zstandard.ZstdCompressionDict(old_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    assert sha(zstandard.ZstdDecompressor(dict_data=zd, max_window_size=2**31).decompress(got.content)) == new["digest"]
    assert dev.checkin().json()["delta"] == delta  # cached, same answer
    other = f"/v1/devices/pi-1/deltas/{'0' * 64}/{new['digest']}"
    assert c.get(other, headers=dev.headers).status_code == 404


def test_staged_rollout_reaches_deterministic_cohorts_step_by_step(server, kit):
    c = server()
    v1, v2 = upload(c, kit["v1"]), upload(c, kit["v2"])
    devices = [provision(c, f"d{i:02d}", current=ref(v1)) for i in range(20)]
    r = rollout(c, v2, steps=[10, 50, 100], soak_seconds=60, min_devices_succeeded=1, max_failure_rate=0.5)
    rid = r["id"]
    pos = {d.id: cohort_position(rid, d.id) for d in devices}
    updated: set[str] = set()
    for step, pct in enumerate([10, 50, 100]):
        got = c.get(f"/v1/admin/rollouts/{rid}", headers=AUTH).json()
        assert got["status"] == "active" and got["step_index"] == step and got["current_percent"] == pct
        for dev in devices:
            d = dev.checkin().json()
            expect = pos[dev.id] < pct and dev.id not in updated
            assert (d["action"] == "update") is expect, (step, dev.id, pos[dev.id])
            if expect:
                assert d["rollout_id"] == rid
                dev.install(d, rid)
                assert dev.checkin().json()["action"] == "none"
                assert dev.events({"type": "committed", "rollout_id": rid, "digest": v2["digest"]}).status_code == 200
                updated.add(dev.id)
        assert updated == {k for k, p in pos.items() if p < pct}
        progress = c.get(f"/v1/admin/rollouts/{rid}", headers=AUTH).json()["progress"]
        assert progress[step]["succeeded"] == progress[step]["joined"]
        assert c.app.state.orchestrator.tick() == []  # soak time not over: nothing moves
        c.clock.now += 61
        c.app.state.orchestrator.tick()
    final = c.get(f"/v1/admin/rollouts/{rid}", headers=AUTH).json()
    assert final["status"] == "completed" and sum(p["succeeded"] for p in final["progress"]) == 20
    assert [h["event"] for h in final["history"]] == ["created", "advanced", "advanced", "completed"]
    s = c.get("/v1/admin/summary", headers=AUTH).json()
    assert [(v["version"], v["devices"]) for v in s["versions"]] == [("2.0.0", 20)]
    assert s["rollouts"][0]["id"] == rid and s["devices"][0]["health"] == "ok"


def test_auto_halt_on_failure_events_rolls_back_with_reasons(server, kit):
    c = server()
    v1, v2 = upload(c, kit["v1"]), upload(c, kit["v2"])
    devs = [provision(c, f"h{i}", current=ref(v1)) for i in range(5)]
    rid = rollout(c, v2, max_failure_rate=0.2, halt_min_count=2, soak_seconds=3600)["id"]
    directives = [d.checkin().json() for d in devs]
    assert all(x["action"] == "update" for x in directives)
    for dev, d in zip(devs[:3], directives):
        dev.install(d, rid)
    ev = {"rollout_id": rid, "digest": v2["digest"]}
    assert devs[0].events({"type": "self_test_failed", **ev, "reason": {"code": "self_test", "detail": "golden mismatch"}}).status_code == 200
    assert c.get(f"/v1/admin/rollouts/{rid}", headers=AUTH).json()["status"] == "active"  # 1 < halt_min_count
    devs[0].current = ref(v1)  # the device rolled itself back
    assert devs[1].events({"type": "probation_failed", **ev, "reason": {"code": "crash_loop", "detail": "3 crashes"}}).status_code == 200
    got = c.get(f"/v1/admin/rollouts/{rid}", headers=AUTH).json()
    assert got["status"] == "halted"
    assert {(x["code"], tuple(x["devices"])) for x in got["halt_reasons"]} == {("self_test", ("h0",)), ("crash_loop", ("h1",))}
    assert "2 of 5 devices failed" in got["halt_message"]
    failed = {m["device_id"]: (m["state"], m["failure_code"], m["failure_detail"]) for m in got["members"] if m["state"] == "failed"}
    assert failed == {"h0": ("failed", "self_test", "golden mismatch"), "h1": ("failed", "crash_loop", "3 crashes")}
    # running the bad bundle → rollback to what they ran before; everyone else → nothing
    for dev, expected in zip(devs, ["none", "rollback", "rollback", "none", "none"]):
        d = dev.checkin().json()
        assert d["action"] == expected, dev.id
        if expected == "rollback":
            assert d["bundle"]["digest"] == v1["digest"] and d["rollout_id"] == rid
            assert c.get(d["bundle"]["url"], headers=dev.headers).status_code == 200
    devs[2].current = ref(v1)
    assert devs[2].events({"type": "rolled_back", **ev}).status_code == 200
    assert devs[2].checkin().json()["action"] == "none"
    assert c.get("/v1/admin/summary", headers=AUTH).json()["rollouts"][0]["halt_reasons"] == got["halt_reasons"]
    # admin actions follow the state machine
    assert c.post(f"/v1/admin/rollouts/{rid}/resume", headers=AUTH).status_code == 409
    assert c.post(f"/v1/admin/rollouts/{rid}/abort", headers=AUTH).json()["status"] == "aborted"
    assert c.post("/v1/admin/rollouts/r_missing/pause", headers=AUTH).status_code == 404


def test_replays_malformed_and_unknown_ids_change_nothing(server, kit):
    c = server()
    v1, v2 = upload(c, kit["v1"]), upload(c, kit["v2"])
    dev = provision(c, "pi-1", current=ref(v1))
    rid = rollout(c, v2, soak_seconds=3600)["id"]
    d = dev.checkin().json()
    dev.install(d, rid)

    def snapshot():
        return (c.get("/v1/admin/devices/pi-1", headers=AUTH).json(), c.get(f"/v1/admin/rollouts/{rid}", headers=AUTH).json(),
                c.get("/v1/admin/events", headers=AUTH).json())

    before = snapshot()
    url, h = "/v1/devices/pi-1/events", dev.headers
    last = dev.seq
    cases = [
        (409, "replayed_seq", {"events": [{"seq": last, "type": "committed", "rollout_id": rid}]}),
        (409, "replayed_seq", {"events": [{"seq": last - 1, "type": "committed"}, {"seq": last + 5, "type": "committed"}]}),
        (409, "out_of_order", {"events": [{"seq": last + 3, "type": "committed"}, {"seq": last + 2, "type": "committed"}]}),
        (422, "unknown_rollout", {"events": [{"seq": last + 1, "type": "committed", "rollout_id": rid},
                                             {"seq": last + 2, "type": "committed", "rollout_id": "r_nope"}]}),
        (422, "unknown_digest", {"events": [{"seq": last + 1, "type": "committed", "digest": "f" * 64}]}),
        (422, "invalid_request", {"events": [{"seq": str(last + 1), "type": "committed"}]}),
        (422, "invalid_request", {"events": [{"seq": last + 1, "type": "exploded"}]}),
        (422, "invalid_request", {"events": [{"seq": True, "type": "committed"}]}),
        (422, "invalid_request", {"events": [{"seq": last + 1, "type": "committed", "digest": "XYZ"}]}),
        (422, "invalid_request", {"events": []}),
        (422, "invalid_request", {"evnts": []}),
        (422, "invalid_request", [1, 2]),
    ]
    for status, code, body in cases:
        r = c.post(url, json=body, headers=h)
        assert (r.status_code, error_code(r)) == (status, code), (body, r.text)
    r = c.post(url, content=b'{"events": [', headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400 and error_code(r) == "malformed_json"
    for body in ({"seq": last, "state": "idle"}, {"seq": "x", "state": "idle"}, {"state": "idle"},
                 {"seq": last + 1, "state": "idle", "current": {"name": "toy", "version": "1", "digest": 5}}):
        r = c.post("/v1/devices/pi-1/checkin", json=body, headers=h)
        assert r.status_code in (409, 422) and error_code(r)
    assert c.post("/v1/admin/rollouts", json={"bundle_id": "b_nope", "group": "lab"}, headers=AUTH).status_code == 422
    assert c.post("/v1/admin/rollouts", json={"bundle_id": v2["id"], "group": "x", "steps": [50, 10]}, headers=AUTH).status_code == 422
    assert c.post("/v1/admin/rollouts", json={"bundle_id": v2["id"], "group": "lab"}, headers=AUTH).status_code == 409
    assert c.post("/v1/admin/devices", json={"id": "bad id!"}, headers=AUTH).status_code == 422
    assert c.post("/v1/admin/devices", json={"id": "ok", "group": 5}, headers=AUTH).status_code == 422
    assert snapshot() == before
    # and the next well-formed batch is accepted
    assert dev.events({"type": "committed", "rollout_id": rid, "digest": v2["digest"]}).json() == {"accepted": 1, "last_seq": last + 1}


def test_rate_limit_and_body_caps(server, kit):
    c = server(device_rate_limit=3, max_body_bytes=4096, max_upload_bytes=kit["v1"].stat().st_size - 1)
    dev = provision(c, "pi-1")
    assert [dev.checkin().status_code for _ in range(3)] == [200, 200, 200]
    r = dev.checkin()
    assert r.status_code == 429 and error_code(r) == "rate_limited" and int(r.headers["retry-after"]) >= 1
    c.clock.now += 61
    assert dev.checkin().status_code == 200
    big = {"events": [{"seq": 10_000 + i, "type": "downloaded"} for i in range(200)]}
    r = c.post("/v1/devices/pi-1/events", json=big, headers=dev.headers)
    assert r.status_code == 413 and error_code(r) == "body_too_large"

    def chunks():
        yield b'{"seq": 1, '
        yield b" " * 5000

    r = c.post("/v1/admin/devices", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = c.post("/v1/admin/bundles", content=kit["v1"].read_bytes(), headers=AUTH)
    assert r.status_code == 413 and c.get("/v1/admin/bundles", headers=AUTH).json() == []


def test_migrate_command(tmp_path, db_url, cli):
    latest = latest_version()
    code, out, _ = cli("server", "migrate", "--data", tmp_path, "--db-url", db_url)
    assert code == 0 and f"Applied migrations {', '.join(map(str, range(1, latest + 1)))}" in out
    code, out, _ = cli("server", "migrate", "--data", tmp_path, "--db-url", db_url)
    assert code == 0 and f"up to date (version {latest})" in out
    assert not (tmp_path / "admin.token").exists()


# ------------------------------------------------------- the real server process




def _server_command() -> list[str]:
    from edgepack.cli.app import app

    registered = any(getattr(g, "name", None) == "server" for g in app.registered_groups)
    module = "edgepack" if registered else "edgepack.cli.server_cmd"
    return [sys.executable, "-m", module, "server", "run"]


def _start(data: Path, port: int, pub: Path, token_file: Path, db_url: str) -> subprocess.Popen:
    log = open(data.parent / "server.log", "ab")  # noqa: SIM115 - the child keeps writing to it
    proc = subprocess.Popen(
        _server_command() + ["--data", str(data), "--port", str(port), "--trusted-key", str(pub), "--admin-token-file", str(token_file),
                             "--db-url", db_url],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "EDGEPACK_SERVER_TICK_INTERVAL_S": "0.2"},
    )
    log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {(data.parent / 'server.log').read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start")


def test_real_server_survives_sigkill_mid_rollout(tmp_path, kit, db_url):
    data, port = tmp_path / "data", free_port()
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN + "\n")
    proc = _start(data, port, kit["pub"], token_file, db_url)
    try:
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        v1, v2 = upload(c, kit["v1"]), upload(c, kit["v2"])
        devs = [provision(c, f"k{i}", current=ref(v1)) for i in range(6)]
        rid = rollout(c, v2, steps=[50, 100], soak_seconds=3600, min_devices_succeeded=1, max_failure_rate=0.5,
                      halt_min_count=2)["id"]
        joined = []
        for dev in devs:
            d = dev.checkin().json()
            if d["action"] == "update":
                dev.install(d, rid)
                joined.append(dev)
        assert joined, "expected some devices in the 50% cohort"
        fail = joined[0].events({"type": "probation_failed", "rollout_id": rid, "digest": v2["digest"],
                                 "reason": {"code": "latency_regression", "detail": "p95 4x"}})
        assert fail.status_code == 200
        before = c.get(f"/v1/admin/rollouts/{rid}", headers=AUTH).json()
        seqs = {d.id: c.get(f"/v1/admin/devices/{d.id}", headers=AUTH).json()["last_seq"] for d in devs}
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    proc = _start(data, port, kit["pub"], token_file, db_url)
    try:
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        after = c.get(f"/v1/admin/rollouts/{rid}", headers=AUTH).json()
        for key in ("status", "step_index", "members", "progress", "history", "halt_reasons", "step_started_at"):
            assert after[key] == before[key], key
        assert after["status"] == "active"
        assert {d.id: c.get(f"/v1/admin/devices/{d.id}", headers=AUTH).json()["last_seq"] for d in devs} == seqs
        # the device protocol continues where it stopped: replay refused, next seq accepted
        replay = {"events": [{"seq": joined[0].seq, "type": "rolled_back", "rollout_id": rid}]}
        assert c.post(f"/v1/devices/{joined[0].id}/events", json=replay, headers=joined[0].headers).status_code == 409
        assert joined[-1].checkin().status_code == 200
        assert c.get("/healthz").json()["schema_version"] == latest_version()
        # the periodic tick advances soak-timed steps on its own
        provision(c, "t0", group="tick")
        tid = rollout(c, v2, group="tick", steps=[50, 100], soak_seconds=0.3, min_devices_succeeded=0)["id"]
        deadline = time.monotonic() + 10
        while c.get(f"/v1/admin/rollouts/{tid}", headers=AUTH).json()["status"] != "completed":
            assert time.monotonic() < deadline, "the rollout tick never completed the rollout"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
