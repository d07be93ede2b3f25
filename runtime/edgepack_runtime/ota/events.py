"""The on-disk event queue: ``CACHE/ota/events.jsonl``, append + fsync, trimmed on ack.

Events carry the device's strictly increasing ``seq`` and are delivered in that order.
A line torn by power loss is skipped; an event already queued (same ``seq``) or already
acknowledged (``seq`` at or below ``CACHE/ota/events.acked``) is never queued twice,
which makes re-queuing the state machine's outbox after a crash safe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List

from .._fs import atomic_write, fsync_dir

EVENT_TYPES = ("downloaded", "installed", "self_test_failed", "probation_failed", "rolled_back", "committed",
               "install_failed")
REASON_CODES = ("self_test", "crash_loop", "error_rate", "latency_regression", "nonfinite", "verify", "download")


class EventQueue:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "events.jsonl"
        self.acked_path = self.directory / "events.acked"

    def acked(self) -> int:
        try:
            return int(self.acked_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError, OSError):
            return 0

    def pending(self) -> List[Dict[str, Any]]:
        """Queued, unacknowledged events in seq order."""
        floor = self.acked()
        events: Dict[int, Dict[str, Any]] = {}
        try:
            with open(self.path, "rb") as fh:
                for line in fh:
                    try:
                        event = json.loads(line)
                        seq = int(event["seq"])
                    except (ValueError, KeyError, TypeError):
                        continue  # torn last line after power loss
                    if seq > floor:
                        events.setdefault(seq, event)
        except FileNotFoundError:
            pass
        return [events[s] for s in sorted(events)]

    def append(self, events: Iterable[Dict[str, Any]]) -> None:
        """Append (and fsync) the events not yet queued or acknowledged."""
        queued = {int(e["seq"]) for e in self.pending()}
        floor = self.acked()
        fresh = [e for e in events if int(e["seq"]) > floor and int(e["seq"]) not in queued]
        if not fresh:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with open(self.path, "ab") as fh:
            if fh.tell() and not self._ends_with_newline():
                fh.write(b"\n")  # a torn line stays alone on its line
            for event in fresh:
                fh.write(json.dumps(event, sort_keys=True).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        if created:
            fsync_dir(self.directory)

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def ack(self, up_to: int) -> None:
        """The server accepted every event up to ``up_to``: record it, then trim the file."""
        if up_to > self.acked():
            atomic_write(self.acked_path, str(up_to).encode())
        rest = [e for e in self.pending() if int(e["seq"]) > up_to]
        if self.path.exists():
            atomic_write(self.path, b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in rest))
