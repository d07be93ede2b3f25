"""TFLite target: ONNX → TFLite through onnx2tf, validated against ONNX, shipped as bundle variants.

Conversion tests need the ``edgepack[tflite]`` extra (tensorflow, onnx2tf, tf_keras …)
and skip, saying so, only when it is absent. The LiteRT-only device test also needs
``ai-edge-litert`` (part of the extra).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from edgepack.convert.tflite import tflite_available

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
PHOTOS = ROOT / "examples" / "photos"
MNV2_SCRIPT = ROOT / "examples" / "heavy" / "make_mobilenetv2.py"
TFLITE_VARIANTS = ["tflite-fp32", "tflite-fp16", "tflite-int8"]

needs_tflite = pytest.mark.skipif(
    not tflite_available(),
    reason="the edgepack[tflite] extra (tensorflow, onnx2tf, tf_keras) is not installed: pip install 'edgepack[tflite]'",
)
needs_litert = pytest.mark.skipif(
    importlib.util.find_spec("ai_edge_litert") is None,
    reason="ai-edge-litert (part of the edgepack[tflite] extra) is not installed",
)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def network_blocked(attempts: list):
    """Every way Python reaches the network raises (and is recorded) inside the block."""

    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise OSError("network is unreachable (blocked by test_tflite)")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        mp.setattr(urllib.request, "urlopen", refuse)
        if importlib.util.find_spec("requests") is not None:
            import requests

            mp.setattr(requests, "get", refuse)
            mp.setattr(requests.Session, "request", refuse)
        yield


def embedded(example: Path) -> onnx.ModelProto:
    """The example's model with its declared preprocessing/post-processing embedded (raw input)."""
    from edgepack.preprocess import Postprocess, embed_preprocessing, preprocess_from_dict

    config = yaml.safe_load((example / "edgepack.yaml").read_text())
    kind = "image" if "image" in config["input"] else "tabular"
    pre = preprocess_from_dict({"kind": kind, **config["input"][kind]})
    out = dict(config.get("output") or {})
    if out.get("labels"):
        out["labels"] = [str(x) for x in out["labels"]]
    return embed_preprocessing(onnx.load(example / config["model"]["path"]), pre, Postprocess(**out),
                               config["input"].get("name", "raw"))


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


