"""`edgepack optimize` on the MobileNetV2-shaped heavy example, through the real CLI.

Behaviour only (sizes, structure, numerics); speed is measured by
``benchmarks/bench_quantize.py``, never asserted here. The model has RANDOM
weights (``examples/heavy/make_mobilenetv2.py``), so it says nothing about
accuracy: its logits are near-ties and top-1 agreement of any lossy variant is
low by nature, which is why the gate below is deliberately loose.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from edgepack.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
MNV2_SCRIPT = ROOT / "examples" / "heavy" / "make_mobilenetv2.py"
# Conv + Gemm layers of MobileNetV2: stem 1, block0 2, 16 blocks x 3, head 1, classifier 1.
WEIGHT_LAYERS = 53
# Few samples keep the file well under a minute; structure does not need more.
CALIB_SAMPLES = 8
# Random-weight MobileNet logits are near-ties, so int8 flips many top-1 classes
# (typically 50-70% agreement on the val images) although cosine stays ~0.96;
# a real gate would be meaningless here. 0.3 still catches a broken model
# (1000 classes: a garbage output agrees ~0.1% of the time).
LOOSE_AGREEMENT = "0.3"

pytestmark = pytest.mark.slow


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_mobilenetv2", MNV2_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def heavy(tmp_path_factory) -> dict[str, Path]:
    """The seeded MobileNetV2-shaped model plus calibration data, written once per module."""
    gen = _load_generator()
    work = tmp_path_factory.mktemp("heavy")
    model, calib = work / "mobilenetv2.onnx", work / "calib.npz"
    gen.main(["-o", str(model), "--calib", str(calib), "--calib-samples", str(CALIB_SAMPLES)])
    return {"model": model, "calib": calib}


def _optimize(heavy: dict[str, Path], out: Path, *extra: str) -> dict:
    """Run ``edgepack optimize ... --json`` in-process and return the parsed report."""
    result = CliRunner().invoke(
        app,
        ["optimize", str(heavy["model"]), "-o", str(out), "--calibration", str(heavy["calib"]),
         "--min-agreement", LOOSE_AGREEMENT, "--runs", "3", "--json", *extra],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def static_per_channel(heavy, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("static") / "mnv2-int8.onnx"
    return out, _optimize(heavy, out, "--quantize", "static", "--per-channel")


@pytest.fixture(scope="module")
def unquantized(heavy, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("none") / "mnv2-opt.onnx"
    return out, _optimize(heavy, out, "--quantize", "none")


# --------------------------------------------------------------------------- static int8, per-channel


def test_static_per_channel_is_at_least_3_5x_smaller(heavy, static_per_channel):
    out, report = static_per_channel
    original_size = heavy["model"].stat().st_size
    written_size = out.stat().st_size
    assert original_size / written_size >= 3.5, (original_size, written_size)

    (cand,) = report["candidates"]
    assert cand["mode"] == "static" and cand["status"] == "chosen"
    assert report["output"] == str(out)
    assert report["original"]["size_bytes"] == original_size
    assert cand["size_bytes"] == written_size
    assert cand["size_ratio"] >= 3.5
    assert cand["size_ratio"] == pytest.approx(original_size / written_size)


def test_static_per_channel_quantizes_every_weight(static_per_channel):
    _, report = static_per_channel
    (cand,) = report["candidates"]
    assert cand["weights_quantized"] == cand["weights_total"] == WEIGHT_LAYERS
    assert cand["weights_left_float"] == []
    # (Latency warnings may appear on a noisy host; only the audit's own warning matters here.)
    assert not [w for w in report["warnings"] if "stayed float" in w]


def test_static_per_channel_output_is_a_runnable_qdq_graph(heavy, static_per_channel):
    out, report = static_per_channel
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops)
    # Per-channel: weight scales are vectors (one per output channel), not scalars.
    inits = {t.name: t for t in model.graph.initializer}
    weight_dq = [n for n in model.graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert weight_dq and all(len(inits[n.input[1]].dims) == 1 for n in weight_dq)

    sess = _session(out)
    with np.load(heavy["calib"]) as data:
        x = data["input"][:1]
    (logits,) = sess.run(None, {"input": x})
    assert logits.shape == (1, 1000) and np.isfinite(logits).all()
    numerics = report["candidates"][0]["numerics"]
    assert numerics["finite"] and numerics["cosine"] > 0.9


# --------------------------------------------------------------------------- --quantize none: portable graph


def test_none_keeps_the_graph_portable(heavy, unquantized):
    out, report = unquantized
    original, optimized = onnx.load(str(heavy["model"])), onnx.load(str(out))
    onnx.checker.check_model(optimized)
    assert {n.domain for n in optimized.graph.node} <= {"", "ai.onnx"}
    assert [(o.domain, o.version) for o in optimized.opset_import] == [
        (o.domain, o.version) for o in original.opset_import]
    assert optimized.ir_version == original.ir_version

    def io(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
        inits = {t.name for t in model.graph.initializer}
        return [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]

    assert io(optimized) == io(original) == (["input"], ["logits"])


def test_none_fuses_batchnorm_away(heavy, unquantized):
    out, report = unquantized
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == WEIGHT_LAYERS - 1
    assert report["graph"]["applied"] is True
    assert report["graph"]["ops_removed"].get("BatchNormalization") == 52
    (cand,) = report["candidates"]
    assert cand["mode"] == "none" and cand["status"] == "chosen"


def test_none_matches_the_original_outputs(heavy, unquantized):
    out, report = unquantized
    original, optimized = _session(heavy["model"]), _session(out)
    with np.load(heavy["calib"]) as data:
        images = data["input"][:4]
    for x in images:
        feed = {"input": x[None]}
        np.testing.assert_allclose(optimized.run(None, feed)[0], original.run(None, feed)[0], rtol=0, atol=1e-4)
    assert report["candidates"][0]["numerics"]["max_abs_error"] <= 1e-4
