import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


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
