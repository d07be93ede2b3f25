"""Plumbing shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import contextlib
import platform
import sys
import time
from pathlib import Path

_T0 = time.perf_counter()


def progress(message: str) -> None:
    """One timestamped progress line on stderr (stdout stays for the results table)."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (x86 and ARM spellings), else platform's guess."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                return value.strip()
    return platform.processor() or platform.machine()
