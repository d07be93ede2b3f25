"""Shared CLI plumbing: error translation, progress display, JSON output."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one clear error line to stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn edgepack errors into one line and an exit code; never a traceback.

    Set ``EDGEPACK_DEBUG=1`` to see tracebacks of unexpected errors.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..errors import EdgepackError

        try:
            return func(*args, **kwargs)
        except EdgepackError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except BrokenPipeError:
            # `edgepack ... | head` closed the pipe: not an error worth a message.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise fail("interrupted; nothing was written.", 130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: one line instead of a traceback
            if os.environ.get("EDGEPACK_DEBUG"):
                raise
            raise fail(
                f"internal error ({type(exc).__name__}: {exc}); this is a bug in edgepack — "
                "rerun with EDGEPACK_DEBUG=1 and report the traceback.",
                70,
            ) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def progress_display(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A spinner with the current step on stderr (only on a terminal and without --json)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda _step: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("Starting") as status:
        yield lambda step: status.update(f"{step}…")


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
