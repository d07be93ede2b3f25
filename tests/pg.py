"""PostgreSQL for tests: one throwaway schema per test in the database named by
``EDGEPACK_TEST_POSTGRES_URL`` (``.ci/run`` installs, starts and creates it).

Without a reachable server the PostgreSQL half of the suite is skipped, unless
``EDGEPACK_REQUIRE_POSTGRES=1`` (set by ``dev.py test``): then it fails, so CI can
never pass by silently testing SQLite only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import pytest

DEFAULT_URL = "postgresql://edgepack:edgepack@127.0.0.1:5432/edgepack_test"


def base_url() -> str:
    return os.environ.get("EDGEPACK_TEST_POSTGRES_URL", DEFAULT_URL)


def _unavailable(reason: str) -> None:
    if os.environ.get("EDGEPACK_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required here (EDGEPACK_REQUIRE_POSTGRES=1) but {reason}; "
                    "run `bash ci/install-system-deps.sh` as root.")
    pytest.skip(f"PostgreSQL not available: {reason}")


def schema_url(url: str, schema: str) -> str:
    """``url`` with libpq options that put ``schema`` first on the search path."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def fresh_schema() -> Iterator[str]:
    """A database URL whose tables live in a new empty schema (dropped afterwards)."""
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed (extra 'postgres')")
    url = base_url()
    try:
        admin = psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        _unavailable(f"cannot connect to {url.split('@')[-1]} ({str(exc).strip().splitlines()[0]})")
    schema = f"t_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield schema_url(url, schema)
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def sql_rows(db_url: str, query: str) -> list[tuple]:
    """Run one read-only query straight against the server's database (either backend)."""
    if db_url.startswith("sqlite:///"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(db_url[len("sqlite:///"):])) as con:
            return [tuple(r) for r in con.execute(query).fetchall()]
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as con:
        return [tuple(r) for r in con.execute(query).fetchall()]
