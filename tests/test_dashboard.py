"""The fleet dashboard (`GET /dashboard`) rendered by a real headless browser.

Starts the real ``edgepack server run`` process, builds a realistic fleet state over
HTTP (two bundle versions, devices with health reports, one auto-halted rollout and
one active staged rollout), then renders the page with Debian's headless Chromium:
``--dump-dom`` for assertions on the rendered DOM, ``--screenshot`` for
``test-artifacts/dashboard.png`` (look at it after UI changes).

Chromium is a required system dependency of the test suite: ``.ci/run`` installs it
(``ci/install-system-deps.sh``); without it this test fails rather than skips.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from bundles import keys, make_bundle, raw_classifier
from net import running_server

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ADMIN = "dashboard-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
WIDTH, HEIGHT = 1400, 1000


# ------------------------------------------------------------------ server




@pytest.fixture
def live_server(tmp_path, db_url):
    """(base url, public key used to sign uploads) of a real `edgepack server run` process (both backends)."""
    priv, pub = keys(tmp_path)
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN + "\n")
    with running_server(tmp_path, pub, token_file, {"EDGEPACK_SERVER_DB_URL": db_url}) as (base, log_path):
        yield base, priv


# ------------------------------------------------------------------ fleet


class Dev:
    """A scripted device: its token, seq counter and what it runs."""

    def __init__(self, client: httpx.Client, device_id: str, group: str, current: dict | None) -> None:
        r = client.post("/v1/admin/devices", json={"id": device_id, "group": group, "tags": ["site-a"], "profile": "rpi4"},
                        headers=AUTH)
        assert r.status_code == 201, r.text
        self.client, self.id, self.token, self.seq, self.current = client, device_id, r.json()["token"], 0, current

    def checkin(self, state: str = "idle", p95_ms: float = 2.0, requests: int = 1000, errors: int = 2,
                serving: bool = True, nonfinite: int = 0) -> dict:
        self.seq += 1
        body = {"seq": self.seq, "state": state, "current": self.current, "previous": None,
                "health": {"serving": serving, "requests": requests, "errors": errors, "p95_ms": p95_ms,
                           "nonfinite": nonfinite, "uptime_s": 3600},
                "runtime_version": "0.1.0", "engines": ["onnxruntime"], "summaries": {}}
        r = self.client.post(f"/v1/devices/{self.id}/checkin", json=body, headers={"Authorization": f"Bearer {self.token}"})
        assert r.status_code == 200, r.text
        return r.json()

    def events(self, *items: dict) -> None:
        batch = []
        for item in items:
            self.seq += 1
            batch.append({"seq": self.seq, "at": time.time(), **item})
        r = self.client.post(f"/v1/devices/{self.id}/events", json={"events": batch},
                             headers={"Authorization": f"Bearer {self.token}"})
        assert r.status_code == 200, r.text


def _ref(bundle: dict) -> dict:
    return {"name": bundle["name"], "version": bundle["version"], "digest": bundle["digest"]}


def _upload(client: httpx.Client, path: Path) -> dict:
    r = client.post("/v1/admin/bundles", content=path.read_bytes(), headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status_code in (200, 201), r.text
    return r.json()


def _rollout(client: httpx.Client, bundle: dict, group: str, **kw) -> str:
    body = {"bundle_id": bundle["id"], "group": group, "soak_seconds": 3600, **kw}
    r = client.post("/v1/admin/rollouts", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def build_fleet(client: httpx.Client, priv: Path, tmp: Path) -> dict:
    v1 = _upload(client, make_bundle(tmp, priv, "1.0.0", raw_classifier(scale=1.0)))
    v2 = _upload(client, make_bundle(tmp, priv, "2.0.0", raw_classifier(scale=2.0)))
    ev2 = {"digest": v2["digest"], "version": v2["version"]}

    # lab: v2 goes to everyone at once and is halted by two failures
    lab = [Dev(client, f"lab-{i:02d}", "lab", _ref(v1)) for i in range(1, 6)]
    halted = _rollout(client, v2, "lab", steps=[100], max_failure_rate=0.2, halt_min_count=2)
    for dev in lab:
        assert dev.checkin()["action"] == "update"
    for dev in lab[:3]:
        dev.events({"type": "downloaded", "rollout_id": halted, **ev2}, {"type": "installed", "rollout_id": halted, **ev2})
        dev.current = _ref(v2)
    lab[0].events({"type": "self_test_failed", "rollout_id": halted, **ev2,
                   "reason": {"code": "self_test", "detail": "golden outputs differ by 0.31 (tolerance 1e-4)"}})
    lab[0].current = _ref(v1)
    lab[1].events({"type": "probation_failed", "rollout_id": halted, **ev2,
                   "reason": {"code": "latency_regression", "detail": "p95 9.8 ms vs 2.1 ms before (4.7x)"}})
    lab[0].checkin(p95_ms=2.2, errors=1)
    lab[1].checkin(state="probation", p95_ms=9.8, errors=41)   # told to roll back on this check-in
    lab[2].checkin(state="probation", p95_ms=6.1, errors=35)
    lab[3].checkin(p95_ms=2.0, errors=3)
    lab[4].checkin(p95_ms=2.4, errors=0, serving=False, nonfinite=3)

    # field: v2 in steps; the first step's cohort updates (one device is still downloading)
    field = [Dev(client, f"field-{i:02d}", "field", _ref(v1)) for i in range(1, 7)]
    active = _rollout(client, v2, "field", steps=[50, 100], min_devices_succeeded=1, max_failure_rate=0.5, halt_min_count=2)
    joined = [dev for dev in field if dev.checkin()["action"] == "update"]
    for i, dev in enumerate(joined):
        if i == len(joined) - 1 and len(joined) > 1:
            dev.events({"type": "downloaded", "rollout_id": active, **ev2})
            continue
        dev.events({"type": "downloaded", "rollout_id": active, **ev2}, {"type": "installed", "rollout_id": active, **ev2})
        dev.current = _ref(v2)
        dev.events({"type": "committed", "rollout_id": active, **ev2})
    for i, dev in enumerate(field):
        on_v2 = dev.current["digest"] == v2["digest"]
        dev.checkin(p95_ms=(3.1 if on_v2 else 1.9) + 0.1 * i, errors=12 if on_v2 else 4)

    spare = Dev(client, "gw-spare-01", "spare", None)  # provisioned, never checked in
    return {"halted": halted, "active": active, "devices": [d.id for d in lab + field + [spare]]}


# ------------------------------------------------------------------ browser


def _chromium(mode: list[str], url: str, tmp: Path) -> subprocess.Popen:
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp)
    return subprocess.Popen(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars",
         "--virtual-time-budget=5000", *mode, url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp,
    )


def _finish(proc: subprocess.Popen, what: str) -> str:
    try:
        out, err = proc.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"chromium {what} did not finish in 45 s:\n{err.decode(errors='replace')[-2000:]}") from None
    assert proc.returncode == 0, f"chromium {what} failed ({proc.returncode}):\n{err.decode(errors='replace')[-2000:]}"
    return out.decode("utf-8", errors="replace")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR", "PNG without an IHDR chunk"
    assert data[-8:-4] == b"IEND", "truncated PNG (no IEND chunk)"
    return struct.unpack(">II", data[16:24])


def test_dashboard_renders_fleet_in_headless_chromium(live_server, tmp_path):
    if not (CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} is missing: the dashboard test needs Debian's chromium package. `.ci/run` installs it "
                    "(ci/install-system-deps.sh); locally run `sudo ci/install-system-deps.sh` "
                    "(or `apt-get install -y chromium`).")
    base, priv = live_server
    with httpx.Client(base_url=base, timeout=10) as client:
        fleet = build_fleet(client, priv, tmp_path)
        summary = client.get("/v1/admin/summary", headers=AUTH).json()
        page = client.get("/dashboard")
    statuses = {r["id"]: r["status"] for r in summary["rollouts"]}
    assert statuses == {fleet["halted"]: "halted", fleet["active"]: "active"}
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/admin/summary" in page.text
    # self-contained: no external scripts, styles, fonts or images
    for needle in ("http://", "https://", "//cdn", "<link", "@import", "src="):
        assert needle not in page.text.replace("http://www.w3.org/2000/svg", ""), needle

    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = tmp_path / "dashboard.png"
    url = f"{base}/dashboard#token={ADMIN}"
    dom_proc = _chromium(["--dump-dom"], url, tmp_path)
    shot_proc = _chromium([f"--screenshot={shot}"], url, tmp_path)
    dom = re.sub(r"<(script|style)\b.*?</\1>", "", _finish(dom_proc, "--dump-dom"), flags=re.S)  # rendered markup only
    _finish(shot_proc, "--screenshot")

    # the DOM the page rendered from /v1/admin/summary
    assert 'id="app"' in dom and "Could not load" not in dom and "was refused" not in dom, dom[:3000]
    assert f'data-rollout="{fleet["halted"]}"' in dom and f'data-rollout="{fleet["active"]}"' in dom
    assert 'data-status="halted"' in dom and 'data-status="active"' in dom
    assert "Halted automatically" in dom and "Rolling out: step 1 of 2" in dom
    assert "2 of 5 devices failed" in dom                                  # the server's halt message
    assert "Self-test failed" in dom and "golden outputs differ by 0.31" in dom  # halt reasons in plain words
    assert "Latency got worse during probation" in dom and "p95 9.8 ms vs 2.1 ms before" in dom
    for device_id in fleet["devices"]:
        assert f'data-device="{device_id}"' in dom, device_id
    assert "never seen" in dom and "unhealthy" in dom
    assert dom.count("<svg") >= 2 and "<rect" in dom and "v1.0.0" in dom and "v2.0.0" in dom
    assert "targeted" in dom and "succeeded" in dom

    data = shot.read_bytes()
    assert _png_size(data) == (WIDTH, HEIGHT)
    assert len(data) > 20_000, "the screenshot is suspiciously small (blank page?)"
    shutil.copyfile(shot, artifacts / "dashboard.png")
