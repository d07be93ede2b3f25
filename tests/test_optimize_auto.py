"""``--quantize auto`` keeps the original when nothing beats it, and "none" never grows a model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from edgepack.optimize.evaluate import Latency
from edgepack.optimize.pipeline import SLOWER_MARGIN, WIN_MARGIN, Candidate, OptimizeConfig, _choose

FEATURES, CLASSES = 256, 64


def fp16_weight_model(seed: int = 0) -> onnx.ModelProto:
    """y = x @ float(W16): the weight is stored in fp16 and cast at run time (folding stores it as fp32)."""
    w = np.random.default_rng(seed).standard_normal((FEATURES, CLASSES)).astype(np.float16)
    nodes = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["x", "w"], ["y"])]
    return _model(nodes, [numpy_helper.from_array(w, "w16")])


def constant_of_shape_model(seed: int = 0) -> onnx.ModelProto:
    """y = x @ (ConstantOfShape([256, 64]) * col + row): tiny on disk, a full [256, 64] tensor once folded."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([FEATURES, CLASSES], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((FEATURES, 1)).astype(np.float32), "col"),
             numpy_helper.from_array(rng.standard_normal((CLASSES,)).astype(np.float32), "row")]
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["ones"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("Mul", ["ones", "col"], ["scaled"]),
             helper.make_node("Add", ["scaled", "row"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    return _model(nodes, inits)


def _model(nodes, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, FEATURES])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, CLASSES])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def write_project(model: onnx.ModelProto, directory: Path, samples: int = 500) -> tuple[Path, Path]:
    src = directory / "model.onnx"
    onnx.save(model, str(src))
    x = np.random.default_rng(7).standard_normal((samples, FEATURES)).astype(np.float32)
    labels = models.run(model, {"x": x})[0].argmax(axis=1).astype(np.int64)
    np.savez(directory / "val.npz", x=x, labels=labels)
    return src, directory / "val.npz"


@pytest.mark.parametrize("build", [fp16_weight_model, constant_of_shape_model], ids=["fp16-initializer", "constant-of-shape"])
def test_graph_optimization_that_grows_the_model_keeps_the_original_bytes(cli, tmp_path, build):
    from edgepack.optimize.graph import optimize_graph

    model = build()
    optimized, _ = optimize_graph(model, 1)
    # The premise: the basic-level optimizer really makes this file bigger (fp32 constants).
    assert len(optimized.SerializeToString()) > 1.3 * len(model.SerializeToString())
    src, val = write_project(model, tmp_path)
    out = tmp_path / "out.onnx"
    code, stdout, err = cli("optimize", src, "-o", out, "--quantize", "none", "--validation", val, "--json", "--runs", "3")
    assert code == 0, err
    report = json.loads(stdout)
    assert out.read_bytes() == src.read_bytes()
    assert "larger than the input" in report["graph"]["note"] and "keeps the original graph" in report["graph"]["note"]
    assert report["candidates"][0]["size_bytes"] == src.stat().st_size


@pytest.mark.parametrize("build", [fp16_weight_model, constant_of_shape_model], ids=["fp16-initializer", "constant-of-shape"])
def test_auto_never_writes_a_result_larger_than_the_input_or_one_that_does_not_beat_it(cli, tmp_path, build):
    src, val = write_project(build(), tmp_path)
    out = tmp_path / "out.onnx"
    code, stdout, err = cli("optimize", src, "-o", out, "--quantize", "auto", "--validation", val, "--json", "--runs", "20")
    assert code == 0, err
    report = json.loads(stdout)
    original = report["original"]
    none = next(c for c in report["candidates"] if c["mode"] == "none")
    assert none["status"] == "rejected" and none["reason"] == "passed the gate but is the original model byte for byte"
    if report["chosen"] == "original":
        assert out.read_bytes() == src.read_bytes()
        assert "wrote the original model unchanged" in report["kept_original"]
    else:
        chosen = next(c for c in report["candidates"] if c["mode"] == report["chosen"])
        assert out.stat().st_size == chosen["size_bytes"] <= src.stat().st_size
        smaller = chosen["size_bytes"] <= original["size_bytes"] * (1 - WIN_MARGIN)
        faster = chosen["latency"]["median_ms"] <= original["latency"]["median_ms"] * (1 - WIN_MARGIN)
        assert smaller or faster
    for cand in report["candidates"]:
        if cand["latency"] and cand["latency"]["median_ms"] > original["latency"]["median_ms"] * (1 + SLOWER_MARGIN):
            label = "graph-optimized fp32" if cand["mode"] == "none" else cand["mode"]
            assert any(w.startswith(f"{label} is ") and "SLOWER than the original" in w for w in report["warnings"])


