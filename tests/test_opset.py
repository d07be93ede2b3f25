"""Models below opset 13 are converted with onnx's version converter and proven unchanged.

Regression: ``--per-channel`` int8 of an opset 11/12 model wrote a model onnxruntime refuses
(``INVALID_GRAPH ... DequantizeLinear``: per-channel ``axis`` arrived in opset 13), and
``build`` told the user to re-export from PyTorch.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from test_build import DIGITS, make_project, manifest_of, run


def tiny_cnn(opset: int, seed: int = 0) -> onnx.ModelProto:
    """Conv, Relu, Flatten, Unsqueeze/Squeeze with axes ATTRIBUTES, Gemm, Softmax over a rank-3
    tensor (its axis meaning changed at 13): every op whose form changed at opset 13."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(rng.normal(0, .3, (4, 1, 3, 3)).astype(np.float32), "W"),
             nh.from_array(rng.normal(0, .1, (4,)).astype(np.float32), "B"),
             nh.from_array(rng.normal(0, .3, (10, 4 * 8 * 8)).astype(np.float32), "G"),
             nh.from_array(rng.normal(0, .1, (10,)).astype(np.float32), "GB"),
             nh.from_array(np.array([0, 2, 5], np.int64), "shape3"),
             nh.from_array(np.array([0, 10], np.int64), "shape2")]
    nodes = [h.make_node("Conv", ["input", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c"], ["r"]),
             h.make_node("Flatten", ["r"], ["f"], axis=1),
             h.make_node("Unsqueeze", ["f"], ["u"], axes=[1]),
             h.make_node("Squeeze", ["u"], ["s"], axes=[1]),
             h.make_node("Gemm", ["s", "G", "GB"], ["g"], transB=1),
             h.make_node("Reshape", ["g", "shape3"], ["g3"]),
             h.make_node("Softmax", ["g3"], ["p3"], axis=1),  # opset < 13: over dims 1.. (all 10 values)
             h.make_node("Reshape", ["p3", "shape2"], ["probs"])]
    graph = h.make_graph(nodes, "tiny", [h.make_tensor_value_info("input", T.FLOAT, ["N", 1, 8, 8])],
                         [h.make_tensor_value_info("probs", T.FLOAT, ["N", 10])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    return model


def digits_at(opset: int) -> onnx.ModelProto:
    """The digits CNN declared at an old opset (its ops mean the same there), with
    Unsqueeze/Squeeze axes attributes after Flatten."""
    model = onnx.load(DIGITS / "model.onnx")
    model.ir_version = 7
    del model.opset_import[:]
    model.opset_import.append(h.make_opsetid("", opset))
    nodes = list(model.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.op_type == "Flatten")
    flat = nodes[at].output[0]
    nodes[at].output[0] = "flat_raw"
    nodes[at + 1:at + 1] = [h.make_node("Unsqueeze", ["flat_raw"], ["flat_u"], axes=[0]),
                            h.make_node("Squeeze", ["flat_u"], [flat], axes=[0])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [11, 12])
def test_old_opset_per_channel_int8_loads_in_onnxruntime(opset, tmp_path, cli):
    src, out = tmp_path / "m.onnx", tmp_path / "int8.onnx"
    onnx.save(tiny_cnn(opset), src)
    rng = np.random.default_rng(1)
    calib = rng.normal(size=(64, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "calib.npy", calib)
    # Random weights give near-tied classes: the agreement gate is set to what int8 of such a
    # model keeps; this test is about the quantized graph being valid, the gate about accuracy.
    code, stdout, stderr = cli("optimize", src, "-o", out, "--quantize", "static", "--per-channel", "--min-agreement", "0.8",
                               "--calibration", tmp_path / "calib.npy", "--runs", "3", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert any(f"used ONNX opset {opset}: converted to opset 13" in w and "outputs unchanged on 64 samples" in w
               for w in report["warnings"])
    quantized = onnx.load(out)
    assert next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert any(n.op_type == "DequantizeLinear" for n in quantized.graph.node)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # was INVALID_GRAPH
    original = ort.InferenceSession(src.read_bytes(), providers=["CPUExecutionProvider"])
    got, want = sess.run(None, {"input": calib})[0], original.run(None, {"input": calib})[0]
    # Still one softmax over all 10 values (per-group softmax would sum to 2); int8 steps are 1/255.
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=10 / 255)
    assert float(np.mean(got.argmax(1) == want.argmax(1))) >= 0.8


@pytest.mark.parametrize("opset", [11, 12])
def test_conversion_keeps_outputs_exactly(opset):
    from edgepack.importers.opset import prove_upgrade, upgrade_opset

    model = tiny_cnn(opset)
    upgrade = upgrade_opset(model, "m.onnx")
    assert upgrade.from_opset == opset and upgrade.to_opset == 13
    assert {n.op_type for n in upgrade.model.graph.node} >= {"Unsqueeze", "Squeeze", "Softmax"}
    assert not any(a.name == "axes" for n in upgrade.model.graph.node if n.op_type in ("Squeeze", "Unsqueeze") for a in n.attribute)
    x = np.random.default_rng(2).normal(size=(10, 1, 8, 8)).astype(np.float32)
    proven = prove_upgrade(upgrade, model, [{"input": x[:5]}, {"input": x[5:]}], "m.onnx", "test data")
    assert proven.samples == 10 and proven.max_abs_error <= 1e-6
    assert proven.lineage()["proof"]["samples"] == 10


def test_a_conversion_that_changes_outputs_is_refused(tmp_path):
    from edgepack.errors import ModelError
    from edgepack.importers.opset import prove_upgrade, upgrade_opset

    def wrong(model, target):
        from onnx import version_converter

        converted = version_converter.convert_version(model, target)
        for init in converted.graph.initializer:
            if init.name == "GB":
                bias = nh.to_array(init).copy()
                bias[0] += 2.0  # one class moves (a shift of all would leave the softmax unchanged)
                init.CopyFrom(nh.from_array(bias, "GB"))
        return converted

    model = tiny_cnn(11)
    upgrade = upgrade_opset(model, "m.onnx", convert=wrong)
    x = np.random.default_rng(3).normal(size=(4, 1, 8, 8)).astype(np.float32)
    with pytest.raises(ModelError, match=r"output 'probs' changed by up to .* on the test data .*re-export"):
        prove_upgrade(upgrade, model, [{"input": x}], "m.onnx", "test data")


def test_a_converter_failure_is_one_clear_sentence():
    from edgepack.errors import ModelError
    from edgepack.importers.opset import upgrade_opset

    def broken(model, target):
        raise RuntimeError("adapter_lookup: No Adapter From Version $11 for Foo")

    with pytest.raises(ModelError, match=r"uses ONNX opset 11; .*could not convert it \(adapter_lookup.*re-export"):
        upgrade_opset(tiny_cnn(11), "m.onnx", convert=broken)


@pytest.mark.parametrize("opset", [11, 12])
def test_old_opset_model_builds_per_channel_int8_and_records_the_conversion(opset, tmp_path):
    project = make_project(tmp_path / "p")
    onnx.save(digits_at(opset), project.parent / "model.onnx")
    code, out, err = run("build", project)
    assert code == 0, (out, err)
    bundle = project.parent / "dist" / "digits-1.0.0.epk"
    code, out, err = run("verify", bundle, "--key", project.parent / "keys" / "digits.pub")
    assert code == 0, (out, err)
    manifest = manifest_of(bundle)
    conversion = manifest["lineage"]["source_model"]["opset_conversion"]
    cal, val = (len(np.load(project.parent / f)["raw"]) for f in ("calib.npz", "val.npz"))
    assert conversion["from_opset"] == opset and conversion["to_opset"] == 13
    assert conversion["proof"]["samples"] == cal + val and conversion["proof"]["max_abs_error"] <= 1e-5
    variants = {v["id"]: v for v in manifest["variants"]}
    assert set(variants) == {"onnx-fp32", "onnx-int8"} and "per-channel" in variants["onnx-int8"]["quantization"]


def test_build_refuses_a_conversion_that_changes_outputs(tmp_path, monkeypatch):
    from edgepack.importers import opset as opset_mod

    real = opset_mod._convert

    def wrong(model, target):
        converted = real(model, target)
        first = converted.graph.initializer[0]
        first.CopyFrom(nh.from_array(nh.to_array(first) * 2, first.name))
        return converted

    monkeypatch.setattr(opset_mod, "_convert", wrong)
    project = make_project(tmp_path / "p")
    onnx.save(digits_at(11), project.parent / "model.onnx")
    code, out, err = run("build", project)
    assert code == 2, (out, err)
    assert "uses ONNX opset 11" in err and "changed by up to" in err and "calibration data" in err
    assert not (project.parent / "dist").exists() or not list((project.parent / "dist").glob("*.epk"))
