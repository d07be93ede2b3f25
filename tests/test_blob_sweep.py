"""Upload temp files of a killed server are swept at start; a live upload's are not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from edgepack.server.blobs import BlobStore

_WRITER = textwrap.dedent("""
    import sys, time
    from edgepack.server.blobs import BlobStore
    store = BlobStore(sys.argv[1])
    with store.temp_file() as (fh, path):
        fh.write(b"x" * 1_000_000)
        fh.flush()
        print(path, flush=True)
        time.sleep(60)
""")


def _writer(root: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line, "the writer did not start"
    return proc, Path(line)


def test_killed_uploads_part_files_are_swept_at_start_while_a_live_upload_keeps_its_file(tmp_path):
    """Ten SIGKILLs during 126 MB uploads left nine blobs/tmp/*.part (930 MB), never swept."""
    root = tmp_path / "blobs"
    BlobStore(root)
    writers = [_writer(root) for _ in range(3)]  # three uploads at once
    for proc, _ in writers:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    killed = [part for _, part in writers]
    assert all(p.exists() for p in killed)  # SIGKILL skips the cleanup: the leak this test is about
    store = BlobStore(root)  # a server (re)starting
    assert store.swept == 3 and not any(p.exists() for p in killed)
    live, live_part = _writer(root)  # another replica, mid-upload
    try:
        assert BlobStore(root).swept == 0  # one more replica starting does not touch it
        assert live_part.exists() and live_part.stat().st_size == 1_000_000
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(10)
    assert BlobStore(root).swept == 1 and not live_part.exists()


def test_a_temp_file_unlinked_between_create_and_lock_is_replaced(tmp_path, monkeypatch):
    """The sweeper may take a brand-new file before its writer locks it; the writer makes another."""
    store = BlobStore(tmp_path / "blobs")
    import fcntl

    real_flock = fcntl.flock
    calls = []

    def racing_flock(fd, op):
        if not calls:  # first lock: a sweeper in another process got there first
            for p in (store.root / "tmp").glob("*.part"):
                p.unlink()
        calls.append(op)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", racing_flock)
    with store.temp_file() as (fh, path):
        assert path.exists() and os.fstat(fh.fileno()).st_nlink == 1
        fh.write(b"ok")
    assert len(calls) == 2