def test_auto_with_nothing_better_writes_the_original_and_says_so(cli, tmp_path):
    # A model with no weights at all: nothing to quantize, nothing to fold, so nothing can beat it.
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "relu.onnx"
    onnx.save(model, str(src))
    x = np.random.default_rng(1).standard_normal((500, 8)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x)
    out = tmp_path / "out.onnx"
    code, stdout, err = cli("optimize", src, "-o", out, "--quantize", "auto", "--validation", tmp_path / "val.npz", "--runs", "5")
    assert code == 0, err
    assert out.read_bytes() == src.read_bytes()
    assert "Kept the original:" in stdout and "Wrote" in stdout and "(original)" in stdout


# --------------------------------------------------------------------------- the decision itself


ORIGINAL = b"o" * 1000
BASE = Latency(median_ms=1.0, p95_ms=1.2, runs=20)


def cand(mode: str, size: int, median_ms: float, data: bytes | None = None) -> Candidate:
    return Candidate(mode, size_bytes=size, latency=Latency(median_ms, median_ms * 1.2, 20),
                     model_bytes=data if data is not None else mode.encode() * size)


def choose(*candidates: Candidate, warnings: list | None = None):
    config = OptimizeConfig(model=Path("m.onnx"), output=Path("o.onnx"), quantize="auto")
    return _choose(config, list(candidates), BASE, ORIGINAL, warnings if warnings is not None else [])


def test_a_dynamic_result_slower_and_no_smaller_does_not_win_and_is_warned():
    warnings: list[str] = []
    dynamic = cand("dynamic", 990, 1.09)  # the case: 1.09× slower, 1% smaller
    chosen = choose(cand("none", 1000, 0.97, ORIGINAL), dynamic, warnings=warnings)
    assert chosen.mode == "original" and chosen.status == "chosen"
    assert dynamic.status == "rejected" and "neither 5% smaller nor 5% faster" in dynamic.reason
    assert warnings == ["dynamic is 1.09× SLOWER than the original on this host (1.090 ms vs 1.000 ms median, same run)."]


def test_the_original_bytes_never_win_on_latency_noise():
    chosen = choose(cand("none", 1000, 0.80, ORIGINAL))  # "20% faster" identical bytes: noise, not a win
    assert chosen.mode == "original"


def test_a_larger_graph_optimized_result_does_not_win():
    chosen = choose(cand("none", 1410, 1.0))  # fp16 weights folded into fp32: 1.41× the size
    assert chosen.mode == "original"


def test_a_smaller_result_wins_even_when_slower_but_is_warned():
    warnings: list[str] = []
    chosen = choose(cand("dynamic", 300, 1.2), warnings=warnings)
    assert chosen.mode == "dynamic" and warnings and "1.20× SLOWER" in warnings[0]


def test_a_faster_result_of_the_same_size_wins_only_past_the_margin():
    assert choose(cand("none", 1000, 0.94)).mode == "none"
    assert choose(cand("none", 1000, 0.96)).mode == "original"


def test_among_winners_the_fastest_then_the_smallest_is_chosen():
    fp16, static = cand("fp16", 500, 0.90), cand("static", 260, 0.92)
    chosen = choose(fp16, static)
    assert chosen is static  # within the 5% latency tie, the smaller file
    assert fp16.status == "rejected" and "static is better" in fp16.reason
