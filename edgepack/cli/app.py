"""The ``edgepack`` command: a Typer app whose commands import heavy modules lazily."""

from __future__ import annotations

from typing import Optional

import typer

from .. import __version__
from . import bench_cmd, bundle_cmds, convert_cmd, devices_cmd, flash_cmd, optimize_cmd, server_cmd

app = typer.Typer(
    name="edgepack",
    help="Optimize, verify, sign and ship ML models to fleets of small devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgepack {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Optimize, verify, sign and ship ML models to fleets of small devices."""


optimize_cmd.register(app)
devices_cmd.register(app)
bundle_cmds.register(app)
flash_cmd.register(app)
server_cmd.register(app)
bench_cmd.register(app)
convert_cmd.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
