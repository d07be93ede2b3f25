"""Tiny ONNX models built with onnx.helper for tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, initializers=(), opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def mlp(features: int = 16, hidden: int = 32, classes: int = 4, seed: int = 0) -> onnx.ModelProto:
    """x[N,features] → MatMul+Add → Relu → MatMul → logits[N,classes]."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array((rng.standard_normal((features, hidden)) / np.sqrt(features)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32) * 0.1, "b1")
    w2 = numpy_helper.from_array((rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        helper.make_node("MatMul", ["h2", "w2"], ["logits"], name="mm2"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [w1, b1, w2],
    )


def mlp_with_constant_weights(seed: int = 0) -> onnx.ModelProto:
    """The MLP with its weights held in Constant nodes instead of initializers."""
    model = mlp(seed=seed)
    constants = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in model.graph.initializer]
    nodes = constants + list(model.graph.node)
    return _model(nodes, list(model.graph.input), list(model.graph.output))


def mlp_in_if(seed: int = 0) -> onnx.ModelProto:
    """Weights that live only inside the branches of an If node."""
    rng = np.random.default_rng(seed)

    def branch(name: str) -> onnx.GraphProto:
        w = numpy_helper.from_array((rng.standard_normal((16, 4)) / 4).astype(np.float32), f"{name}_w")
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_mm")],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", 4])],
            [w],
        )

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0, name="sum"),
        helper.make_node("ReduceSum", ["total"], ["scalar"], keepdims=0, name="sum2"),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32)), name="zero"),
        helper.make_node("Greater", ["scalar", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["logits"], then_branch=branch("then"), else_branch=branch("else"), name="if"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
    )


def outlier_weight_mlp(seed: int = 0) -> onnx.ModelProto:
    """A classifier that per-tensor int8 destroys: one huge weight sets the scale.

    Feature 0 is always zero in its data, so the 1000.0 weight never affects the float
    model; but per-tensor quantization picks scale ≈ 1000/127 and every real weight
    (|w| ≈ 0.05) rounds to zero — the classic outlier failure.
    """
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((16, 8)) * 0.05).astype(np.float32)
    w[0, 0] = 1000.0
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm")]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(w, "w")],
    )


def outlier_inputs(n: int, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    x[:, 0] = 0.0
    return x


def wide_activation_mlp(width: int = 65536, seed: int = 0) -> onnx.ModelProto:
    """Small weights in, a very wide hidden activation: calibration memory stress."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array((rng.standard_normal((8, width)) * 0.3).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((width, 4)) * 0.01).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="mm2"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [w1, w2],
    )


def identity_with_opset(opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def run(model: onnx.ModelProto | str, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else open(model, "rb").read()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)
