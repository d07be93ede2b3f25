"""Load benchmark of the OTA update server: check-ins against one or more processes, then downloads.

One run measures, in this order and with the same generator settings (``--configs``):

* ``sqlite-1``: one SQLite-backed server process;
* ``postgres-1``: one PostgreSQL-backed process (a fresh schema, dropped afterwards);
* ``postgres-2``: two PostgreSQL-backed replicas behind nginx (configured from
  deploy/nginx/edgepack.conf by ``tests/nginx.py``); the generators talk to nginx only;
* ``postgres-2-direct``: the same two replicas without nginx, the generators' connections
  split evenly across them (the difference to ``postgres-2`` is nginx's own cost);
* ``downloads``: MB/s of one large, incompressible bundle fetched by 1..N concurrent
  clients (a) through the API process (``GET /v1/devices/{id}/bundles/{digest}``) and
  (b) through nginx with the signed URL from the check-in directive, with the API
  process's CPU seconds during each.

Each check-in configuration gets a fresh stack (loopback only, every loop bounded in
count and time):

1. A fresh data directory (and, for PostgreSQL, a fresh schema via ``tests/pg.py``).
2. ``--devices`` devices provisioned *before* the servers start, through the server's own
   provisioning code (``Fleet.provision``: random token, only its sha256 stored) on the
   configuration's database, all in one transaction (10,000 admin API calls would measure
   provisioning, not check-ins).
3. The real server(s) (``python -m edgepack server run``) on free ports, all with the same
   signed-download settings (``EDGEPACK_SERVER_DOWNLOAD_BASE_URL`` pointing at nginx's
   port, ``EDGEPACK_SERVER_DOWNLOAD_SECRET``), so every configuration does the same work
   per check-in (``update`` directives carry a signed URL). A signed bundle is uploaded
   through the admin API and an active rollout created for the devices' group (steps
   ``--steps``, long soak): in-cohort devices get ``update`` and become members.
4. ``--workers`` load-generator processes with ``--threads`` threads each; each thread owns
   a slice of the devices and one HTTP/1.1 keep-alive connection (``http.client``) and
   checks its devices in round-robin, one request at a time, each with the device's next
   ``seq``. Warm-up: one check-in per device (bounded by ``--warmup-timeout``). Then every
   generator measures the same fixed window of ``--seconds`` seconds.
5. Recorded: check-ins/s (200s in the window / window), p50/p95/p99, answers by status
   (503 "busy" separately) and transport errors, CPU of the server processes summed over
   replicas (and per check-in), nginx's CPU, PostgreSQL's CPU (``postgres`` processes from
   ``/proc``: all of them, and only the backends of this configuration's servers, found by
   ``application_name`` in ``pg_stat_activity``), and the rollout's sanity afterwards
   (members = distinct devices that were answered ``update``).

Results go to ``<out-dir>/server-load-<hostname>-<UTC date and time>.json`` and ``.md``; the
Markdown is printed on stdout, progress on stderr. The run stops by itself (a global
deadline, ``--deadline``); every process it started (servers, nginx, generators) is killed
in a ``finally`` and the PostgreSQL schemas are dropped. A configuration that cannot run
(no PostgreSQL, no nginx) is skipped with a note; one that fails is reported with its
error and server log excerpt, and the run goes on with the next.

Usage::

    python benchmarks/bench_server_load.py [--devices 10000] [--seconds 15] [--workers 2] [--threads 6]
        [--configs sqlite-1,postgres-1,postgres-2,postgres-2-direct,downloads]
        [--download-mb 64] [--download-clients 1,8] [--download-rounds K | --download-total-mb 2048]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import http.client
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit

from _common import cpu_model, progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

GOALS = {"checkins_per_s": 1000.0, "p99_ms": 50.0, "devices": 10000}
ADMIN = "bench-admin-token-0123456789abcdef"
DOWNLOAD_SECRET = "bench-download-secret-shared-by-all-replicas-0123456789"
GROUP = "bench"
HOST = "127.0.0.1"
CHECKIN_CONFIGS = ("sqlite-1", "postgres-1", "postgres-2", "postgres-2-direct")
ALL_CONFIGS = CHECKIN_CONFIGS + ("downloads",)
_T0 = time.perf_counter()


def machine_info() -> dict:
    cpu = cpu_model()
    versions = {}
    for mod in ("fastapi", "starlette", "uvicorn", "pydantic", "httptools", "uvloop", "psycopg"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            versions[mod] = None
    info = {"hostname": socket.gethostname(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "sqlite": __import__("sqlite3").sqlite_version, **versions}
    with contextlib.suppress(Exception):
        info["nginx"] = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=5).stderr.strip().split("/")[-1]
    with contextlib.suppress(Exception):
        import pg
        import psycopg

        with psycopg.connect(pg.base_url(), autocommit=True, connect_timeout=3) as con:
            info["postgresql"] = con.execute("SHOW server_version").fetchone()[0]
    return info


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def pct(ordered: List[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def left(hard_deadline: float) -> float:
    return hard_deadline - time.time()


# ------------------------------------------------------------------ /proc


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem_mib(pid: int) -> Dict[str, float]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def pids_named(name: str) -> List[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/stat").read_text().split("(", 1)[1].rsplit(")", 1)[0] == name:
                    out.append(int(entry))
    return out


def children_of(pid: int) -> List[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return out


def cpu_map(pids: List[int]) -> Dict[int, float]:
    return {p: proc_cpu_s(p) for p in pids}


def cpu_delta(before: Dict[int, float], after: Dict[int, float]) -> float:
    """CPU used between two snapshots; a process born in between counts fully, one that died is lost."""
    return sum(v - before.get(p, 0.0) for p, v in after.items())


def nginx_pids(workdir: Path) -> List[int]:
    with contextlib.suppress(OSError, ValueError):
        master = int((workdir / "nginx.pid").read_text().strip())
        return [master] + children_of(master)
    return []


def pg_backend_pids(app_name: str) -> List[int]:
    """PIDs of the PostgreSQL backends whose connections carry ``application_name``."""
    try:
        import pg
        import psycopg

        with psycopg.connect(pg.base_url(), autocommit=True, connect_timeout=3) as con:
            return [r[0] for r in con.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                              (app_name,)).fetchall()]
    except Exception:  # noqa: BLE001 - a missing number, not a failed run
        return []


_PG_DB_STATS = ("xact_commit", "xact_rollback", "deadlocks", "conflicts", "tup_returned", "tup_fetched", "tup_inserted",
                "tup_updated", "tup_deleted", "blks_hit", "blks_read")


def pg_db_stats() -> Dict[str, int]:
    """Cumulative counters of the benchmark's database from ``pg_stat_database`` (every client of it)."""
    try:
        import pg
        import psycopg

        with psycopg.connect(pg.base_url(), autocommit=True, connect_timeout=3) as con:
            con.execute("SELECT pg_stat_clear_snapshot()")
            row = con.execute(f"SELECT {', '.join(_PG_DB_STATS)} FROM pg_stat_database WHERE datname = current_database()"
                              ).fetchone()
            return dict(zip(_PG_DB_STATS, (int(x or 0) for x in row)))
    except Exception:  # noqa: BLE001 - a missing number, not a failed run
        return {}


