"""Benchmark the device runtime's request path against bare onnxruntime, in ONE run.

Every number is measured next to its baseline in the same run, on the same tiny model
(``tests/bundles.py``'s raw classifier: uint8 [N,4] → Cast → /255 → MatMul → [N,3];
one row per request), so machine noise hits both alike:

* **in-process overhead** — ``Model.predict(x)`` vs the bare
  ``onnxruntime.InferenceSession.run`` on a session built with the same options;
  calls alternate (raw, predict, raw, ...) and the medians are subtracted.
* **Unix socket** — the real daemon (``python -m edgepack_runtime.cli serve``) in a
  subprocess; a minimal keep-alive HTTP/1.1 client on raw sockets (pre-encoded
  request, one ``sendall``, ``recv`` until Content-Length) sends JSON predictions
  one after another. Round trip p50 minus the bare call's p50 (bare calls are
  interleaved with the round trips), and requests/s of a plain sequential loop.
  The same through ``http.client`` is reported for information (it adds the
  client's own header parsing).
* **HTTP** — the same over loopback TCP.
* **cold start** — wall time from spawning a process to its first prediction:
  ``edgepack_runtime.open(cache).predict(x)`` (verifies signature and hashes,
  self-tests, loads) vs a bare process that imports onnxruntime, creates the session
  and runs once. Runs alternate; medians; ratio. Files are in the page cache for
  both (warm disk, cold process).
* **RSS** — the daemon after the load above vs a bare process holding the same
  onnxruntime session after one run; ratio.

Results go to ``<out-dir>/runtime-<hostname>-<date>.json`` and ``.md``; the Markdown
is printed on stdout, progress goes to stderr.

Usage::

    python benchmarks/bench_runtime.py [--requests 20000] [--cold-runs 7] [--out-dir benchmarks/results]

Transports are measured twice: with client and daemon left to the scheduler, and
with both pinned to one CPU (Linux, 2+ CPUs), next to a transport floor (a Python
echo server) in each placement. This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnxruntime as ort

from _common import cpu_model, progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import bundles  # noqa: E402  (tests/bundles.py: signed test bundles in the real format)

import edgepack_runtime  # noqa: E402
from edgepack_runtime.bundle import load_public_key  # noqa: E402
from edgepack_runtime.cache import CacheConfig  # noqa: E402
from edgepack_runtime.model import RuntimeConfig, install  # noqa: E402

X = np.array([[0, 255, 10, 20]], np.uint8)
GOALS = {
    "overhead_us": 20.0,
    "socket_p50_us": 50.0,
    "socket_rps": 10000.0,
    "http_p50_us": 250.0,
    "cold_ratio": 1.5,
    "rss_ratio": 1.5,
}
_T0 = time.perf_counter()




def machine_info() -> dict:
    cpu = cpu_model()
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "runtime": edgepack_runtime.__version__,
        "platform": platform.platform(),
    }


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def pct(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------ setup


def make_cache(work: Path) -> Tuple[Path, Path]:
    """A device cache with the test bundle installed and its key pinned; (cache, model file)."""
    priv, pub = bundles.keys(work)
    cache = work / "cache"
    config = RuntimeConfig(CacheConfig(root=cache, trusted_keys=(load_public_key(pub),)))
    slot = install(bundles.make_bundle(work, priv), config)
    (cache / "keys").mkdir(exist_ok=True)
    shutil.copy(pub, cache / "keys" / "test.pub")
    return cache, cache / "store" / slot.digest / "models" / "onnx-fp32.onnx"


def bare_session(model_file: Path) -> ort.InferenceSession:
    """A session built as a user would, with the runtime's thread settings."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------- in-process


