"""Signed download URLs, and bundle bytes served by nginx instead of Python (issue 9).

Unit tests cover :mod:`edgepack.server.signing`, the new settings and the device HTTP
client's origin rule. The integration tests run the real ``edgepack server run`` behind a
real nginx configured from deploy/nginx/edgepack.conf (tests/nginx.py), with a counting
TCP relay between nginx and the API so the tests can see exactly which requests and how
many bytes reached Python. Devices talk to the API at ``http://127.0.0.1:PORT`` and get
download URLs on ``http://localhost:PORT/blobs``: another origin (host differs), like a CDN.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import random
import re
import shutil
import socket
import stat
import threading
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import onnx
import pytest
from bundles import keys, make_bundle, raw_classifier
from edgepack_runtime.bundle import load_public_key
from edgepack_runtime.cache import CacheConfig
from edgepack_runtime.model import RuntimeConfig
from edgepack_runtime.ota.client import OtaClient, OtaOptions
from edgepack_runtime.ota.http import HttpClient, Unreachable
from fastapi.testclient import TestClient
from net import free_port, running_server
from nginx import render_config, running_nginx
from onnx import numpy_helper

from edgepack.errors import ServerError
from edgepack.server.app import create_app
from edgepack.server.settings import ServerSettings, load_settings
from edgepack.server.signing import SignatureError, sign_url, signature, verify_uri
from edgepack.server.storage import open_storage

SECRET = "s" * 20 + "-download-secret-for-tests-0123456789"
ADMIN = "admin-token-0123456789abcdef-nginx"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
DIGEST = "ab" * 32
PATH = f"/blobs/sha256/ab/{DIGEST}"
NOW = 1_800_000_000


def uri_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + "?" + parts.query


def signed(path: str = PATH, device: str = "dev-1", expires: int = NOW + 60, secret: str = SECRET) -> str:
    return uri_of(sign_url("https://cdn.example.com", path, device, expires, secret))


# ------------------------------------------------------------------ signing


def test_signed_url_verifies_for_the_device_it_was_signed_for():
    url = sign_url("https://cdn.example.com/blobs/", f"sha256/ab/{DIGEST}", "dev 1/é", NOW + 60, SECRET)
    assert url.startswith(f"https://cdn.example.com{PATH}?")
    assert verify_uri(uri_of(url), SECRET, NOW) == "dev 1/é"


def test_expired_url_is_refused():
    uri = signed(expires=NOW - 1)
    with pytest.raises(SignatureError, match="expired"):
        verify_uri(uri, SECRET, NOW)
    assert verify_uri(uri, SECRET, NOW - 1) == "dev-1"  # valid up to and including its expiry second


def test_tampered_digest_is_refused():
    uri = signed()
    other = uri.replace(DIGEST, "cd" * 32).replace("/ab/", "/cd/")
    with pytest.raises(SignatureError, match="signature"):
        verify_uri(other, SECRET, NOW)


def test_another_devices_signature_is_refused():
    mine = parse_qs(urlsplit(signed(device="dev-1")).query)
    forged = f"{PATH}?device=dev-2&expires={mine['expires'][0]}&sig={mine['sig'][0]}"
    with pytest.raises(SignatureError, match="signature"):
        verify_uri(forged, SECRET, NOW)


def test_extended_expiry_is_refused():
    uri = signed(expires=NOW + 60).replace(f"expires={NOW + 60}", f"expires={NOW + 6000}")
    with pytest.raises(SignatureError, match="signature"):
        verify_uri(uri, SECRET, NOW)


def test_url_signed_with_another_secret_is_refused():
    with pytest.raises(SignatureError, match="signature"):
        verify_uri(signed(secret="x" * 40), SECRET, NOW)


def test_url_expiring_beyond_the_servers_ttl_is_refused():
    uri = signed(expires=NOW + 7 * 86400)
    with pytest.raises(SignatureError, match="further ahead"):
        verify_uri(uri, SECRET, NOW, max_lifetime_s=900)
    assert verify_uri(signed(expires=NOW + 900), SECRET, NOW, max_lifetime_s=900) == "dev-1"


@pytest.mark.parametrize("mangle", [
    lambda u: u.split("?")[0],                                   # no query at all
    lambda u: re.sub(r"&sig=[^&]*", "", u),                      # no signature
    lambda u: u + "&sig=AAAA",                                   # duplicated parameter
    lambda u: u + "&extra=1",                                    # unknown parameter
    lambda u: re.sub(r"expires=\d+", "expires=soon", u),         # non-numeric expiry
    lambda u: re.sub(r"expires=\d+", "expires=-5", u),           # negative expiry
    lambda u: re.sub(r"device=[^&]*", "device=", u),             # empty device
    lambda u: re.sub(r"sig=[^&]*", "sig=%C3%A9%00", u),          # non-ASCII garbage signature
    lambda u: "https://evil.example.com" + u,                    # not a request URI
    lambda u: "",                                                # no header sent
], ids=["no-query", "no-sig", "dup", "extra", "expires-text", "expires-negative", "empty-device", "garbage-sig",
        "absolute", "empty"])
def test_malformed_url_is_refused(mangle):
    uri = signed()
    assert verify_uri(uri, SECRET, NOW) == "dev-1"  # the unmangled one is fine: the mangling is what fails
    with pytest.raises(SignatureError):
        verify_uri(mangle(uri), SECRET, NOW)


def test_empty_secret_cannot_sign_or_verify():
    with pytest.raises(ValueError, match="secret"):
        signature("", PATH, "dev-1", NOW)
    with pytest.raises(ValueError):
        verify_uri(signed(), "", NOW)


# ------------------------------------------------------------------ settings


def test_download_secret_is_generated_once_with_mode_0600_and_reused(tmp_path):
    first, _ = load_settings(data_dir=tmp_path, env={})
    secret_file = tmp_path / "download.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert len(first.download_secret) >= 32 and first.download_secret == secret_file.read_text().strip()
    again, _ = load_settings(data_dir=tmp_path, env={})  # a second replica on the same data dir
    assert again.download_secret == first.download_secret
    assert first.download_base_url == "" and first.download_url_ttl_s == 900
    assert SECRET not in repr(first) and first.download_secret not in repr(first)  # never logged with the settings
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".download")] == []  # no temp file left


def test_download_settings_from_env_and_their_validation(tmp_path):
    env = {"EDGEPACK_SERVER_DOWNLOAD_SECRET": SECRET, "EDGEPACK_SERVER_DOWNLOAD_BASE_URL": "https://cdn.example.com/blobs/",
           "EDGEPACK_SERVER_DOWNLOAD_URL_TTL_S": "120"}
    s, _ = load_settings(data_dir=tmp_path, env=env)
    assert (s.download_secret, s.download_base_url, s.download_url_ttl_s) == (SECRET, "https://cdn.example.com/blobs", 120)
    assert not (tmp_path / "download.secret").exists()
    for key, value, problem in [("DOWNLOAD_SECRET", "short", "32 characters"),
                                ("DOWNLOAD_BASE_URL", "cdn.example.com/blobs", "http"),
                                ("DOWNLOAD_BASE_URL", "ftp://cdn.example.com/blobs", "http"),
                                ("DOWNLOAD_BASE_URL", "http://cdn.example.com:port/blobs", "http"),
                                ("DOWNLOAD_BASE_URL", "https://cdn.example.com/blobs?x=1", "query"),
                                ("DOWNLOAD_URL_TTL_S", "0", "positive")]:
        with pytest.raises(ServerError, match=problem):
            load_settings(data_dir=tmp_path, env={**env, "EDGEPACK_SERVER_" + key: value})


# ------------------------------------------------------------ API, in process


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    d = tmp_path_factory.mktemp("nginx-bundles")
    priv, pub = keys(d)
    pad = np.random.default_rng(7).standard_normal(150_000).astype(np.float32)  # ~600 KB, shared: small deltas

    def build(version: str, scale: float) -> dict:
        model: onnx.ModelProto = raw_classifier(scale=scale)
        model.graph.initializer.append(numpy_helper.from_array(pad, "pad"))
        out = d / version
        out.mkdir()
        path = make_bundle(out, priv, version, model)
        data = path.read_bytes()
        return {"path": path, "bytes": data, "digest": hashlib.sha256(data).hexdigest()}

    return {"pub": pub, "v1": build("1.0.0", 1.0), "v2": build("2.0.0", 2.0)}


def checkin_body(seq: int, current: dict | None = None) -> dict:
    return {"seq": seq, "state": "idle", "current": current, "previous": None, "health": None,
            "runtime_version": "0.1.0", "engines": ["onnxruntime"], "summaries": {}}


def direct(client, kit: dict, device_id: str, group: str, version: str = "v1") -> tuple[str, dict]:
    """Upload ``version``, provision ``device_id`` into ``group`` and roll the bundle out to all of it."""
    r = client.post("/v1/admin/bundles", content=kit[version]["bytes"], headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status_code in (200, 201), r.text
    bundle = r.json()
    r = client.post("/v1/admin/devices", json={"id": device_id, "group": group, "tags": [], "profile": "rpi4"}, headers=AUTH)
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    r = client.post("/v1/admin/rollouts", headers=AUTH, json={
        "bundle_id": bundle["id"], "group": group, "steps": [100], "soak_seconds": 0, "min_devices_succeeded": 0,
        "probation": {"requests": 0, "seconds": 0, "max_error_rate": 0.05, "max_latency_ratio": 3.0}})
    assert r.status_code == 201, r.text
    return token, bundle


def test_without_a_download_base_url_directives_keep_api_urls(tmp_path, kit):
    settings = ServerSettings.for_tests(tmp_path, ADMIN, trusted_key_files=(kit["pub"],))
    with TestClient(create_app(settings, open_storage(settings.db_url), run_ticker=False)) as c:
        token, _ = direct(c, kit, "dev-1", "lab")
        d = c.post("/v1/devices/dev-1/checkin", json=checkin_body(1), headers={"Authorization": f"Bearer {token}"}).json()
        assert d["bundle"]["url"] == f"/v1/devices/dev-1/bundles/{kit['v1']['digest']}"
        r = c.get(d["bundle"]["url"], headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.content == kit["v1"]["bytes"]


def test_download_auth_answers_from_the_signature_alone(tmp_path, kit):
    settings = ServerSettings.for_tests(tmp_path, ADMIN, trusted_key_files=(kit["pub"],), download_secret=SECRET,
                                        download_base_url="https://cdn.example.com/blobs", download_url_ttl_s=60)
    with TestClient(create_app(settings, open_storage(settings.db_url), run_ticker=False)) as c:
        good = uri_of(sign_url(settings.download_base_url, f"sha256/ab/{DIGEST}", "nobody-in-the-db", int(time.time()) + 30, SECRET))
        # No device, admin token or database row needed: only the HMAC and the clock.
        assert c.get("/v1/internal/download-auth", headers={"X-Original-URI": good}).status_code == 204
        assert c.get("/v1/internal/download-auth", headers={"X-Original-URI": good.replace("/ab/", "/cd/")}).status_code == 403
        assert c.get("/v1/internal/download-auth").status_code == 403
        too_long = uri_of(sign_url(settings.download_base_url, "x", "d", int(time.time()) + 3600, SECRET))
        assert c.get("/v1/internal/download-auth", headers={"X-Original-URI": too_long}).status_code == 403


# -------------------------------------------------- device HTTP client origins


class _Recorder(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.seen: list[dict] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                recorder.seen.append({k.lower(): v for k, v in self.headers.items()})
                body = b"0123456789"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]


def test_device_token_is_never_sent_to_another_origin():
    api, cdn = _Recorder(), _Recorder()
    try:
        client = HttpClient(f"http://127.0.0.1:{api.port}", "device-secret-token")
        for url in (f"http://127.0.0.1:{cdn.port}/blobs/x?sig=1", f"http://localhost:{api.port}/blobs/x"):
            status, _, chunks = client.stream(url)
            assert status == 200 and b"".join(chunks) == b"0123456789"
        status, _, chunks = client.stream(f"http://127.0.0.1:{api.port}/v1/x")  # same origin, absolute
        b"".join(chunks)
        status, _, chunks = client.stream("/v1/y")  # same origin, relative
        b"".join(chunks)
        # The other port and the other host name are other origins: no token. The server's own gets it.
        assert [h.get("authorization") for h in cdn.seen] == [None]
        assert [h.get("authorization") for h in api.seen] == [None, "Bearer device-secret-token", "Bearer device-secret-token"]
    finally:
        api.shutdown()
        cdn.shutdown()


# --------------------------------------------------------- real nginx in front


_REQUEST_LINE = re.compile(rb"(GET|POST|PATCH|PUT|DELETE|HEAD) (/\S*) HTTP/1\.[01]\r\n")


class CountingRelay:
    """TCP relay nginx -> API that records request lines and counts the bytes the API sends back."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream_port = 0
        self.lock = threading.Lock()
        self.requests: list[str] = []   # "METHOD /path" (keep-alive connections carry several)
        self.response_bytes = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return

        def up() -> None:
            tail = b""
            try:
                while data := client.recv(65536):
                    # Request lines end in " HTTP/1.1\r\n" (a keep-alive request may follow a body
                    # directly); the tail catches a line split across reads, counted once.
                    scan = tail + data
                    found = [m for m in _REQUEST_LINE.finditer(scan) if m.end() > len(tail)]
                    with self.lock:
                        self.requests += [f"{m.group(1).decode()} {m.group(2).decode()}" for m in found]
                    tail = scan[-300:]
                    upstream.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    upstream.shutdown(socket.SHUT_WR)

        threading.Thread(target=up, daemon=True).start()
        try:
            while data := upstream.recv(65536):
                with self.lock:
                    self.response_bytes += len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, kit):
    """API server (one replica) behind the counting relay, behind nginx from the example config."""
    work = tmp_path_factory.mktemp("nginx-stack")
    admin_file = work / "admin.token"
    admin_file.write_text(ADMIN + "\n")
    relay = CountingRelay()
    nginx_port = free_port()
    base_blobs = f"http://localhost:{nginx_port}/blobs"
    env = {"EDGEPACK_SERVER_DOWNLOAD_BASE_URL": base_blobs, "EDGEPACK_SERVER_DOWNLOAD_SECRET": SECRET,
           "EDGEPACK_SERVER_DOWNLOAD_URL_TTL_S": "60", "EDGEPACK_SERVER_TICK_INTERVAL_S": "0.2"}
    try:
        with running_server(work, kit["pub"], admin_file, env) as (api_url, server_log):
            relay.upstream_port = urlsplit(api_url).port
            with (running_nginx(work / "nginx", work / "data" / "blobs", [relay.port], port=nginx_port) as base,
                  httpx.Client(base_url=base, timeout=10) as client):
                yield {"base": base, "blobs": base_blobs, "client": client, "relay": relay, "work": work,
                       "nginx": work / "nginx", "server_log": server_log}
    finally:
        relay.stop()


