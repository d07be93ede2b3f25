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
import socket
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


# What the test command exports into pytest's environment (setdefault: a developer can point the
# tests elsewhere). REQUIRE_* turn "PostgreSQL/nginx not available" from a skip into a failure, so
# CI cannot go green by silently skipping the fleet-scale tests.
TEST_ENV = {
    "EDGEPACK_TEST_POSTGRES_URL": "postgresql://edgepack:edgepack@127.0.0.1:5432/edgepack_test",
    "EDGEPACK_REQUIRE_POSTGRES": "1",
    "EDGEPACK_REQUIRE_NGINX": "1",
}


def _postgres_listening(url: str) -> bool:
    """Whether something accepts TCP connections where the tests' PostgreSQL should be."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=1):
            return True
    except OSError:
        return False


def _missing_system_deps(env: dict[str, str]) -> list[str]:
    missing = []
    if not Path("/usr/bin/chromium").exists():
        missing.append("chromium")
    if not any(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        missing.append("postgresql")
    elif not _postgres_listening(env["EDGEPACK_TEST_POSTGRES_URL"]):
        missing.append("a running PostgreSQL cluster")
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        missing.append("nginx")
    if not (shutil.which("qemu-x86_64-static") and shutil.which("qemu-aarch64-static")):
        missing.append("qemu-user-static")
    return missing


def system_deps(env: dict[str, str]) -> None:
    """Debian packages and services the tests drive for real: headless Chromium (dashboard),
    a PostgreSQL cluster with the test role and database, and nginx (fleet-scale server)."""
    script = ROOT / "ci" / "install-system-deps.sh"
    if os.name != "posix" or not script.exists():
        return  # Debian packages: nothing this script can do elsewhere
    if os.geteuid() == 0:
        _run("bash", script)  # idempotent and ~0.2 s when all is there; also repairs a missing role or database
        return
    missing = _missing_system_deps(env)
    if missing:
        print(f"Missing {', '.join(missing)} and this is not root: run `sudo bash {script}` first; "
              "the tests that need them will fail.", flush=True)


def test(extra: list[str]) -> None:
    """The whole test suite."""
    env = dict(os.environ)
    for key, value in TEST_ENV.items():
        env.setdefault(key, value)
    system_deps(env)
    _run(PY, "-m", "pytest", *extra, env=env)


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
