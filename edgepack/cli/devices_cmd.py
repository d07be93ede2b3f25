"""``edgepack devices list`` and ``edgepack devices show``."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ._common import handle_errors, print_json

if TYPE_CHECKING:
    from ..devices import DeviceProfile

# The environment is read here, in the CLI layer, and passed down as an argument.
DIR_OPTION_HELP = "Directory of device profile .yaml files (default: the profiles shipped with edgepack)."
DIR_ENVVAR = "EDGEPACK_DEVICES_DIR"

devices_app = typer.Typer(
    name="devices",
    help="List and inspect device profiles (target boards and their recommended settings).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(devices_app, name="devices")


def _dir_option() -> Optional[Path]:
    return typer.Option(None, "--dir", envvar=DIR_ENVVAR, help=DIR_OPTION_HELP, show_default=False)


def _clock(profile: DeviceProfile) -> str:
    clock = profile.cpu.clock_ghz
    return f"{profile.cpu.cores}× {clock:.1f} GHz" if clock is not None else f"{profile.cpu.cores}× n/a"


def _memory(mb: int) -> str:
    return f"{mb // 1024} GB" if mb % 1024 == 0 else f"{mb} MB"


def _num(value: Optional[float], unit: str) -> str:
    return f"{value:g} {unit}" if value is not None else "n/a"


@devices_app.command("list")
@handle_errors
def list_devices(
    directory: Optional[Path] = _dir_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the profiles as a JSON list on stdout."),
) -> None:
    """List the known device profiles."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..devices import list_profiles, profile_to_dict

    profiles = list_profiles(directory)
    if as_json:
        print_json([profile_to_dict(p) for p in profiles])
        return
    if not profiles:
        typer.echo("No device profiles found.")
        return
    table = Table(title="Device profiles")
    # Ids are what users type next, so they are never wrapped or cut short.
    table.add_column("id", no_wrap=True, min_width=max(len(p.id) for p in profiles))
    for column in ("name", "arch", "cores×clock", "memory", "SIMD", "recommended"):
        table.add_column(column)
    for p in profiles:
        rec = p.recommended
        cells = (
            p.id, p.name, p.arch, _clock(p), _memory(p.memory_mb),
            ", ".join(p.simd) or "-", f"{rec.variant}, {rec.threads} thread{'s' if rec.threads != 1 else ''}",
        )
        # Profiles are user files: Text cells keep brackets from being read as rich markup.
        table.add_row(*(Text(cell) for cell in cells))
    Console().print(table)


@devices_app.command("show")
@handle_errors
def show_device(
    name: str = typer.Argument(..., help="A device id (see `edgepack devices list`) or a path to a profile .yaml file.",
                               show_default=False),
    directory: Optional[Path] = _dir_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON on stdout."),
) -> None:
    """Show every field of one device profile."""
    from ..devices import get_profile, profile_to_dict

    from edgepack_runtime.arith import CLASSES, host_class

    profile = get_profile(name, directory)
    klass = profile.arith_class
    if as_json:
        print_json({**profile_to_dict(profile), "arith_class": klass, "host_arith_class": host_class()})
        return
    how = "named in the profile" if profile.arithmetic else "derived from simd"
    summary = CLASSES[klass].summary if klass in CLASSES else "no class covers this CPU: only fp32 is certified for it"
    here = host_class()
    where = ("natively on this host" if here == klass else
             f"under qemu ({' -cpu '.join(CLASSES[klass].emulate)})" if klass in CLASSES and CLASSES[klass].emulate else
             "by a reference evaluation (QEMU cannot emulate this class)" if klass in CLASSES else "not at all")
    peak, rec = profile.peak, profile.recommended
    rows = [
        ("name", profile.name),
        ("arch", profile.arch),
        ("cpu", f"{profile.cpu.model}; {_clock(profile)}"),
        ("memory", f"{profile.memory_mb} MB"),
        ("simd", ", ".join(profile.simd) or "-"),
        ("arithmetic", f"{klass} ({how}): {summary}; this host is {here}, so builds measure it {where}"),
        ("peak fp32", _num(peak.fp32_gflops, "GFLOPS")),
        ("peak int8", _num(peak.int8_gops, "GOPS")),
        ("memory bw", _num(peak.memory_bandwidth_gbs, "GB/s")),
        ("peak source", peak.source),
        ("engines", ", ".join(profile.engines)),
        ("recommended", f"{rec.variant}, {rec.threads} thread{'s' if rec.threads != 1 else ''}, {rec.engine}"),
        ("emulated", "yes: timings are not device timings" if profile.emulated else "no"),
        ("notes", profile.notes or "-"),
        ("file", str(profile.path) if profile.path else "-"),
    ]
    typer.echo(profile.id)
    width = max(len(key) for key, _ in rows) + 2
    for key, value in rows:
        wrapped = textwrap.wrap(value, width=max(40, 96 - width)) or [""]
        typer.echo(f"  {key:<{width}}{wrapped[0]}")
        for line in wrapped[1:]:
            typer.echo(f"  {'':<{width}}{line}")