def bench_in_process(cache: Path, model_file: Path, calls: int) -> dict:
    model = edgepack_runtime.open(cache)
    session = bare_session(model_file)
    feed = {"raw": X}
    np.testing.assert_array_equal(model.predict(X)["scores"], session.run(None, feed)[0])
    for _ in range(2000):
        session.run(None, feed)
        model.predict(X)
    perf = time.perf_counter_ns
    raw, pred = [], []
    for _ in range(calls):
        t0 = perf()
        session.run(None, feed)
        t1 = perf()
        model.predict(X)
        t2 = perf()
        raw.append((t1 - t0) / 1000)
        pred.append((t2 - t1) / 1000)
    raw_p50, pred_p50 = statistics.median(raw), statistics.median(pred)
    return {"calls": calls, "raw_median_us": raw_p50, "predict_median_us": pred_p50, "overhead_us": pred_p50 - raw_p50}


# ------------------------------------------------------------------ daemon


class RawClient:
    """The thinnest keep-alive HTTP/1.1 client: one sendall, recv until Content-Length."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def roundtrip(self, request: bytes) -> bytes:
        sock = self.sock
        sock.sendall(request)
        data = sock.recv(65536)
        end = data.find(b"\r\n\r\n")
        while end < 0:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError("daemon closed the connection")
            data += more
            end = data.find(b"\r\n\r\n")
        at = data.find(b"Content-Length: ", 0, end) + 16
        need = end + 4 + int(data[at:data.find(b"\r\n", at)])
        while len(data) < need:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError("daemon closed the connection")
            data += more
        if not data.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(data[:300].decode("latin-1"))
        return data[end + 4:need]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def connect_tcp(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def predict_request(body: bytes) -> bytes:
    return b"POST /predict HTTP/1.1\r\nHost: edgepack\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def bench_transport(client: RawClient, request: bytes, session: ort.InferenceSession, requests: int, expected: Optional[np.ndarray]) -> dict:
    """Round trips vs bare session calls, alternating blocks of each (each block a tight loop)."""
    if expected is not None:
        got = np.asarray(json.loads(client.roundtrip(request))["outputs"]["scores"], np.float32)
        np.testing.assert_array_equal(got, expected)
    feed = {"raw": X}
    run = session.run
    roundtrip = client.roundtrip
    for _ in range(2000):
        roundtrip(request)
    perf = time.perf_counter_ns
    trips: List[float] = []
    raws: List[float] = []
    block = 1000
    for _ in range(max(1, requests // block)):
        for _ in range(block):
            t0 = perf()
            run(None, feed)
            raws.append((perf() - t0) / 1000)
        for _ in range(block):
            t0 = perf()
            roundtrip(request)
            trips.append((perf() - t0) / 1000)
    # plain sequential throughput, nothing else in the loop
    start = time.perf_counter()
    for _ in range(requests):
        roundtrip(request)
    elapsed = time.perf_counter() - start
    raw_p50 = statistics.median(raws)
    return {
        "requests": len(trips),
        "roundtrip_p50_us": statistics.median(trips),
        "roundtrip_p90_us": pct(trips, 0.90),
        "roundtrip_p99_us": pct(trips, 0.99),
        "raw_p50_us": raw_p50,
        "minus_raw_p50_us": statistics.median(trips) - raw_p50,
        "sequential_rps": requests / elapsed,
    }


_ECHO = """
import os, socket, sys
path = sys.argv[1]
response = b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: 2\\r\\n\\r\\n{}"
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
while conn.recv(65536):
    conn.sendall(response)
