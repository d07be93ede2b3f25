"""Power loss during an install: the REAL installer is SIGKILLed at every step.

Each case runs ``python -m edgepack_runtime.cli install`` in a subprocess with
``EDGEPACK_RUNTIME_KILL_AT`` set, so the process dies by SIGKILL at that step (no
``finally``, no cleanup — what a pulled plug leaves behind). A fresh process then
opens the cache the way a device does at its next start (``verify --json``, then
``edgepack_runtime.open(...).predict``), and a normal install must still go through.

Kill points (install order, see ``edgepack_runtime.cache``)::

    verify → extract → extract:member (after each member file) → selftest →
    switch:previous → switch:previous:rename → switch:current →
    switch:current:rename → gc

``:rename`` is reached inside the slot pointer's atomic write: the temp file is
written and fsynced, the rename has not happened (a write cut mid-way).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import bundles
from edgepack_runtime.bundle import extract_bundle, load_public_key

V1, V2 = "1.0.0", "2.0.0"
RAW = np.array([[0, 255, 10, 20], [1, 2, 3, 4], [200, 100, 50, 25]], np.uint8)
LAST = "LAST"  # placeholder for the number of the last member of the v2 bundle

# (kill point, version a fresh start must serve, what goes wrong there without care)
UPDATE_KILL_POINTS = [
    ("verify", V1, "power-loss-before-verification"),
    ("extract", V1, "power-loss-before-extraction"),
    ("extract:member#1", V1, "power-loss-mid-extraction-after-first-member"),
    (f"extract:member#{LAST}", V1, "power-loss-mid-extraction-after-last-member"),
    ("selftest", V1, "power-loss-after-extraction-before-self-test"),
    ("switch:previous", V1, "power-loss-before-switch"),
    ("switch:previous:rename", V1, "power-loss-mid-write-of-previous-pointer"),
    ("switch:current", V1, "power-loss-mid-switch-previous-written-current-not"),
    ("switch:current:rename", V1, "power-loss-mid-write-of-current-pointer"),
    ("gc", V2, "power-loss-after-switch-before-gc"),
]

# First-ever install: "switch:previous:rename" is never reached (there is no current
# pointer to copy, previous is just removed), so it is not a kill point here.
FIRST_INSTALL_KILL_POINTS = [
    ("verify", None, "first-install-power-loss-before-verification"),
    ("extract:member#1", None, "first-install-power-loss-mid-extraction"),
    ("selftest", None, "first-install-power-loss-before-self-test"),
    ("switch:previous", None, "first-install-power-loss-before-switch"),
    ("switch:current", None, "first-install-power-loss-mid-switch"),
    ("switch:current:rename", None, "first-install-power-loss-mid-write-of-current-pointer"),
    ("gc", V2, "first-install-power-loss-after-switch"),
]

# Runs the real CLI entry point (what `edgepack-runtime` runs) in a fresh process, with
# its own stdout/stderr/exit code; when a command succeeded and a prediction was asked
# for, also opens the cache with the public API and writes its predictions to a file.
# Several commands' outputs are separated by a line holding only \x1e.
PROBE = r"""
import json, sys
from edgepack_runtime import cli
request = json.loads(sys.argv[1])
rc = 0
for i, argv in enumerate(request["commands"]):
    if i:
        print("\x1e", flush=True)
    rc = cli.main(argv) or rc
    sys.stdout.flush()
if rc == 0 and request.get("predict_to"):
    import numpy as np
    import edgepack_runtime
    model = edgepack_runtime.open(request["cache"], keys=request["keys"])
    scores = model.predict(np.asarray(request["raw"], np.uint8))["scores"]
    with open(request["predict_to"], "w") as fh:
        json.dump({"version": model.version, "digest": model.slot.digest, "scores": scores.tolist()}, fh)
sys.exit(rc)
"""


def _env(kill_at: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEPACK_RUNTIME_KILL_AT", "EDGEPACK_CACHE")}
    if kill_at:
        env["EDGEPACK_RUNTIME_KILL_AT"] = kill_at
    return env


def runtime_cli(*args: str, kill_at: str | None = None, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack_runtime.cli", *map(str, args)], capture_output=True,
                          text=True, env=_env(kill_at), cwd=cwd, timeout=120)


def _expected(model) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"raw": RAW})[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Keys, v1 and v2 bundles, their expected outputs, and a cache holding v1 (installed by the CLI)."""
    tmp = tmp_path_factory.mktemp("power")
    priv, pub = bundles.keys(tmp)
    m1, m2 = bundles.raw_classifier(scale=1.0), bundles.raw_classifier(scale=2.0)
    b1 = bundles.make_bundle(tmp, priv, V1, m1)
    b2 = bundles.make_bundle(tmp, priv, V2, m2)
    expected = {V1: _expected(m1), V2: _expected(m2)}
    assert not np.allclose(expected[V1], expected[V2])  # else "serves v1" could not be told from v2
    members = []
    extract_bundle(b2, tmp / "count-members", load_public_key(pub), on_member=members.append)
    assert len(members) >= 3
    base = tmp / "base-cache"
    done = runtime_cli("install", b1, "--cache", base, "--key", pub, "--json", cwd=tmp)
    assert done.returncode == 0, done.stderr
    return {"tmp": tmp, "pub": pub, "b1": b1, "b2": b2, "expected": expected, "members": len(members), "base": base}


def _kill_install(world, cache: Path, kill_at: str, cwd: Path) -> None:
    kill_at = kill_at.replace(LAST, str(world["members"]))
    died = runtime_cli("install", world["b2"], "--cache", cache, "--key", world["pub"], "--json", kill_at=kill_at, cwd=cwd)
    assert died.returncode == -signal.SIGKILL, (
        f"the installer did not die by SIGKILL at {kill_at} (rc {died.returncode}): the step was not reached\n"
        f"{died.stdout}\n{died.stderr}")
    assert not died.stdout  # it printed no "installed" line: it really died before finishing


