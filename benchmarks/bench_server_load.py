"""Load benchmark of the OTA update server: many devices checking in against ONE process.

What it does (loopback only, every loop bounded in count and time):

1. Builds a signed test bundle (``tests/bundles.py``) and a fresh data directory.
2. Provisions ``--devices`` devices *before* the server starts, through the server's
   own provisioning code (``Fleet.provision``: random token, only its sha256 stored)
   on the same SQLite file, all inside one transaction (10,000 admin API calls would
   cost 10,000 fsyncs and measure provisioning, not check-ins).
3. Starts the real server (``python -m edgepack server run``) on 127.0.0.1 and a
   free port, uploads the bundle through the admin API and creates an active rollout
   to the devices' group (steps ``--steps``, long soak), so every check-in computes a
   real directive (in-cohort devices get ``update`` and become members, the others
   ``none``).
4. Runs ``--workers`` load-generator processes with ``--threads`` threads each; each
   thread owns a slice of the devices and one HTTP/1.1 keep-alive connection
   (``http.client``) and checks its devices in round-robin, one request at a time, each
   with the device's next ``seq``. Warm-up: one check-in per device (bounded by
   ``--warmup-timeout``). Then every generator measures the same fixed window of
   ``--seconds`` seconds.
5. Records sustained check-ins/s (2xx answers in the window / window), p50/p95/p99
   latency, answers by status and transport errors, the server's CPU and RSS from
   ``/proc``, and whether the goal (≥ 1,000 check-ins/s at p99 ≤ 50 ms) is met.

Results go to ``<out-dir>/server-load-<hostname>-<UTC date and time>.json`` and ``.md``; the
Markdown is printed on stdout, progress on stderr. The run stops by itself (a global
deadline) and the server is killed in a ``finally``.

Usage::

    python benchmarks/bench_server_load.py [--devices 10000] [--seconds 20] [--workers 2] [--threads 6]
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any, Dict, List, Optional

from _common import cpu_model, progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

GOALS = {"checkins_per_s": 1000.0, "p99_ms": 50.0, "devices": 10000}
ADMIN = "bench-admin-token-0123456789abcdef"
GROUP = "bench"
HOST = "127.0.0.1"
_T0 = time.perf_counter()




def machine_info() -> dict:
    cpu = cpu_model()
    versions = {}
    for mod in ("fastapi", "starlette", "uvicorn", "pydantic", "httptools", "uvloop"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            versions[mod] = None
    return {"hostname": socket.gethostname(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "sqlite": __import__("sqlite3").sqlite_version, **versions}


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


# ------------------------------------------------------------------ /proc


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem_mib(pid: int) -> Dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


# ------------------------------------------------------------------ setup


def provision_offline(data: Path, pub: Path, n: int) -> List[tuple]:
    """Provision ``n`` devices through ``Fleet.provision`` on the server's database; [(id, token)]."""
    from edgepack.server.blobs import BlobStore
    from edgepack.server.fleet import Fleet
    from edgepack.server.orchestration import Orchestrator
    from edgepack.server.schemas import DeviceCreate
    from edgepack.server.settings import ServerSettings
    from edgepack.server.storage import open_storage

    settings = ServerSettings.for_tests(data, ADMIN, trusted_key_files=(pub,))
    storage = open_storage(settings.db_url)
    try:
        storage.migrate()
        fleet = Fleet(settings, storage, BlobStore(settings.blob_dir), Orchestrator(storage, time.time), time.time)
        out = []
        with storage.transaction():  # one commit for all (Fleet.provision's own transaction nests)
            for i in range(n):
                record, token = fleet.provision(DeviceCreate(id=f"dev-{i:05d}", group=GROUP, tags=["bench"], profile="rpi4"))
                out.append((record.id, token))
        return out
    finally:
        storage.close()


