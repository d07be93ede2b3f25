"""``edgepack server run`` and ``edgepack server migrate``: the OTA update server."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._common import handle_errors

server_app = typer.Typer(
    name="server",
    help="Run the over-the-air update server (bundles, devices, staged rollouts).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="server")


def _db_url_option():
    return typer.Option(None, "--db-url", help="Database: sqlite:///PATH (default DATA/edgepack.db) or "
                        "postgresql://USER:PASSWORD@HOST:PORT/DB for several replicas (env EDGEPACK_SERVER_DB_URL).",
                        show_default=False)


def _data_option() -> Optional[Path]:
    return typer.Option(None, "--data", help="Server data directory (database, blobs, admin token). "
                        "Env: EDGEPACK_SERVER_DATA; default ./edgepack-server-data.", show_default=False)


@server_app.command("run")
@handle_errors
def run(
    data: Optional[Path] = _data_option(),
    host: Optional[str] = typer.Option(None, "--host", help="Listen address (env EDGEPACK_SERVER_HOST; default 127.0.0.1).", show_default=False),
    port: Optional[int] = typer.Option(None, "--port", help="Listen port (env EDGEPACK_SERVER_PORT; default 8400).", show_default=False),
    trusted_key: Optional[List[Path]] = typer.Option(None, "--trusted-key", help="Publisher public key (.pub) uploads must be signed with; repeatable. Env: EDGEPACK_SERVER_TRUSTED_KEYS (os.pathsep-separated).", show_default=False),
    admin_token_file: Optional[Path] = typer.Option(None, "--admin-token-file", help="File holding the admin bearer token (env EDGEPACK_SERVER_ADMIN_TOKEN_FILE or EDGEPACK_SERVER_ADMIN_TOKEN). Without one, a token is generated into DATA/admin.token.", show_default=False),
    db_url: Optional[str] = _db_url_option(),
) -> None:
    """Serve the admin and device APIs (one process; run several against one PostgreSQL database to scale out)."""
    from ..server.app import create_app
    from ..server.settings import load_settings
    from ..server.storage import open_storage

    try:
        import uvicorn
    except ImportError as exc:
        from ..errors import MissingExtraError

        raise MissingExtraError("The update server needs its extra: pip install 'edgepack[server]'.") from exc
    settings, created = load_settings(data_dir=data, host=host, port=port, trusted_keys=trusted_key,
                                      admin_token_file=admin_token_file, db_url=db_url, require_trusted_keys=True)
    if created is not None:
        typer.echo(f"Generated an admin token in {created} (mode 0600); send it as 'Authorization: Bearer <token>'.", err=True)
    storage = open_storage(settings.db_url, pool_size=settings.db_pool_size)
    try:
        app = create_app(settings, storage)
        typer.echo(f"edgepack server on http://{settings.host}:{settings.port} (data: {settings.data_dir})", err=True)
        # http/loop "auto": httptools and uvloop when installed (the server extra), else h11/asyncio.
        # No access log: one log record per device check-in costs more than the check-in's own work.
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", workers=1,
                    http="auto", loop="auto", access_log=False)
    finally:
        storage.close()


@server_app.command("migrate")
@handle_errors
def migrate(data: Optional[Path] = _data_option(), db_url: Optional[str] = _db_url_option()) -> None:
    """Apply pending database schema migrations and exit (safe to run from several hosts at once)."""
    from ..server.settings import load_settings
    from ..server.storage import open_storage

    settings, _ = load_settings(data_dir=data, db_url=db_url, create_admin_token=False)
    storage = open_storage(settings.db_url, pool_size=2)
    try:
        applied = storage.migrate()
        version = storage.schema_version()
    finally:
        storage.close()
    if applied:
        typer.echo(f"Applied migrations {', '.join(map(str, applied))}; schema is at version {version}.")
    else:
        typer.echo(f"Schema is up to date (version {version}).")


if __name__ == "__main__":  # `python -m edgepack.cli.server_cmd server run …` before registration in app.py
    _standalone = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(_standalone)

    @_standalone.callback()
    def _root() -> None:
        """edgepack (server commands only)."""

    _standalone()
