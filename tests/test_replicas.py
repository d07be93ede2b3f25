"""Several server replicas on one PostgreSQL database.

Real ``edgepack server run`` processes (same data/blob directory, one PostgreSQL schema)
and simulated devices that check in through whichever replica they happen to reach,
concurrently. What must hold (issue 9): cohort assignment, step advancement and
auto-halt happen exactly once; the member counts the cheap checks rely on stay equal
to the members; and a replica SIGKILLed mid-rollout loses nothing that it
acknowledged while the other keeps serving.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from bundles import keys, make_bundle, raw_classifier

from net import free_port
from pg import fresh_schema, sql_rows

ADMIN = "admin-token-0123456789abcdef-replicas"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    d = tmp_path_factory.mktemp("replica-bundles")
    priv, pub = keys(d)
    return {"pub": pub, "v1": make_bundle(d, priv, "1.0.0", raw_classifier(scale=1.0)),
            "v2": make_bundle(d, priv, "2.0.0", raw_classifier(scale=2.0))}


@pytest.fixture
def pg_url():
    with fresh_schema() as url:
        yield url


class Replica:
    """One ``edgepack server run`` process against the shared database and data directory."""

    def __init__(self, name: str, workdir: Path, kit: dict, db_url: str) -> None:
        self.name, self.workdir, self.kit, self.db_url = name, workdir, kit, db_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        token_file = self.workdir / "admin.token"
        token_file.write_text(ADMIN + "\n")
        env = {**os.environ, "EDGEPACK_SERVER_TICK_INTERVAL_S": "0.2", "EDGEPACK_SERVER_DEVICE_RATE_LIMIT": "0",
               "EDGEPACK_SERVER_DOWNLOAD_SECRET": "replicas-share-this-download-secret-0123456789"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgepack", "server", "run", "--data", str(self.workdir / "data"), "--port",
                 str(self.port), "--trusted-key", str(self.kit["pub"]), "--admin-token-file", str(token_file),
                 "--db-url", self.db_url], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, f"replica {self.name} exited:\n{self.log.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=0.5).status_code == 200:
                    return
            assert time.monotonic() < deadline, f"replica {self.name} did not start:\n{self.log.read_text()}"
            time.sleep(0.1)

    def sigkill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        assert self.proc.returncode == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def replicas(tmp_path: Path, kit: dict, db_url: str, n: int = 2) -> Iterator[list[Replica]]:
    # The operator's order: migrate once, then start the replicas (which find nothing left to apply).
    done = subprocess.run([sys.executable, "-m", "edgepack", "server", "migrate", "--data", str(tmp_path / "data"),
                           "--db-url", db_url], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "Applied migrations" in done.stdout, done.stdout + done.stderr
    started = [Replica(chr(ord("a") + i), tmp_path, kit, db_url) for i in range(n)]
    try:
        for r in started:
            r.start()
        yield started
    finally:
        for r in started:
            r.stop()
        for r in started:
            if "Traceback" in r.log.read_text(errors="replace"):
                print(f"===== replica {r.name} log =====\n{r.log.read_text(errors='replace')[-6000:]}")


class SimDevice:
    """A device speaking the protocol (seq, check-in, events) to whichever replica it is given."""

    def __init__(self, device_id: str, token: str, current: dict) -> None:
        self.id, self.token, self.seq, self.current = device_id, token, 0, current
        self.acked_seq = 0  # highest seq a replica answered 200 for
        self.acked_events: list[tuple[int, str]] = []

    def _post(self, client: httpx.Client, path: str, body: dict) -> httpx.Response:
        return client.post(path, json=body, headers={"Authorization": f"Bearer {self.token}"})

    def checkin(self, client: httpx.Client) -> httpx.Response:
        self.seq += 1
        r = self._post(client, f"/v1/devices/{self.id}/checkin", {
            "seq": self.seq, "state": "idle", "current": self.current, "previous": None,
            "health": {"serving": True, "requests": 100, "errors": 0, "p95_ms": 2.0, "nonfinite": 0, "uptime_s": 10},
            "runtime_version": "0.1.0", "engines": ["onnxruntime"], "summaries": {}})
        if r.status_code == 200:
            self.acked_seq = self.seq
        return r

    def events(self, client: httpx.Client, *items: dict) -> httpx.Response:
        batch = []
        for item in items:
            self.seq += 1
            batch.append({"seq": self.seq, "at": 1.0, **item})
        r = self._post(client, f"/v1/devices/{self.id}/events", {"events": batch})
        if r.status_code == 200:
            self.acked_seq = self.seq
            self.acked_events += [(e["seq"], e["type"]) for e in batch]
        return r


def _setup_fleet(admin: httpx.Client, kit: dict, n_devices: int, group: str) -> tuple[dict, dict, list[SimDevice]]:
    bundles = {}
    for name in ("v1", "v2"):
        r = admin.post("/v1/admin/bundles", content=kit[name].read_bytes(), headers={"Content-Type": "application/octet-stream"})
        assert r.status_code in (200, 201), r.text
        bundles[name] = r.json()
    v1 = {k: bundles["v1"][k] for k in ("name", "version", "digest")}
    devices = []
    for i in range(n_devices):
        r = admin.post("/v1/admin/devices", json={"id": f"{group}-{i:03d}", "group": group})
        assert r.status_code == 201, r.text
        devices.append(SimDevice(f"{group}-{i:03d}", r.json()["token"], v1))
    return bundles["v1"], bundles["v2"], devices


def _drive(devices: list[SimDevice], urls: list[str], rollout_id: str, target: dict, stop: threading.Event,
           statuses: Counter, lock: threading.Lock, fail_ids: frozenset = frozenset(), dead: set | None = None) -> None:
    """Check each device in through a random live replica until ``stop``; install what it is told to."""
    clients = {u: httpx.Client(base_url=u, timeout=20) for u in urls}
    rng = random.Random(devices[0].id)
    try:
        while not stop.is_set():
            for d in devices:
                live = [u for u in urls if not dead or u not in dead]
                url = rng.choice(live)
                try:
                    r = d.checkin(clients[url])
                except httpx.TransportError:
                    with lock:
                        statuses["transport_error"] += 1
                    continue
                with lock:
                    statuses[r.status_code] += 1
                    statuses[url] += r.status_code == 200
                if r.status_code != 200:
                    continue
                body = r.json()
                if body["action"] == "update" and body["rollout_id"] == rollout_id and d.current["digest"] != target["digest"]:
                    ev = {"rollout_id": rollout_id, "digest": target["digest"], "version": target["version"]}
                    if d.id in fail_ids:
                        items = ({"type": "downloaded", **ev}, {"type": "installed", **ev},
                                 {"type": "probation_failed", **ev, "reason": {"code": "error_rate", "detail": "50% errors"}})
                    else:
                        items = ({"type": "downloaded", **ev}, {"type": "installed", **ev}, {"type": "committed", **ev})
                    try:
                        e = d.events(clients[rng.choice(live)], *items)
                    except httpx.TransportError:
                        continue
                    with lock:
                        statuses[f"events {e.status_code}"] += 1
                    if e.status_code == 200 and d.id not in fail_ids:
                        d.current = {k: target[k] for k in ("name", "version", "digest")}
            time.sleep(0.005)
    finally:
        for c in clients.values():
            c.close()


@contextlib.contextmanager
def driving(devices: list[SimDevice], n_threads: int, stop: threading.Event, **kwargs) -> Iterator[None]:
    """``n_threads`` threads run :func:`_drive` over slices of ``devices`` until the block ends."""
    threads = [threading.Thread(target=_drive, args=(devices[i::n_threads],), kwargs={"stop": stop, **kwargs}, daemon=True)
               for i in range(n_threads)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def _wait_completed(admin: httpx.Client, rid: str, devices: list[SimDevice], target: dict) -> None:
    _wait("every device on the new version", lambda: all(d.current["digest"] == target["digest"] for d in devices), 90)
    _wait("the rollout to complete", lambda: admin.get(f"/v1/admin/rollouts/{rid}").json()["status"] == "completed", 30)


def _wait(what: str, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def _counts_match_members(db_url: str, rollout_id: str) -> None:
    kept = {s: n for s, n in sql_rows(db_url, f"SELECT state, n FROM rollout_member_counts WHERE rollout_id = '{rollout_id}'") if n}
    real = dict(sql_rows(db_url, f"SELECT state, COUNT(*) FROM rollout_members WHERE rollout_id = '{rollout_id}' GROUP BY state"))
    assert kept == real


def test_concurrent_checkins_on_two_replicas_advance_each_step_exactly_once(tmp_path, kit, pg_url):
    with replicas(tmp_path, kit, pg_url) as (a, b):
        admin = httpx.Client(base_url=a.url, headers=AUTH, timeout=20)
        _, v2, devices = _setup_fleet(admin, kit, 40, "field")
        # soak 0: every check-in that sees a finished step tries to advance it, on both replicas at once
        r = httpx.post(f"{b.url}/v1/admin/rollouts", headers=AUTH, json={
            "bundle_id": v2["id"], "group": "field", "steps": [10, 25, 50, 100], "soak_seconds": 0,
            "min_devices_succeeded": 1, "max_failure_rate": 0.5, "halt_min_count": 1000})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        stop, statuses, lock = threading.Event(), Counter(), threading.Lock()
        with driving(devices, 8, stop, urls=[a.url, b.url], rollout_id=rid, target=v2, statuses=statuses, lock=lock):
            _wait_completed(admin, rid, devices, v2)
        view_a = admin.get(f"/v1/admin/rollouts/{rid}").json()
        view_b = httpx.get(f"{b.url}/v1/admin/rollouts/{rid}", headers=AUTH).json()
        events = [h["event"] for h in view_a["history"]]
        assert events == ["created", "advanced", "advanced", "advanced", "completed"], view_a["history"]
        assert [h["detail"] for h in view_a["history"] if h["event"] == "advanced"] == [
            "step 1 at 25%", "step 2 at 50%", "step 3 at 100%"]
        assert len(view_a["members"]) == len(devices) and {m["state"] for m in view_a["members"]} == {"committed"}
        assert view_a == view_b  # both replicas read the same state
        _counts_match_members(pg_url, rid)
        # nothing failed but the expected busy answers of a collision
        assert set(statuses) - {a.url, b.url} <= {200, 503, "events 200", "events 503"}, statuses
        assert statuses[a.url] >= len(devices) and statuses[b.url] >= len(devices), statuses  # both replicas served


def test_failures_reported_through_both_replicas_halt_the_rollout_once(tmp_path, kit, pg_url):
    with replicas(tmp_path, kit, pg_url) as (a, b):
        admin = httpx.Client(base_url=a.url, headers=AUTH, timeout=20)
        _, v2, devices = _setup_fleet(admin, kit, 30, "lab")
        r = admin.post("/v1/admin/rollouts", json={
            "bundle_id": v2["id"], "group": "lab", "steps": [100], "soak_seconds": 3600, "min_devices_succeeded": 1,
            "max_failure_rate": 0.05, "halt_min_count": 3})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        stop, statuses, lock = threading.Event(), Counter(), threading.Lock()
        failing = frozenset(d.id for d in devices[::3])  # 10 of 30 fail their probation
        with driving(devices, 6, stop, urls=[a.url, b.url], rollout_id=rid, target=v2, statuses=statuses, lock=lock,
                     fail_ids=failing):
            _wait("the halt", lambda: admin.get(f"/v1/admin/rollouts/{rid}").json()["status"] == "halted", 60)
            time.sleep(1.0)  # more failures keep arriving through both replicas after the halt
        view = admin.get(f"/v1/admin/rollouts/{rid}").json()
        assert view["status"] == "halted"
        assert [h["event"] for h in view["history"]] == ["created", "halted"], view["history"]
        # The failing devices report probation_failed with reason code "error_rate": that is the kind,
        # and only devices that really failed are named (was: `== {...} or halt_reasons`, true for any list).
        assert view["halt_reasons"] and {h["code"] for h in view["halt_reasons"]} == {"error_rate"}, view["halt_reasons"]
        assert {d for h in view["halt_reasons"] for d in h["devices"]} <= failing, view["halt_reasons"]
        members = view["members"]
        assert len({m["device_id"] for m in members}) == len(members)  # each device joined once
        _counts_match_members(pg_url, rid)
        assert set(statuses) - {a.url, b.url} <= {200, 503, "events 200", "events 503"}, statuses


def test_sigkill_of_one_replica_mid_rollout_loses_nothing_and_the_other_keeps_serving(tmp_path, kit, pg_url):
    with replicas(tmp_path, kit, pg_url) as (a, b):
        admin = httpx.Client(base_url=b.url, headers=AUTH, timeout=20)
        _, v2, devices = _setup_fleet(admin, kit, 24, "edge")
        r = admin.post("/v1/admin/rollouts", json={
            "bundle_id": v2["id"], "group": "edge", "steps": [25, 50, 100], "soak_seconds": 1.0,
            "min_devices_succeeded": 1, "max_failure_rate": 0.5, "halt_min_count": 1000})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        stop, statuses, lock, dead = threading.Event(), Counter(), threading.Lock(), set()
        with driving(devices, 6, stop, urls=[a.url, b.url], rollout_id=rid, target=v2, statuses=statuses, lock=lock,
                     dead=dead):
            _wait("the first step to finish", lambda: admin.get(f"/v1/admin/rollouts/{rid}").json()["step_index"] >= 1, 60)
            served_by_a = statuses[200]
            a.sigkill()  # with check-ins in flight on it
            dead.add(a.url)  # the devices' next attempts go to the survivor (a load balancer's job)
            with lock:
                at_kill = statuses[200]
            _wait_completed(admin, rid, devices, v2)
        assert served_by_a > 0 and statuses[a.url] > 0 and statuses[200] > at_kill  # b kept serving after a died
        view = admin.get(f"/v1/admin/rollouts/{rid}").json()
        assert [h["event"] for h in view["history"]] == ["created", "advanced", "advanced", "completed"], view["history"]
        assert len(view["members"]) == len(devices) and {m["state"] for m in view["members"]} == {"committed"}
        _counts_match_members(pg_url, rid)
        # everything a replica acknowledged is in the database: seqs and every acknowledged event
        stored = {row[0]: row[1] for row in sql_rows(pg_url, "SELECT id, last_seq FROM devices")}
        for d in devices:
            assert stored[d.id] >= d.acked_seq, (d.id, stored[d.id], d.acked_seq)
            kept = set(sql_rows(pg_url, f"SELECT seq, type FROM events WHERE device_id = '{d.id}'"))
            assert set(d.acked_events) <= kept, (d.id, set(d.acked_events) - kept)
        # the killed replica comes back and serves the same state
        a.start()
        assert httpx.get(f"{a.url}/v1/admin/rollouts/{rid}", headers=AUTH).json() == view
