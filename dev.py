#!/usr/bin/env python3
"""One-command entry points for a fresh machine that has only python3.

    python3 dev.py demo   # set up, then run the main job on the bundled example
    python3 dev.py test   # set up, then run the whole test suite

Set-up creates ``.venv`` next to this file and installs the runtime and edgepack
(with the ``dev`` extra) into it; it is skipped when nothing it depends on changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".edgepack-installed"
# What the installed environment depends on; a change triggers a reinstall.
INPUTS = [ROOT / "pyproject.toml", ROOT / "runtime" / "pyproject.toml", ROOT / "dev.py"]


def _run(*cmd: str | Path, **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kwargs)


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in INPUTS:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def setup() -> None:
    """Create the virtualenv and install edgepack into it (idempotent)."""
    if sys.version_info < (3, 10):
        sys.exit(f"edgepack needs Python 3.10 or newer; this is {sys.version.split()[0]}.")
    if not PY.exists():
        print(f"Creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        return
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    _run(*pip, "--upgrade", "pip", "setuptools", "wheel")
    _run(*pip, "-e", "./runtime", "-e", ".[dev,tflite]")
    STAMP.write_text(_fingerprint())


def demo() -> None:
    """The main job, end to end on the bundled digits example.

    Build a signed bundle from the project file (embedded preprocessing, fp32 and int8
    variants behind the accuracy gate), verify it like a device would, install it into
    a local device cache (the USB-stick path) and predict raw digits through the device
    runtime; then start an OTA server and a device agent, roll the bundle out over the
    air and print predictions the device made.
    """
    example = ROOT / "examples" / "digits"
    keys = example / "keys"
    shutil.rmtree(ROOT / "out", ignore_errors=True)  # each run starts with empty device caches
    if not (keys / "digits.key").exists():
        _run(BIN / "edgepack", "keys", "generate", "--dir", keys, "--name", "digits")
    _run(BIN / "edgepack", "build", example / "edgepack.yaml")
    bundle = example / "dist" / "digits-1.0.0.epk"
    _run(BIN / "edgepack", "verify", bundle, "--key", keys / "digits.pub")
    cache = ROOT / "out" / "device-cache"
    _run(BIN / "edgepack-runtime", "install", bundle, "--cache", cache, "--key", keys / "digits.pub")
    _run(PY, "-c", (
        "import numpy as np, edgepack_runtime\n"
        f"model = edgepack_runtime.open({str(cache)!r})\n"
        f"val = np.load({str(example / 'val.npz')!r})\n"
        "scores = model.predict(val['raw'][:5])['scores']\n"
        "labels = model.manifest['io']['outputs'][0]['labels']\n"
        "print(f'device runs {model.name} {model.version} ({model.variant[\"id\"]})')\n"
        "for s, y in zip(scores, val['labels'][:5]):\n"
        "    print(f'  predicted {labels[int(s.argmax())]} ({s.max():.2f}), true {y}')\n"
    ))
    # Over the air: a real OTA server and a device agent on this machine.
    _run(PY, ROOT / "examples" / "fleet_demo.py", bundle, keys / "digits.pub", ROOT / "out" / "fleet")


def system_deps() -> None:
    """Debian packages the tests drive for real (headless Chromium for the dashboard)."""
    script = ROOT / "ci" / "install-system-deps.sh"
    if script.exists() and not Path("/usr/bin/chromium").exists():
        if os.geteuid() != 0:
            print("Chromium is missing and this is not root: run `sudo bash ci/install-system-deps.sh` first.", flush=True)
            return
        _run("bash", script)


def test(extra: list[str]) -> None:
    """The whole test suite."""
    system_deps()
    _run(PY, "-m", "pytest", *extra)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    setup()
    try:
        if argv[0] == "demo":
            demo()
        elif argv[0] == "test":
            test(argv[1:])
    except subprocess.CalledProcessError as exc:
        return exc.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
