#!/usr/bin/env python3
"""Fleet demo: roll the digits bundle out to a device over the air and predict on it.

Starts a real OTA server (`edgepack server run`) and a real device agent
(`edgepack-runtime serve --ota-server ...`) with an empty cache on this machine, uploads
the bundle, provisions the device, creates a rollout, waits until the device has
installed and committed the bundle, then asks the device's local daemon (Unix socket)
for predictions on raw digits. Everything runs on 127.0.0.1 and stops at the end.

    python examples/fleet_demo.py BUNDLE PUBLIC_KEY WORK_DIR
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 120


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self._path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, method: str, path: str, body: bytes | dict | None = None) -> dict:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Authorization": f"Bearer {token}"}
    if isinstance(body, dict):
        headers["Content-Type"] = "application/json"
    elif body is not None:
        headers["Content-Type"] = "application/octet-stream"
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


def _wait(what: str, check, deadline: float, procs: list) -> None:
    while time.monotonic() < deadline:
        for proc, name, log in procs:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode} while waiting for {what}:\n{Path(log).read_text()[-2000:]}")
        try:
            if check():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"timed out waiting for {what}")


def main(bundle: Path, public_key: Path, work: Path) -> int:
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    admin_token = secrets.token_urlsafe(24)
    (work / "admin.token").write_text(admin_token)
    os.chmod(work / "admin.token", 0o600)
    env = dict(os.environ, EDGEPACK_SERVER_POLL_INTERVAL_S="1")
    procs: list = []
    deadline = time.monotonic() + DEADLINE_S
    try:
        server_log = work / "server.log"
        server = subprocess.Popen(
            [sys.executable, "-m", "edgepack", "server", "run", "--data", str(work / "server"), "--port", str(port),
             "--trusted-key", str(public_key), "--admin-token-file", str(work / "admin.token")],
            stdout=open(server_log, "wb"), stderr=subprocess.STDOUT, env=env,
        )
        procs.append((server, "server", server_log))
        _wait("the server", lambda: urllib.request.urlopen(base + "/healthz", timeout=2).status == 200, deadline, procs)
        print(f"server   listening on {base}")

        uploaded = _api(base, admin_token, "POST", "/v1/admin/bundles", bundle.read_bytes())
        print(f"server   registered {uploaded['name']} {uploaded['version']} ({uploaded['size']:,} bytes, stage {uploaded['stage']})")
        device = _api(base, admin_token, "POST", "/v1/admin/devices", {"id": "demo-pi-01", "group": "demo", "profile": "rpi4"})
        token_file = work / "device.token"
        token_file.write_text(device["token"])
        os.chmod(token_file, 0o600)
        print("server   provisioned device demo-pi-01 (token shown once, stored hashed)")

        sock = work / "device.sock"
        device_log = work / "device.log"
        agent = subprocess.Popen(
            [sys.executable, "-m", "edgepack_runtime.cli", "serve", "--cache", str(work / "device-cache"), "--socket", str(sock),
             "--key", str(public_key), "--ota-server", base, "--device-id", "demo-pi-01", "--token-file", str(token_file),
             "--ota-interval", "1"],
            stdout=open(device_log, "wb"), stderr=subprocess.STDOUT,
        )
        procs.append((agent, "device agent", device_log))
        _wait("the device daemon", lambda: sock.exists(), deadline, procs)
        print("device   agent started with an empty cache (no model yet: /readyz says 503)")

        rollout = _api(base, admin_token, "POST", "/v1/admin/rollouts", {
            "bundle_id": uploaded["id"], "group": "demo", "steps": [100], "soak_seconds": 0,
            "probation": {"requests": 0, "seconds": 1, "max_error_rate": 0.05, "max_latency_ratio": 3.0},
        })
        print(f"server   rollout {rollout['id']} of {uploaded['version']} to group demo started")

        def committed() -> bool:
            info = _api(base, admin_token, "GET", f"/v1/admin/devices/demo-pi-01")
            return (info.get("current") or {}).get("version") == uploaded["version"] and info.get("state") in ("idle", "committed")

        _wait("the device to install the bundle over the air", committed, deadline, procs)
        print(f"device   downloaded, verified, self-tested and committed {uploaded['version']}; the server agrees")

        val = np.load(ROOT / "examples" / "digits" / "val.npz")
        raw, labels = val["raw"][:5], val["labels"][:5]
        conn = _UnixConnection(str(sock))
        conn.request("POST", "/predict", json.dumps({"inputs": {"raw": raw.tolist()}}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise SystemExit(f"device answered {response.status}: {answer}")
        scores = np.asarray(answer["outputs"]["scores"])
        model = answer["model"]
        print(f"device   predictions from {model['name']} {model['version']} ({model['variant']}) over its local socket:")
        for s, y in zip(scores, labels):
            print(f"           predicted {int(s.argmax())} ({s.max():.2f}), true {y}")
        return 0
    finally:
        for proc, _, _ in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