def _probe(world, cache: Path, commands: list, cwd: Path, predict: bool = True):
    out = cwd / "predictions.json"
    out.unlink(missing_ok=True)
    request = {"commands": [[str(a) for a in c] for c in commands], "cache": str(cache), "keys": [str(world["pub"])],
               "raw": RAW.tolist(), "predict_to": str(out) if predict else None}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(request)], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=120)
    prediction = json.loads(out.read_text()) if out.exists() else None
    return done, done.stdout.split("\n\x1e\n"), prediction


def _leftovers(cache: Path) -> list:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.name.endswith((".partial", ".tmp")))


def _assert_serves(world, done, outputs, prediction, version: str) -> None:
    assert done.returncode == 0, f"the cache did not open after power loss:\n{done.stdout}\n{done.stderr}"
    info = json.loads(outputs[0])
    assert info["ok"] is True and info["version"] == version, info
    assert info["notes"] == [], "current was damaged and the start had to fall back: a pointer write was not atomic"
    assert "Traceback" not in done.stderr
    assert prediction is not None and prediction["version"] == version and prediction["digest"] == info["digest"]
    np.testing.assert_allclose(np.asarray(prediction["scores"]), world["expected"][version], rtol=0, atol=1e-5)


def _assert_next_install_goes_through(world, cache: Path, cwd: Path) -> None:
    again = runtime_cli("install", world["b2"], "--cache", cache, "--key", world["pub"], "--json", cwd=cwd)
    assert again.returncode == 0, f"orphan state blocked the next install:\n{again.stdout}\n{again.stderr}"
    assert json.loads(again.stdout)["version"] == V2
    # Verify with the keys pinned in the cache only: what the device does offline at its next start.
    done, outputs, prediction = _probe(world, cache, [["verify", "--json", "--cache", cache],
                                                      ["status", "--json", "--cache", cache]], cwd)
    _assert_serves(world, done, outputs, prediction, V2)
    status = json.loads(outputs[1])
    assert status["current"]["version"] == V2
    assert not [e for e in status["store"] if e.endswith((".partial", ".tmp"))]
    assert _leftovers(cache) == [], "leftovers of the interrupted install are still in the cache"


def _expect_leftover_for(kill_at: str, cache: Path) -> None:
    """The kill really cut a write in half: its temp file / partial directory is there."""
    left = _leftovers(cache)
    if kill_at.startswith("extract:member"):
        assert any(p.startswith("store/.") and p.endswith(".partial") for p in left), left
    elif kill_at.endswith(":rename"):
        which = kill_at.split(":")[1]
        assert any(p.startswith(f"slots/.{which}.") and p.endswith(".tmp") for p in left), left


@pytest.mark.parametrize("kill_at,serves", [(k, v) for k, v, _ in UPDATE_KILL_POINTS],
                         ids=[name for _, _, name in UPDATE_KILL_POINTS])
def test_power_loss_during_update_leaves_a_verified_model_and_nothing_that_blocks_the_next_install(world, tmp_path, kill_at, serves):
    cache = tmp_path / "cache"
    shutil.copytree(world["base"], cache)
    _kill_install(world, cache, kill_at, tmp_path)
    _expect_leftover_for(kill_at, cache)

    done, outputs, prediction = _probe(world, cache, [["verify", "--json", "--cache", cache, "--key", world["pub"]]], tmp_path)
    _assert_serves(world, done, outputs, prediction, serves)
    _assert_next_install_goes_through(world, cache, tmp_path)


def test_power_loss_mid_switch_with_previous_written_but_current_not_keeps_serving_the_old_model(world, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(world["base"], cache)
    before = json.loads((cache / "slots" / "current").read_text())
    assert not (cache / "slots" / "previous").exists()
    _kill_install(world, cache, "switch:current", tmp_path)
    # Half a switch: previous already names the old current, current is untouched.
    assert json.loads((cache / "slots" / "previous").read_text()) == before
    assert json.loads((cache / "slots" / "current").read_text()) == before

    done, outputs, prediction = _probe(world, cache, [["verify", "--json", "--cache", cache, "--key", world["pub"]]], tmp_path)
    _assert_serves(world, done, outputs, prediction, V1)  # straight from current, no fallback needed
    _assert_next_install_goes_through(world, cache, tmp_path)
    assert json.loads((cache / "slots" / "previous").read_text())["version"] == V1


@pytest.mark.parametrize("kill_at,serves", [(k, v) for k, v, _ in FIRST_INSTALL_KILL_POINTS],
                         ids=[name for _, _, name in FIRST_INSTALL_KILL_POINTS])
def test_power_loss_during_first_install_gives_a_clear_no_model_error_and_the_next_install_works(world, tmp_path, kill_at, serves):
    cache = tmp_path / "cache"
    _kill_install(world, cache, kill_at, tmp_path)
    _expect_leftover_for(kill_at, cache)

    opened = runtime_cli("verify", "--json", "--cache", cache, "--key", world["pub"], cwd=tmp_path)
    if serves is None:
        assert opened.returncode != 0 and not opened.stdout
        lines = opened.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in opened.stderr, opened.stderr
        assert lines[0].startswith("error: No verified model is installed") and "edgepack-runtime install" in lines[0]
    else:
        assert opened.returncode == 0, opened.stderr
        done, outputs, prediction = _probe(world, cache, [["verify", "--json", "--cache", cache, "--key", world["pub"]]], tmp_path)
        _assert_serves(world, done, outputs, prediction, serves)
    _assert_next_install_goes_through(world, cache, tmp_path)
