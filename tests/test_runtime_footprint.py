"""The device runtime installs and runs alone: a fresh venv with only numpy + onnxruntime.

One virtual environment per module: ``python -m venv`` (with pip), then ``pip install
numpy onnxruntime`` (from the local wheel cache / index, with their own dependencies)
and ``pip install --no-deps`` of a copy of ``runtime/`` (a copy, so the build leaves no
``build/`` directory in the source tree). Everything then runs with that venv's python
in a scratch directory, so neither the repo nor the dev venv is importable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import bundles

pytestmark = pytest.mark.slow

RUNTIME_SRC = Path(__file__).resolve().parent.parent / "runtime"
WORKSTATION_ONLY = {"edgepack", "onnx", "typer", "pyyaml", "cryptography", "rich", "click", "torch", "scikit-learn"}


def _clean_env() -> dict:
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "EDGEPACK_RUNTIME_KILL_AT", "EDGEPACK_CACHE",
            "PIP_REQUIRE_VIRTUALENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(args, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=_clean_env(), timeout=timeout)


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{' '.join(map(str, done.args))} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """(venv python, venv bin dir, scratch dir) of a venv holding numpy, onnxruntime and edgepack-runtime only."""
    start = time.monotonic()
    root = tmp_path_factory.mktemp("footprint")
    scratch = root / "scratch"
    scratch.mkdir()
    venv = root / "venv"
    # The base interpreter, not the dev venv's: a venv made from a venv is still clean, but be explicit.
    base = getattr(sys, "_base_executable", sys.executable)
    _ok(_run([base, "-m", "venv", venv], scratch))
    bin_dir = venv / "bin"
    python = bin_dir / "python"
    _ok(_run([python, "-m", "pip", "install", "--no-compile", "-q", "numpy", "onnxruntime"], scratch, timeout=300))
    source = root / "runtime-src"
    shutil.copytree(RUNTIME_SRC, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "*.pyc"))
    _ok(_run([python, "-m", "pip", "install", "--no-compile", "-q", "--no-deps", source], scratch, timeout=300))
    print(f"footprint venv ready in {time.monotonic() - start:.1f}s")
    return python, bin_dir, scratch


def test_runtime_venv_cannot_import_the_workstation_package(device):
    python, _, scratch = device
    done = _run([python, "-c", "import edgepack"], scratch)
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr
    # The runtime itself imports without any workstation package present.
    _ok(_run([python, "-c", "import edgepack_runtime, edgepack_runtime.cli, edgepack_runtime.model, edgepack_runtime.cache"], scratch))


def test_runtime_venv_holds_no_workstation_dependencies(device):
    python, _, scratch = device
    listed = json.loads(_ok(_run([python, "-m", "pip", "list", "--format", "json"], scratch)).stdout)
    names = {p["name"].lower().replace("_", "-") for p in listed}
    assert {"numpy", "onnxruntime", "edgepack-runtime"} <= names
    assert not names & WORKSTATION_ONLY, f"workstation packages leaked into the device venv: {sorted(names & WORKSTATION_ONLY)}"


def test_runtime_alone_installs_a_bundle_and_predicts(device, tmp_path):
    python, bin_dir, scratch = device
    priv, pub = bundles.keys(tmp_path)  # built on the "workstation" (this dev venv)
    model = bundles.raw_classifier(scale=1.5)
    bundle = bundles.make_bundle(tmp_path, priv, "1.2.0", model)
    cache = tmp_path / "cache"

    done = _ok(_run([bin_dir / "edgepack-runtime", "install", bundle, "--cache", cache, "--key", pub, "--json"], scratch))
    assert json.loads(done.stdout)["version"] == "1.2.0"

    raw = [[0, 255, 10, 20], [9, 8, 7, 6]]
    snippet = (
        "import json, sys, numpy as np, edgepack_runtime\n"
        "assert 'edgepack' not in sys.modules\n"
        f"model = edgepack_runtime.open({str(cache)!r})\n"  # keys pinned in the cache by the install
        f"out = model.predict(np.asarray({raw!r}, np.uint8))\n"
        "print(json.dumps({'version': model.version, 'scores': out['scores'].tolist(), 'modules': sorted(sys.modules)}))\n"
    )
    result = json.loads(_ok(_run([python, "-c", snippet], scratch)).stdout)
    assert result["version"] == "1.2.0"
    assert not {m.split(".")[0] for m in result["modules"]} & {"edgepack", "onnx", "typer", "yaml", "cryptography"}

    import onnxruntime as ort

    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"raw": np.asarray(raw, np.uint8)})[0]
    np.testing.assert_allclose(np.asarray(result["scores"]), expected, rtol=0, atol=1e-5)
