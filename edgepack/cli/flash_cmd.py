"""``edgepack flash BUNDLE TARGET``: install a bundle into a device's offline cache."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from ._common import handle_errors, print_json

DEFAULT_CACHE_PATH = "/var/lib/edgepack"  # same as edgepack.flash.DEFAULT_CACHE_PATH (kept import-free here)


def register(app: typer.Typer) -> None:
    app.command("flash")(flash)


@handle_errors
def flash(
    bundle: Path = typer.Argument(..., help="The signed .epk bundle.", show_default=False),
    target: str = typer.Argument(
        ..., show_default=False,
        help="The device: the mount point of its root filesystem (e.g. an SD card at /media/me/rootfs), "
             "or ssh://user@host[:port].",
    ),
    key: List[Path] = typer.Option(
        ..., "--key", show_default=False,
        help="The publisher's public key (.pub): the bundle must verify against it, and it is pinned on the device. "
             "Repeatable.",
    ),
    force: bool = typer.Option(False, "--force", help="Install into a directory even if it has no etc/ (does not look like a root filesystem)."),
    cache_path: str = typer.Option(DEFAULT_CACHE_PATH, "--cache-path", help="The cache directory as the device sees it."),
    allow_downgrade: bool = typer.Option(False, "--allow-downgrade", help="Allow replacing a newer version of the same model."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Verify BUNDLE, then install it into the device's cache so it runs offline at the next start.

    Nothing is written to the device before the bundle verified against --key. The
    install is the device runtime's own (verify, unpack, golden-vector self-test,
    A/B switch); over ssh it runs `edgepack-runtime install` on the device.

    Exit codes: 0 flashed, 1 verification failed, 2 bad input or the device refused.
    """
    from ..flash import flash as do_flash

    result = do_flash(bundle, target, key, cache_path, force=force, allow_downgrade=allow_downgrade)
    if as_json:
        print_json(result.to_dict())
        return
    typer.echo(
        f"Flashed {result.name} {result.version} into {result.cache} on {result.target} "
        f"(digest {result.digest[:16]}…, pinned keys: {', '.join(result.keys_pinned)}). "
        "The device runs it offline at its next start."
    )