# ------------------------------------------------------------------ setup


def provision_offline(data: Path, pub: Path, n: int, db_url: Optional[str] = None, group: str = GROUP,
                      prefix: str = "dev") -> List[tuple]:
    """Provision ``n`` devices through ``Fleet.provision`` on the server's database; [(id, token)]."""
    from edgepack.server.blobs import BlobStore
    from edgepack.server.fleet import Fleet
    from edgepack.server.orchestration import Orchestrator
    from edgepack.server.schemas import DeviceCreate
    from edgepack.server.settings import ServerSettings
    from edgepack.server.storage import open_storage

    settings = ServerSettings.for_tests(data, ADMIN, trusted_key_files=(pub,), **({"db_url": db_url} if db_url else {}))
    storage = open_storage(settings.db_url)
    try:
        storage.migrate()  # the operator's order: migrate once, then start the replicas
        fleet = Fleet(settings, storage, BlobStore(settings.blob_dir), Orchestrator(storage, time.time), time.time)
        out = []
        with storage.transaction():  # one commit for all (Fleet.provision's own transaction nests)
            for i in range(n):
                record, token = fleet.provision(DeviceCreate(id=f"{prefix}-{i:05d}", group=group, tags=["bench"], profile="rpi4"))
                out.append((record.id, token))
        return out
    finally:
        storage.close()


def start_server(data: Path, port: int, pub: Path, token_file: Path, log_path: Path, db_url: Optional[str] = None,
                 env: Optional[dict] = None, procs: Optional[list] = None) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing to it
    cmd = [sys.executable, "-m", "edgepack", "server", "run", "--data", str(data), "--host", HOST, "--port", str(port),
           "--trusted-key", str(pub), "--admin-token-file", str(token_file)]
    if db_url:
        cmd += ["--db-url", db_url]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    log.close()
    if procs is not None:
        procs.append(proc)  # the caller's finally kills it even if it never answers
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
        try:
            if request("GET", port, "/healthz")[0] == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the server did not answer /healthz within 30 s")


def kill_proc(proc: Optional[subprocess.Popen]) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)


def request(method: str, port: int, path: str, body: Any = None, headers: Optional[dict] = None, timeout: float = 30) -> tuple:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, (json.loads(data) if data else None)
        except ValueError:
            return resp.status, data[:500].decode(errors="replace")
    finally:
        conn.close()


def log_excerpt(paths: List[Path], limit: int = 3000) -> Optional[str]:
    """Tracebacks / errors from the server logs (None when they are clean)."""
    parts = []
    for p in paths:
        with contextlib.suppress(OSError):
            text = p.read_text(errors="replace")
            if any(w in text for w in ("Traceback", "ERROR", "CRITICAL", "Exception")):
                parts.append(f"--- {p.name} ---\n{text[-limit:]}")
    return "\n".join(parts) or None


# ------------------------------------------------------------------ load generator


def _body(seq: int) -> bytes:
    return (b'{"seq":%d,"state":"idle","current":null,"previous":null,'
            b'"health":{"serving":true,"requests":1200,"errors":3,"p95_ms":1.8,"nonfinite":0,"uptime_s":3600},'
            b'"runtime_version":"0.1.0","engines":["onnxruntime"],"summaries":{}}' % seq)


