"""A model served over stdin/stdout, for measuring a variant under another CPU's arithmetic.

``edgepack build`` starts one of these per (arithmetic class, variant), usually under
qemu-user (``qemu-x86_64 -cpu Haswell``, ``qemu-aarch64 -cpu cortex-a72``), and streams
the validation set through it batch by batch, so memory stays bounded and the numbers
come from the same engine code a device runs (:func:`edgepack_runtime.engines.load_session`).
It needs only numpy and the engine, which is all the emulator's guest has.

Wire format, both directions: a 4-byte big-endian length, that many bytes of JSON
(the header, whose ``arrays`` lists each array's dtype and shape), then the arrays'
raw C-order bytes, one after the other.

* worker -> host, first: ``{"ok": true, "inputs": [...], "outputs": [...], "machine": ...}``
  or ``{"ok": false, "error": "..."}``.
* host -> worker: ``{"op": "run", "names": [...], "arrays": n}`` + n arrays; the answer is
  ``{"ok": true, "arrays": m}`` + the m outputs, or ``{"ok": false, "error": ...}``.
  ``{"op": "exit"}`` ends the worker.
"""

from __future__ import annotations

import json
import os
import platform
import struct
import sys
from typing import IO, Any, Dict, List, Tuple

import numpy as np

MAX_HEADER = 1 << 20


def write_message(stream: IO[bytes], header: Dict[str, Any], arrays: List[np.ndarray] = ()) -> None:
    arrays = [np.ascontiguousarray(a) for a in arrays]
    if any(a.dtype.hasobject for a in arrays):
        raise TypeError("object arrays cannot be sent to a measuring process")
    header = dict(header, arrays=[[a.dtype.str, list(a.shape)] for a in arrays])
    data = json.dumps(header).encode()
    stream.write(struct.pack(">I", len(data)) + data)
    for array in arrays:
        stream.write(memoryview(array).cast("B") if array.size else b"")
    stream.flush()


def _read_exact(stream: IO[bytes], count: int) -> bytes:
    parts = []
    left = count
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError("the other side closed the pipe")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_message(stream: IO[bytes]) -> Tuple[Dict[str, Any], List[np.ndarray]]:
    (length,) = struct.unpack(">I", _read_exact(stream, 4))
    if length > MAX_HEADER:
        raise ValueError(f"message header of {length} bytes is larger than {MAX_HEADER}")
    header = json.loads(_read_exact(stream, length))
    arrays = []
    for dtype_str, shape in header.get("arrays", []):
        dtype = np.dtype(dtype_str)
        if dtype.hasobject:
            raise ValueError("object arrays are refused")
        count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        arrays.append(np.frombuffer(_read_exact(stream, count), dtype=dtype).reshape(shape).copy() if count else np.zeros(shape, dtype))
    return header, arrays


def _describe(session) -> Tuple[List[dict], List[dict]]:
    """Names and static shapes of a session's tensors (None for symbolic dimensions)."""
    inner = getattr(session, "_session", None)
    if inner is not None and hasattr(inner, "get_inputs"):  # onnxruntime
        def spec(t):
            return {"name": t.name, "shape": [d if isinstance(d, int) else None for d in (t.shape or [])]}
        return [spec(t) for t in inner.get_inputs()], [spec(t) for t in inner.get_outputs()]
    details = getattr(session, "_inputs", None)
    if details is not None:  # LiteRT: a leading 1 in the signature means a static batch of one
        def lspec(d):
            return {"name": d["name"], "shape": [int(s) if int(s) > 0 else None for s in d.get("shape_signature", d["shape"])]}
        return [lspec(d) for d in details], [{"name": n, "shape": None} for n in session.output_names]
    return ([{"name": n, "shape": None} for n in session.input_names],
            [{"name": n, "shape": None} for n in session.output_names])


def main(argv: List[str]) -> int:
    # The protocol owns the real stdout; anything an engine prints goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    engine, path, threads = argv[0], argv[1], int(argv[2]) if len(argv) > 2 else 1
    try:
        from .engines import load_session

        session = load_session(engine, __import__("pathlib").Path(path), threads)
    except Exception as exc:  # noqa: BLE001 - reported to the host, which raises its own error
        write_message(out, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    inputs, outputs = _describe(session)
    write_message(out, {"ok": True, "inputs": inputs, "outputs": outputs, "machine": platform.machine()})
    while True:
        try:
            header, arrays = read_message(inp)
        except EOFError:
            return 0
        if header.get("op") != "run":
            return 0
        try:
            result = session.run(dict(zip(header["names"], arrays)))
            write_message(out, {"ok": True}, [np.asarray(r) for r in result])
        except Exception as exc:  # noqa: BLE001
            write_message(out, {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}"})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