def start_server(data: Path, port: int, pub: Path, token_file: Path, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing to it
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgepack", "server", "run", "--data", str(data), "--host", HOST, "--port", str(port),
         "--trusted-key", str(pub), "--admin-token-file", str(token_file)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
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
        return resp.status, (json.loads(data) if data else None)
    finally:
        conn.close()


# ------------------------------------------------------------------ load generator


def _body(seq: int) -> bytes:
    return (b'{"seq":%d,"state":"idle","current":null,"previous":null,'
            b'"health":{"serving":true,"requests":1200,"errors":3,"p95_ms":1.8,"nonfinite":0,"uptime_s":3600},'
            b'"runtime_version":"0.1.0","engines":["onnxruntime"],"summaries":{}}' % seq)


def _thread(port: int, devices: List[tuple], seqs: Dict[str, int], phase: dict, out: dict, hard_deadline: float) -> None:
    """One keep-alive connection; check in ``devices`` round-robin until the window ends."""
    lat: List[float] = []
    statuses: Dict[str, int] = {}
    actions: Dict[str, int] = {}
    seen_window: set = set()
    errors: Dict[str, int] = {}
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
            if in_window:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            i += 1
            time.sleep(0.01)
            continue
        if status == 200 or status == 409:
            seqs[dev_id] = seq  # 409: the server already has this seq (e.g. a retried request)
        if warming:
            warm_done += status == 200
        elif in_window:
            lat.append(dt)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 200:
                seen_window.add(dev_id)
                action = json.loads(data).get("action", "?")
                actions[action] = actions.get(action, 0) + 1
        i += 1
    if conn is not None:
        conn.close()
    out.update(lat=lat, statuses=statuses, actions=actions, seen=seen_window, errors=errors, warm_done=warm_done)


def generator(port: int, devices: List[tuple], threads: int, ctl: Any, result_q: Any, hard_deadline: float) -> None:
    """One load-generator process: ``threads`` threads over a slice of the devices."""
    seqs = {d: 0 for d, _ in devices}
    slices = [devices[k::threads] for k in range(threads)]
    warm_deadline = ctl["warm_deadline"].value
    states, outs, workers = [], [], []
    for part in slices:
        st = {"warm_deadline": warm_deadline, "warm_signalled": False, "ready": threading.Event(),
              "go": threading.Event(), "start": 0.0, "end": 0.0}
        out: dict = {}
        states.append(st)
        outs.append(out)
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
    lat, statuses, actions, seen, errors, warm_done = [], {}, {}, set(), {}, 0
    for out in outs:
        lat += out.get("lat", [])
        seen |= out.get("seen", set())
        warm_done += out.get("warm_done", 0)
        for src, dst in ((out.get("statuses", {}), statuses), (out.get("actions", {}), actions), (out.get("errors", {}), errors)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
    result_q.put({"lat": lat, "statuses": statuses, "actions": actions, "seen": sorted(seen), "errors": errors,
                  "warm_done": warm_done, "cpu_s": time.process_time() - cpu0, "cpu_window_s": time.process_time() - cpu_w0,
                  "alive_threads": sum(w.is_alive() for w in workers)})


# ------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> dict:
    import bundles  # tests/bundles.py: signed test bundles in the real format

    hard_deadline = time.time() + args.deadline
    work = Path(tempfile.mkdtemp(prefix="edgepack-server-load-"))
    data = work / "data"
    priv, pub = bundles.keys(work)
    bundle = bundles.make_bundle(work, priv, "2.0.0")
    token_file = work / "admin.token"
    token_file.write_text(ADMIN + "\n")
    token_file.chmod(0o600)

    t = time.perf_counter()
    devices = provision_offline(data, pub, args.devices)
    provision_s = time.perf_counter() - t
    progress(f"provisioned {len(devices)} devices in {provision_s:.1f}s (Fleet.provision, one transaction)")

    port = free_port()
    proc = None
    gens: List[mp.Process] = []
    try:
        proc = start_server(data, port, pub, token_file, work / "server.log")
        progress(f"server pid {proc.pid} on http://{HOST}:{port}")
        auth = {"Authorization": f"Bearer {ADMIN}"}
        st, up = request("POST", port, "/v1/admin/bundles", bundle.read_bytes(),
                         {**auth, "Content-Type": "application/octet-stream"})
        if st not in (200, 201):
            raise RuntimeError(f"upload failed: {st} {up}")
        st, ro = request("POST", port, "/v1/admin/rollouts", {
            "bundle_id": up["id"], "group": GROUP, "steps": args.steps, "soak_seconds": 3600,
            "min_devices_succeeded": 1, "max_failure_rate": 0.1, "halt_min_count": 1}, auth)
        if st != 201:
            raise RuntimeError(f"rollout failed: {st} {ro}")
        progress(f"bundle {up['id']} uploaded; rollout {ro['id']} active, steps {args.steps}")

        ctx = mp.get_context("fork")
        ctl = {"warm_deadline": ctx.Value("d", time.time() + args.warmup_timeout), "ready": ctx.Semaphore(0),
               "go": ctx.Event(), "start": ctx.Value("d", 0.0), "end": ctx.Value("d", 0.0)}
        result_q = ctx.Queue()
        for w in range(args.workers):
            g = ctx.Process(target=generator, args=(port, devices[w::args.workers], args.threads, ctl, result_q, hard_deadline),
                            daemon=True)
            g.start()
            gens.append(g)
        t = time.perf_counter()
        for _ in gens:
            if not ctl["ready"].acquire(timeout=max(0.1, hard_deadline - time.time())):
                raise RuntimeError("load generators did not finish the warm-up before the deadline")
        warm_s = time.perf_counter() - t
        progress(f"warm-up done in {warm_s:.1f}s; measuring {args.seconds:.0f}s")
        start = time.time() + 0.2
        end = start + args.seconds
        ctl["start"].value, ctl["end"].value = start, end
        ctl["go"].set()
        time.sleep(max(0.0, start - time.time()))
        cpu0, w0 = proc_cpu_s(proc.pid), time.time()
        time.sleep(max(0.0, end - time.time()))
        cpu1, w1 = proc_cpu_s(proc.pid), time.time()
        mem = proc_mem_mib(proc.pid)
        results = []
        for _ in gens:
            results.append(result_q.get(timeout=max(1.0, hard_deadline - time.time() + 5)))
        for g in gens:
            g.join(timeout=5)
        st, server_dev = request("GET", port, f"/v1/admin/devices/{devices[0][0]}", headers=auth)
        st, ro_after = request("GET", port, f"/v1/admin/rollouts/{ro['id']}", headers=auth)
    finally:
        for g in gens:
            if g.is_alive():
                g.kill()
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    lat = sorted(x for r in results for x in r["lat"])
    statuses: Dict[str, int] = {}
    actions: Dict[str, int] = {}
    errors: Dict[str, int] = {}
    for r in results:
        for src, dst in ((r["statuses"], statuses), (r["actions"], actions), (r["errors"], errors)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
    ok = statuses.get("200", 0)
    seen = sum(len(r["seen"]) for r in results)
    warm_done = sum(r["warm_done"] for r in results)
    rate = ok / args.seconds
    p99_ms = pct(lat, 0.99) * 1000
    return {
        "config": {"devices": args.devices, "seconds": args.seconds, "workers": args.workers, "threads": args.threads,
                   "connections": args.workers * args.threads, "steps": args.steps, "warmup_timeout": args.warmup_timeout},
        "provision_s": round(provision_s, 2),
        "warmup": {"seconds": round(warm_s, 2), "devices_checked_in": warm_done},
        "window": {"seconds": args.seconds, "requests": len(lat), "ok": ok, "checkins_per_s": round(rate, 1),
                   "latency_ms": {k: round(pct(lat, q) * 1000, 2) for k, q in
                                  (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))},
                   "mean_ms": round(sum(lat) / len(lat) * 1000, 2) if lat else None,
                   "statuses": statuses, "transport_errors": errors, "actions": actions,
                   "devices_checked_in": seen},
        "server": {"pid_cpu_percent_of_one_core": round(100 * (cpu1 - cpu0) / (w1 - w0), 1), **mem},
        "generators": {"cpu_s_window": round(sum(r["cpu_window_s"] for r in results), 2),
                       "cpu_percent_window": round(100 * sum(r["cpu_window_s"] for r in results) / args.seconds, 1)},
        "check": {"device0_last_seq": server_dev.get("last_seq") if isinstance(server_dev, dict) else None,
                  "rollout_status": ro_after.get("status") if isinstance(ro_after, dict) else None,
                  "rollout_members": len(ro_after.get("members", [])) if isinstance(ro_after, dict) else None},
        "goals": {"checkins_per_s": GOALS["checkins_per_s"], "p99_ms": GOALS["p99_ms"], "devices": GOALS["devices"],
                  "met": bool(rate >= GOALS["checkins_per_s"] and p99_ms <= GOALS["p99_ms"]
                              and args.devices >= GOALS["devices"] and seen == args.devices and not errors
                              and ok == len(lat))},
        "work_dir": str(work) if args.keep else None,
    }


def render_markdown(result: dict, command: str) -> str:
    m, c, w, s = result["machine"], result["config"], result["window"], result["server"]
    L = w["latency_ms"]
    yes = lambda b: "yes" if b else "**no**"  # noqa: E731
    other = {k: v for k, v in w["statuses"].items() if k != "200"}
    lines = [
        f"# Server load benchmark — {m['hostname']}, {result['date']}",
        "",
        f"{m['cpu']} ({m['cpus']} CPUs), Python {m['python']}, SQLite {m['sqlite']}, fastapi {m['fastapi']}, "
        f"uvicorn {m['uvicorn']}, httptools {m['httptools']}, uvloop {m['uvloop']}. "
        f"Load average at start {result['load_start']}, at end {result['load_end']}.",
        "",
        f"Command: `{command}`",
        "",
        f"One server process (`python -m edgepack server run`, 127.0.0.1); {c['devices']:,} provisioned devices in one group "
        f"with an active rollout (steps {c['steps']}); {c['workers']} generator process(es) × {c['threads']} threads = "
        f"{c['connections']} keep-alive connections, one request at a time each; {c['seconds']:.0f} s window after a "
        f"warm-up of one check-in per device ({result['warmup']['seconds']} s).",
        "",
        "| metric | measured | goal | met |",
        "| --- | --- | --- | --- |",
        f"| sustained check-ins/s (200s in window / window) | {w['checkins_per_s']:,.1f} | ≥ {GOALS['checkins_per_s']:,.0f} | "
        f"{yes(w['checkins_per_s'] >= GOALS['checkins_per_s'])} |",
        f"| latency p99 | {L['p99']} ms | ≤ {GOALS['p99_ms']:.0f} ms | {yes(L['p99'] <= GOALS['p99_ms'])} |",
        f"| latency p50 / p95 / max | {L['p50']} / {L['p95']} / {L['max']} ms | | |",
        f"| devices checked in during the window | {w['devices_checked_in']:,} of {c['devices']:,} (warm-up: "
        f"{result['warmup']['devices_checked_in']:,}) | all, ≥ {GOALS['devices']:,} | "
        f"{yes(w['devices_checked_in'] == c['devices'] and c['devices'] >= GOALS['devices'])} |",
        f"| non-200 answers / transport errors | {other or 'none'} / {w['transport_errors'] or 'none'} | none | "
        f"{yes(not other and not w['transport_errors'])} |",
        f"| directives in window | {w['actions']} | | |",
        f"| server CPU (window) | {s['pid_cpu_percent_of_one_core']} % of one core | | |",
        f"| server RSS at end / peak | {s.get('VmRSS')} / {s.get('VmHWM')} MiB | | |",
        f"| generators CPU (window) | {result['generators']['cpu_percent_window']} % of one core | | |",
        "",
        f"**Goal (≥ {GOALS['checkins_per_s']:,.0f} check-ins/s at p99 ≤ {GOALS['p99_ms']:.0f} ms, "
        f"≥ {GOALS['devices']:,} devices): {'met' if result['goals']['met'] else 'not met'}.**",
        "",
        f"Devices were provisioned before the server started through `Fleet.provision` (random token, sha256 stored) "
        f"in one transaction ({result['provision_s']} s). After the run: device 0 last_seq "
        f"{result['check']['device0_last_seq']}, rollout {result['check']['rollout_status']} with "
        f"{result['check']['rollout_members']} members. Latency is client-side (request written → body read), "
        f"closed loop, so it includes queueing at the server; the generators share the 2 CPUs with the server.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10000)
    p.add_argument("--seconds", type=float, default=20.0, help="measurement window")
    p.add_argument("--workers", type=int, default=2, help="load-generator processes")
    p.add_argument("--threads", type=int, default=6, help="threads (keep-alive connections) per generator")
    p.add_argument("--steps", type=float, nargs="+", default=[50, 100], help="rollout step percentages")
    p.add_argument("--warmup-timeout", type=float, default=90.0, help="max seconds for the warm-up sweep")
    p.add_argument("--deadline", type=float, default=300.0, help="hard stop for the whole run, seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory (database, server log)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    args.steps = [int(x) if float(x).is_integer() else x for x in args.steps]
    machine = machine_info()
    start_load = loadavg()
    progress(f"host {machine['hostname']}: {machine['cpu']}, {machine['cpus']} CPUs, load {start_load}")
    now = _dt.datetime.now(_dt.timezone.utc)
    result = run(args)
    result.update(machine=machine, date=now.isoformat(timespec="seconds"), load_start=start_load, load_end=loadavg())
    command = "python benchmarks/bench_server_load.py " + " ".join(sys.argv[1:] if argv is None else argv)
    markdown = render_markdown(result, command.strip())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"server-load-{machine['hostname']}-{now.strftime('%Y-%m-%dT%H%M%SZ')}"  # one pair of files per run
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
