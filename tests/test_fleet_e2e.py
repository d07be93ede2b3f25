"""Fleet updates end to end: the real server, real device agents, real traffic.

``python -m edgepack server run`` (127.0.0.1, free port, tmp data dir, trusted key) and
N=4 device agents, each ``python -m edgepack_runtime.cli serve --ota-server ...``: the
inference daemon with the OTA client in a background thread, pre-installed with v1
by ``edgepack-runtime install`` and provisioned through the admin API into group
"fleet". A traffic thread keeps sending predictions to every daemon over its Unix
socket, so probation (fed by the daemon's /predict path) has signal.

The devices reach the server through :class:`Proxy`, a transparent TCP relay in this
process that writes an access log (method, path, Range header) and can throttle one
download; the server itself is unmodified.

Scenario: (a) a staged rollout of v2 reaches every device (the daemons and the server
agree); (b) three bad releases each halt at their first step with the right reason and
leave no device on them: v3a fails its golden self-test (caught by the installer before
the switch), v3b answers NaN on inputs like live traffic's but not on its golden inputs, so
the self-test passes; caught by probation's non-finite check on live traffic), v3c is
~25x slower (an extra Tanh(MatMul) chain multiplied by 0 and added; caught by
probation's p95-vs-previous-model check); (c) a device agent SIGKILLed mid-download of
a ~6 MB bundle resumes with ``Range: bytes=N-`` (N>0) and completes the install.

The quick (not slow) tests at the end cover the server-side health check: a check-in
whose health regressed (non-finite outputs, error rate, p95 vs the previous model's)
counts as a failure for the rollout and can halt it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import httpx
import numpy as np
import onnx
import pytest
from bundles import keys, make_bundle, raw_classifier
from onnx import helper, numpy_helper

from edgepack.server import rollout as logic
from edgepack.server.rollout import cohort_position
from net import UnixHTTPConnection, free_port

ADMIN = "admin-token-0123456789abcdef-fleet"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
N_DEVICES = 4
GROUP = "fleet"
X = [[0, 255, 10, 20], [1, 2, 3, 4], [200, 100, 50, 25]]
PROBATION = {"requests": 100, "seconds": 10, "max_error_rate": 0.05, "max_latency_ratio": 5.0}


# ------------------------------------------------------------------ bundles


def slow_classifier(layers: int = 320, width: int = 512) -> onnx.ModelProto:
    """raw_classifier(scale=2.0)'s exact scores, plus Tanh(MatMul) x ``layers`` on [N, width] (one shared
    weight, so the bundle stays ~1 MB) whose finite sum is multiplied by 0 and added: the same outputs,
    ~5 ms per 3-row request instead of ~10 us, i.e. well over 10x even the p95 that the 4x3 model shows
    on a busy 2-CPU test machine (0.15-0.7 ms: scheduling noise, not compute)."""
    base = raw_classifier(scale=2.0)
    rng = np.random.default_rng(7)
    nodes = list(base.graph.node)
    for node in nodes:
        if node.name == "mm":
            node.output[0] = "scores0"
    nodes.append(helper.make_node("MatMul", ["x", "slow_in"], ["s0"]))
    h = "s0"
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [h, "slow_w"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        h = f"t{i}"
    nodes += [helper.make_node("ReduceSum", [h, "axes"], ["red"], keepdims=1),
              helper.make_node("Mul", ["red", "zero"], ["nothing"]),
              helper.make_node("Add", ["scores0", "nothing"], ["scores"])]
    inits = list(base.graph.initializer) + [
        numpy_helper.from_array((rng.standard_normal((4, width)) * 0.5).astype(np.float32), "slow_in"),
        numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "slow_w"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    graph = helper.make_graph(nodes, "slow", list(base.graph.input), list(base.graph.output), inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def big_classifier(megabytes: float = 6.0) -> onnx.ModelProto:
    """raw_classifier(scale=5.0) carrying an unused random (incompressible) initializer: a large, good bundle."""
    model = raw_classifier(scale=5.0)
    pad = np.random.default_rng(11).standard_normal(int(megabytes * 1024 * 1024 / 4)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(pad, "padding"))
    return model


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet-bundles")
    priv, pub = keys(d)
    return {
        "pub": pub,
        "v1": make_bundle(d, priv, "1.0.0", raw_classifier(scale=1.0)),
        "v2": make_bundle(d, priv, "2.0.0", raw_classifier(scale=2.0)),
        # golden vectors from another model: fails the installer's self-test before any switch
        "v3a": make_bundle(d, priv, "3.0.0", raw_classifier(scale=3.0), golden_model=raw_classifier(scale=4.0)),
        # NaN only on inputs like live traffic's, finite on its golden inputs: the self-test PASSES
        "v3b": make_bundle(d, priv, "3.0.1", raw_classifier(nan=True)),
        "v3c": make_bundle(d, priv, "3.0.2", slow_classifier()),  # ~5 ms a request instead of ~10 us
        "v4": make_bundle(d, priv, "4.0.0", big_classifier()),
    }


# ------------------------------------------------------------------ plumbing




def wait_for(what: str, predicate: Callable[[], object], timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, ValueError, KeyError, httpx.HTTPError, http.client.HTTPException) as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))




def unix_json(path: str, method: str, target: str, payload=None, conn: Optional[UnixHTTPConnection] = None):
    own = conn is None
    conn = conn or UnixHTTPConnection(path)
    try:
        body = None if payload is None else json.dumps(payload).encode()
        conn.request(method, target, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        if own:
            conn.close()


class Proxy:
    """Transparent TCP relay to the server with an access log and an optional per-path throttle."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.log: List[dict] = []
        self.throttle: Dict[str, float] = {}  # path -> bytes per second
        self.lock = threading.Lock()
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        upstream = None
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = client.recv(65536)
                if not chunk:
                    return
                buf += chunk
            lines = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ")[:2]
            path, _, query = target.partition("?")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            with self.lock:
                self.log.append({"at": time.time(), "method": method, "path": path, "query": query,
                                 "range": headers.get("range")})
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            upstream.sendall(buf)

            def pump_up() -> None:
                try:
                    while True:
                        data = client.recv(65536)
                        if not data:
                            break
                        upstream.sendall(data)
                    upstream.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            threading.Thread(target=pump_up, daemon=True).start()
            while True:
                data = upstream.recv(16384)
                if not data:
                    break
                rate = self.throttle.get(path)
                client.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass

    def requests_for(self, path: str, query_has: str = "") -> List[dict]:
        with self.lock:
            return [entry for entry in self.log if entry["path"] == path and query_has in entry["query"]]

    def stop(self) -> None:
        self.stopped = True
        self.listener.close()


