import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session", autouse=True)
def _emulators():
    """Builds measure int8 under each target's arithmetic (qemu-user, the aarch64 sysroot): set
    them up once per machine (cached in ~/.cache, a no-op afterwards), whatever test runs first,
    so no build silently falls back to "not measured". Without root or sudo nothing is installed
    and the builds say what is missing."""
    import os
    import shutil

    import warnings

    from edgepack.bench.emulator import EmulatorConfig, EmulatorError, default_root, setup_emulator

    root = Path(os.environ.get("EDGEPACK_EMULATOR_DIR") or default_root())
    if (root / "sysroot" / ".edgepack-emulator.json").is_file() or os.geteuid() == 0 or shutil.which("sudo"):
        try:
            setup_emulator(EmulatorConfig(root=root))
        except EmulatorError as exc:  # the tests that need it fail with the builds' own "not measured" sentences
            warnings.warn(f"The emulator could not be set up: {exc}", stacklevel=1)
    yield


@pytest.fixture
def digits() -> Path:
    return ROOT / "examples" / "digits"


@pytest.fixture
def cli():
    """Invoke the real edgepack CLI in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from edgepack.cli.app import app

    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """The server's database URL, once per backend: a new SQLite file, then a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'edgepack.db'}"
        return
    from pg import fresh_schema

    with fresh_schema() as url:
        yield url
