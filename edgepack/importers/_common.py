"""Helpers shared by the importers: reading and hashing input files, loading an
optional converter, running an exported graph and comparing numbers.

Foreign exceptions from these steps (OSError, ImportError, onnxruntime) are
translated here, so each importer only deals with its own converter's errors.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import MissingExtraError, ModelError
from ..modelio import read_model_bytes, runtime_load_error
from .base import SourceFile


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (or its type name)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__


# One reader for every model-like input file (shared with edgepack.modelio.load_model).
read_source_file = read_model_bytes


def source_file(role: str, path: Path, data: bytes | None = None) -> SourceFile:
    """A :class:`SourceFile` for ``path``, hashing ``data`` if given, else the file (streamed).

    Raises:
        ModelError: The file cannot be read.
    """
    if data is not None:
        return SourceFile(role, path, hashlib.sha256(data).hexdigest())
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ModelError(f"Cannot read {role} file {path}: {exc.strerror or exc}.") from exc
    return SourceFile(role, path, digest.hexdigest())


def require_extra(module: str, display: str, extra: str) -> ModuleType:
    """Import an optional dependency, or say which extra installs it.

    Raises:
        MissingExtraError: The module is not installed, or installed but broken.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == module:
            raise MissingExtraError(f"{display} is not installed; install the extra with: pip install 'edgepack[{extra}]'") from exc
        raise MissingExtraError(
            f"{display} is installed but cannot be imported ({first_line(exc)}); reinstall the extra with: "
            f"pip install --force-reinstall 'edgepack[{extra}]'"
        ) from exc


def onnx_session(model_bytes: bytes, source: str) -> Any:
    """An onnxruntime CPU session for a serialized model.

    Raises:
        ModelError: onnxruntime cannot load the model.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures are raised (and translated), not logged
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise runtime_load_error(exc, source) from exc


def run_session(session: Any, feeds: dict[str, np.ndarray], failure: str) -> list[np.ndarray]:
    """Run a session on ``feeds``; ``failure`` starts the error message if it fails.

    Raises:
        ModelError: onnxruntime failed to run the graph.
    """
    try:
        return [np.asarray(out) for out in session.run(None, feeds)]
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise ModelError(f"{failure} (onnxruntime: {first_line(exc)}).") from exc


def max_abs_diff(expected: np.ndarray, actual: np.ndarray) -> float:
    """Largest absolute difference; ``inf`` if shapes differ or only one side is NaN."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.size != actual.size:
        return float("inf")
    if expected.size == 0:
        return 0.0
    a = expected.reshape(-1).astype(np.float64)
    b = actual.reshape(-1).astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    return float(diff.max())


def tolerance(expected: np.ndarray, atol: float) -> float:
    """``atol`` scaled up for outputs larger than 1 in magnitude (float32 keeps ~7 digits)."""
    values = np.asarray(expected, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return atol * max(1.0, float(np.abs(finite).max()) if finite.size else 1.0)


def merge_opset_imports(model: Any) -> None:
    """Keep one ``opset_import`` entry per domain (the highest version), in place.

    Some converters list the default domain twice; later tools expect one entry.
    """
    best: dict[str, int] = {}
    for entry in model.opset_import:
        best[entry.domain] = max(best.get(entry.domain, 0), entry.version)
    if len(best) == len(model.opset_import):
        return
    from onnx import helper

    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in best.items())
