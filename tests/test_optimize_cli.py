"""`edgepack optimize` through the real CLI: the gate, quantization audits and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import models


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def labelled_validation(model: onnx.ModelProto, x: np.ndarray, path: Path) -> Path:
    """Validation data whose labels are the float model's own predictions (accuracy 100%)."""
    labels = models.run(model, {"x": x})[0].argmax(axis=1).astype(np.int64)
    np.savez(path, x=x, labels=labels)
    return path


def assert_clean_error(code: int, out: str, err: str, expected_code: int = 2) -> str:
    assert code == expected_code, (code, out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --- the done-when numbers on the digits example -------------------------------------------


def test_digits_static_int8_keeps_accuracy_within_one_point(cli, digits, tmp_path):
    out = tmp_path / "digits-int8.onnx"
    code, stdout, err = cli(
        "optimize", digits / "model.onnx", "-o", out, "--quantize", "static",
        "--calibration", digits / "calib.npz", "--validation", digits / "val.npz",
        "--max-accuracy-drop", "0.01", "--json", "--runs", "5",
    )
    assert code == 0, err
    report = json.loads(stdout)
    cand = report["candidates"][0]
    assert cand["mode"] == "static" and cand["status"] == "chosen"
    numerics = cand["numerics"]
    assert numerics["samples"] == 450
    assert numerics["reference_accuracy"] - numerics["accuracy"] <= 0.01
    assert numerics["reference_accuracy"] >= 0.95
    assert cand["weights_quantized"] == cand["weights_total"] == 4
    # Structure: a QDQ graph; numerics: the file written is the one measured.
    written = onnx.load(str(out))
    ops = {n.op_type for n in written.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    val = np.load(digits / "val.npz")
    logits = models.run(str(out), {"input": val["input"]})[0]
    assert abs((logits.argmax(1) == val["labels"]).mean() - numerics["accuracy"]) < 1e-9
    assert os_size(out) < os_size(digits / "model.onnx") / 3


def os_size(path: Path) -> int:
    return path.stat().st_size


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_every_calibration_method_quantizes_digits(cli, digits, tmp_path, method):
    out = tmp_path / f"{method}.onnx"
    code, stdout, err = cli(
        "optimize", digits / "model.onnx", "-o", out, "--quantize", "static", "--per-channel",
        "--calibration-method", method, "--calibration", digits / "calib.npz",
        "--validation", digits / "val.npz", "--json", "--runs", "3",
    )
    assert code == 0, err
    cand = json.loads(stdout)["candidates"][0]
    assert cand["numerics"]["agreement"] >= 0.97
    assert out.exists()


@pytest.mark.parametrize("mode", ["none", "dynamic", "fp16"])
def test_other_modes_write_runnable_models_that_agree(cli, digits, tmp_path, mode):
    out = tmp_path / f"{mode}.onnx"
    code, stdout, err = cli(
        "optimize", digits / "model.onnx", "-o", out, "--quantize", mode,
        "--validation", digits / "val.npz", "--json", "--runs", "3",
    )
    assert code == 0, err
    cand = json.loads(stdout)["candidates"][0]
    assert cand["numerics"]["agreement"] >= 0.98
    if mode == "none":
        assert cand["numerics"]["close"] is True
    if mode == "fp16":
        weights = [t for t in onnx.load(str(out)).graph.initializer if t.dims and np.prod(t.dims) > 100]
        assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    val = np.load(digits / "val.npz")
    assert models.run(str(out), {"input": val["input"][:4]})[0].shape == (4, 10)


def test_auto_reports_why_each_other_candidate_was_rejected(cli, digits, tmp_path):
    out = tmp_path / "auto.onnx"
    code, stdout, err = cli(
        "optimize", digits / "model.onnx", "-o", out, "--quantize", "auto",
        "--calibration", digits / "calib.npz", "--validation", digits / "val.npz", "--json", "--runs", "5",
    )
    assert code == 0, err
    report = json.loads(stdout)
    modes = {c["mode"]: c for c in report["candidates"]}
    assert set(modes) == {"none", "static", "dynamic", "fp16"}
    chosen = [c for c in report["candidates"] if c["status"] == "chosen"]
    assert len(chosen) == 1 and report["chosen"] == chosen[0]["mode"]
    for cand in report["candidates"]:
        if cand["status"] != "chosen":
            assert cand["status"] in ("rejected", "failed") and cand["reason"]
    assert out.read_bytes() == _bytes_of_mode(report, chosen[0]["mode"], out)


def _bytes_of_mode(report, mode, out):
    # The written file is the chosen candidate: its size is the one reported.
    cand = next(c for c in report["candidates"] if c["mode"] == mode)
    assert out.stat().st_size == cand["size_bytes"]
    return out.read_bytes()


def test_auto_without_calibration_skips_static_and_says_so(cli, digits, tmp_path):
    code, stdout, err = cli(
        "optimize", digits / "model.onnx", "-o", tmp_path / "a.onnx", "--quantize", "auto",
        "--validation", digits / "val.npz", "--json", "--runs", "2",
    )
    assert code == 0, err
    static = next(c for c in json.loads(stdout)["candidates"] if c["mode"] == "static")
    assert static["status"] == "rejected" and "calibration" in static["reason"]


# --- the gate -------------------------------------------------------------------------------


def test_quantization_that_breaks_the_model_is_refused_by_the_gate(cli, tmp_path):
    model = models.outlier_weight_mlp()
    src = save(model, tmp_path / "outlier.onnx")
    np.save(tmp_path / "calib.npy", models.outlier_inputs(64, seed=2))
    val = labelled_validation(model, models.outlier_inputs(200, seed=3), tmp_path / "val.npz")
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(
        "optimize", src, "-o", out, "--quantize", "static", "--calibration", tmp_path / "calib.npy",
        "--validation", val, "--min-agreement", "0.99", "--json", "--runs", "2",
    )
    line = assert_clean_error(code, stdout, err, expected_code=1)
    assert "agreement" in line and "99.00%" in line
    report = json.loads(stdout)
    agreement = report["candidates"][0]["numerics"]["agreement"]
    assert agreement < 0.6, "the outlier model should really be broken by per-tensor int8"
    assert f"{agreement * 100:.2f}%" in line
    assert not out.exists()
    assert not any(p.name.startswith(".out.onnx") for p in tmp_path.iterdir()), "temp file left behind"


def test_auto_falls_back_to_a_mode_that_passes_when_int8_breaks_the_model(cli, tmp_path):
    model = models.outlier_weight_mlp()
    src = save(model, tmp_path / "outlier.onnx")
    np.save(tmp_path / "calib.npy", models.outlier_inputs(64, seed=2))
    # 400 samples: enough for a 99% agreement gate to decide (0 flips in 200 would leave it undecided).
    val = labelled_validation(model, models.outlier_inputs(400, seed=3), tmp_path / "val.npz")
    code, stdout, err = cli(
        "optimize", src, "-o", tmp_path / "out.onnx", "--quantize", "auto", "--calibration", tmp_path / "calib.npy",
        "--validation", val, "--min-agreement", "0.99", "--json", "--runs", "2",
    )
    assert code == 0, err
    report = json.loads(stdout)
    static = next(c for c in report["candidates"] if c["mode"] == "static")
    assert static["status"] == "rejected" and "failed the gate" in static["reason"]
    # This 618-byte model has nothing to gain (fp16 saves 3%): auto keeps the original, unchanged.
    assert report["chosen"] in ("original", "none", "fp16", "dynamic")
    if report["chosen"] == "original":
        assert (tmp_path / "out.onnx").read_bytes() == src.read_bytes()


def test_accuracy_drop_gate_without_labels_is_a_clear_failure(cli, digits, tmp_path):
    np.save(tmp_path / "val.npy", np.load(digits / "val.npz")["input"])
    code, stdout, err = cli(
        "optimize", digits / "model.onnx", "-o", tmp_path / "o.onnx", "--quantize", "dynamic",
        "--validation", tmp_path / "val.npy", "--max-accuracy-drop", "0.01", "--runs", "2",
    )
    line = assert_clean_error(code, stdout, err, expected_code=1)
    assert "no labels" in line
    assert not (tmp_path / "o.onnx").exists()


# --- weights the quantizer cannot see -------------------------------------------------------


def test_weights_in_constant_nodes_are_really_quantized(cli, tmp_path):
    model = models.mlp_with_constant_weights()
    src = save(model, tmp_path / "const.onnx")
    x = np.random.default_rng(5).standard_normal((128, 16)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    out = tmp_path / "q.onnx"
    code, stdout, err = cli(
        "optimize", src, "-o", out, "--quantize", "static", "--calibration", tmp_path / "calib.npy",
        # Random weights give near-tied logits, so int8 flips a few of them by nature; 600 held-out
        # samples let a 95% agreement gate decide at that flip rate (128 leave it undecided).
        "--validation", labelled_validation(model, np.random.default_rng(6).standard_normal((600, 16)).astype(np.float32),
                                            tmp_path / "val.npz"), "--min-agreement", "0.95", "--json", "--runs", "2",
    )
    assert code == 0, err
    cand = json.loads(stdout)["candidates"][0]
    assert cand["weights_total"] == 2 and cand["weights_quantized"] == 2
    q = onnx.load(str(out))
    int8_weights = [t for t in q.graph.initializer if t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) >= 64]
    assert len(int8_weights) == 2, "both weight matrices must be stored as int8"
    assert not any(t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 64 for t in q.graph.initializer)
    assert cand["numerics"]["agreement"] >= 0.95


def test_weights_inside_if_branches_are_not_silently_left_float(cli, tmp_path):
    model = models.mlp_in_if()
    src = save(model, tmp_path / "if.onnx")
    x = np.abs(np.random.default_rng(6).standard_normal((64, 16)).astype(np.float32))
    np.save(tmp_path / "calib.npy", x)
    out = tmp_path / "q.onnx"
    code, stdout, err = cli(
        "optimize", src, "-o", out, "--quantize", "static", "--calibration", tmp_path / "calib.npy", "--runs", "2",
    )
    if code == 0:
        # Quantized: then every branch weight must really be int8 and the model still agree.
        q = onnx.load(str(out))
        float_weights = []
        for node in q.graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    float_weights += [t.name for t in attr.g.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 64]
        assert not float_weights, f"branch weights left float but exit 0: {float_weights}"
    else:
        line = assert_clean_error(code, stdout, err, expected_code=2)
        assert "not quantizable" in line or "left every weight in float" in line
        assert not out.exists()


# --- bad input: one line, exit 2, nothing written -------------------------------------------


def test_missing_model_file(cli, tmp_path):
    line = assert_clean_error(*cli("optimize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx"))
    assert "does not exist" in line
    assert not (tmp_path / "o.onnx").exists()


def test_file_that_is_not_onnx(cli, tmp_path):
    src = tmp_path / "model.onnx"
    src.write_text("this is a CSV file, not a model\n1,2,3\n")
    line = assert_clean_error(*cli("optimize", src, "-o", tmp_path / "o.onnx"))
    assert "not a valid ONNX model" in line or "not an ONNX model" in line


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_truncated_onnx_file(cli, digits, tmp_path, fraction):
    data = (digits / "model.onnx").read_bytes()
    src = tmp_path / "cut.onnx"
    src.write_bytes(data[: int(len(data) * fraction)])
    line = assert_clean_error(*cli("optimize", src, "-o", tmp_path / "o.onnx"))
    assert "ONNX" in line
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("opset", [99, 0])
def test_unsupported_opset(cli, tmp_path, opset):
    src = tmp_path / "m.onnx"
    src.write_bytes(models.identity_with_opset(opset).SerializeToString())
    line = assert_clean_error(*cli("optimize", src, "-o", tmp_path / "o.onnx"))
    assert f"opset {opset}" in line and "unsupported" in line
    assert not (tmp_path / "o.onnx").exists()


def test_old_opset_that_onnxruntime_runs_is_accepted(cli, tmp_path):
    src = save(models.identity_with_opset(5), tmp_path / "m.onnx")
    code, _, err = cli("optimize", src, "-o", tmp_path / "o.onnx", "--runs", "2")
    assert code == 0, err


def test_calibration_data_with_the_wrong_shape(cli, digits, tmp_path):
    np.save(tmp_path / "calib.npy", np.zeros((10, 28, 28), np.float32))
    line = assert_clean_error(*cli(
        "optimize", digits / "model.onnx", "-o", tmp_path / "o.onnx", "--quantize", "static", "--calibration", tmp_path / "calib.npy",
    ))
    assert "(28, 28)" in line and "(1, 8, 8)" in line


def test_calibration_data_with_the_wrong_dtype(cli, digits, tmp_path):
    np.save(tmp_path / "calib.npy", np.full((10, 1, 8, 8), "a"))
    line = assert_clean_error(*cli(
        "optimize", digits / "model.onnx", "-o", tmp_path / "o.onnx", "--quantize", "static", "--calibration", tmp_path / "calib.npy",
    ))
    assert "dtype" in line and "float32" in line


def test_empty_calibration_set(cli, digits, tmp_path):
    np.save(tmp_path / "calib.npy", np.zeros((0, 1, 8, 8), np.float32))
    line = assert_clean_error(*cli(
        "optimize", digits / "model.onnx", "-o", tmp_path / "o.onnx", "--quantize", "static", "--calibration", tmp_path / "calib.npy",
    ))
    assert "empty" in line


def test_empty_image_folder_as_calibration(cli, digits, tmp_path):
    (tmp_path / "imgs").mkdir()
    line = assert_clean_error(*cli(
        "optimize", digits / "model.onnx", "-o", tmp_path / "o.onnx", "--quantize", "static", "--calibration", tmp_path / "imgs",
    ))
    assert "no images" in line


def test_static_without_calibration_is_refused_before_any_work(cli, digits, tmp_path):
    line = assert_clean_error(*cli("optimize", digits / "model.onnx", "-o", tmp_path / "o.onnx", "--quantize", "static"))
    assert "--calibration" in line


@pytest.mark.parametrize("target", ["missing-dir/o.onnx", "is-a-dir", "file-parent/o.onnx"])
def test_unwritable_output(cli, digits, tmp_path, target):
    (tmp_path / "is-a-dir").mkdir()
    (tmp_path / "file-parent").write_text("x")
    line = assert_clean_error(*cli("optimize", digits / "model.onnx", "-o", tmp_path / target))
    assert "Output" in line or "output" in line


def test_gate_threshold_given_as_a_percentage_is_refused(cli, digits, tmp_path):
    line = assert_clean_error(*cli(
        "optimize", digits / "model.onnx", "-o", tmp_path / "o.onnx", "--max-accuracy-drop", "5",
        "--validation", digits / "val.npz",
    ))
    assert "fraction" in line


def test_labels_that_do_not_match_the_samples(cli, digits, tmp_path):
    val = np.load(digits / "val.npz")
    np.savez(tmp_path / "val.npz", input=val["input"], labels=val["labels"][:10])
    line = assert_clean_error(*cli("optimize", digits / "model.onnx", "-o", tmp_path / "o.onnx", "--validation", tmp_path / "val.npz"))
    assert "labels" in line


def test_calibration_npz_keyed_by_the_wrong_names(cli, tmp_path):
    model = models.mlp()
    src = save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", a=np.zeros((4, 16), np.float32), b=np.zeros((4, 16), np.float32))
    line = assert_clean_error(*cli("optimize", src, "-o", tmp_path / "o.onnx", "--quantize", "static", "--calibration", tmp_path / "c.npz"))
    assert "'x'" in line or "['x']" in line


def test_image_folder_calibration_with_class_subfolders(cli, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (13, 17, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    # A tiny NCHW conv classifier with 2 classes.
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(rng.standard_normal((2, 3, 8, 8)).astype(np.float32) * 0.1, "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Flatten", ["c"], ["logits"], name="flat")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [w],
    )
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "conv.onnx")
    code, stdout, err = cli(
        "optimize", src, "-o", tmp_path / "q.onnx", "--quantize", "static", "--calibration", tmp_path / "imgs",
        "--validation", tmp_path / "imgs", "--min-agreement", "0.5", "--json", "--runs", "2",
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["evaluation"]["labels"] is True
    assert report["candidates"][0]["numerics"]["samples"] == 6


def test_version_and_fast_help(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == "edgepack 0.1.0"
    code, out, _ = cli("optimize", "--help")
    assert code == 0 and "--quantize" in out


def test_validation_data_the_model_rejects_is_a_clear_data_error(cli, tmp_path):
    # Right shape and dtype, but an index input out of range: onnxruntime fails at run time.
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0, name="gather")], "g",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [table],
    )
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "gather.onnx")
    np.save(tmp_path / "val.npy", np.array([0, 1, 99], np.int64))
    line = assert_clean_error(*cli("optimize", src, "-o", tmp_path / "o.onnx", "--validation", tmp_path / "val.npy"))
    assert "does not run through the original model" in line
    assert not (tmp_path / "o.onnx").exists()