"""


def bench_echo_floor(work: Path, request: bytes, requests: int, cpu: Optional[int]) -> float:
    """p50 round trip to a Python process that answers every recv with a fixed response."""
    path = work / "echo.sock"
    if path.exists():
        path.unlink()
    proc = subprocess.Popen([sys.executable, "-c", _ECHO, str(path)], stdout=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None)
    try:
        proc.stdout.readline()
        with connect_unix(str(path)) as s:
            client = RawClient(s)
            for _ in range(2000):
                client.roundtrip(request)
            perf = time.perf_counter_ns
            trips = []
            for _ in range(requests):
                t0 = perf()
                client.roundtrip(request)
                trips.append((perf() - t0) / 1000)
        return statistics.median(trips)
    finally:
        proc.kill()
        proc.wait(5)


def bench_http_client(path: str, body: bytes, requests: int) -> dict:
    conn = UnixHTTPConnection(path)
    headers = {"Content-Type": "application/json"}
    times = []
    perf = time.perf_counter_ns
    for i in range(requests + 500):
        t0 = perf()
        conn.request("POST", "/predict", body, headers)
        response = conn.getresponse()
        response.read()
        if i >= 500:
            times.append((perf() - t0) / 1000)
    conn.close()
    return {"requests": requests, "roundtrip_p50_us": statistics.median(times)}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start_daemon(cache: Path, sock: Path, port: int, cpu: Optional[int]) -> Tuple[subprocess.Popen, float]:
    """The daemon, and seconds from spawn to its first served prediction."""
    cmd = [sys.executable, "-m", "edgepack_runtime.cli", "serve", "--cache", str(cache), "--socket", str(sock), "--http", f"127.0.0.1:{port}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None)
    request = predict_request(json.dumps({"raw": X.tolist()}).encode())
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited: {proc.stderr.read().decode()}")
        try:
            with connect_unix(str(sock)) as s:
                RawClient(s).roundtrip(request)
            return proc, time.perf_counter() - t0
        except (OSError, RuntimeError):
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("daemon did not become ready")
            time.sleep(0.002)


def stop_daemon(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


# --------------------------------------------------------------- processes

_RUNTIME_COLD = """
import time, numpy as np, edgepack_runtime
m = edgepack_runtime.open({cache!r})
m.predict(np.array([[0, 255, 10, 20]], np.uint8))
print(time.monotonic(), flush=True)
"""
_BARE_COLD = """
import time, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
s = ort.InferenceSession({model!r}, o, providers=["CPUExecutionProvider"])
s.run(None, {{"raw": np.array([[0, 255, 10, 20]], np.uint8)}})
print(time.monotonic(), flush=True)
"""
_BARE_HOLD = _BARE_COLD + "\nimport sys; sys.stdin.read()\n"


def cold_once(code: str) -> float:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    return float(out.split()[-1]) - t0


def bench_cold(cache: Path, model_file: Path, runs: int) -> dict:
    runtime_code = _RUNTIME_COLD.format(cache=str(cache))
    bare_code = _BARE_COLD.format(model=str(model_file))
    cold_once(runtime_code), cold_once(bare_code)  # warm the page cache for both
    runtime, bare = [], []
    for i in range(runs):
        for code, into in ((runtime_code, runtime), (bare_code, bare)) if i % 2 == 0 else ((bare_code, bare), (runtime_code, runtime)):
            into.append(cold_once(code))
    r, b = statistics.median(runtime), statistics.median(bare)
    return {"runs": runs, "runtime_s": r, "bare_s": b, "ratio": r / b, "runtime_all_s": runtime, "bare_all_s": bare}


def bare_rss(model_file: Path) -> int:
    proc = subprocess.Popen([sys.executable, "-c", _BARE_HOLD.format(model=str(model_file))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        return rss_kb(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(10)


# ------------------------------------------------------------------ report


def _ok(value: float, goal: float, higher_is_better: bool = False) -> str:
    met = value >= goal if higher_is_better else value <= goal
    return "yes" if met else "**no**"


def render_markdown(result: dict) -> str:
    m, r = result["machine"], result["results"]
    inproc, cold, mem = r["in_process"], r["cold_start"], r["rss"]
    places = r["placements"]
    lines = [
        f"# Runtime benchmark — {m['hostname']}, {result['date']}",
        "",
        f"{m['cpu']} ({m['cpus']} CPUs), Python {m['python']}, numpy {m['numpy']}, onnxruntime {m['onnxruntime']}, "
        f"edgepack-runtime {m['runtime']}. Load average at start {result['loadavg_start']}, at end {result['loadavg_end']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| metric | measured | baseline in the same run | goal | met |",
        "| --- | --- | --- | --- | --- |",
        f"| in-process `predict` overhead (median) | {inproc['overhead_us']:.1f} µs | bare `InferenceSession.run` "
        f"{inproc['raw_median_us']:.1f} µs; `predict` {inproc['predict_median_us']:.1f} µs | ≤ {GOALS['overhead_us']:.0f} µs | {_ok(inproc['overhead_us'], GOALS['overhead_us'])} |",
    ]
    for name, pl in places.items():
        unix, tcp = pl["unix_socket"], pl["http"]
        lines += [
            f"| Unix socket round trip − raw call (p50), {name} | {unix['minus_raw_p50_us']:.1f} µs | round trip {unix['roundtrip_p50_us']:.1f} µs "
            f"(p90 {unix['roundtrip_p90_us']:.0f}, p99 {unix['roundtrip_p99_us']:.0f}); raw call {unix['raw_p50_us']:.1f} µs; "
            f"transport floor (Python echo server) {pl['echo_floor_p50_us']:.1f} µs | ≤ {GOALS['socket_p50_us']:.0f} µs | {_ok(unix['minus_raw_p50_us'], GOALS['socket_p50_us'])} |",
            f"| Unix socket sequential throughput, {name} | {unix['sequential_rps']:,.0f} req/s | one connection, one request at a time | "
            f"≥ {GOALS['socket_rps']:,.0f} req/s | {_ok(unix['sequential_rps'], GOALS['socket_rps'], True)} |",
            f"| HTTP (loopback TCP) round trip − raw call (p50), {name} | {tcp['minus_raw_p50_us']:.1f} µs | round trip {tcp['roundtrip_p50_us']:.1f} µs "
            f"(p90 {tcp['roundtrip_p90_us']:.0f}, p99 {tcp['roundtrip_p99_us']:.0f}); {tcp['sequential_rps']:,.0f} req/s | "
            f"≤ {GOALS['http_p50_us']:.0f} µs | {_ok(tcp['minus_raw_p50_us'], GOALS['http_p50_us'])} |",
        ]
    lines += [
        f"| cold start to first prediction | {cold['ratio']:.2f}× | `open(cache).predict` {cold['runtime_s'] * 1000:.0f} ms vs bare onnxruntime "
        f"{cold['bare_s'] * 1000:.0f} ms (medians of {cold['runs']}) | ≤ {GOALS['cold_ratio']}× | {_ok(cold['ratio'], GOALS['cold_ratio'])} |",
        f"| daemon RSS | {mem['ratio']:.2f}× | daemon {mem['daemon_kb'] / 1024:.1f} MiB vs a bare process holding the same session "
        f"{mem['bare_kb'] / 1024:.1f} MiB | ≤ {GOALS['rss_ratio']}× | {_ok(mem['ratio'], GOALS['rss_ratio'])} |",
        "",
        "Placements: *any CPU* leaves client and daemon to the scheduler; *one CPU* pins both (and the echo server) to one CPU, "
        "so a round trip costs context switches instead of cross-CPU wake-ups (on a VM, waking an idle vCPU usually goes "
        "through the hypervisor). Other load on the machine shows in the load average above and moves these numbers by tens "
        "of µs between runs. The transport floor is a Python process answering every `recv` with a fixed response: "
        "no parsing and no model, just the socket ping-pong both sides pay.",
        "",
        "For information:",
        "",
    ]
    for name, pl in places.items():
        lines.append(f"* {name}: `http.client` over the Unix socket (stdlib client with its own header parsing) round trip p50 "
                     f"{pl['http_client_unix_p50_us']:.1f} µs; daemon-side time per /predict (parsed head → response written, from "
                     f"/metrics) mean {pl['server_mean_us']:.1f} µs; daemon spawn to first served prediction {pl['daemon_first_prediction_s'] * 1000:.0f} ms; "
                     f"exit code after SIGTERM {pl['daemon_exit_code']}.")
    lines += [
        "",
        "Model: uint8 [1,4] → Cast → /255 → MatMul → float [1,3] (tests/bundles.py `raw_classifier`); JSON bodies "
        "`{\"inputs\": {\"raw\": [[0, 255, 10, 20]]}}`, keep-alive, one request at a time. Raw-call baselines alternate "
        "with round trips in blocks of 1000 calls.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000, help="timed requests per transport and placement")
    ap.add_argument("--calls", type=int, default=50000, help="timed in-process calls")
    ap.add_argument("--cold-runs", type=int, default=7, help="cold starts per side")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results", help="where result files go")
    return ap.parse_args(argv)


def bench_placement(work: Path, cache: Path, model_file: Path, requests: int, cpu: Optional[int]) -> Tuple[dict, int]:
    """Echo floor, Unix socket and HTTP against a fresh daemon; (results, daemon RSS in kB)."""
    original = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        session = bare_session(model_file)
        expected = session.run(None, {"raw": X})[0]
        body = json.dumps({"inputs": {"raw": X.tolist()}}).encode()
        request = predict_request(body)
        out: dict = {"cpu": cpu, "echo_floor_p50_us": bench_echo_floor(work, request, requests, cpu)}
        sock_path = work / "d.sock"
        port = free_port()
        proc, first = start_daemon(cache, sock_path, port, cpu)
        try:
            with connect_unix(str(sock_path)) as s:
                out["unix_socket"] = bench_transport(RawClient(s), request, session, requests, expected)
            with connect_tcp(port) as s:
                out["http"] = bench_transport(RawClient(s), request, session, requests, expected)
            out["http_client_unix_p50_us"] = bench_http_client(str(sock_path), body, min(requests, 5000))["roundtrip_p50_us"]
            with connect_unix(str(sock_path)) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                text = b""
                while b"edgepack_model_runs_total " not in text or not text.endswith(b"\n"):
                    text += s.recv(1 << 20)
            lines = text.decode().splitlines()
            total = float(next(l.split()[-1] for l in lines if l.startswith('edgepack_request_duration_seconds_sum{endpoint="/predict"}')))
            count = float(next(l.split()[-1] for l in lines if l.startswith('edgepack_request_duration_seconds_count{endpoint="/predict"}')))
            out["server_mean_us"] = total / count * 1e6
            out["daemon_first_prediction_s"] = first
            daemon_kb = rss_kb(proc.pid)
        finally:
            out["daemon_exit_code"] = stop_daemon(proc)
        return out, daemon_kb
    finally:
        os.sched_setaffinity(0, original)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    now = _dt.datetime.now().astimezone()
    machine = machine_info()
    start_load = loadavg()
    progress(f"host {machine['hostname']}: {machine['cpu']}, {machine['cpus']} CPUs, onnxruntime {machine['onnxruntime']}, load {start_load}")
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ep-bench-") as tmp:
        work = Path(tmp)
        cache, model_file = make_cache(work)
        progress("in-process overhead")
        results["in_process"] = bench_in_process(cache, model_file, args.calls)
        placements = {"any CPU": None}
        if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
            placements["one CPU"] = min(os.sched_getaffinity(0))
        results["placements"] = {}
        daemon_kb = 0
        for name, cpu in placements.items():
            progress(f"echo floor, Unix socket, HTTP ({name})")
            results["placements"][name], kb = bench_placement(work, cache, model_file, args.requests, cpu)
            daemon_kb = daemon_kb or kb  # RSS of the first daemon, after its full load
        progress("RSS of a bare process")
        bare_kb = bare_rss(model_file)
        results["rss"] = {"daemon_kb": daemon_kb, "bare_kb": bare_kb, "ratio": daemon_kb / bare_kb}
        progress("cold starts")
        results["cold_start"] = bench_cold(cache, model_file, args.cold_runs)
    result = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/bench_runtime.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "loadavg_start": start_load,
        "loadavg_end": loadavg(),
        "goals": GOALS,
        "results": results,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"runtime-{machine['hostname']}-{now.date().isoformat()}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = render_markdown(result)
    (args.out_dir / f"{stem}.md").write_text(markdown)
    print(markdown)
    progress(f"wrote {args.out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
