"""Loading and describing ONNX models, with one clear error per kind of bad file.

Every foreign exception raised while reading a model (protobuf, onnx checker,
onnxruntime) is translated here, so callers only ever see :class:`ModelError`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import ModelError

# Bigger than any model this tool targets; refusing early beats an out-of-memory kill.
MAX_MODEL_BYTES = 2 * 1024**3
# The ONNX standard starts at opset 1; onnxruntime loads old opsets (it only
# "guarantees" 7+), so refusing them would reject models that run fine.
MIN_OPSET = 1


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype and shape (None for a dynamic dimension) of a graph input/output."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | None, ...] | None

    @property
    def sample_shape(self) -> tuple[int | None, ...] | None:
        """Shape without the leading batch dimension."""
        return None if self.shape is None else self.shape[1:]

    def describe(self) -> str:
        dims = "?" if self.shape is None else "[" + ", ".join("N" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.name} {self.dtype} {dims}"


def _tensor_spec(value_info: onnx.ValueInfoProto) -> TensorSpec:
    ttype = value_info.type
    if not ttype.HasField("tensor_type"):
        return TensorSpec(value_info.name, None, None)
    tensor = ttype.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (KeyError, TypeError, ValueError):
        dtype = None
    if not tensor.HasField("shape"):
        return TensorSpec(value_info.name, dtype, None)
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim)
    return TensorSpec(value_info.name, dtype, dims)


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """Real inputs of the main graph (initializers listed as inputs are skipped)."""
    initializers = {init.name for init in model.graph.initializer}
    return [_tensor_spec(vi) for vi in model.graph.input if vi.name not in initializers]


def graph_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """Outputs of the main graph."""
    return [_tensor_spec(vi) for vi in model.graph.output]


def ai_onnx_opset(model: onnx.ModelProto) -> int | None:
    """The default-domain opset version the model imports, if any."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return None


def _probe_model(opset: int) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8).SerializeToString()


@functools.lru_cache(maxsize=1)
def max_runtime_opset() -> int:
    """Highest default-domain opset the installed onnxruntime loads (probed once)."""
    import onnxruntime as ort

    def loads(opset: int) -> bool:
        try:
            ort.InferenceSession(_probe_model(opset), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - any load failure means "not supported"
            return False
        return True

    low, high = 7, onnx.defs.onnx_opset_version() + 2
    while low < high:  # largest opset that loads
        mid = (low + high + 1) // 2
        if loads(mid):
            low = mid
        else:
            high = mid - 1
    return low


def check_opset(model: onnx.ModelProto, source: str) -> None:
    """Refuse models whose opset this machine's onnxruntime cannot run.

    Raises:
        ModelError: The opset is missing, too old or too new.
    """
    opset = ai_onnx_opset(model)
    if opset is None:
        if any(n.domain in ("", "ai.onnx") for n in model.graph.node):
            raise ModelError(f"{source} uses standard ONNX operators but declares no ai.onnx opset; re-export it with an opset_import.")
        return
    if opset < MIN_OPSET:
        raise ModelError(
            f"{source} declares opset {opset}, which is unsupported (opsets start at {MIN_OPSET}); "
            "re-export the model with a valid opset."
        )
    highest = max_runtime_opset()
    if opset > highest:
        raise ModelError(
            f"{source} uses opset {opset}, which is unsupported: the installed onnxruntime runs opset {highest} at most; "
            f"re-export the model with opset {highest} or lower, or upgrade onnxruntime."
        )


def read_model_bytes(path: Path, what: str, *, limit: int = MAX_MODEL_BYTES) -> bytes:
    """Read a whole model-like input file, refusing missing, empty and oversized ones.

    Args:
        path: The file.
        what: What it is, for messages (``"Model file"``, ``"Weights file"``).
        limit: Largest accepted size in bytes.

    Raises:
        ModelError: The file is missing, not a file, empty, too big or unreadable.
    """
    if not path.exists():
        raise ModelError(f"{what} {path} does not exist; check the path.")
    if not path.is_file():
        raise ModelError(f"{what} {path} is not a file; give the path of the file itself.")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{what} {path} is empty; save or export it again.")
    if size > limit:
        raise ModelError(f"{what} {path} is {size / 1e9:.1f} GB, above the {limit / 1e9:.1f} GB limit; this tool targets smaller models.")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelError(f"Cannot read {what.lower()} {path}: {exc.strerror or exc}.") from exc


def load_model(path: str | Path, *, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX model file and make sure it is usable.

    Args:
        path: The ``.onnx`` file (external data next to it is loaded too).
        check: Also run the ONNX checker and the opset check.

    Raises:
        ModelError: Missing, unreadable, not ONNX, truncated, invalid, or unsupported opset.
    """
    source = str(path)
    p = Path(path)
    data = read_model_bytes(p, "Model file")
    return parse_model(data, source, base_dir=p.parent, check=check)


def parse_model(data: bytes, source: str, *, base_dir: Path | None = None, check: bool = True) -> onnx.ModelProto:
    """Parse serialized ONNX bytes (see :func:`load_model` for the errors raised)."""
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelError(
            f"{source} is not a valid ONNX model (it could not be parsed: the file is truncated, corrupted or another format); "
            "export the model to ONNX again."
        ) from exc
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise ModelError(f"{source} is not an ONNX model (it contains no graph); export the model to ONNX again.")
    if base_dir is not None and any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    ):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{source} keeps weights in external data files that could not be read ({exc}); keep them next to the model.") from exc
    if check:
        check_opset(model, source)
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid graph"
            raise ModelError(
                f"{source} is not a valid ONNX model ({first}); the file may be truncated or corrupted — export it again."
            ) from exc
    return model


def runtime_load_error(exc: BaseException, source: str) -> ModelError:
    """Translate an onnxruntime session-creation failure into a ModelError."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(f"onnxruntime cannot load {source}: {text[:300]}")