def _thread(port: int, devices: List[tuple], seqs: Dict[str, int], phase: dict, out: dict, hard_deadline: float) -> None:
    """One keep-alive connection to ``port``; check in ``devices`` round-robin until the window ends."""
    lat: List[float] = []
    statuses: Dict[str, int] = {}
    actions: Dict[str, int] = {}
    seen_window: set = set()
    updated: set = set()  # devices answered `update` at any time (warm-up or window): the rollout's members
    errors: Dict[str, int] = {}
    warm_statuses: Dict[str, int] = {}
    warm_done = 0
    conn = None
    i = 0
    perf = time.perf_counter
    while True:
        now = time.time()
        if now >= hard_deadline:
            break
        warming = i < len(devices)
        if warming and now >= phase["warm_deadline"]:
            warming = False
            i = len(devices)  # warm-up timed out: go on (counted as incomplete)
        if not warming:
            if not phase["warm_signalled"]:
                phase["warm_signalled"] = True
                phase["ready"].set()
            if not phase["go"].wait(timeout=max(0.0, hard_deadline - now)):
                break
            now = time.time()
            if now >= phase["end"]:
                break
        dev_id, token = devices[i % len(devices)]
        seq = seqs[dev_id] + 1
        in_window = not warming and phase["start"] <= now
        try:
            if conn is None:
                conn = http.client.HTTPConnection(HOST, port, timeout=10)
            t0 = perf()
            conn.request("POST", f"/v1/devices/{dev_id}/checkin", body=_body(seq),
                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            dt = perf() - t0
            status = resp.status
            if resp.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            if conn is not None:
                conn.close()
            conn = None
            key = ("window:" if in_window else "warmup:" if warming else "other:") + type(exc).__name__
            errors[key] = errors.get(key, 0) + 1
            i += 1
            time.sleep(0.01)
            continue
        if status == 200 or status == 409:
            seqs[dev_id] = seq  # 409: the server already has this seq (e.g. a retried request)
        action = None
        if status == 200:
            action = json.loads(data).get("action", "?")
            if action == "update":
                updated.add(dev_id)
        if warming:
            warm_done += status == 200
            warm_statuses[str(status)] = warm_statuses.get(str(status), 0) + 1
        elif in_window:
            lat.append(dt)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 200:
                seen_window.add(dev_id)
                actions[action] = actions.get(action, 0) + 1
        i += 1
    if conn is not None:
        conn.close()
    out.update(lat=lat, statuses=statuses, actions=actions, seen=seen_window, updated=updated, errors=errors,
               warm_done=warm_done, warm_statuses=warm_statuses)


def generator(ports: List[int], offset: int, devices: List[tuple], threads: int, ctl: Any, result_q: Any,
              hard_deadline: float) -> None:
    """One load-generator process: ``threads`` threads over a slice of the devices.

    Thread ``k`` connects to ``ports[(offset + k) % len(ports)]`` (the global thread index
    decides, so the connections of all generators split evenly over the ports).
    """
    seqs = {d: 0 for d, _ in devices}
    slices = [devices[k::threads] for k in range(threads)]
    warm_deadline = ctl["warm_deadline"].value
    states, outs, workers = [], [], []
    for k, part in enumerate(slices):
        st = {"warm_deadline": warm_deadline, "warm_signalled": False, "ready": threading.Event(),
              "go": threading.Event(), "start": 0.0, "end": 0.0}
        out: dict = {}
        states.append(st)
        outs.append(out)
        port = ports[(offset + k) % len(ports)]
        workers.append(threading.Thread(target=_thread, args=(port, part, seqs, st, out, hard_deadline), daemon=True))
    cpu0 = time.process_time()
    for w in workers:
        w.start()
    for st in states:
        st["ready"].wait(timeout=max(0.0, hard_deadline - time.time()))
    ctl["ready"].release()  # this process finished its warm-up
    ctl["go"].wait(timeout=max(0.0, hard_deadline - time.time()))
    start, end = ctl["start"].value, ctl["end"].value
    for st in states:
        st["start"], st["end"] = start, end
        st["go"].set()
    cpu_w0 = time.process_time()
    for w in workers:
        w.join(timeout=max(0.0, hard_deadline - time.time()) + 1)
    lat, statuses, actions, seen, updated, errors, warm_statuses, warm_done = [], {}, {}, set(), set(), {}, {}, 0
    for out in outs:
        lat += out.get("lat", [])
        seen |= out.get("seen", set())
        updated |= out.get("updated", set())
        warm_done += out.get("warm_done", 0)
        for src, dst in ((out.get("statuses", {}), statuses), (out.get("actions", {}), actions),
                         (out.get("errors", {}), errors), (out.get("warm_statuses", {}), warm_statuses)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
    result_q.put({"lat": lat, "statuses": statuses, "actions": actions, "seen": sorted(seen), "updated": sorted(updated),
                  "errors": errors, "warm_statuses": warm_statuses,
                  "warm_done": warm_done, "cpu_s": time.process_time() - cpu0, "cpu_window_s": time.process_time() - cpu_w0,
                  "alive_threads": sum(w.is_alive() for w in workers)})


# ------------------------------------------------------------------ check-in configurations


class Unavailable(Exception):
    """This configuration cannot run on this machine (no PostgreSQL, no nginx)."""


def _pg_schema(stack: contextlib.ExitStack) -> str:
    import pg

    try:
        return stack.enter_context(pg.fresh_schema())
    except BaseException as exc:  # tests/pg.py calls pytest.skip/fail (BaseException) when PostgreSQL is missing
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise Unavailable(f"PostgreSQL not reachable at {pg.base_url().split('@')[-1]}: {exc}") from None


def _nginx_binary() -> str:
    import nginx

    try:
        return nginx.nginx_binary()
    except BaseException as exc:  # pytest.skip when nginx is not installed
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise Unavailable(f"nginx is not installed: {exc}") from None


def _nginx(stack: contextlib.ExitStack, workdir: Path, blob_dir: Path, ports: List[int], port: int) -> str:
    import nginx

    _nginx_binary()
    return stack.enter_context(nginx.running_nginx(workdir, blob_dir, ports, port=port))


def run_checkins(name: str, args: argparse.Namespace, kit: dict, work: Path, hard_deadline: float) -> dict:
    """One check-in configuration on a fresh stack; the result dict (or raises)."""
    replicas = 2 if name.startswith("postgres-2") else 1
    use_pg = name.startswith("postgres")
    use_nginx = name == "postgres-2"
    cdir = work / name
    data = cdir / "data"
    cdir.mkdir(parents=True)
    app_name = f"edgepack-bench-{name}-{os.getpid()}"
    procs: List[subprocess.Popen] = []
    gens: List[mp.Process] = []
    with contextlib.ExitStack() as stack:
        try:
            db_url = None
            if use_pg:
                db_url = _pg_schema(stack) + f"&application_name={app_name}"
            if use_nginx:
                _nginx_binary()  # Unavailable before provisioning, not after
            t = time.perf_counter()
            devices = provision_offline(data, kit["pub"], args.devices, db_url)
            provision_s = time.perf_counter() - t
            progress(f"[{name}] provisioned {len(devices)} devices in {provision_s:.1f}s "
                     f"({'PostgreSQL' if use_pg else 'SQLite'}, Fleet.provision, one transaction)")
            nginx_port = free_port()
            env = {"EDGEPACK_SERVER_DOWNLOAD_SECRET": DOWNLOAD_SECRET,
                   "EDGEPACK_SERVER_DOWNLOAD_BASE_URL": f"http://{HOST}:{nginx_port}/blobs"}
            ports = [free_port() for _ in range(replicas)]
            logs = [cdir / f"server-{k}.log" for k in range(replicas)]
            servers = [start_server(data, ports[k], kit["pub"], kit["token_file"], logs[k], db_url, env, procs)
                       for k in range(replicas)]
            progress(f"[{name}] server pid(s) {[p.pid for p in servers]} on ports {ports}")
            targets = ports
            nginx_dir = cdir / "nginx"
            if use_nginx:
                base = _nginx(stack, nginx_dir, data / "blobs", ports, nginx_port)
                targets = [nginx_port]
                progress(f"[{name}] nginx on {base}, pids {nginx_pids(nginx_dir)}")
            auth = {"Authorization": f"Bearer {ADMIN}"}
            st, up = request("POST", ports[0], "/v1/admin/bundles", kit["bundle"].read_bytes(),
                             {**auth, "Content-Type": "application/octet-stream"})
            if st not in (200, 201):
                raise RuntimeError(f"upload failed: {st} {up}")
            st, ro = request("POST", ports[0], "/v1/admin/rollouts", {
                "bundle_id": up["id"], "group": GROUP, "steps": args.steps, "soak_seconds": 3600,
                "min_devices_succeeded": 1, "max_failure_rate": 0.1, "halt_min_count": 1}, auth)
            if st != 201:
                raise RuntimeError(f"rollout failed: {st} {ro}")

            ctx = mp.get_context("fork")
            ctl = {"warm_deadline": ctx.Value("d", time.time() + args.warmup_timeout), "ready": ctx.Semaphore(0),
                   "go": ctx.Event(), "start": ctx.Value("d", 0.0), "end": ctx.Value("d", 0.0)}
            result_q = ctx.Queue()
            for w in range(args.workers):
                g = ctx.Process(target=generator, args=(targets, w * args.threads, devices[w::args.workers], args.threads,
                                                        ctl, result_q, hard_deadline), daemon=True)
                g.start()
                gens.append(g)
            t = time.perf_counter()
            for _ in gens:
                if not ctl["ready"].acquire(timeout=max(0.1, left(hard_deadline))):
                    raise RuntimeError("load generators did not finish the warm-up before the deadline")
            warm_s = time.perf_counter() - t
            if left(hard_deadline) < args.seconds + 10:
                raise RuntimeError(f"global deadline: {left(hard_deadline):.0f}s left, no room for the window")
            progress(f"[{name}] warm-up done in {warm_s:.1f}s; measuring {args.seconds:.0f}s against ports {targets}")
            start = time.time() + 0.2
            end = start + args.seconds
            ctl["start"].value, ctl["end"].value = start, end
            ctl["go"].set()
            time.sleep(max(0.0, start - time.time()))
            backends = pg_backend_pids(app_name) if use_pg else []
            all_pg = pids_named("postgres") if use_pg else []
            ngx = nginx_pids(nginx_dir) if use_nginx else []
            stats0 = pg_db_stats() if use_pg else {}
            srv0 = cpu_map([p.pid for p in servers])
            be0, pg0, ngx0, w0 = cpu_map(backends), cpu_map(all_pg), cpu_map(ngx), time.time()
            time.sleep(max(0.0, end - time.time()))
            backends_after = pg_backend_pids(app_name) if use_pg else []
            srv1 = cpu_map([p.pid for p in servers])
            be1 = cpu_map(sorted(set(backends) | set(backends_after)))
            pg1, ngx1, w1 = cpu_map(pids_named("postgres") if use_pg else []), cpu_map(nginx_pids(nginx_dir)), time.time()
            mem = {p.pid: proc_mem_mib(p.pid) for p in servers}
            time.sleep(0.6 if use_pg else 0)  # backends flush their statistics at most once a second (when busy)
            stats1 = pg_db_stats() if use_pg else {}
            results = []
            for _ in gens:
                results.append(result_q.get(timeout=max(1.0, left(hard_deadline) + 5)))
            for g in gens:
                g.join(timeout=5)
            st, server_dev = request("GET", ports[0], f"/v1/admin/devices/{devices[0][0]}", headers=auth)
            st_ro, ro_after = request("GET", ports[0], f"/v1/admin/rollouts/{ro['id']}", headers=auth)
            alive = [p.pid for p in servers if p.poll() is None]
            excerpt = log_excerpt(logs)
        except BaseException:
            excerpt = log_excerpt([cdir / f"server-{k}.log" for k in range(replicas)]) or ""
            with contextlib.suppress(OSError):
                ngx_log = (cdir / "nginx" / "error.log").read_text(errors="replace").splitlines()
                tail = [line for line in ngx_log if "[error]" in line or "[crit]" in line]
                if tail:
                    excerpt += "\n--- nginx error.log ---\n" + "\n".join(tail[-20:])
            if excerpt:
                progress(f"[{name}] server log excerpt:\n{excerpt[-3000:]}")
            raise
        finally:
            for g in gens:
                if g.is_alive():
                    g.kill()
            for p in procs:
                kill_proc(p)
            # the ExitStack then stops nginx and drops the PostgreSQL schema

    lat = sorted(x for r in results for x in r["lat"])
    statuses: Dict[str, int] = {}
    actions: Dict[str, int] = {}
    errors: Dict[str, int] = {}
    warm_statuses: Dict[str, int] = {}
    for r in results:
        for src, dst in ((r["statuses"], statuses), (r["actions"], actions), (r["errors"], errors),
                         (r["warm_statuses"], warm_statuses)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
    ok = statuses.get("200", 0)
    seen = sum(len(r["seen"]) for r in results)
    updated = sum(len(r["updated"]) for r in results)  # generators own disjoint device slices
    warm_done = sum(r["warm_done"] for r in results)
    window = w1 - w0
    rate = ok / args.seconds
    p99_ms = pct(lat, 0.99) * 1000
    srv_cpu = cpu_delta(srv0, srv1)
    be_cpu, pg_cpu, ngx_cpu = cpu_delta(be0, be1), cpu_delta(pg0, pg1), cpu_delta(ngx0, ngx1)
    members = ro_after.get("members") if isinstance(ro_after, dict) else None
    n_members = len(members) if isinstance(members, list) else None
    per = lambda cpu: round(1000 * cpu / ok, 3) if ok else None  # noqa: E731 - CPU ms per 200 check-in
    window_errors = {k.split(":", 1)[1]: v for k, v in errors.items() if k.startswith("window:")}
    return {
        "name": name,
        "replicas": replicas,
        "database": "postgresql" if use_pg else "sqlite",
        "via": "nginx" if use_nginx else ("direct, connections split over replicas" if replicas > 1 else "direct"),
        "provision_s": round(provision_s, 2),
        "warmup": {"seconds": round(warm_s, 2), "devices_checked_in": warm_done, "statuses": warm_statuses},
        "window": {"seconds": args.seconds, "requests": len(lat), "ok": ok, "checkins_per_s": round(rate, 1),
                   "latency_ms": {k: round(pct(lat, q) * 1000, 2) for k, q in
                                  (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))},
                   "mean_ms": round(sum(lat) / len(lat) * 1000, 2) if lat else None,
                   "statuses": statuses, "busy_503": statuses.get("503", 0), "transport_errors": window_errors,
                   "all_transport_errors": errors, "actions": actions, "devices_checked_in": seen},
        "cpu": {"servers_s": round(srv_cpu, 2), "servers_percent_of_one_core": round(100 * srv_cpu / window, 1),
                "servers_ms_per_checkin": per(srv_cpu),
                "per_server_percent": {str(p): round(100 * (srv1[p] - srv0[p]) / window, 1) for p in srv1},
                "nginx_s": round(ngx_cpu, 2) if use_nginx else None,
                "nginx_ms_per_checkin": per(ngx_cpu) if use_nginx else None,
                "postgres_own_backends_s": round(be_cpu, 2) if use_pg else None,
                "postgres_own_backends_ms_per_checkin": per(be_cpu) if use_pg else None,
                "postgres_own_backends": len(be1) if use_pg else None,
                "postgres_all_s": round(pg_cpu, 2) if use_pg else None,
                "postgres_all_ms_per_checkin": per(pg_cpu) if use_pg else None,
                "generators_s": round(sum(r["cpu_window_s"] for r in results), 2)},
        "server_mem_mib": {str(k): v for k, v in mem.items()},
        "postgres_db_stats_window": ({k: stats1[k] - stats0[k] for k in stats1 if k in stats0} if stats0 and stats1 else None),
        "check": {"device0_last_seq": server_dev.get("last_seq") if isinstance(server_dev, dict) else None,
                  "rollout_http_status": st_ro,
                  "rollout_status": ro_after.get("status") if isinstance(ro_after, dict) else ro_after,
                  "rollout_members": n_members, "devices_answered_update": updated,
                  "members_match": n_members == updated, "servers_alive_at_end": len(alive),
                  "generator_threads_still_alive": sum(r["alive_threads"] for r in results)},
        "goal_met": bool(rate >= GOALS["checkins_per_s"] and p99_ms <= GOALS["p99_ms"] and args.devices >= GOALS["devices"]
                         and seen == args.devices and not window_errors and ok == len(lat)),
        "server_log_excerpt": excerpt,
    }


# ------------------------------------------------------------------ downloads


def _download_once(port: int, path: str, headers: dict, buf: bytearray) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"GET {path.split('?')[0]}: HTTP {resp.status} {resp.read()[:300]!r}")
        view = memoryview(buf)
        total = 0
        while True:
            n = resp.readinto(view)
            if not n:
                break
            total += n
        return total
    finally:
        conn.close()


def measure_downloads(label: str, port: int, paths: List[tuple], rounds: int, size: int, api_pid: int, ngx: List[int],
                      hard_deadline: float) -> dict:
    """``len(paths)`` concurrent clients, each fetching its (path, headers) ``rounds`` times to nowhere."""
    clients = len(paths)
    errors: List[str] = []
    got = [0] * clients

    def client(k: int) -> None:
        buf = bytearray(1 << 20)
        try:
            for _ in range(rounds):
                if time.time() > hard_deadline:
                    raise RuntimeError("global deadline")
                n = _download_once(port, paths[k][0], paths[k][1], buf)
                if n != size:
                    raise RuntimeError(f"short body: {n} of {size} bytes")
                got[k] += n
        except Exception as exc:  # noqa: BLE001 - reported
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    api0, ngx0, me0 = proc_cpu_s(api_pid), cpu_map(ngx), time.process_time()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, left(hard_deadline)))
    dt = time.perf_counter() - t0
    api1, ngx1, me1 = proc_cpu_s(api_pid), cpu_map(ngx), time.process_time()
    total = sum(got)
    return {"path": label, "clients": clients, "rounds": rounds, "bytes": total, "seconds": round(dt, 3),
            "mb_per_s": round(total / 1e6 / dt, 1), "api_cpu_s": round(api1 - api0, 3),
            "api_cpu_s_per_gb": round((api1 - api0) / (total / 1e9), 3) if total else None,
            "nginx_cpu_s": round(cpu_delta(ngx0, ngx1), 3), "client_cpu_s": round(me1 - me0, 3),
            "errors": errors[:5], "complete": not errors and total == clients * rounds * size}


