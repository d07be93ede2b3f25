"""Portable graph optimization: shape inference, constant folding, fusion, dead-node removal.

We use onnxruntime's own offline optimizer at the *basic* level. Basic rewrites
(constant folding, redundant-node elimination, Conv+BatchNorm/Add/Mul fusion, ...)
are semantics-preserving, use only standard ONNX operators and run before any
execution-provider partitioning, so the result loads on a plain onnxruntime on any
machine; the *extended* and *all* levels emit ``com.microsoft`` fused kernels tied to
one build and CPU. Running the same kernels that will later execute the model also
means constant folding cannot drift from runtime numerics. onnxslim/onnxoptimizer
would add a dependency for the same rewrites.
"""

from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import OptimizationError


@dataclass(frozen=True)
class GraphReport:
    """What graph optimization did.

    Attributes:
        nodes_before: Node count of the main graph before.
        nodes_after: Node count after.
        ops_removed: Per op type, how many fewer nodes there are afterwards.
        applied: True when the optimized graph is used; False when it was discarded.
        note: Why it was discarded, or other remarks.
    """

    nodes_before: int
    nodes_after: int
    ops_removed: dict[str, int] = field(default_factory=dict)
    applied: bool = True
    note: str = ""


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn main-graph ``Constant`` nodes holding tensors into initializers, in place.

    Quantizers only find weights among initializers; a weight inside a Constant node
    would otherwise be treated as an activation. Returns the number converted.
    """
    graph = model.graph
    keep = []
    converted = 0
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None and len(node.attribute) == 1:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            converted += 1
        else:
            keep.append(node)
    if converted:
        del graph.node[:]
        graph.node.extend(keep)
    return converted


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name, in place, so reports and audits can point at it."""
    taken = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{index}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, keeping the model unchanged where inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is an optimisation, never a requirement
        return model


def _domains(model: onnx.ModelProto) -> set[str]:
    domains: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domains.add(node.domain or "")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return domains


def _ort_basic(model: onnx.ModelProto, threads: int) -> onnx.ModelProto:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgepack-graph-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(out)
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(out))
    return optimized


def optimize_graph(model: onnx.ModelProto, threads: int = 1) -> tuple[onnx.ModelProto, GraphReport]:
    """Return a portable, optimized copy of ``model`` and what changed.

    The graph keeps its input/output names, its opset and only the operator domains
    it already used; when onnxruntime's result would break any of that, the
    shape-inferred original is returned with ``applied=False``.

    Raises:
        OptimizationError: onnxruntime cannot load the model at all.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    before = collections.Counter(n.op_type for n in work.graph.node)
    constants_to_initializers(work)
    work = infer_shapes(work)
    try:
        optimized = _ort_basic(work, threads)
    except Exception as exc:  # noqa: BLE001 - translated below
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OptimizationError(f"onnxruntime cannot load the model, so it cannot be optimized: {text[:300]}") from exc

    def fallback(note: str) -> tuple[onnx.ModelProto, GraphReport]:
        n = sum(before.values())
        name_nodes(work)
        return work, GraphReport(n, len(work.graph.node), {}, applied=False, note=note)

    if [i.name for i in optimized.graph.input if i.name not in {t.name for t in optimized.graph.initializer}] != [
        i.name for i in work.graph.input if i.name not in {t.name for t in work.graph.initializer}
    ] or [o.name for o in optimized.graph.output] != [o.name for o in work.graph.output]:
        return fallback("onnxruntime changed the graph's inputs or outputs; kept the original graph")
    new_domains = _domains(optimized) - _domains(work) - {""}
    if new_domains:
        return fallback(f"onnxruntime introduced non-portable operator domains {sorted(new_domains)}; kept the original graph")
    # Keep the original opset imports and metadata: the optimizer must not change them.
    del optimized.opset_import[:]
    optimized.opset_import.extend(work.opset_import)
    optimized.ir_version = work.ir_version
    optimized.producer_name = work.producer_name
    optimized.producer_version = work.producer_version
    del optimized.metadata_props[:]
    optimized.metadata_props.extend(work.metadata_props)
    optimized = infer_shapes(optimized)
    try:
        onnx.checker.check_model(optimized)
    except onnx.checker.ValidationError as exc:
        return fallback(f"the optimized graph failed the ONNX checker ({str(exc).splitlines()[0][:200]}); kept the original graph")
    name_nodes(optimized)
    after = collections.Counter(n.op_type for n in optimized.graph.node)
    removed = {op: before[op] - after.get(op, 0) for op in before if before[op] > after.get(op, 0)}
    return optimized, GraphReport(sum(before.values()), sum(after.values()), removed)

