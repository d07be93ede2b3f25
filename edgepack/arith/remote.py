"""A model session in another process (usually under qemu-user), with the onnxruntime session API.

:class:`RemoteSession` starts :mod:`edgepack_runtime._evalworker` with a launcher prefix
(``qemu-x86_64-static -cpu Haswell python`` or the aarch64 sysroot's python) and sends
it one batch at a time, so any code written against ``InferenceSession`` (``compare``,
golden vectors) measures the variant under that CPU's arithmetic unchanged, in bounded
memory.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgepackError

__all__ = ["RemoteError", "RemoteSession"]


class RemoteError(EdgepackError):
    """The measuring process could not start, load the model or run it."""


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: list


class RemoteSession:
    """``InferenceSession``-like access to a model loaded by a worker process.

    Args:
        prefix: Command that runs a Python able to import ``edgepack_runtime``, numpy
            and the engine (e.g. ``[qemu, "-cpu", "Haswell", sys.executable]``).
        engine: Engine name (``onnxruntime`` or ``litert``).
        model_path: The model file, readable by the worker.
        env: Environment of the worker.
        label: How error messages name the place it runs (``qemu-x86_64 -cpu Haswell``).
        timeout_s: Longest wait for one answer (emulation is slow, but not this slow).
    """

    def __init__(self, prefix: Sequence[str], engine: str, model_path: Path, *, env: dict | None = None,
                 label: str = "the measuring process", threads: int = 1, timeout_s: float = 1800.0) -> None:
        from edgepack_runtime._evalworker import read_message

        self.label = label
        self._timeout = timeout_s
        self._stderr: list[bytes] = []
        cmd = [*prefix, "-m", "edgepack_runtime._evalworker", engine, str(model_path), str(threads)]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        except OSError as exc:
            raise RemoteError(f"Cannot start {label} ({cmd[0]}): {exc.strerror or exc}.") from exc
        # stderr is drained continuously so a chatty engine can never block the pipe.
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        header, _ = self._call(lambda: read_message(self._proc.stdout))
        if not header.get("ok"):
            self.close()
            raise RemoteError(f"{label} cannot load {Path(model_path).name}: {header.get('error')}")
        self._inputs = [_Tensor(t["name"], t.get("shape") or []) for t in header["inputs"]]
        self._outputs = [_Tensor(t["name"], t.get("shape") or []) for t in header["outputs"]]
        self.machine = header.get("machine")

    def _read_stderr(self) -> None:
        for line in iter(self._proc.stderr.readline, b""):
            if len(self._stderr) < 200:
                self._stderr.append(line)

    def _tail(self) -> str:
        lines = [ln.decode(errors="replace").rstrip() for ln in self._stderr
                 if b"TCG doesn't support requested feature" not in ln]
        return "\n".join(lines[-8:])

    def _call(self, fn):
        result: dict = {}

        def target():
            try:
                result["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below in the caller's thread
                result["error"] = exc

        worker = threading.Thread(target=target, daemon=True)
        worker.start()
        worker.join(self._timeout)
        if worker.is_alive():
            self.close()
            raise RemoteError(f"{self.label} gave no answer within {self._timeout:.0f} s; it was stopped.")
        if "error" in result:
            code = self._proc.poll()
            self.close()
            tail = self._tail()
            raise RemoteError(f"{self.label} stopped answering (exit code {code}): {result['error']}"
                              + (f"\n{tail}" if tail else "")) from result["error"]
        return result["value"]

    def get_inputs(self) -> list[_Tensor]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Tensor]:
        return list(self._outputs)

    def run(self, output_names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch in the worker; same contract as ``InferenceSession.run``."""
        from edgepack_runtime._evalworker import read_message, write_message

        names = list(feed)
        self._call(lambda: write_message(self._proc.stdin, {"op": "run", "names": names}, [feed[n] for n in names]))
        header, arrays = self._call(lambda: read_message(self._proc.stdout))
        if not header.get("ok"):
            raise RemoteError(f"{self.label} failed to run the model: {header.get('error')}")
        if output_names is not None:
            index = {t.name: i for i, t in enumerate(self._outputs)}
            arrays = [arrays[index[n]] for n in output_names]
        return arrays

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is None or proc.poll() is not None:
            return
        try:
            from edgepack_runtime._evalworker import write_message

            write_message(proc.stdin, {"op": "exit"})
            proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten session must not leave an emulator running
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