def run_downloads(args: argparse.Namespace, kit: dict, work: Path, hard_deadline: float) -> dict:
    import bundles
    import numpy as np
    from onnx import numpy_helper

    ddir = work / "downloads"
    data = ddir / "data"
    ddir.mkdir(parents=True)
    t = time.perf_counter()
    model = bundles.raw_classifier(scale=5.0)  # + an unused random initializer: large and incompressible
    pad = np.random.default_rng(11).standard_normal(int(args.download_mb * 1024 * 1024 / 4)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(pad, "padding"))
    big = bundles.make_bundle(ddir, kit["priv"], "9.0.0", model, name="big")
    del model, pad
    size = big.stat().st_size
    progress(f"[downloads] built a {size / 1e6:.1f} MB bundle in {time.perf_counter() - t:.1f}s")
    n_dev = max(args.download_clients)
    devices = provision_offline(data, kit["pub"], n_dev, None, group="dl", prefix="dl")
    procs: List[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        try:
            nginx_port, port = free_port(), free_port()
            env = {"EDGEPACK_SERVER_DOWNLOAD_SECRET": DOWNLOAD_SECRET,
                   "EDGEPACK_SERVER_DOWNLOAD_BASE_URL": f"http://{HOST}:{nginx_port}/blobs"}
            log = ddir / "server.log"
            api = start_server(data, port, kit["pub"], kit["token_file"], log, None, env, procs)
            nginx_dir = ddir / "nginx"
            _nginx(stack, nginx_dir, data / "blobs", [port], nginx_port)
            ngx = nginx_pids(nginx_dir)
            auth = {"Authorization": f"Bearer {ADMIN}"}
            t = time.perf_counter()
            st, up = request("POST", port, "/v1/admin/bundles", big.read_bytes(), {**auth, "Content-Type": "application/octet-stream"},
                             timeout=120)
            if st not in (200, 201):
                raise RuntimeError(f"upload failed: {st} {up}")
            upload_s = time.perf_counter() - t
            st, ro = request("POST", port, "/v1/admin/rollouts", {
                "bundle_id": up["id"], "group": "dl", "steps": [100], "soak_seconds": 3600,
                "min_devices_succeeded": 1, "max_failure_rate": 0.5, "halt_min_count": 1}, auth)
            if st != 201:
                raise RuntimeError(f"rollout failed: {st} {ro}")
            api_paths, signed_paths = [], []
            for dev_id, token in devices:  # one check-in each: `update` grants the bundle and carries the signed URL
                st, d = request("POST", port, f"/v1/devices/{dev_id}/checkin", json.loads(_body(1)),
                                {"Authorization": f"Bearer {token}"})
                if st != 200 or d.get("action") != "update":
                    raise RuntimeError(f"check-in of {dev_id} did not get `update`: {st} {d}")
                url = urlsplit(d["bundle"]["url"])
                if url.port != nginx_port:
                    raise RuntimeError(f"directive URL is not on nginx: {d['bundle']['url']}")
                signed_paths.append((url.path + "?" + url.query, {}))
                api_paths.append((f"/v1/devices/{dev_id}/bundles/{up['digest']}", {"Authorization": f"Bearer {token}"}))
            progress(f"[downloads] API pid {api.pid} :{port}, nginx :{nginx_port} pids {ngx}; upload {upload_s:.1f}s")
            rows = []
            for clients in args.download_clients:
                for label, target, paths in (("API (Python)", port, api_paths), ("nginx (signed URL)", nginx_port, signed_paths)):
                    if left(hard_deadline) < 20:
                        raise RuntimeError(f"global deadline: {left(hard_deadline):.0f}s left")
                    rounds = args.download_rounds or max(1, round(args.download_total_mb * 1e6 / (size * clients)))
                    row = measure_downloads(label, target, paths[:clients], rounds, size, api.pid, ngx, hard_deadline)
                    progress(f"[downloads] {label}, {clients} client(s): {row['mb_per_s']} MB/s, API CPU {row['api_cpu_s']}s,"
                             f" nginx CPU {row['nginx_cpu_s']}s{' ERRORS ' + str(row['errors']) if row['errors'] else ''}")
                    rows.append(row)
            excerpt = log_excerpt([log])
        except BaseException:
            excerpt = log_excerpt([ddir / "server.log"])
            if excerpt:
                progress(f"[downloads] server log excerpt:\n{excerpt[-3000:]}")
            raise
        finally:
            for p in procs:
                kill_proc(p)
    return {"bundle_bytes": size, "upload_s": round(upload_s, 2), "rows": rows, "server_log_excerpt": excerpt}


# ------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> dict:
    import bundles  # tests/bundles.py: signed test bundles in the real format

    hard_deadline = time.time() + args.deadline
    work = Path(tempfile.mkdtemp(prefix="edgepack-server-load-"))
    priv, pub = bundles.keys(work)
    token_file = work / "admin.token"
    token_file.write_text(ADMIN + "\n")
    token_file.chmod(0o600)
    kit = {"priv": priv, "pub": pub, "bundle": bundles.make_bundle(work, priv, "2.0.0"), "token_file": token_file}
    out: Dict[str, Any] = {"configs": {}, "skipped": {}, "failed": {}, "downloads": None}
    try:
        for name in args.configs:
            if left(hard_deadline) < args.seconds + 30:
                out["skipped"][name] = f"global deadline ({args.deadline:.0f}s): only {left(hard_deadline):.0f}s left"
                progress(f"[{name}] skipped: {out['skipped'][name]}")
                continue
            t = time.perf_counter()
            try:
                if name == "downloads":
                    out["downloads"] = run_downloads(args, kit, work, hard_deadline)
                else:
                    res = run_checkins(name, args, kit, work, hard_deadline)
                    res["wall_s"] = round(time.perf_counter() - t, 1)
                    out["configs"][name] = res
                    w, c = res["window"], res["cpu"]
                    progress(f"[{name}] {w['checkins_per_s']} check-ins/s, p50/p95/p99 {w['latency_ms']['p50']}/"
                             f"{w['latency_ms']['p95']}/{w['latency_ms']['p99']} ms, statuses {w['statuses']}, "
                             f"servers {c['servers_percent_of_one_core']}% of a core, rollout members "
                             f"{res['check']['rollout_members']} vs updated {res['check']['devices_answered_update']}")
            except Unavailable as exc:
                out["skipped"][name] = str(exc)
                progress(f"[{name}] skipped: {exc}")
            except Exception as exc:  # noqa: BLE001 - reported, the next configuration still runs
                out["failed"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
                progress(f"[{name}] FAILED: {type(exc).__name__}: {exc}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    out["work_dir"] = str(work) if args.keep else None
    out["config"] = {"devices": args.devices, "seconds": args.seconds, "workers": args.workers, "threads": args.threads,
                     "connections": args.workers * args.threads, "steps": args.steps, "warmup_timeout": args.warmup_timeout,
                     "configs": args.configs, "download_mb": args.download_mb, "download_clients": args.download_clients,
                     "download_rounds": args.download_rounds,
                     "download_total_mb": args.download_total_mb, "deadline": args.deadline}
    return out


def ok_count(r: dict) -> int:
    return r["window"]["ok"]


def _fmt(v: Any) -> str:
    return "–" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))


def render_markdown(result: dict, command: str) -> str:
    m, c = result["machine"], result["config"]
    yes = lambda b: "yes" if b else "**no**"  # noqa: E731
    lines = [
        f"# Server load benchmark — {m['hostname']}, {result['date']}",
        "",
        f"{m['cpu']} ({m['cpus']} CPUs), Python {m['python']}, SQLite {m['sqlite']}, PostgreSQL {m.get('postgresql', '–')}, "
        f"nginx {m.get('nginx', '–')}, fastapi {m['fastapi']}, uvicorn {m['uvicorn']}, httptools {m['httptools']}, "
        f"uvloop {m['uvloop']}, psycopg {m.get('psycopg')}. Load average at start {result['load_start']}, at end "
        f"{result['load_end']}. Run time {result['run_s']} s.",
        "",
        f"Command: `{command}`",
        "",
        f"Every check-in configuration: a fresh stack, {c['devices']:,} devices provisioned offline (`Fleet.provision`, one "
        f"transaction) in one group with an active rollout (steps {c['steps']}); {c['workers']} generator process(es) × "
        f"{c['threads']} threads = {c['connections']} keep-alive connections, one request at a time each, closed loop; "
        f"{c['seconds']:.0f} s window after a warm-up of one check-in per device. All servers run with signed downloads "
        f"on (`EDGEPACK_SERVER_DOWNLOAD_BASE_URL`/`_SECRET`), so `update` directives carry a signed URL everywhere. "
        f"Servers, PostgreSQL, nginx (1 worker) and the generators share the {m['cpus']} CPUs.",
        "",
    ]
    for name, r in result["configs"].items():
        w, cpu, chk = r["window"], r["cpu"], r["check"]
        L = w["latency_ms"]
        other = {k: v for k, v in w["statuses"].items() if k not in ("200", "503")}
        lines += [
            f"## {name}: {r['replicas']} × {r['database']} server, {r['via']}",
            "",
            "| metric | measured | goal | met |",
            "| --- | --- | --- | --- |",
            f"| check-ins/s (200s in window / window) | {w['checkins_per_s']:,.1f} | ≥ {GOALS['checkins_per_s']:,.0f} | "
            f"{yes(w['checkins_per_s'] >= GOALS['checkins_per_s'])} |",
            f"| latency p50 / p95 / p99 | {L['p50']} / {L['p95']} / {L['p99']} ms | p99 ≤ {GOALS['p99_ms']:.0f} ms | "
            f"{yes(L['p99'] <= GOALS['p99_ms'])} |",
            f"| latency max | {L['max']} ms | | |",
            f"| 503 busy answers | {w['busy_503']:,} | 0 | {yes(w['busy_503'] == 0)} |",
            f"| other non-200 answers / transport errors | {other or 'none'} / {w['transport_errors'] or 'none'} | none | "
            f"{yes(not other and not w['transport_errors'])} |",
            f"| devices checked in during the window | {w['devices_checked_in']:,} of {c['devices']:,} | all | "
            f"{yes(w['devices_checked_in'] == c['devices'])} |",
            f"| directives in window | {w['actions']} | | |",
            f"| server CPU, summed over {r['replicas']} process(es) | {cpu['servers_percent_of_one_core']} % of one core "
            f"({cpu['servers_ms_per_checkin']} ms per check-in; per process {list(cpu['per_server_percent'].values())} %) | | |",
        ]
        if r["database"] == "postgresql":
            lines.append(f"| PostgreSQL CPU: this run's {cpu['postgres_own_backends']} backends / all postgres processes | "
                         f"{cpu['postgres_own_backends_ms_per_checkin']} / {cpu['postgres_all_ms_per_checkin']} ms per check-in "
                         f"({cpu['postgres_own_backends_s']} / {cpu['postgres_all_s']} s) | | |")
        dbs = r.get("postgres_db_stats_window")
        if dbs and ok_count(r):
            n = ok_count(r)
            lines.append(f"| PostgreSQL per check-in (pg_stat_database, window ≈ +0.6 s) | {dbs['xact_commit'] / n:.2f} commits, "
                         f"{dbs['xact_rollback'] / n:.3f} rollbacks, {dbs['tup_fetched'] / n:.1f} rows fetched, "
                         f"{dbs['tup_inserted'] / n:.2f} inserted, {dbs['tup_updated'] / n:.2f} updated; deadlocks "
                         f"{dbs['deadlocks']} | | |")
        if cpu.get("nginx_s") is not None:
            lines.append(f"| nginx CPU | {cpu['nginx_ms_per_checkin']} ms per check-in ({cpu['nginx_s']} s) | | |")
        lines += [
            f"| generators CPU | {cpu['generators_s']} s in the window | | |",
            f"| rollout after the run | {chk['rollout_status']}, {_fmt(chk['rollout_members'])} members; "
            f"{_fmt(chk['devices_answered_update'])} distinct devices answered `update` | equal | {yes(chk['members_match'])} |",
            f"| setup | provisioning {r['provision_s']} s, warm-up {r['warmup']['seconds']} s "
            f"({r['warmup']['devices_checked_in']:,} devices, statuses {r['warmup']['statuses']}) | | |",
            "",
        ]
        if r.get("server_log_excerpt"):
            lines += ["Server log excerpt:", "", "```", r["server_log_excerpt"][-2000:], "```", ""]
    if result["configs"]:
        lines += ["## Summary", "", "| config | check-ins/s | p50 / p95 / p99 ms | 503 | other errors | server CPU ms/check-in "
                  "| PostgreSQL CPU ms/check-in (own backends / all) | nginx CPU ms/check-in | members = updated |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in result["configs"].items():
            w, cpu, L = r["window"], r["cpu"], r["window"]["latency_ms"]
            other = sum(v for k, v in w["statuses"].items() if k not in ("200", "503")) + sum(w["transport_errors"].values())
            pgc = (f"{cpu['postgres_own_backends_ms_per_checkin']} / {cpu['postgres_all_ms_per_checkin']}"
                   if r["database"] == "postgresql" else "–")
            lines.append(f"| {name} | {w['checkins_per_s']:,.1f} | {L['p50']} / {L['p95']} / {L['p99']} | {w['busy_503']} | "
                         f"{other} | {cpu['servers_ms_per_checkin']} | {pgc} | {_fmt(cpu.get('nginx_ms_per_checkin'))} | "
                         f"{yes(r['check']['members_match'])} |")
        lines.append("")
    d = result.get("downloads")
    if d:
        lines += [f"## Downloads: one {d['bundle_bytes'] / 1e6:.1f} MB bundle (random payload), full body each time, "
                  f"to nowhere; one SQLite-backed API process, nginx in front", "",
                  "| path | clients × downloads | total MB | MB/s | API process CPU s | API CPU s per GB | nginx CPU s | "
                  "client CPU s | complete |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in d["rows"]:
            lines.append(f"| {row['path']} | {row['clients']} × {row['rounds']} | {row['bytes'] / 1e6:,.0f} | {row['mb_per_s']:,} | "
                         f"{row['api_cpu_s']} | {_fmt(row['api_cpu_s_per_gb'])} | {row['nginx_cpu_s']} | {row['client_cpu_s']} | "
                         f"{yes(row['complete'])}{' ' + '; '.join(row['errors']) if row['errors'] else ''} |")
        lines += ["", "API path: `GET /v1/devices/{id}/bundles/{digest}` with the device's bearer token, straight to the "
                  "API process. nginx path: the signed URL from the device's `update` directive (`auth_request` asks the "
                  "API once per download, then nginx sends the file).", ""]
        if d.get("server_log_excerpt"):
            lines += ["Server log excerpt:", "", "```", d["server_log_excerpt"][-2000:], "```", ""]
    for name, why in result["skipped"].items():
        lines.append(f"- **{name} skipped**: {why}")
    for name, f in result["failed"].items():
        lines.append(f"- **{name} FAILED**: {f['error']}")
    if result["skipped"] or result["failed"]:
        lines.append("")
    lines.append("Latency is client-side (request written → body read), closed loop, so it includes queueing at the "
                 "server. CPU is utime+stime from /proc over the window. 'All postgres processes' includes any other "
                 "client of the same PostgreSQL server on this shared machine; 'own backends' are the backends whose "
                 "`application_name` is this configuration's.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10000)
    p.add_argument("--seconds", type=float, default=15.0, help="measurement window per configuration")
    p.add_argument("--workers", type=int, default=2, help="load-generator processes")
    p.add_argument("--threads", type=int, default=6, help="threads (keep-alive connections) per generator")
    p.add_argument("--steps", type=float, nargs="+", default=[50, 100], help="rollout step percentages")
    p.add_argument("--warmup-timeout", type=float, default=90.0, help="max seconds for the warm-up sweep")
    p.add_argument("--deadline", type=float, default=600.0, help="hard stop for the whole run, seconds")
    p.add_argument("--configs", default=",".join(ALL_CONFIGS),
                   help=f"comma-separated, run in this order; any of {','.join(ALL_CONFIGS)} (default all)")
    p.add_argument("--download-mb", type=float, default=64.0, help="size of the random payload of the download bundle")
    p.add_argument("--download-clients", default="1,8", help="comma-separated concurrent downloader counts")
    p.add_argument("--download-rounds", type=int, default=None,
                   help="full downloads per client (default: enough for ~--download-total-mb per measurement)")
    p.add_argument("--download-total-mb", type=float, default=2048.0,
                   help="bytes per measurement when --download-rounds is not given (bounds the run time)")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directories (databases, logs)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    args.steps = [int(x) if float(x).is_integer() else x for x in args.steps]
    args.configs = [x.strip() for x in args.configs.split(",") if x.strip()]
    unknown = [x for x in args.configs if x not in ALL_CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {','.join(ALL_CONFIGS)}")
    args.download_clients = [int(x) for x in args.download_clients.split(",") if x.strip()]
    if not args.download_clients or min(args.download_clients) < 1:
        p.error("--download-clients needs positive counts")
    machine = machine_info()
    start_load = loadavg()
    progress(f"host {machine['hostname']}: {machine['cpu']}, {machine['cpus']} CPUs, load {start_load}")
    now = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    result = run(args)
    result.update(machine=machine, date=now.isoformat(timespec="seconds"), load_start=start_load, load_end=loadavg(),
                  run_s=round(time.perf_counter() - t0, 1))
    command = "python benchmarks/bench_server_load.py " + " ".join(sys.argv[1:] if argv is None else argv)
    markdown = render_markdown(result, command.strip())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"server-load-{machine['hostname']}-{now.strftime('%Y-%m-%dT%H%M%SZ')}"  # one pair of files per run
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown)
    print(markdown)
    progress(f"wrote {args.out_dir / stem}.json and .md")
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
