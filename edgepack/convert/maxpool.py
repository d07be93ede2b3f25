"""Zero padding for MaxPools that follow a Relu, so onnx2tf's int8 TFLite loads.

onnx2tf turns a padded ONNX MaxPool into ``PADV2`` with the float minimum (-3.4e38) plus
a VALID ``MAX_POOL_2D``. int8 calibration then sees that constant: the pooled tensor
gets a scale of about 1e36, every activation rounds to one value, and LiteRT's XNNPACK
delegate refuses the model ("failed to prepare"; the builtin kernels abort). ResNet,
SqueezeNet and ShuffleNet all pool a Relu output (or a Concat of them) this way. When every value in the
window is a Relu output (>= 0) and every window holds at least one real value, padding
with 0 instead of -inf cannot change a maximum, so the MaxPool becomes
``Pad(0)`` + an unpadded floor-mode MaxPool. The rewrite is proven bit-exact with
onnxruntime on a real sample before it is used; otherwise the model is left as it was.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["zero_pad_relu_maxpools"]


def _attr(node, name, default):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# Ops whose output is >= 0 wherever all their data inputs are (SqueezeNet pools a Concat of Relus).
_KEEPS_SIGN = {"Concat", "MaxPool", "Reshape", "Flatten", "Transpose", "Identity", "Squeeze", "Unsqueeze"}


def _non_negative(name: str, producers, initializers, depth: int = 0) -> bool:
    producer = producers.get(name)
    if producer is None or depth > 8:
        return False
    if producer.op_type == "Relu":
        return True
    if producer.op_type == "Clip" and len(producer.input) > 1 and producer.input[1] in initializers:
        from onnx import numpy_helper

        return float(np.min(numpy_helper.to_array(initializers[producer.input[1]]))) >= 0.0
    if producer.op_type in _KEEPS_SIGN:
        data = producer.input if producer.op_type == "Concat" else producer.input[:1]
        return bool(data) and all(_non_negative(i, producers, initializers, depth + 1) for i in data)
    return False


def _rewrite(model):
    """The rewritten model and how many MaxPools changed (pure; ``model`` is not modified)."""
    import onnx
    from onnx import helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    producers = {out: n for n in model.graph.node for out in n.output}
    initializers = {i.name: i for i in model.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes, changed = [], 0
    for node in out.graph.node:
        pads = list(_attr(node, "pads", []))
        ceil = int(_attr(node, "ceil_mode", 0))
        kernel = list(_attr(node, "kernel_shape", []))
        if (node.op_type != "MaxPool" or len(node.output) != 1 or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                or any(d != 1 for d in _attr(node, "dilations", [1] * len(kernel)))
                or (not any(pads) and not ceil) or node.input[0] not in shapes or node.output[0] not in shapes
                or not _non_negative(node.input[0], producers, initializers)):
            nodes.append(node)
            continue
        rank = len(kernel)
        strides = list(_attr(node, "strides", [1] * rank))
        pads = pads or [0] * (2 * rank)
        in_shape, out_shape = shapes[node.input[0]], shapes[node.output[0]]
        begin, end = pads[:rank], []
        ok = True
        for axis in range(rank):
            size, k, s, o = in_shape[2 + axis], kernel[axis], strides[axis], out_shape[2 + axis]
            needed = (o - 1) * s + k - (size + begin[axis])  # end padding a floor-mode pool needs for o outputs
            # Every window must hold a real value, or a 0 pad would replace a -inf output.
            if needed < 0 or begin[axis] >= k or needed >= k or (o - 1) * s >= size + begin[axis]:
                ok = False
            end.append(max(needed, 0))
        if not ok:
            nodes.append(node)
            continue
        name = node.name or node.output[0]
        pad_name = f"{name}__zero_pads"
        out.graph.initializer.append(numpy_helper.from_array(np.asarray([0, 0, *begin, 0, 0, *end], np.int64), pad_name))
        padded = f"{node.output[0]}__zero_padded"
        nodes.append(helper.make_node("Pad", [node.input[0], pad_name], [padded], name=f"{name}__zero_pad", mode="constant"))
        nodes.append(helper.make_node("MaxPool", [padded], list(node.output), name=name, kernel_shape=kernel, strides=strides))
        changed += 1
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, changed


def zero_pad_relu_maxpools(model, sample: Mapping[str, np.ndarray]):
    """``model`` with Relu-fed MaxPools zero-padded, if onnxruntime proves it bit-exact on ``sample``.

    Returns:
        ``(model, count)``: the rewritten model and how many MaxPools changed, or the
        original model and 0 when nothing applies, there is no sample, or the proof fails.
    """
    if not sample:
        return model, 0
    try:
        rewritten, changed = _rewrite(model)
    except Exception:  # noqa: BLE001 - shape inference can fail on exotic graphs; the rewrite is an aid
        return model, 0
    if not changed:
        return model, 0
    from ..optimize.evaluate import session

    try:
        before = session(model.SerializeToString(), 1).run(None, dict(sample))
        after = session(rewritten.SerializeToString(), 1).run(None, dict(sample))
    except Exception:  # noqa: BLE001
        return model, 0
    if all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after)):
        return rewritten, changed
    return model, 0