def make_project(directory: Path, example: Path, variants: list[str]) -> Path:
    from edgepack.bundle.keys import generate_keypair

    directory.mkdir(parents=True, exist_ok=True)
    for item in example.iterdir():
        if item.is_file() and item.suffix in (".onnx", ".npz", ".yaml", ".txt"):
            shutil.copy(item, directory / item.name)
    config = yaml.safe_load((directory / "edgepack.yaml").read_text())
    config["targets"] = [{"device": config["targets"][0]["device"], "variants": variants}]
    (directory / "edgepack.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    keys = directory / Path(config["signing"]["key"]).parent
    keys.mkdir(parents=True, exist_ok=True)
    generate_keypair(keys, Path(config["signing"]["key"]).stem)
    return directory / "edgepack.yaml"


def convert_app():
    """The ``edgepack`` app with the convert command (registered here in case app.py does not yet)."""
    import typer

    from edgepack.cli import app as app_module
    from edgepack.cli import convert_cmd

    if any(c.name == "convert" for c in app_module.app.registered_commands):
        return app_module.app
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """edgepack (test harness)."""

    convert_cmd.register(app)
    return app


def run_cli(*args):
    from typer.testing import CliRunner

    result = CliRunner().invoke(convert_app(), [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


# --------------------------------------------------------------------------- without the extra


def test_missing_extra_names_the_extra(monkeypatch):
    from edgepack.convert import tflite
    from edgepack.errors import MissingExtraError

    real = importlib.util.find_spec
    monkeypatch.setattr(tflite.importlib.util, "find_spec", lambda name, *a: None if name == "onnx2tf" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"edgepack\[tflite\]"):
        tflite.require_tflite()
    assert not tflite.tflite_available()


def test_project_accepts_tflite_variants_and_manifest_names_them():
    from edgepack.build.manifest import PRECISIONS, variant_engine, variant_file, variant_id
    from edgepack.project import VARIANTS, validate_project

    assert set(TFLITE_VARIANTS) <= set(VARIANTS)
    assert variant_id("tflite-int8") == "tflite-int8" and variant_file("tflite-int8") == "models/tflite-int8.tflite"
    assert variant_engine("tflite-fp16") == "litert" and variant_engine("int8") == "onnxruntime"
    assert PRECISIONS["tflite-int8"] == "int8"
    config = yaml.safe_load((DIGITS / "edgepack.yaml").read_text())
    config["targets"][0]["variants"] = ["fp32", "tflite-int8"]
    assert validate_project(config) == []
    config["targets"][0]["variants"] = ["tflite-int9"]
    assert any("did you mean 'tflite-int8'" in p for p in validate_project(config))


# --------------------------------------------------------------------------- conversion


@pytest.fixture(scope="module")
def digits_converted():
    from edgepack.convert import convert_onnx_to_tflite

    model = embedded(DIGITS)
    attempts: list = []
    with network_blocked(attempts):
        result = convert_onnx_to_tflite(model, ("fp32", "fp16", "int8"), {"raw": npz(DIGITS / "calib.npz")["raw"]})
    assert attempts == []
    return model, result


@needs_tflite
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_digits_tflite_agrees_with_onnx(digits_converted, precision):
    from edgepack.convert import validate_tflite
    from edgepack.convert.tflite import LiteRTSession

    model, result = digits_converted
    val = npz(DIGITS / "val.npz")
    report = validate_tflite(model, result.models[precision], {"raw": val["raw"]}, val["labels"], precision)
    assert report.passed and report.samples == len(val["raw"])
    scores = report.outputs[0]
    assert scores.name == "scores"
    assert scores.max_abs_error <= {"fp32": 1e-5, "fp16": 5e-3, "int8": 0.1}[precision]
    assert report.agreement >= {"fp32": 1.0, "fp16": 0.99, "int8": 0.98}[precision]
    assert report.accuracy >= report.reference_accuracy - 0.01
    # Same raw input and output names as the ONNX model: the device feeds NHWC uint8 pixels.
    sess = LiteRTSession(result.models[precision])
    assert [i.name for i in sess.get_inputs()] == ["raw"] and sess.get_inputs()[0].type == "uint8"
    assert sess.get_inputs()[0].shape == [1, 8, 8, 1]
    assert [o.name for o in sess.get_outputs()] == ["scores"]


@needs_tflite
def test_int8_is_full_integer(digits_converted):
    from tensorflow.lite.tools import flatbuffer_utils as fu

    _, result = digits_converted
    model = fu.convert_bytearray_to_object(bytearray(result.models["int8"]))
    sub = model.subgraphs[0]
    float_weights = [t for t in sub.tensors if t.type == 0 and model.buffers[t.buffer].data is not None
                     and len(model.buffers[t.buffer].data) > 64]
    assert float_weights == []  # every weight is integer
    assert sum(1 for t in sub.tensors if t.type == 9) > 0  # int8 tensors


@pytest.fixture(scope="module")
def photos_converted():
    """Photos (3-channel image input: the case where onnx2tf would download a sample file), network blocked."""
    import onnx2tf.onnx2tf as o2t

    from edgepack.convert import convert_onnx_to_tflite
    from edgepack.convert.tflite import ONNX2TF_SAMPLE_FILE

    calls: list[bool] = []
    original = o2t.download_test_image_data

    def spy():
        calls.append(Path(os.getcwd(), ONNX2TF_SAMPLE_FILE).is_file())
        return original()

    attempts: list = []
    model = embedded(PHOTOS)
    with network_blocked(attempts), pytest.MonkeyPatch.context() as mp:
        mp.setattr(o2t, "download_test_image_data", spy)
        result = convert_onnx_to_tflite(model, ("fp32", "fp16", "int8"), {"image": npz(PHOTOS / "calib.npz")["raw"]})
    return model, result, calls, attempts


@needs_tflite
def test_conversion_works_with_the_network_unreachable(photos_converted):
    _, result, calls, attempts = photos_converted
    assert attempts == []  # nothing even tried to reach the network
    assert calls and all(calls)  # onnx2tf asked for its sample file and found ours, derived from calib.npz
    assert set(result.models) == {"fp32", "fp16", "int8"}


@needs_tflite
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_photos_tflite_agrees_with_onnx_per_output(photos_converted, precision):
    from edgepack.convert import validate_tflite

    model, result, _, _ = photos_converted
    val = npz(PHOTOS / "val.npz")
    report = validate_tflite(model, result.models[precision], {"image": val["raw"]}, val["labels"], precision)
    assert [o.name for o in report.outputs] == ["scores", "top_k_indices", "top_k_scores"]
    assert report.passed and report.agreement >= 0.98
    assert set(report.to_dict()["outputs"]) == {"scores", "top_k_indices", "top_k_scores"}


def _photo_frames(height: int, width: int, count: int = 6) -> np.ndarray:
    """Real-content raw frames of another size: windows of a mosaic of validation frames."""
    raw = npz(PHOTOS / "val.npz")["raw"]
    rows = [np.concatenate(list(raw[r * 6:(r + 1) * 6]), axis=1) for r in range(6)]
    mosaic = np.concatenate(rows, axis=0)  # 234 x 312
    step_y, step_x = (mosaic.shape[0] - height) // count, (mosaic.shape[1] - width) // count
    return np.stack([mosaic[i * step_y:i * step_y + height, i * step_x:i * step_x + width] for i in range(count)])


@needs_tflite
@needs_litert
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_photos_tflite_accepts_other_raw_sizes_like_onnx(photos_converted, precision, tmp_path):
    """resize_shorter/center_crop run as TF ops: the TFLite raw schema is the ONNX one (any size in range)."""
    from edgepack_runtime.engines import load_session

    from edgepack.convert import validate_tflite
    from edgepack.convert.tflite import LiteRTSession
    from edgepack.optimize.evaluate import session

    model, result, _, _ = photos_converted
    (signature,) = [list(i.shape) for i in LiteRTSession(result.models[precision]).get_inputs()]
    assert signature == [1, None, None, 3]
    path = tmp_path / "model.tflite"
    path.write_bytes(result.models[precision])
    device = load_session("litert", path)
    onnx_session = session(model.SerializeToString(), 1)
    for height, width in ((48, 64), (120, 90), (33, 200)):
        frames = _photo_frames(height, width)
        report = validate_tflite(model, result.models[precision], {"image": frames}, None, precision)
        assert report.passed and report.agreement == 1.0, (height, width, report.to_dict())
        (scores, *_) = device.run({"image": frames})
        (expected, *_) = onnx_session.run(None, {"image": frames})
        assert scores.shape == (len(frames), 6) and (scores.argmax(1) == expected.argmax(1)).all()


def _tiny_model_with_bad_names() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "conv@w:0")
    w2 = numpy_helper.from_array(rng.normal(size=(4 * 6 * 6, 5)).astype(np.float32), "fc:w@1")
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "flat:shape")
    nodes = [
        helper.make_node("Conv", ["input:0", "conv@w:0"], ["conv:out@0"], name="conv@1:0", pads=[0, 0, 0, 0]),
        helper.make_node("Relu", ["conv:out@0"], ["relu:0"], name="relu@2"),
        helper.make_node("Reshape", ["relu:0", "flat:shape"], ["flat@0"], name="reshape:3"),
        helper.make_node("MatMul", ["flat@0", "fc:w@1"], ["logits:0"], name="fc@4:x"),
    ]
    graph = helper.make_graph(nodes, "bad names", [helper.make_tensor_value_info("input:0", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits:0", TensorProto.FLOAT, [1, 5])], [w1, w2, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@needs_tflite
def test_names_tensorflow_rejects_are_sanitized_not_fatal():
    from edgepack.convert import convert_onnx_to_tflite, sanitize_names, validate_tflite
    from edgepack.convert.tflite import LiteRTSession

    model = _tiny_model_with_bad_names()
    onnx.checker.check_model(model)
    clean, renamed = sanitize_names(model)
    assert renamed["conv@w:0"] == "conv_w_0" and all("@" not in n.name and ":" not in n.name for n in clean.graph.node)
    x = np.random.default_rng(1).normal(size=(16, 3, 8, 8)).astype(np.float32)
    result = convert_onnx_to_tflite(model, ("fp32",), {"input:0": x})
    assert any("renamed" in n for n in result.notes)
    sess = LiteRTSession(result.models["fp32"])
    assert [i.name for i in sess.get_inputs()] == ["input:0"] and [o.name for o in sess.get_outputs()] == ["logits:0"]
    report = validate_tflite(model, result.models["fp32"], {"input:0": x}, precision="fp32")
    assert report.passed and report.max_abs_error < 1e-4


def _corrupt_weights(tflite_bytes: bytes) -> bytes:
    from tensorflow.lite.tools import flatbuffer_utils as fu

    model = fu.convert_bytearray_to_object(bytearray(tflite_bytes))
    sub = model.subgraphs[0]
    floats = [t for t in sub.tensors if t.type == 0 and model.buffers[t.buffer].data is not None
              and len(model.buffers[t.buffer].data) >= 4096]
    target = max(floats, key=lambda t: len(model.buffers[t.buffer].data))
    data = np.frombuffer(bytes(model.buffers[target.buffer].data), np.float32).copy()
    data[::3] *= -4.0  # a damaged weight tensor: the file still loads and runs
    model.buffers[target.buffer].data = np.frombuffer(data.tobytes(), np.uint8)
    return bytes(fu.convert_object_to_bytearray(model))


@needs_tflite
def test_corrupted_tflite_is_caught_naming_the_output(digits_converted):
    from edgepack.convert import validate_tflite
    from edgepack.errors import GateError

    model, result = digits_converted
    val = npz(DIGITS / "val.npz")
    bad = _corrupt_weights(result.models["fp32"])
    with pytest.raises(GateError, match=r"first diverging output 'scores'") as info:
        validate_tflite(model, bad, {"raw": val["raw"]}, val["labels"], "fp32")
    assert "Refusing" in str(info.value)
    assert not info.value.report.passed  # type: ignore[attr-defined]


def _mistranslate_relu(monkeypatch) -> None:
    """Make onnx2tf translate Relu as Abs (a plausible converter bug)."""
    import onnx2tf.ops.Relu as relu_op
    import tensorflow as tf

    class _NN:
        def __getattr__(self, name):
            return getattr(tf.nn, name)

        @staticmethod
        def relu(features, name=None):
            return tf.abs(features, name=name)

    class _TF:
        nn = _NN()

        def __getattr__(self, name):
            return getattr(tf, name)

    monkeypatch.setattr(relu_op, "tf", _TF())


@needs_tflite
def test_mistranslated_op_is_caught_by_validation(monkeypatch):
    from edgepack.convert import convert_onnx_to_tflite, validate_tflite
    from edgepack.errors import GateError

    _mistranslate_relu(monkeypatch)
    model = embedded(DIGITS)
    result = convert_onnx_to_tflite(model, ("fp32",), {"raw": npz(DIGITS / "calib.npz")["raw"]})
    val = npz(DIGITS / "val.npz")
    with pytest.raises(GateError, match=r"TFLite fp32 model diverges .* first diverging output 'scores'"):
        validate_tflite(model, result.models["fp32"], {"raw": val["raw"]}, val["labels"], "fp32")


@needs_tflite
def test_cli_convert_writes_validated_model_and_refuses_int8_without_calibration(tmp_path):
    model_path = tmp_path / "digits-embedded.onnx"
    onnx.save(embedded(DIGITS), model_path)
    out = tmp_path / "digits-int8.tflite"
    code, stdout, stderr = run_cli("convert", model_path, "--to", "tflite", "--quantize", "int8",
                                   "--calibration", DIGITS / "calib.npz", "--validation", DIGITS / "val.npz",
                                   "-o", out, "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert out.is_file() and doc["size_bytes"] == out.stat().st_size
    assert doc["validation"]["passed"] and doc["validation"]["outputs"]["scores"]["agreement"] >= 0.98
    code, _, stderr = run_cli("convert", model_path, "--to", "tflite", "--quantize", "int8", "--validation", DIGITS / "val.npz")
    assert code == 2 and "--calibration" in stderr


@needs_tflite
def test_keras_model_and_savedmodel_convert_directly_through_tensorflow(tmp_path):
    import keras

    inp = keras.Input((8, 8, 1), name="pixels")
    x = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="probs")(x))
    weights, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([weights * 30, bias])  # decisive classes: top-1 is not a coin toss
    model.save(tmp_path / "tiny.keras")
    model.export(str(tmp_path / "saved"), verbose=False)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", pixels=rng.random((32, 8, 8, 1)).astype(np.float32))
    np.savez(tmp_path / "val.npz", pixels=rng.random((32, 8, 8, 1)).astype(np.float32))
    for source, precision in ((tmp_path / "tiny.keras", "int8"), (tmp_path / "saved", "fp16")):
        out = tmp_path / f"{source.stem}-{precision}.tflite"
        code, stdout, stderr = run_cli("convert", source, "--quantize", precision, "--calibration", tmp_path / "calib.npz",
                                       "--validation", tmp_path / "val.npz", "-o", out, "--json")
        assert code == 0, stderr
        doc = json.loads(stdout)
        assert out.is_file() and doc["validation"]["passed"] and doc["validation"]["samples"] == 32


@needs_tflite
@pytest.mark.slow
def test_int8_is_at_least_3_5x_smaller_on_mobilenetv2(tmp_path):
    from edgepack.convert import convert_onnx_to_tflite, validate_tflite

    onnx_path = tmp_path / "mnv2.onnx"
    subprocess.run([sys.executable, MNV2_SCRIPT, "-o", onnx_path, "--resolution", "96", "--calib", tmp_path / "calib.npz",
                    "--calib-samples", "8", "--val", tmp_path / "val.npz", "--val-samples", "4"], check=True, capture_output=True)
    model = onnx.load(onnx_path)
    result = convert_onnx_to_tflite(model, ("fp32", "int8"), {"input": npz(tmp_path / "calib.npz")["input"]})
    fp32, int8 = len(result.models["fp32"]), len(result.models["int8"])
    assert fp32 / int8 >= 3.5, (fp32, int8)
    # The float conversion of the NCHW model is exact; its input keeps the ONNX NCHW shape.
    report = validate_tflite(model, result.models["fp32"], {"input": npz(tmp_path / "val.npz")["input"]}, precision="fp32")
    assert report.passed


# --------------------------------------------------------------------------- bundles and devices


@pytest.fixture(scope="module")
def digits_bundle(tmp_path_factory):
    from edgepack.build.pipeline import build

    project = make_project(tmp_path_factory.mktemp("digits-tflite"), DIGITS, ["fp32", "int8", "fp16", *TFLITE_VARIANTS])
    attempts: list = []
    with network_blocked(attempts):
        result = build(project, source_date_epoch=0)
    assert attempts == []
    return project.parent, result


@needs_tflite
@pytest.mark.slow
def test_digits_bundle_carries_onnx_and_tflite_variants_and_verifies(digits_bundle):
    from typer.testing import CliRunner

    from edgepack.cli.app import app

    directory, result = digits_bundle
    variants = {v["id"]: v for v in result.manifest["variants"]}
    assert set(variants) == {"onnx-fp32", "onnx-int8", "onnx-fp16", *TFLITE_VARIANTS}
    for vid in TFLITE_VARIANTS:
        assert variants[vid]["engine"] == "litert" and variants[vid]["file"] == f"models/{vid}.tflite"
        assert variants[vid]["precision"] == vid.split("-")[1]
        check = result.report["variants"][vid]["tflite_validation"]
        assert check["passed"] and check["outputs"]["scores"]["agreement"] >= 0.98
    # One raw input schema for every variant.
    assert [i["name"] for i in result.manifest["io"]["inputs"]] == ["raw"]
    assert result.manifest["io"]["inputs"][0]["layout"] == "NHWC"
    assert set(result.manifest["golden"]["tolerances"]) == set(variants)
    outcome = CliRunner().invoke(app, ["verify", str(result.bundle), "--key", str(directory / "keys" / "digits.pub"), "--json"])
    assert outcome.exit_code == 0, outcome.stdout
    golden = json.loads(outcome.stdout)["golden"]
    assert all(golden[vid] == "ok" for vid in variants), golden


@needs_tflite
def test_build_refuses_a_mistranslated_tflite_variant_naming_the_output(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from edgepack.cli.app import app

    _mistranslate_relu(monkeypatch)
    project = make_project(tmp_path / "p", DIGITS, ["fp32", "tflite-fp32"])
    outcome = CliRunner().invoke(app, ["build", str(project)])
    assert outcome.exit_code == 1
    assert "tflite-fp32" in outcome.stderr and "first diverging output 'scores'" in outcome.stderr
    assert not (project.parent / "dist" / "digits-1.0.0.epk").exists()


@needs_tflite
@needs_litert
def test_runtime_litert_engine_runs_every_row_and_refuses_other_sizes(digits_bundle, tmp_path):
    from edgepack_runtime.bundle import load_public_key
    from edgepack_runtime.engines import EngineError, load_session

    from edgepack.bundle import extract_bundle

    directory, result = digits_bundle
    root = tmp_path / "b"
    extract_bundle(result.bundle, root, load_public_key(directory / "keys" / "digits.pub"))
    sess = load_session("litert", root / "models" / "tflite-fp32.tflite", threads=2)
    val = npz(DIGITS / "val.npz")
    (scores,) = sess.run({"raw": val["raw"][:20]})
    assert scores.shape == (20, 10) and (scores.argmax(1) == val["labels"][:20]).mean() >= 0.95
    with pytest.raises(EngineError, match="takes 'raw' shaped"):
        sess.run({"raw": np.zeros((1, 9, 9, 1), np.uint8)})


def _site_packages(python: Path) -> Path:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _link_distribution(name: str, module: str, target: Path) -> None:
    import importlib.metadata as md

    dist = md.distribution(name)
    package = Path(importlib.util.find_spec(module).origin).parent
    for path in {package, Path(str(dist._path))} | ({package.with_name(module + ".libs")} if package.with_name(module + ".libs").exists() else set()):
        (target / path.name).symlink_to(path)


def litert_only_python(tmp_path: Path) -> Path:
    """The python of a fresh venv holding only numpy, ai-edge-litert and edgepack-runtime (pip --no-deps)."""
    import venv

    env_dir = tmp_path / "device-env"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = _site_packages(python)
    source = tmp_path / "runtime-src"
    shutil.copytree(ROOT / "runtime", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", site, source], check=True, capture_output=True)
    _link_distribution("numpy", "numpy", site)
    _link_distribution("ai-edge-litert", "ai_edge_litert", site)
    return python


@needs_tflite
@needs_litert
@pytest.mark.slow
def test_device_with_only_numpy_and_litert_serves_the_tflite_variant(digits_bundle, tmp_path):
    """A venv holding only numpy, ai-edge-litert and edgepack-runtime (pip install --no-deps) runs the bundle."""
    directory, result = digits_bundle
    python = litert_only_python(tmp_path)
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        import numpy as np
        from edgepack_runtime.cli import main
        absent = [m for m in ("onnxruntime", "tensorflow", "onnx", "edgepack") if importlib.util.find_spec(m) is not None]
        assert not absent, absent
        sys.argv = ["edgepack-runtime", "install", {str(result.bundle)!r}, "--cache", "cache", "--key", {str(directory / "keys" / "digits.pub")!r}]
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, exc.code
        import edgepack_runtime
        model = edgepack_runtime.open("cache", threads=2)
        val = np.load({str(DIGITS / "val.npz")!r})
        scores = model.predict(val["raw"][:64])["scores"]
        print(json.dumps({{"variant": model.variant["id"], "engine": model.variant["engine"],
                          "accuracy": float((scores.argmax(1) == val["labels"][:64]).mean())}}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    out = subprocess.run([python, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["engine"] == "litert" and doc["variant"] == "tflite-int8"
    assert doc["accuracy"] >= 0.95
