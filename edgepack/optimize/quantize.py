"""Quantization modes, each a small plug-in in :data:`QUANTIZERS`.

Every quantizer reads a float model file and writes a quantized one; nothing here
measures accuracy (that is the gate's job). After quantizing, :func:`audit` checks
structurally that the weights really were quantized, because onnxruntime silently
skips weights it cannot see (inside ``If``/``Loop`` bodies, or computed at run time).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..data import Dataset
from ..errors import NotQuantizableError, OptimizationError

# Ops whose second input is a weight matrix/kernel worth quantizing.
WEIGHT_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Samples held by the calibrator at once; activations of one chunk live in memory.
CALIBRATION_CHUNK = 16


@dataclass(frozen=True)
class QuantOptions:
    """Options shared by the quantizers.

    Attributes:
        per_channel: Per-output-channel weight scales (static and dynamic int8).
        calibration_method: minmax, entropy or percentile (static only).
        calibration_batch: Samples per calibration inference.
        calibration_limit: Use at most this many calibration samples (None: all).
        exclude_nodes: Node names to keep in float (e.g. post-processing).
        reduce_range: 7-bit weights, so two u8 x s8 products can never saturate the
            16-bit pairs of x86 ``vpmaddubsw`` (CPUs without VNNI).
        activations: ``u8`` or ``s8`` activations (static only).
        weights: ``s8`` or ``u8`` weights.
    """

    per_channel: bool = False
    calibration_method: str = "minmax"
    calibration_batch: int = 1
    calibration_limit: int | None = None
    exclude_nodes: tuple[str, ...] = ()
    reduce_range: bool = False
    activations: str = "u8"
    weights: str = "s8"

    def describe(self) -> str:
        """The settings that change int8 arithmetic, e.g. ``u8/s8 per-channel minmax``."""
        parts = [f"{self.activations}/{self.weights}", "per-channel" if self.per_channel else "per-tensor",
                 self.calibration_method]
        if self.reduce_range:
            parts.append("reduce_range")
        return " ".join(parts)


@dataclass(frozen=True)
class QuantAudit:
    """Structural facts about a quantized model.

    Attributes:
        weights_total: Weight-bearing ops with constant weights in the float model.
        weights_quantized: How many of those consume quantized weights afterwards.
        left_float: Where weights stayed float (node names, with subgraph paths).
    """

    weights_total: int
    weights_quantized: int
    left_float: tuple[str, ...]


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    # onnxruntime.quantization logs advice through the root logger and print()s
    # progress to stdout, which would corrupt `--json` output.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


class _CalibrationReader:
    """onnxruntime CalibrationDataReader over a lazy Dataset, in strided chunks.

    onnxruntime calls ``set_range`` per chunk and collects each chunk separately
    (merging histograms / ranges), so at most one chunk of activations is alive.
    """

    def __init__(self, dataset: Dataset, batch: int, limit: int | None, chunk: int) -> None:
        self._dataset = dataset
        self._batch = batch
        count = len(dataset) if limit is None else min(limit, len(dataset))
        self._starts = list(range(0, count, batch))
        self._stop_sample = count
        self._chunk = chunk
        self._pos = 0
        self._end = len(self._starts)

    def __len__(self) -> int:
        # onnxruntime requires the length to be a multiple of the stride; a short last
        # chunk is fine because get_next simply runs out early.
        return -(-len(self._starts) // self._chunk) * self._chunk

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pos = start_index
        self._end = min(end_index, len(self._starts))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._end:
            return None
        start = self._starts[self._pos]
        self._pos += 1
        return self._dataset.batch(start, min(start + self._batch, self._stop_sample))

    def rewind(self) -> None:
        self._pos = 0
        self._end = len(self._starts)


_QUANT_TYPES = {"u8": lambda q: q.QUInt8, "s8": lambda q: q.QInt8}


def _static(src: Path, dst: Path, options: QuantOptions, calibration: Dataset | None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calibration is None:
        raise OptimizationError("Static quantization needs calibration data; pass --calibration with representative inputs.")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    reader = _CalibrationReader(calibration, options.calibration_batch, options.calibration_limit, CALIBRATION_CHUNK)
    with _quiet_logging():
        quantize_static(
            str(src),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=options.per_channel,
            reduce_range=options.reduce_range,
            # u8 activations / s8 weights is onnxruntime's fast path on x86 and ARM.
            activation_type=_QUANT_TYPES[options.activations](QuantType),
            weight_type=_QUANT_TYPES[options.weights](QuantType),
            calibrate_method=methods[options.calibration_method],
            nodes_to_exclude=list(options.exclude_nodes),
            extra_options={"CalibStridedMinMax": CALIBRATION_CHUNK},
        )


def _dynamic(src: Path, dst: Path, options: QuantOptions, calibration: Dataset | None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_logging():
        quantize_dynamic(str(src), str(dst), per_channel=options.per_channel, reduce_range=options.reduce_range,
                         weight_type=_QUANT_TYPES[options.weights](QuantType),
                         nodes_to_exclude=list(options.exclude_nodes))


def _fp16(src: Path, dst: Path, options: QuantOptions, calibration: Dataset | None) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with _quiet_logging():
        # keep_io_types: the device feeds and reads float32 whatever the variant.
        converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(dst))


Quantizer = Callable[[Path, Path, QuantOptions, "Dataset | None"], None]
QUANTIZERS: dict[str, Quantizer] = {"static": _static, "dynamic": _dynamic, "fp16": _fp16}


def _subgraphs(graph: onnx.GraphProto, path: str) -> Iterator[tuple[str, onnx.GraphProto]]:
    yield path, graph
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                yield from _subgraphs(sub, f"{path}/{node.name or node.op_type}.{attr.name}")


def _constant_names(graph: onnx.GraphProto, outer: set[str]) -> set[str]:
    names = set(outer) | {t.name for t in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _weighted_nodes(model: onnx.ModelProto) -> list[tuple[str, onnx.NodeProto, str]]:
    """(location, node, weight tensor name) for every op fed a constant float weight."""
    found = []
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}

    def walk(graph: onnx.GraphProto, path: str, outer: set[str], outer_float: set[str]) -> None:
        consts = _constant_names(graph, outer)
        floats = set(outer_float) | {t.name for t in graph.initializer if t.data_type in float_types}
        for n in graph.node:
            if n.op_type == "Constant":
                value = next((a for a in n.attribute if a.name == "value"), None)
                if value is not None and value.t.data_type in float_types:
                    floats.update(n.output)
        for node in graph.node:
            if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in consts and node.input[1] in floats:
                found.append((f"{path}/{node.name or node.op_type}", node, node.input[1]))
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub in subs:
                    walk(sub, f"{path}/{node.name or node.op_type}.{attr.name}", consts, floats)

    walk(model.graph, "main", set(), set())
    return found


def audit(float_model: onnx.ModelProto, quantized: onnx.ModelProto, mode: str) -> QuantAudit:
    """Check which weight-bearing ops of ``float_model`` consume quantized weights in ``quantized``.

    A weight counts as quantized when its op is gone (replaced by an integer op) or its
    weight input now comes from a DequantizeLinear / Cast of a low-precision tensor.
    Pure: reads the two models only.
    """
    before = _weighted_nodes(float_model)
    after_nodes: dict[str, tuple[onnx.NodeProto, dict[str, onnx.NodeProto], dict[str, int]]] = {}

    def index(graph: onnx.GraphProto, path: str) -> None:
        producers = {o: n for n in graph.node for o in n.output}
        dtypes = {t.name: t.data_type for t in graph.initializer}
        for node in graph.node:
            after_nodes[f"{path}/{node.name or node.op_type}"] = (node, producers, dtypes)
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub in subs:
                    index(sub, f"{path}/{node.name or node.op_type}.{attr.name}")

    index(quantized.graph, "main")
    low = {onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.BFLOAT16}
    left: list[str] = []
    for location, node, _weight in before:
        entry = after_nodes.get(location)
        if entry is None or entry[0].op_type != node.op_type:
            continue  # replaced by an integer op (ConvInteger, MatMulInteger, QLinear*)
        new_node, producers, dtypes = entry
        weight = new_node.input[1] if len(new_node.input) > 1 else ""
        producer = producers.get(weight)
        if producer is not None and producer.op_type in ("DequantizeLinear", "DynamicQuantizeLinear"):
            continue
        if dtypes.get(weight) in low:
            continue  # fp16 keeps the op and stores the weight itself in half precision
        if producer is not None and producer.op_type == "Cast" and dtypes.get(producer.input[0]) in low:
            continue
        left.append(location)
    return QuantAudit(len(before), len(before) - len(left), tuple(left))


def quantize(mode: str, src: Path, dst: Path, options: QuantOptions, calibration: Dataset | None) -> QuantAudit:
    """Quantize ``src`` into ``dst`` with the named mode and audit the result.

    Raises:
        NotQuantizableError: No weight was quantized, or the quantizer failed on this graph.
        OptimizationError: Missing calibration data for static mode.
    """
    if mode not in QUANTIZERS:
        raise OptimizationError(f"Unknown quantization mode '{mode}'; choose one of {', '.join(QUANTIZERS)}.")
    float_model = onnx.load(str(src))
    if not _weighted_nodes(float_model):
        raise NotQuantizableError(
            f"{mode} quantization found no Conv/MatMul/Gemm weights in this model; it has nothing to quantize "
            "(weights computed at run time cannot be quantized)."
        )
    try:
        QUANTIZERS[mode](src, dst, options, calibration)
    except (NotQuantizableError, OptimizationError):
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises bare exceptions of many types
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NotQuantizableError(f"{mode} quantization failed on this model: {text[:300]}") from exc
    result = audit(float_model, onnx.load(str(dst)), mode)
    if result.weights_quantized == 0:
        raise NotQuantizableError(
            f"{mode} quantization left every weight in float ({', '.join(result.left_float[:5])}); "
            "the model is not quantizable this way (weights inside If/Loop bodies are not reached by onnxruntime's quantizer)."
        )
    return result