def test_example_config_rewrite_keeps_everything_but_paths_and_ports(tmp_path):
    conf = render_config(tmp_path, tmp_path / "blobs", [7001, 7002], 9999)
    assert "server 127.0.0.1:7001" in conf and "server 127.0.0.1:7002" in conf and "10.0.0." not in conf
    for kept in ("auth_request /_edgepack/download-auth;", "proxy_pass_request_body off;", "X-Original-URI $request_uri;",
                 "keepalive 64;", "sendfile on;", "client_max_body_size 512m;", "internal;", "immutable"):
        assert kept in conf, kept
    with pytest.raises(AssertionError, match="directives, the test rewrite expects 1"):
        render_config(tmp_path, tmp_path, [1], 2, template="user x;\nhttp {\n}\n")


def _checkin(stack, device_id: str, token: str, seq: int, current: dict | None = None) -> dict:
    r = stack["client"].post(f"/v1/devices/{device_id}/checkin", json=checkin_body(seq, current),
                             headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_directed_device_gets_absolute_signed_urls_that_nginx_serves_byte_exact(stack, kit):
    c = stack["client"]
    token, _ = direct(c, kit, "dev-urls", "urls")
    d = _checkin(stack, "dev-urls", token, 1)
    v1 = kit["v1"]
    url = d["bundle"]["url"]
    assert url.startswith(f"{stack['blobs']}/sha256/{v1['digest'][:2]}/{v1['digest']}?"), url
    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    assert time.time() + 50 < expires <= time.time() + 61  # now + the 60 s TTL
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.content == v1["bytes"]
    assert "immutable" in r.headers["cache-control"]
    # Resume: the tail only, as 206 with the right Content-Range.
    n = len(v1["bytes"]) - 12345
    r = httpx.get(url, headers={"Range": f"bytes={n}-"}, timeout=10)
    assert r.status_code == 206 and r.content == v1["bytes"][n:]
    assert r.headers["content-range"] == f"bytes {n}-{len(v1['bytes']) - 1}/{len(v1['bytes'])}"
    # The delta the device gets once it runs v1 is signed the same way and served by nginx too.
    token2, _ = direct(c, kit, "dev-urls-2", "urls-2", version="v2")
    current = {"name": "toy", "version": "1.0.0", "digest": v1["digest"]}
    d2 = _checkin(stack, "dev-urls-2", token2, 1, current)
    delta_url = d2["delta"]["url"]
    assert delta_url.startswith(f"{stack['blobs']}/deltas/{v1['digest']}.{kit['v2']['digest']}.zst?"), delta_url
    r = httpx.get(delta_url, timeout=10)
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == d2["delta"]["digest"]


def test_expired_tampered_or_forged_urls_get_403_from_nginx(stack, kit):
    c = stack["client"]
    token, _ = direct(c, kit, "dev-forge", "forge")
    good = _checkin(stack, "dev-forge", token, 1)["bundle"]["url"]
    assert httpx.get(good, headers={"Range": "bytes=0-0"}, timeout=10).status_code == 206
    q = parse_qs(urlsplit(good).query)
    v1, v2 = kit["v1"]["digest"], kit["v2"]["digest"]
    blob = f"sha256/{v1[:2]}/{v1}"
    now = int(time.time())
    never_directed = good.split("?")[0].replace(v1, v2).replace(f"/{v1[:2]}/", f"/{v2[:2]}/") + "?" + urlsplit(good).query
    refused = {
        "expired": sign_url(stack["blobs"], blob, "dev-forge", now - 5, SECRET),
        "another device": good.replace("device=dev-forge", "device=dev-other"),
        "expiry pushed": good.replace(f"expires={q['expires'][0]}", f"expires={int(q['expires'][0]) + 10}"),
        "digest never directed (v2 is on the server)": never_directed,
        "signed with a guessed secret": sign_url(stack["blobs"], f"sha256/{v2[:2]}/{v2}", "dev-forge", now + 30, "guess" * 8),
        "unsigned": good.split("?")[0],
        "too long lived": sign_url(stack["blobs"], blob, "dev-forge", now + 86400, SECRET),
    }
    assert (stack["work"] / "data" / "blobs" / "sha256" / v2[:2] / v2).is_file()  # the bytes exist; only the grant is missing
    for why, url in refused.items():
        r = httpx.get(url, timeout=10)
        assert r.status_code == 403, (why, r.status_code)
        assert kit["v1"]["bytes"][:64] not in r.content and kit["v2"]["bytes"][:64] not in r.content
    # The check itself is not reachable from outside; the blob dir is never listed.
    assert httpx.get(stack["base"] + "/v1/internal/download-auth", headers={"X-Original-URI": good}).status_code == 404
    assert httpx.get(stack["base"] + "/blobs/sha256/").status_code == 403


def test_device_installs_through_nginx_resuming_and_no_bundle_byte_passes_through_python(stack, kit, tmp_path):
    c, relay = stack["client"], stack["relay"]
    token, _ = direct(c, kit, "dev-agent", "agent")
    v1 = kit["v1"]
    cache = tmp_path / "cache"
    (cache / "keys").mkdir(parents=True)
    shutil.copy(kit["pub"], cache / "keys" / "test.pub")
    chunks = {"n": 0}

    def drop_after_five_chunks(step: str) -> None:  # the link dies mid-body, once
        if step == "download:chunk":
            chunks["n"] += 1
            if chunks["n"] == 5:
                raise Unreachable("test: connection dropped mid-download")

    config = RuntimeConfig(CacheConfig(root=cache, trusted_keys=(load_public_key(kit["pub"]),)))
    options = OtaOptions(server=stack["base"], device_id="dev-agent", token=token, timeout_s=5.0, backoff_base_s=0.01,
                         backoff_cap_s=0.05, probation_tick_s=0.01, chunk_bytes=64 * 1024)
    logs: list[str] = []
    client = OtaClient(config, options, fault=drop_after_five_chunks, sleep=lambda s: None, rng=random.Random(0),
                       log=logs.append)
    with relay.lock:
        relay.requests.clear()
        before = relay.response_bytes

    assert client.run_once(wait=False) == "interrupted", logs
    offset = client.machine.data["offset"]
    assert offset == 5 * 64 * 1024, offset
    # The device stays offline past its URL's expiry: the stored URL is now refused by nginx.
    target = client.machine.data["target"]
    assert target["url"].startswith(stack["blobs"] + "/")
    stale = sign_url(stack["blobs"], f"sha256/{v1['digest'][:2]}/{v1['digest']}", "dev-agent", int(time.time()) - 1, SECRET)
    client.machine.update(target={**target, "url": stale})

    assert client.run_once(wait=False) == "committed", logs
    assert any("fresh" in line for line in logs), logs
    assert (cache / "ota" / "bundles" / f"{v1['digest']}.epk").read_bytes() == v1["bytes"]

    access = (stack["nginx"] / "access.log").read_text()
    path = f"/blobs/sha256/{v1['digest'][:2]}/{v1['digest']}"
    lines = [line for line in access.splitlines() if f"GET {path}?device=dev-agent&" in line]
    statuses = [re.search(r'" (\d{3}) (\d+)', line).groups() for line in lines]
    # the first attempt (200, dropped), the stale URL (403), the resume from the saved offset (206, the tail only);
    # sorted: nginx logs the dropped request whenever it notices the drop
    assert sorted(s for s, _ in statuses) == ["200", "206", "403"], lines
    assert [int(n) for s, n in statuses if s == "206"] == [len(v1["bytes"]) - offset], lines
    with relay.lock:
        sent_by_api = relay.response_bytes - before
        seen = list(relay.requests)
    # Python answered check-ins, events and signature checks; nginx sent the bundle.
    assert not [r for r in seen if "/bundles/" in r or "/deltas/" in r or "/blobs/" in r], seen
    assert sum(r.startswith("GET /v1/internal/download-auth") for r in seen) == 3, seen
    assert sent_by_api < 64 * 1024 < len(v1["bytes"]), (sent_by_api, len(v1["bytes"]))
