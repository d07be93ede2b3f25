"""Database URLs from the operator: one clear error, exit 2, never the password, never a traceback."""

from __future__ import annotations

import pytest

from pg import base_url, fresh_schema

SECRET = "hunter2-not-in-any-message"


def _pg_url_with(**parts) -> str:
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(base_url())
    user, password = parts.get("user", u.username), parts.get("password", u.password)
    netloc = f"{user}:{password}@{u.hostname}:{parts.get('port', u.port or 5432)}"
    return urlunsplit((u.scheme, netloc, "/" + parts.get("db", u.path.lstrip("/")), u.query, ""))


@pytest.mark.parametrize("make_url, says", [
    (lambda: f"mysql://root:{SECRET}@db/edgepack", "is not supported; use sqlite:///PATH or postgresql://"),
    (lambda: "sqlite:///", "is not supported"),
    (lambda: _pg_url_with(password=SECRET), "password authentication failed"),
    (lambda: _pg_url_with(db="no_such_database"), 'database "no_such_database" does not exist'),
    (lambda: _pg_url_with(password=SECRET, port=1), "Connection refused"),
])
def test_bad_database_url_is_one_clear_error_without_the_password(tmp_path, cli, make_url, says):
    url = make_url()
    if url.startswith("postgres"):
        with fresh_schema():
            pass  # skips (or fails under EDGEPACK_REQUIRE_POSTGRES=1) when PostgreSQL is absent
    code, out, err = cli("server", "migrate", "--data", tmp_path, "--db-url", url)
    assert code == 2, out + err
    assert says in err and "Traceback" not in out + err
    assert SECRET not in out + err
    if "@" in url:
        assert "***@" in err  # the URL is shown, its password is not


def test_database_newer_than_this_edgepack_is_refused(tmp_path, db_url, cli):
    from edgepack.server.storage import open_storage

    storage = open_storage(db_url)
    storage.migrate()
    with storage.transaction():
        storage._x("INSERT INTO schema_migrations (version, name, applied_at) VALUES (99, 'from the future', 0)")
    storage.close()
    code, _, err = cli("server", "migrate", "--data", tmp_path, "--db-url", db_url)
    assert code == 2 and "newer than this edgepack supports" in err and "upgrade edgepack" in err


def test_lost_database_connections_answer_503_then_the_server_recovers(tmp_path):
    """PostgreSQL restarted or a connection killed under a running replica: a clear 503, no 500, and the
    pool reconnects by itself."""
    import psycopg
    from fastapi.testclient import TestClient

    from edgepack.server.app import create_app
    from edgepack.server.settings import ServerSettings
    from edgepack.server.storage import open_storage

    admin = "admin-token-0123456789abcdef-lost"
    with fresh_schema() as url:
        url = f"{url}&application_name=edgepack_lost_conn_test"
        settings = ServerSettings.for_tests(tmp_path, admin, db_url=url)
        storage = open_storage(url)
        client = TestClient(create_app(settings, storage, run_ticker=False))
        auth = {"Authorization": f"Bearer {admin}"}
        assert client.get("/v1/admin/devices", headers=auth).status_code == 200
        with psycopg.connect(base_url(), autocommit=True) as con:
            killed = con.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                 "WHERE application_name = 'edgepack_lost_conn_test'").fetchone()[0]
        assert killed >= 1
        answers = [client.get("/v1/admin/devices", headers=auth) for _ in range(killed + 2)]
        assert answers[0].status_code == 503, answers[0].text
        assert answers[0].json()["error"]["code"] == "database_unavailable"
        assert answers[-1].status_code == 200  # broken connections were dropped, new ones opened
        storage.close()
