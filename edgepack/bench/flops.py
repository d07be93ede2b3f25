"""Count the arithmetic of an ONNX graph: multiply-adds of Conv, Gemm and MatMul (and their int8 forms).

FLOPs here are ``2 x multiply-accumulates`` of the matrix-like ops (bias adds,
activations and elementwise ops are left out; they are small next to these on CNNs).
Shapes come from ONNX shape inference with every symbolic dimension (the batch) set
to 1, so the count is per sample. Quantized ops (QLinearConv, ConvInteger,
QLinearMatMul, MatMulInteger) count as ops too: against ``int8_gops``, not FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["FlopCount", "count_flops"]

_CONV = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
_MATMUL = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}
_INT8_OPS = {"ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul"}


@dataclass
class FlopCount:
    """Per-sample arithmetic of a graph.

    Attributes:
        total: All counted ops (2 x MACs).
        int8: The part done by integer (quantized) ops.
        by_op: Totals per op type.
        uncounted: Counted op types whose shapes were unknown (the count is then a lower bound).
    """

    total: int = 0
    int8: int = 0
    by_op: dict = field(default_factory=dict)
    uncounted: list = field(default_factory=list)

    def add(self, op: str, flops: int, int8: bool = False) -> None:
        self.total += flops
        self.by_op[op] = self.by_op.get(op, 0) + flops
        if int8 or op in _INT8_OPS:
            self.int8 += flops

    def to_dict(self) -> dict:
        return {"total": self.total, "int8": self.int8, "by_op": dict(sorted(self.by_op.items())),
                "uncounted": sorted(set(self.uncounted)), "per": "sample (symbolic dims = 1)",
                "definition": "2 x multiply-accumulates of Conv/Gemm/MatMul (incl. quantized forms)"}


def _dims(type_proto) -> list[int] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    out = []
    for d in type_proto.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1)
    return out


def _fix_dims(model, input_shapes: dict | None) -> None:
    for value in list(model.graph.input) + list(model.graph.output):
        shape = value.type.tensor_type.shape
        given = (input_shapes or {}).get(value.name)
        for i, d in enumerate(shape.dim):
            if given is not None and i < len(given) and given[i]:
                d.Clear()
                d.dim_value = int(given[i])
            elif not (d.HasField("dim_value") and d.dim_value > 0):
                d.Clear()
                d.dim_value = 1


def _dequantized(model) -> set:
    """Tensors produced by DequantizeLinear (QDQ models: the op then runs as int8)."""
    return {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}


def _counted_tensors(model) -> list[str]:
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in _CONV or node.op_type in _MATMUL or node.op_type == "Gemm":
            names += [n for n in node.input[:4] if n] + [node.output[0]]
    return list(dict.fromkeys(names))


def _runtime_shapes(model, feed: dict) -> dict:
    """Shapes of the counted ops' tensors when the model runs on ``feed`` (one sample).

    Needed when shapes depend on the data (an in-graph resize of a raw image of any
    size), which static shape inference cannot follow.
    """
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    inits = {i.name for i in probe.graph.initializer}
    present = {o.name for o in probe.graph.output}
    wanted = [n for n in _counted_tensors(probe) if n not in inits]
    for name in wanted:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    names = [o.name for o in probe.graph.output]
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outs = sess.run(names, feed)
    except Exception:  # noqa: BLE001 - static shapes are the fallback
        return {}
    return {n: list(np.shape(o)) for n, o in zip(names, outs) if n in wanted}


def count_flops(model_or_path: str | Path | bytes | onnx.ModelProto,  # noqa: F821
                input_shapes: dict | None = None, feed: dict | None = None) -> FlopCount:
    """Count per-sample FLOPs of an ONNX model (path, bytes or ModelProto).

    Args:
        input_shapes: Concrete shapes for inputs whose dims are symbolic (e.g. a raw image
            input of any size); other symbolic dims are taken as 1.
        feed: One sample (batch 1) to run the model on; the counted ops' shapes are then
            measured, which also covers data-dependent shapes. Preferred when available.
    """
    import onnx
    from onnx import numpy_helper, shape_inference

    if isinstance(model_or_path, (str, Path)):
        model = onnx.load(str(model_or_path))
    elif isinstance(model_or_path, bytes):
        model = onnx.load_from_string(model_or_path)
    else:
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
    measured = _runtime_shapes(model, feed) if feed is not None else {}
    _fix_dims(model, input_shapes)
    try:
        model = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - fall back to whatever shapes the file has
        pass
    shapes: dict[str, list[int]] = {}
    for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        dims = _dims(value.type)
        if dims is not None:
            shapes[value.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    shapes.update(measured)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(numpy_helper.to_array(attr.t).shape)
    count = FlopCount()
    qdq = _dequantized(model)
    for node in model.graph.node:
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op in _CONV:
            xi, wi = _CONV[op]
            w = shapes.get(node.input[wi])
            y = shapes.get(node.output[0])
            if not w or not y:
                count.uncounted.append(op)
                continue
            group = int(attrs.get("group", 1))
            # y: [N, Cout, *spatial]; w: [Cout, Cin/group, *kernel]
            macs = int(np.prod(y)) * int(np.prod(w[1:]))
            count.add(op, 2 * macs, int8=node.input[wi] in qdq and node.input[xi] in qdq)
            _ = group  # Cin/group is already w[1]
        elif op == "Gemm":
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if not a or not b or len(a) != 2 or len(b) != 2:
                count.uncounted.append(op)
                continue
            m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
            n = b[0] if attrs.get("transB", 0) else b[1]
            count.add(op, 2 * m * n * k, int8=node.input[0] in qdq and node.input[1] in qdq)
        elif op in _MATMUL:
            ai, bi = _MATMUL[op]
            a, b = shapes.get(node.input[ai]), shapes.get(node.input[bi])
            y = shapes.get(node.output[0])
            if not a or not b:
                count.uncounted.append(op)
                continue
            k = a[-1]
            if y:
                out_elems = int(np.prod(y))
            else:
                a2 = a if len(a) > 1 else [1] + a
                b2 = b if len(b) > 1 else b + [1]
                batch = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
                out_elems = int(np.prod(batch)) * a2[-2] * b2[-1]
            count.add(op, 2 * out_elems * k, int8=node.input[ai] in qdq and node.input[bi] in qdq)
    return count
