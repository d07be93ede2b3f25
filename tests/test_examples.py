"""Checks for the example models in ``examples/``.

The digits model is committed, so these tests guard it against accidental
regeneration with a worse or leaky split. The MobileNetV2 generator is only a
script, so it is checked by building the model in-process.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
MNV2_SCRIPT = ROOT / "examples" / "heavy" / "make_mobilenetv2.py"


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    """Shape of a graph input/output, symbolic dims as their names."""
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    """CPU session; the bytes path avoids writing large models to disk."""
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_model() -> onnx.ModelProto:
    return onnx.load(DIGITS / "model.onnx")


@pytest.fixture(scope="module")
def val() -> dict[str, np.ndarray]:
    with np.load(DIGITS / "val.npz") as f:
        return dict(f)


@pytest.fixture(scope="module")
def calib() -> dict[str, np.ndarray]:
    with np.load(DIGITS / "calib.npz") as f:
        return dict(f)


def test_digits_model_is_valid_with_expected_io(digits_model):
    onnx.checker.check_model(digits_model, full_check=True)
    assert digits_model.ir_version == 8
    assert {(o.domain, o.version) for o in digits_model.opset_import} == {("", 17)}
    (inp,), (out,) = digits_model.graph.input, digits_model.graph.output
    assert inp.name == "input"
    assert inp.type.tensor_type.elem_type == TensorProto.FLOAT
    assert _dims(inp) == ["N", 1, 8, 8]
    assert out.name == "logits"
    assert out.type.tensor_type.elem_type == TensorProto.FLOAT
    assert _dims(out) == ["N", 10]
    assert {n.op_type for n in digits_model.graph.node} <= {
        "Conv", "Relu", "MaxPool", "Flatten", "Reshape", "Gemm"}


def test_digits_files_are_small():
    total = sum((DIGITS / f).stat().st_size for f in ("model.onnx", "val.npz", "calib.npz"))
    assert total < 1_000_000


def test_digits_data_layout(val, calib):
    n = len(val["labels"])
    assert val["input"].dtype == np.float32 and val["input"].shape == (n, 1, 8, 8)
    assert val["labels"].dtype == np.int64 and set(np.unique(val["labels"])) == set(range(10))
    assert val["raw"].dtype == np.uint8 and val["raw"].shape == (n, 8, 8, 1)
    assert val["indices"].dtype == np.int64 and val["indices"].shape == (n,)
    m = len(calib["indices"])
    assert 150 <= m <= 250
    assert calib["input"].dtype == np.float32 and calib["input"].shape == (m, 1, 8, 8)
    assert calib["raw"].dtype == np.uint8 and calib["raw"].shape == (m, 8, 8, 1)
    assert calib["indices"].dtype == np.int64


@pytest.mark.parametrize("name", ["val", "calib"])
def test_digits_input_is_raw_over_16(name, val, calib):
    data = {"val": val, "calib": calib}[name]
    assert data["raw"].max() <= 16
    expected = data["raw"].astype(np.float32)[..., 0][:, None] / np.float32(16.0)
    np.testing.assert_array_equal(data["input"], expected)


def test_digits_raw_matches_sklearn_at_indices(val, calib):
    # Guards the indices: later preprocessing work will look samples up by them.
    from sklearn.datasets import load_digits

    digits = load_digits()
    for data in (val, calib):
        np.testing.assert_array_equal(data["raw"][..., 0], digits.images[data["indices"]])
    np.testing.assert_array_equal(val["labels"], digits.target[val["indices"]])


def test_digits_val_and_calib_are_disjoint(val, calib):
    assert len(np.unique(val["indices"])) == len(val["indices"])
    assert len(np.unique(calib["indices"])) == len(calib["indices"])
    assert np.intersect1d(val["indices"], calib["indices"]).size == 0


def test_digits_heldout_accuracy(val):
    logits = _session(DIGITS / "model.onnx").run(["logits"], {"input": val["input"]})[0]
    assert logits.shape == (len(val["labels"]), 10)
    accuracy = float((logits.argmax(axis=1) == val["labels"]).mean())
    assert accuracy >= 0.95, accuracy


@pytest.mark.slow
def test_digits_training_is_deterministic(tmp_path):
    # One run takes ~10 s, so comparing two fresh runs is affordable and, unlike
    # comparing against the committed file, does not depend on this machine's
    # BLAS rounding matching the one that produced the commit.
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        subprocess.run([sys.executable, str(DIGITS / "train.py"), "--out-dir", str(out)],
                       check=True, capture_output=True, text=True, timeout=300)
        outputs.append({f: (out / f).read_bytes()
                        for f in ("model.onnx", "val.npz", "calib.npz")})
    assert outputs[0] == outputs[1]
    # The data splits do not depend on floating point, so they must match the commit.
    for f in ("val.npz", "calib.npz"):
        assert outputs[0][f] == (DIGITS / f).read_bytes(), f


# --------------------------------------------------------------------------- mobilenetv2


def _load_mnv2_module() -> ModuleType:
    """Import the generator script by path; ``examples`` is not a package."""
    spec = importlib.util.spec_from_file_location("make_mobilenetv2", MNV2_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mnv2_module() -> ModuleType:
    return _load_mnv2_module()


@pytest.fixture(scope="module")
def mnv2(mnv2_module) -> onnx.ModelProto:
    return mnv2_module.build_mobilenetv2()


def test_mnv2_is_valid_with_expected_io(mnv2):
    onnx.checker.check_model(mnv2)
    assert mnv2.ir_version == 8
    assert {(o.domain, o.version) for o in mnv2.opset_import} == {("", 17)}
    (inp,), (out,) = mnv2.graph.input, mnv2.graph.output
    assert (inp.name, _dims(inp)) == ("input", [1, 3, 224, 224])
    assert (out.name, _dims(out)) == ("logits", [1, 1000])
    assert inp.type.tensor_type.elem_type == TensorProto.FLOAT


def test_mnv2_parameter_count(mnv2):
    n_params = sum(int(np.prod(t.dims)) for t in mnv2.graph.initializer)
    assert 3_300_000 <= n_params <= 3_700_000, n_params


def test_mnv2_has_depthwise_convs_and_batchnorm(mnv2):
    inferred = onnx.shape_inference.infer_shapes(mnv2, strict_mode=True)
    channels = {vi.name: _dims(vi)[1]
                for vi in [*inferred.graph.value_info, *inferred.graph.input]}
    convs = [n for n in mnv2.graph.node if n.op_type == "Conv"]
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs}
    depthwise = [n for n in convs if groups[n.name] > 1 and groups[n.name] == channels[n.input[0]]]
    assert len(depthwise) == 17  # one per inverted residual block
    # Grouped convs that are not depthwise would indicate a wiring mistake.
    assert all(groups[n.name] == 1 for n in convs if n not in depthwise)

    ops = [n.op_type for n in mnv2.graph.node]
    assert ops.count("BatchNormalization") == len(convs) == 52
    assert ops.count("Add") == 10
    assert {"Clip", "GlobalAveragePool", "Flatten", "Gemm"} <= set(ops)
    # BN must stay unfused and non-trivial, otherwise optimizers have nothing to do.
    inits = {t.name: numpy_helper.to_array(t) for t in mnv2.graph.initializer}
    for bn in (n for n in mnv2.graph.node if n.op_type == "BatchNormalization"):
        assert bn.input[0] in {c.output[0] for c in convs}
        scale, bias, mean, var = (inits[i] for i in bn.input[1:])
        assert not np.allclose(scale, 1) and not np.allclose(bias, 0)
        assert not np.allclose(mean, 0) and not np.allclose(var, 1) and (var > 0).all()


def test_mnv2_runs_with_sane_logits(mnv2, mnv2_module):
    sess = _session(mnv2)
    images = mnv2_module.smooth_images(2, 224, seed=0, stream=mnv2_module._STREAM_VAL)
    logits = [sess.run(["logits"], {"input": img[None]})[0] for img in images]
    for out in logits:
        assert out.shape == (1, 1000) and out.dtype == np.float32
        assert np.isfinite(out).all()
        assert np.ptp(out) > 1e-3
    # Different inputs should give different outputs; a collapsed net would not.
    assert not np.allclose(logits[0], logits[1])


def test_mnv2_build_is_deterministic(mnv2, mnv2_module):
    assert mnv2_module.build_mobilenetv2(seed=0).SerializeToString() == mnv2.SerializeToString()


def test_mnv2_cli_writes_model_and_data(tmp_path, mnv2):
    out = tmp_path / "m.onnx"
    subprocess.run([sys.executable, str(MNV2_SCRIPT), "-o", str(out),
                    "--calib", str(tmp_path / "c.npz"), "--calib-samples", "3",
                    "--val", str(tmp_path / "v.npz"), "--val-samples", "2"],
                   check=True, capture_output=True, text=True, timeout=300)
    assert out.read_bytes() == mnv2.SerializeToString()
    with np.load(tmp_path / "c.npz") as c, np.load(tmp_path / "v.npz") as v:
        calib_x, val_x = c["input"], v["input"]
    assert calib_x.shape == (3, 3, 224, 224) and calib_x.dtype == np.float32
    assert val_x.shape == (2, 3, 224, 224) and val_x.dtype == np.float32
    assert np.isfinite(calib_x).all() and np.isfinite(val_x).all()
    assert not np.allclose(calib_x[0], val_x[0])  # separate seeds for calib and val