class Agent:
    """One device: cache, socket, token, and its `edgepack-runtime serve --ota-server` process."""

    def __init__(self, root: Path, sockdir: Path, device_id: str, token: str, server_url: str) -> None:
        self.id = device_id
        self.cache = root / device_id / "cache"
        self.socket = str(sockdir / f"{device_id}.sock")
        self.token_file = root / device_id / "token"
        self.token_file.parent.mkdir(parents=True, exist_ok=True)
        self.token_file.write_text(token + "\n")
        self.stderr = root / device_id / "agent.err"
        self.server_url = server_url
        self.proc: Optional[subprocess.Popen] = None

    def command(self) -> List[str]:
        return [sys.executable, "-m", "edgepack_runtime.cli", "serve", "--cache", str(self.cache), "--socket", self.socket,
                "--ota-server", self.server_url, "--device-id", self.id, "--token-file", str(self.token_file),
                "--ota-interval", "0.5"]

    def start(self) -> None:
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=err)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def info(self) -> dict:
        status, body = unix_json(self.socket, "GET", "/info")
        assert status == 200, body
        return body

    def version(self) -> Optional[str]:
        return (self.info().get("model") or {}).get("version")

    def ota_state(self) -> dict:
        try:
            return json.loads((self.cache / "ota" / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def log(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""


class Traffic:
    """Predictions to every daemon, continuously; remembers which versions each one answered with."""

    def __init__(self, agents: List[Agent]) -> None:
        self.agents = agents
        self.seen: Dict[str, set] = {a.id: set() for a in agents}
        self.ok: Dict[str, int] = {a.id: 0 for a in agents}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conns: Dict[str, Optional[UnixHTTPConnection]] = {a.id: None for a in self.agents}
        while not self.stop_event.is_set():
            for agent in self.agents:
                try:
                    if conns[agent.id] is None:
                        conns[agent.id] = UnixHTTPConnection(agent.socket, timeout=5.0)
                    status, body = unix_json(agent.socket, "POST", "/predict", {"raw": X}, conn=conns[agent.id])
                    if status == 200:
                        self.seen[agent.id].add(body["model"]["version"])
                        self.ok[agent.id] += 1
                except (OSError, ValueError, http.client.HTTPException):
                    conn = conns[agent.id]
                    if conn is not None:
                        conn.close()
                    conns[agent.id] = None
            self.stop_event.wait(0.01)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)


def server_command() -> List[str]:
    from edgepack.cli.app import app

    registered = any(getattr(g, "name", None) == "server" for g in app.registered_groups)
    return [sys.executable, "-m", "edgepack" if registered else "edgepack.cli.server_cmd", "server", "run"]


class Stack:
    """The server side: one SQLite-backed process (``sqlite-1``), or two PostgreSQL-backed replicas
    sharing one data directory behind a real nginx that balances the API and serves bundle files
    itself from signed URLs (``postgres-2-nginx``). Devices reach it through :class:`Proxy` (access
    log, throttle); in the nginx topology downloads go through a second relay, another origin."""

    def __init__(self, topology: str, tmp_path: Path, kit: dict) -> None:
        self.topology, self.tmp_path, self.kit = topology, tmp_path, kit
        self.data = tmp_path / "server-data"
        self.token_file = tmp_path / "admin.token"
        self.token_file.write_text(ADMIN + "\n")
        self.env = {**os.environ, "EDGEPACK_SERVER_TICK_INTERVAL_S": "0.2", "EDGEPACK_SERVER_POLL_INTERVAL_S": "1",
                    "EDGEPACK_SERVER_DEVICE_RATE_LIMIT": "0"}
        self.ports: List[int] = []
        self.procs: List[Optional[subprocess.Popen]] = []
        self.logs: List[Path] = []
        self._exit = contextlib.ExitStack()
        self.proxy: Optional[Proxy] = None
        self.download_proxy: Optional[Proxy] = None

    @property
    def nginx(self) -> bool:
        return self.topology != "sqlite-1"

    def start(self) -> str:
        """Start everything; returns the admin base URL."""
        if not self.nginx:
            self.ports = [free_port()]
            self.procs, self.logs = [None], [self.tmp_path / "server.log"]
            self._start_replica(0)
            self.proxy = self.download_proxy = Proxy(self.ports[0])
            return f"http://127.0.0.1:{self.ports[0]}"
        from nginx import running_nginx
        from pg import fresh_schema

        url = self._exit.enter_context(fresh_schema())
        front = free_port()
        self.proxy, self.download_proxy = Proxy(front), Proxy(front)
        self.env.update(EDGEPACK_SERVER_DB_URL=url, EDGEPACK_SERVER_DOWNLOAD_BASE_URL=f"{self.download_proxy.url}/blobs",
                        EDGEPACK_SERVER_DOWNLOAD_SECRET="e2e-replicas-share-one-download-secret-0123456789")
        done = subprocess.run(server_command()[:-1] + ["migrate", "--data", str(self.data)], env=self.env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        self.ports = [free_port(), free_port()]
        self.procs, self.logs = [None, None], [self.tmp_path / "server-a.log", self.tmp_path / "server-b.log"]
        for i in range(2):
            self._start_replica(i)
        base = self._exit.enter_context(running_nginx(self.tmp_path / "nginx", self.data / "blobs", self.ports, port=front))
        return base

    def _start_replica(self, i: int) -> None:
        with open(self.logs[i], "ab") as log:
            self.procs[i] = subprocess.Popen(
                server_command() + ["--data", str(self.data), "--port", str(self.ports[i]), "--trusted-key",
                                    str(self.kit["pub"]), "--admin-token-file", str(self.token_file)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env)
        wait_for(f"replica {i} /healthz", lambda: self.procs[i].poll() is None and httpx.get(
            f"http://127.0.0.1:{self.ports[i]}/healthz", timeout=1).status_code == 200, 30)

    def sigkill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait(10)
        assert self.procs[i].returncode == -signal.SIGKILL

    def restart(self, i: int) -> None:
        self._start_replica(i)

    def alive(self) -> bool:
        return all(p is not None and p.poll() is None for p in self.procs)

    def bundle_path(self, device_id: str, digest: str) -> str:
        return f"/blobs/sha256/{digest[:2]}/{digest}" if self.nginx else f"/v1/devices/{device_id}/bundles/{digest}"

    def bundle_requests(self, device_id: str, digest: str) -> List[dict]:
        """The device's download requests of that bundle, as the relay in front of them saw them."""
        if self.nginx:
            return self.download_proxy.requests_for(self.bundle_path(device_id, digest), f"device={device_id}&")
        return self.proxy.requests_for(self.bundle_path(device_id, digest))

    def log_text(self) -> str:
        return "\n".join(f"===== {p.name} =====\n" + p.read_text(errors="replace")[-12000:] for p in self.logs if p.exists())

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.kill()
            if p is not None:
                p.wait(10)
        for proxy in {id(x): x for x in (self.proxy, self.download_proxy) if x is not None}.values():
            proxy.stop()
        self._exit.close()


# ---------------------------------------------------------------- the e2e test


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["sqlite-1", "postgres-2-nginx"])
def test_fleet_rollout_bad_releases_and_resumed_download(tmp_path, kit, topology):
    """The issue-5 scenario; with ``postgres-2-nginx`` also: one replica SIGKILLed mid-rollout (and
    restarted later) loses nothing, and no bundle byte passes through a Python process."""
    t_start = time.monotonic()
    sockdir = Path(tempfile.mkdtemp(prefix="epf-"))  # Unix socket paths must stay short
    stack = Stack(topology, tmp_path, kit)
    agents: List[Agent] = []
    traffic: Optional[Traffic] = None
    c = httpx.Client(headers=AUTH, timeout=15)

    def phase(name: str) -> None:
        print(f"[fleet-e2e {topology} {time.monotonic() - t_start:6.1f}s] {name}", flush=True)

    try:
        c.base_url = stack.start()
        proxy = stack.proxy

        def upload(name: str) -> dict:
            r = c.post("/v1/admin/bundles", content=kit[name].read_bytes(), headers={"Content-Type": "application/octet-stream"})
            assert r.status_code in (200, 201), r.text
            return r.json()

        bundles = {name: upload(name) for name in ("v1", "v2", "v3a", "v3b", "v3c", "v4")}

        # ---- provision N devices, pre-install v1 with `edgepack-runtime install`, start the agents
        for i in range(N_DEVICES):
            r = c.post("/v1/admin/devices", json={"id": f"d{i}", "group": GROUP, "tags": ["e2e"], "profile": "x86-gateway"})
            assert r.status_code == 201, r.text
            agents.append(Agent(tmp_path / "devices", sockdir, f"d{i}", r.json()["token"], proxy.url))
        installers = [subprocess.Popen([sys.executable, "-m", "edgepack_runtime.cli", "install", str(kit["v1"]), "--cache",
                                        str(a.cache), "--key", str(kit["pub"])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                      for a in agents]
        for a, p in zip(agents, installers):
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0, f"{a.id}: {out.decode(errors='replace')}"
        for a in agents:
            a.start()
        wait_for("every daemon serving v1", lambda: all(a.version() == "1.0.0" for a in agents), 45)
        wait_for("every device checked in on v1", lambda: all(
            (d.get("current") or {}).get("version") == "1.0.0" for d in c.get("/v1/admin/devices").json()), 30)
        traffic = Traffic(agents)
        traffic.start()
        wait_for("traffic on every daemon", lambda: all(n >= 50 for n in traffic.ok.values()), 30)
        phase("fleet up on v1")

        def rollout_view(rid: str) -> dict:
            r = c.get(f"/v1/admin/rollouts/{rid}")
            assert r.status_code == 200, r.text
            return r.json()

        def server_versions() -> Dict[str, Optional[str]]:
            return {d["id"]: (d.get("current") or {}).get("version") for d in c.get("/v1/admin/devices", params={"group": GROUP}).json()}

        def daemon_versions() -> Dict[str, Optional[str]]:
            return {a.id: a.version() for a in agents}

        def fleet_on(version: str) -> bool:
            return set(daemon_versions().values()) == {version} and set(server_versions().values()) == {version}

        # ---- (a) staged rollout of v2 reaches every device
        r = c.post("/v1/admin/rollouts", json={"bundle_id": bundles["v2"]["id"], "group": GROUP, "steps": [25, 50, 100],
                                               "soak_seconds": 1, "min_devices_succeeded": 1, "max_failure_rate": 0.1,
                                               "halt_min_count": 1, "probation": PROBATION})
        assert r.status_code == 201, r.text
        rid_v2 = r.json()["id"]

        def v2_done() -> bool:
            view = rollout_view(rid_v2)
            assert view["status"] in ("active", "completed"), view
            return (view["status"] == "completed" and len(view["members"]) == N_DEVICES
                    and all(m["state"] == "committed" for m in view["members"]) and fleet_on("2.0.0"))

        if stack.nginx:
            # one replica dies mid-rollout (SIGKILL: nothing flushed, requests in flight); nginx sends
            # everything to the survivor
            wait_for("the first cohort to join", lambda: len(rollout_view(rid_v2)["members"]) >= 1, 30, 0.05)
            stack.sigkill(0)
            phase("(a) replica a SIGKILLed mid-rollout")
        wait_for("the v2 rollout to complete on every device", v2_done, 60, 0.25)
        view = rollout_view(rid_v2)
        assert [h["event"] for h in view["history"]] == ["created", "advanced", "advanced", "completed"]
        assert daemon_versions() == server_versions() == {a.id: "2.0.0" for a in agents}
        if stack.nginx:
            stack.restart(0)
            assert httpx.get(f"http://127.0.0.1:{stack.ports[0]}/v1/admin/rollouts/{rid_v2}", headers=AUTH).json() == view
        phase("(a) v2 on every device")

        # ---- (b) three bad releases, each halts at its first step
        def create_first_step_cohort(bundle: dict) -> tuple:
            """A rollout whose 25% first step holds some but not all devices (cohorts depend on the random id)."""
            for _ in range(30):
                r = c.post("/v1/admin/rollouts", json={"bundle_id": bundle["id"], "group": GROUP, "steps": [25, 100],
                                                       "soak_seconds": 3600, "min_devices_succeeded": 1,
                                                       "max_failure_rate": 0.1, "halt_min_count": 1, "probation": PROBATION})
                assert r.status_code == 201, r.text
                rid = r.json()["id"]
                cohort = {a.id for a in agents if cohort_position(rid, a.id) < 25}
                if 0 < len(cohort) < N_DEVICES:
                    return rid, cohort
                assert c.post(f"/v1/admin/rollouts/{rid}/abort").status_code == 200
            raise AssertionError("no rollout id gave a usable first cohort")

        bad = [("v3a", "3.0.0", "self_test"), ("v3b", "3.0.1", "nonfinite"), ("v3c", "3.0.2", "latency_regression")]
        for name, version, kind in bad:
            rid, cohort = create_first_step_cohort(bundles[name])
            halted = wait_for(f"{name} to halt", lambda: rollout_view(rid)["status"] == "halted" and rollout_view(rid), 60, 0.2)
            assert halted["step_index"] == 0 and halted["current_percent"] == 25, halted
            assert kind in {h["code"] for h in halted["halt_reasons"]}, halted["halt_reasons"]
            assert halted["halt_message"] and kind in halted["halt_message"], halted["halt_message"]
            summary = c.get("/v1/admin/summary").json()
            shown = next(x for x in summary["rollouts"] if x["id"] == rid)
            assert shown["status"] == "halted" and kind in {h["code"] for h in shown["halt_reasons"]} and kind in shown["halt_message"]

            def settled() -> bool:
                members = rollout_view(rid)["members"]
                return (all(m["state"] in ("failed", "reverted") for m in members) and fleet_on("2.0.0")
                        and all(a.ota_state().get("state") == "idle" for a in agents))

            wait_for(f"every device that took {name} to be back on v2", settled, 60, 0.25)
            members = {m["device_id"]: m for m in rollout_view(rid)["members"]}
            assert members and set(members) <= cohort, (members, cohort)
            # caught on the device (installer self-test / probation on live traffic), reported as an event
            events = c.get("/v1/admin/events", params={"rollout_id": rid, "limit": 1000}).json()
            caught_by = "self_test_failed" if name == "v3a" else "probation_failed"
            assert any(e["type"] == caught_by and e["reason_code"] == kind for e in events), events
            if name != "v3a":
                assert {e["device_id"] for e in events if e["type"] == "rolled_back"} == {
                    e["device_id"] for e in events if e["type"] == "installed"}, events
            assert any(m["failure_code"] == kind for m in members.values()), members
            assert daemon_versions() == server_versions() == {a.id: "2.0.0" for a in agents}  # no ghost installs
            digest = bundles[name]["digest"]
            for a in agents:
                if a.id not in cohort:
                    assert version not in traffic.seen[a.id], (a.id, name)
                    assert a.id not in members
                    events = c.get("/v1/admin/events", params={"device_id": a.id, "limit": 1000}).json()
                    assert not [e for e in events if e["digest"] == digest or e["rollout_id"] == rid], (a.id, name)
                    assert not stack.bundle_requests(a.id, digest), (a.id, name)
            if name != "v3a":  # these two were switched to and served live traffic before probation failed them
                assert any(version in traffic.seen[d] for d in members), (name, traffic.seen)
            else:
                assert not any(version in traffic.seen[a.id] for a in agents)
            assert c.post(f"/v1/admin/rollouts/{rid}/rollback").json()["status"] == logic.ROLLED_BACK  # frees the group
            phase(f"(b) {name} halted ({kind}); cohort {sorted(cohort)} back on v2")

        # ---- (c) SIGKILL an agent mid-download of a large bundle; the restart resumes with Range
        big = bundles["v4"]
        assert big["size"] > 5_000_000
        victim = agents[0]
        big_path = stack.bundle_path(victim.id, big["digest"])
        stack.download_proxy.throttle[big_path] = 1_500_000.0  # bytes/s: the download takes ~4 s
        r = c.post("/v1/admin/rollouts", json={"bundle_id": big["id"], "group": GROUP, "steps": [100], "soak_seconds": 0,
                                               "min_devices_succeeded": 0, "max_failure_rate": 0.1, "halt_min_count": 1,
                                               "probation": {**PROBATION, "max_latency_ratio": 100.0}})
        assert r.status_code == 201, r.text
        rid_big = r.json()["id"]
        wait_for("the victim's download to pass 512 KiB", lambda: victim.ota_state().get("state") == "downloading"
                 and int(victim.ota_state().get("offset") or 0) >= 512 * 1024, 30, 0.02)
        victim.kill()
        saved = victim.ota_state()
        partial = victim.cache / "ota" / "download.partial"
        assert saved["state"] == "downloading" and 0 < saved["offset"] < big["size"], saved
        assert partial.stat().st_size >= saved["offset"]
        before = len(stack.bundle_requests(victim.id, big["digest"]))
        assert before == 1 and stack.bundle_requests(victim.id, big["digest"])[0]["range"] is None
        phase(f"(c) killed {victim.id} at offset {saved['offset']} of {big['size']}")
        stack.download_proxy.throttle.pop(big_path)
        victim.start()
        wait_for("v4 on every device (daemons and server)", lambda: fleet_on("4.0.0"), 60, 0.25)
        resumed = stack.bundle_requests(victim.id, big["digest"])[before:]
        assert resumed and resumed[0]["range"] == f"bytes={saved['offset']}-", resumed
        assert all(e["range"] for e in resumed), resumed  # never started over from byte 0
        assert daemon_versions() == server_versions() == {a.id: "4.0.0" for a in agents}
        wait_for("the v4 rollout to complete", lambda: rollout_view(rid_big)["status"] == "completed", 30, 0.25)
        assert {m["state"] for m in rollout_view(rid_big)["members"]} == {"committed"}
        phase("(c) resumed with Range and installed")
        assert all(a.proc.poll() is None for a in agents), "an agent died"
        assert stack.alive()
        if stack.nginx:  # every bundle byte came from nginx: the API was never asked for one
            api_downloads = [e for e in proxy.log if "/bundles/" in e["path"] or "/deltas/" in e["path"]]
            assert not api_downloads, api_downloads[:3]
            assert len([e for e in stack.download_proxy.log if e["path"].startswith("/blobs/")]) > 2 * N_DEVICES
    except BaseException:
        print("\n" + stack.log_text(), flush=True)
        for a in agents:
            print(f"\n===== agent {a.id} (exit {a.proc.poll() if a.proc else None}) =====\n" + a.log()[-8000:], flush=True)
            try:
                print(f"ota: {json.dumps(a.info().get('ota'))}\nstate.json: {json.dumps(a.ota_state())}", flush=True)
            except (OSError, ValueError, AssertionError, http.client.HTTPException) as exc:
                print(f"(no /info: {exc!r})", flush=True)
        try:
            print("\n===== rollouts =====\n" + json.dumps(c.get("/v1/admin/rollouts").json(), indent=1)[-6000:], flush=True)
            print("\n===== events =====\n" + "\n".join(json.dumps(e) for e in c.get("/v1/admin/events", params={"limit": 60}).json()), flush=True)
        except httpx.HTTPError as exc:
            print(f"(no server state: {exc!r})", flush=True)
        if stack.download_proxy is not None:
            print("\n===== proxy log (downloads) =====\n" + "\n".join(
                json.dumps(e) for e in stack.download_proxy.log if "/bundles/" in e["path"] or "/deltas/" in e["path"]
                or e["path"].startswith("/blobs/")), flush=True)
        raise
    finally:
        if traffic is not None:
            traffic.stop()
        for a in agents:
            a.kill()
        stack.stop()
        c.close()
        shutil.rmtree(sockdir, ignore_errors=True)


# ------------------------------------------ server-side health check (quick)


@pytest.mark.parametrize("argv, problem", [
    (["--device-id", "d"], "only make sense with --ota-server"),
    (["--ota-server", "http://127.0.0.1:1"], "needs --device-id"),
    (["--ota-server", "http://127.0.0.1:1", "--device-id", "d", "--token-file", "/nonexistent/token"], "Cannot read the device token"),
])
def test_serve_ota_options_are_checked(argv, problem, tmp_path):
    from edgepack_runtime import cli, daemon
    from edgepack_runtime.errors import EdgepackError

    args = cli.build_parser().parse_args(["serve", "--cache", str(tmp_path), *argv])
    with pytest.raises(EdgepackError, match=problem):
        daemon.options_from_args(args, {})


def test_serve_ota_options_parse(tmp_path):
    from edgepack_runtime import cli, daemon

    (tmp_path / "token").write_text("tok-123\n")
    args = cli.build_parser().parse_args(["serve", "--cache", str(tmp_path), "--ota-server", "http://127.0.0.1:9",
                                          "--device-id", "d7", "--token-file", str(tmp_path / "token"), "--ota-interval", "0.5"])
    ota = daemon.options_from_args(args, {}).ota
    assert (ota.server, ota.device_id, ota.token, ota.interval_s) == ("http://127.0.0.1:9", "d7", "tok-123", 0.5)
    assert daemon.options_from_args(cli.build_parser().parse_args(["serve", "--cache", str(tmp_path)]), {}).ota is None


@pytest.mark.parametrize("health, baseline, expected", [
    (None, None, None),
    ({"requests": 3, "errors": 0, "nonfinite": 1, "p95_ms": 1.0}, 1.0, "nonfinite"),       # any NaN fails at once
    ({"requests": 10, "errors": 5, "nonfinite": 0, "p95_ms": 1.0}, 1.0, None),             # too few requests to judge
    ({"requests": 100, "errors": 6, "nonfinite": 0, "p95_ms": 1.0}, 1.0, "error_rate"),    # 6% > 5%
    ({"requests": 100, "errors": 5, "nonfinite": 0, "p95_ms": 1.0}, 1.0, None),
    ({"requests": 100, "errors": 0, "nonfinite": 0, "p95_ms": 3.1}, 1.0, "latency_regression"),
    ({"requests": 100, "errors": 0, "nonfinite": 0, "p95_ms": 2.9}, 1.0, None),
    ({"requests": 100, "errors": 0, "nonfinite": 0, "p95_ms": 30.0}, None, None),          # no baseline: no verdict
])
def test_health_failure_rules(health, baseline, expected):
    got = logic.health_failure(health, {"requests": 50, "max_error_rate": 0.05, "max_latency_ratio": 3.0}, baseline)
    assert (got[0] if got else None) == expected
    if got:
        assert "check-in health" in got[1]


def test_checkin_health_regression_counts_as_failure_and_halts(tmp_path, kit, db_url):
    from fastapi.testclient import TestClient

    from edgepack.server.app import create_app
    from edgepack.server.settings import ServerSettings
    from edgepack.server.storage import open_storage

    settings = ServerSettings.for_tests(tmp_path / "data", ADMIN, trusted_key_files=(kit["pub"],), db_url=db_url)
    client = TestClient(create_app(settings, open_storage(settings.db_url), run_ticker=False))

    def up(name: str) -> dict:
        return client.post("/v1/admin/bundles", content=kit[name].read_bytes(), headers=AUTH).json()

    v1, v2 = up("v1"), up("v2")
    ref = {k: v1[k] for k in ("name", "version", "digest")}
    tokens = {d: client.post("/v1/admin/devices", json={"id": d, "group": "g"}, headers=AUTH).json()["token"]
              for d in ("a", "b", "c")}
    seqs = {d: 0 for d in tokens}

    def checkin(dev: str, current: dict, health: dict) -> dict:
        seqs[dev] += 1
        r = client.post(f"/v1/devices/{dev}/checkin", headers={"Authorization": f"Bearer {tokens[dev]}"},
                        json={"seq": seqs[dev], "state": "idle", "current": current, "health": health})
        assert r.status_code == 200, r.text
        return r.json()

    healthy = {"serving": True, "requests": 500, "errors": 0, "p95_ms": 0.02, "nonfinite": 0}
    for dev in tokens:
        checkin(dev, ref, healthy)
    rid = client.post("/v1/admin/rollouts", headers=AUTH, json={
        "bundle_id": v2["id"], "group": "g", "steps": [100], "soak_seconds": 3600, "min_devices_succeeded": 1,
        "max_failure_rate": 0.4, "halt_min_count": 1, "probation": {"requests": 50}}).json()["id"]
    assert checkin("a", ref, healthy)["action"] == "update"
    new = {k: v2[k] for k in ("name", "version", "digest")}
    # "a" runs v2: a p95 of 10x the previous model's (the median of the devices still on v1) is a regression
    assert checkin("a", new, {**healthy, "p95_ms": 0.2})["action"] == "rollback"  # 1 of 1 failed: halted at once
    got = client.get(f"/v1/admin/rollouts/{rid}", headers=AUTH).json()
    assert got["status"] == "halted" and [h["code"] for h in got["halt_reasons"]] == ["latency_regression"]
    member = got["members"][0]
    assert (member["device_id"], member["state"], member["failure_code"]) == ("a", "failed", "latency_regression")
    assert "0.02" in member["failure_detail"]
    # the device obeys: back on v1, the server follows its report, nothing else is directed
    assert checkin("a", ref, healthy)["action"] == "none"
    assert client.get("/v1/admin/devices/a", headers=AUTH).json()["current"]["version"] == "1.0.0"
    assert checkin("b", ref, healthy)["action"] == "none"


def test_healthy_checkins_on_the_new_model_do_not_fail_it(tmp_path, kit, db_url):
    from fastapi.testclient import TestClient

    from edgepack.server.app import create_app
    from edgepack.server.settings import ServerSettings
    from edgepack.server.storage import open_storage

    settings = ServerSettings.for_tests(tmp_path / "data", ADMIN, trusted_key_files=(kit["pub"],), db_url=db_url)
    client = TestClient(create_app(settings, open_storage(settings.db_url), run_ticker=False))
    v1 = client.post("/v1/admin/bundles", content=kit["v1"].read_bytes(), headers=AUTH).json()
    v2 = client.post("/v1/admin/bundles", content=kit["v2"].read_bytes(), headers=AUTH).json()
    token = client.post("/v1/admin/devices", json={"id": "a", "group": "g"}, headers=AUTH).json()["token"]
    h = {"Authorization": f"Bearer {token}"}
    rid = client.post("/v1/admin/rollouts", headers=AUTH, json={
        "bundle_id": v2["id"], "group": "g", "steps": [100], "soak_seconds": 0, "min_devices_succeeded": 1,
        "max_failure_rate": 0.1, "halt_min_count": 1}).json()["id"]
    ref1 = {k: v1[k] for k in ("name", "version", "digest")}
    ref2 = {k: v2[k] for k in ("name", "version", "digest")}
    health = {"serving": True, "requests": 10, "errors": 5, "p95_ms": 1.0, "nonfinite": 0}  # too few requests to judge
    assert client.post("/v1/devices/a/checkin", headers=h, json={"seq": 1, "state": "idle", "current": ref1}).json()["action"] == "update"
    assert client.post("/v1/devices/a/checkin", headers=h, json={"seq": 2, "state": "idle", "current": ref2, "health": health}).status_code == 200
    got = client.get(f"/v1/admin/rollouts/{rid}", headers=AUTH).json()
    assert got["status"] == "active" and got["members"][0]["state"] == "installed"
    # once it has enough requests, a NaN in production fails it even after probation
    bad = {**health, "requests": 100, "errors": 0, "nonfinite": 2}
    client.post("/v1/devices/a/checkin", headers=h, json={"seq": 3, "state": "idle", "current": ref2, "health": bad})
    got = client.get(f"/v1/admin/rollouts/{rid}", headers=AUTH).json()
    assert got["status"] == "halted" and got["halt_reasons"][0]["code"] == "nonfinite"
