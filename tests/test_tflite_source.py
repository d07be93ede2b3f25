"""``kind: tflite`` (and ``kind: keras``) models build into LiteRT-only bundles.

Regression: ``kind: tflite`` passed project validation and then ``build`` refused it
("packages ONNX models for onnxruntime only"). A float and an already-quantized int8
``.tflite`` (tiny Keras digit classifiers trained here) must build into a bundle whose
variant runs with LiteRT from RAW pixels: the declared preprocessing is compiled to
TFLite and fused in front of the unchanged model, gated against the source model,
golden-tested, verified, and served by a device that has only numpy and LiteRT.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_build import make_project, manifest_of, run
from test_tflite import litert_only_python, needs_litert, needs_tflite

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = "digits-1.0.0.epk"

pytestmark = needs_tflite


@pytest.fixture(scope="module")
def keras_digits(tmp_path_factory):
    """A tiny Keras CNN on scikit-learn's 8x8 digits (NHWC, pixel / 16), as .keras, float and int8 .tflite."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    from sklearn.datasets import load_digits

    out = tmp_path_factory.mktemp("keras-digits")
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    keras = tf.keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.Flatten(),
                              keras.layers.Dense(10), keras.layers.Softmax()])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x[:1200], digits.target[:1200], epochs=20, batch_size=64, verbose=0)
    model.save(out / "model.keras")
    (out / "float.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[i:i + 1]] for i in range(200))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8  # fully integer, int8 I/O
    (out / "int8.tflite").write_bytes(converter.convert())
    return out


def tflite_project(directory: Path, model: Path, variants: list[str], kind: str = "tflite") -> Path:
    """The digits example with ``model`` as a TFLite (or Keras) source: NHWC input, labels only."""
    project = make_project(directory)
    target = directory / model.name
    shutil.copy(model, target)
    config = yaml.safe_load(project.read_text())
    config["model"] = {"kind": kind, "path": model.name}
    config["input"]["image"]["layout"] = "NHWC"
    config["output"] = {"labels": [str(i) for i in range(10)]}
    config["targets"] = [{"device": "rpi4", "variants": variants}, {"device": "x86-gateway", "variants": variants}]
    project.write_text(yaml.safe_dump(config, sort_keys=False))
    return project


def source_outputs(model_bytes: bytes, raw: np.ndarray) -> np.ndarray:
    """The source .tflite run the way its author would: pixel / 16, its own input quantization, dequantized."""
    from edgepack.convert.tflite import LiteRTSession

    sess = LiteRTSession(model_bytes)
    x = raw.astype(np.float32) / 16.0
    detail, out = sess._in[0], sess._out[0]
    if detail["dtype"] != np.float32:
        scale, zero = detail["quantization"]
        x = np.clip(np.round(x / scale) + zero, -128, 127).astype(detail["dtype"])
    y = sess.run(None, {detail["name"]: x})[0]
    if out["dtype"] != np.float32:
        scale, zero = out["quantization"]
        y = (y.astype(np.float32) - zero) * scale
    return y


@pytest.fixture(scope="module", params=["float", "int8"])
def built(request, keras_digits, tmp_path_factory):
    variant = {"float": "tflite-fp32", "int8": "tflite-int8"}[request.param]
    project = tflite_project(tmp_path_factory.mktemp(f"tflite-{request.param}"), keras_digits / f"{request.param}.tflite", [variant])
    code, out, err = run("build", project)
    assert code == 0, (out, err)
    return request.param, variant, project.parent


def test_tflite_source_builds_a_litert_bundle_that_verifies(built):
    kind, variant, directory = built
    bundle = directory / "dist" / BUNDLE
    code, out, err = run("verify", bundle, "--key", directory / "keys" / "digits.pub", "--json")
    assert code == 0, (out, err)
    assert json.loads(out)["golden"] == {variant: "ok"}
    manifest = manifest_of(bundle)
    (entry,) = manifest["variants"]
    assert entry["id"] == variant and entry["engine"] == "litert" and entry["file"] == f"models/{variant}.tflite"
    assert set(manifest["targets"]) == {"rpi4", "x86-gateway"}
    (inp,) = manifest["io"]["inputs"]
    assert inp["name"] == "raw" and inp["dtype"] == "uint8" and inp["shape"] == [None, 8, 8, 1] and inp["preprocess"]["scale"] == 0.0625
    out = manifest["io"]["outputs"][0]
    assert out["dtype"] == "float32" and out["labels"] == [str(i) for i in range(10)]  # int8 outputs dequantized in the graph
    source = manifest["lineage"]["source_model"]
    assert source["kind"] == "tflite" and source["passthrough"]["precision"] == ("int8" if kind == "int8" else "fp32")
    result = manifest["gates"]["results"][variant]
    assert result["samples"] == 450 and result["agreement"] == 1.0


def test_bundled_tflite_equals_the_source_model_from_raw_pixels(built, keras_digits, tmp_path):
    """The fused file on raw uint8 pixels computes what the unchanged source file computes on pixel / 16."""
    from edgepack.bundle import extract_bundle, load_public_key
    from edgepack.convert.tflite import LiteRTSession

    kind, _variant, directory = built
    manifest = extract_bundle(directory / "dist" / BUNDLE, tmp_path / "x", load_public_key(directory / "keys" / "digits.pub"))
    fused = LiteRTSession((tmp_path / "x" / manifest.variants[0]["file"]).read_bytes())
    val = np.load(directory / "val.npz")
    raw, labels = val["raw"][:100], val["labels"][:100]
    got = fused.run(None, {"raw": raw})[0]
    want = source_outputs((keras_digits / f"{kind}.tflite").read_bytes(), raw)
    assert got.shape == want.shape == (100, 10)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert float(np.mean(got.argmax(1) == labels)) > 0.8


def test_device_runtime_serves_the_tflite_bundle_from_raw_input(built, tmp_path):
    import edgepack_runtime

    _kind, variant, directory = built
    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-m", "edgepack_runtime.cli", "install", str(directory / "dist" / BUNDLE),
                             "--cache", str(cache), "--key", str(directory / "keys" / "digits.pub")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    model = edgepack_runtime.open(cache)
    assert model.variant["id"] == variant and model.variant["engine"] == "litert"
    val = np.load(directory / "val.npz")
    scores = next(iter(model.predict(val["raw"][:64]).values()))
    assert scores.shape == (64, 10) and float(np.mean(scores.argmax(1) == val["labels"][:64])) > 0.8


def test_tflite_source_refuses_variants_it_cannot_build(keras_digits, tmp_path):
    project = tflite_project(tmp_path / "p", keras_digits / "float.tflite", ["fp32", "int8"])
    code, out, err = run("build", project)
    assert code == 2, (out, err)
    assert "fp32, int8 cannot be built from a tflite model" in err and "ships as tflite-fp32" in err
    config = yaml.safe_load(project.read_text())
    config["targets"] = [{"device": "rpi4", "variants": ["tflite-fp32"]}]
    config["output"] = {"softmax": True, "labels": [str(i) for i in range(10)]}
    project.write_text(yaml.safe_dump(config, sort_keys=False))
    code, out, err = run("build", project)
    assert code == 2 and "softmax/top_k" in err


def test_fused_preprocessing_that_diverges_from_the_source_is_refused(keras_digits, tmp_path, monkeypatch):
    """The gate's reference is the source model with the DECLARED preprocessing: a front computing
    something else (here pixel / 255 instead of / 16) fails the gate and writes no bundle."""
    from edgepack.build import tflite_source
    from edgepack.preprocess import preprocess_from_dict

    real = tflite_source._front

    def wrong_front(pre, raw_name, model_input, calibration_raw, progress):
        wrong = preprocess_from_dict({**pre.to_dict(), "scale": 1 / 255})
        return real(wrong, raw_name, model_input, calibration_raw, progress)

    monkeypatch.setattr(tflite_source, "_front", wrong_front)
    project = tflite_project(tmp_path / "p", keras_digits / "float.tflite", ["tflite-fp32"])
    code, out, err = run("build", project)
    assert code == 1, (out, err)
    assert "no bundle was written" in err and "tflite-fp32 failed its gates" in err and "accuracy dropped" in err
    assert not list(project.parent.glob("dist/*.epk"))


@needs_litert
@pytest.mark.slow
def test_device_with_only_numpy_and_litert_serves_a_tflite_source_bundle(built, tmp_path):
    """A venv holding only numpy, ai-edge-litert and edgepack-runtime runs the bundle from raw pixels."""
    _kind, variant, directory = built
    python = litert_only_python(tmp_path)
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        import numpy as np
        from edgepack_runtime.cli import main
        absent = [m for m in ("onnxruntime", "tensorflow", "onnx", "edgepack") if importlib.util.find_spec(m) is not None]
        assert not absent, absent
        sys.argv = ["edgepack-runtime", "install", {str(directory / "dist" / BUNDLE)!r}, "--cache", "cache",
                    "--key", {str(directory / "keys" / "digits.pub")!r}]
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, exc.code
        import edgepack_runtime
        model = edgepack_runtime.open("cache")
        val = np.load({str(directory / "val.npz")!r})
        scores = next(iter(model.predict(val["raw"][:64]).values()))
        print(json.dumps({{"variant": model.variant["id"], "accuracy": float((scores.argmax(1) == val["labels"][:64]).mean())}}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    out = subprocess.run([python, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["variant"] == variant and doc["accuracy"] > 0.8


# --------------------------------------------------------------------------- Keras


def keras_outputs(path: Path, raw: np.ndarray) -> np.ndarray:
    from edgepack.convert.tflite import TensorFlowSession

    sess = TensorFlowSession(path)
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: raw.astype(np.float32) / 16.0})[0])


def test_keras_model_builds_tflite_variants_with_tensorflow_alone(keras_digits, tmp_path, monkeypatch):
    from edgepack.bundle import extract_bundle, load_public_key
    from edgepack.convert.tflite import LiteRTSession
    from edgepack.importers import keras_importer

    def no_tf2onnx(*args, **kwargs):
        raise AssertionError("tflite-* variants of a Keras model must not need tf2onnx")

    monkeypatch.setattr(keras_importer, "_tf2onnx", no_tf2onnx)
    project = tflite_project(tmp_path / "p", keras_digits / "model.keras", ["tflite-fp32"], kind="keras")
    code, out, err = run("build", project)
    assert code == 0, (out, err)
    bundle = project.parent / "dist" / BUNDLE
    code, out, err = run("verify", bundle, "--key", project.parent / "keys" / "digits.pub")
    assert code == 0, (out, err)
    manifest = extract_bundle(bundle, tmp_path / "x", load_public_key(project.parent / "keys" / "digits.pub"))
    assert [v["id"] for v in manifest.variants] == ["tflite-fp32"]
    assert manifest["lineage"]["source_model"]["kind"] == "keras" and "TFLite" in manifest["lineage"]["source_model"]["description"]
    raw = np.load(project.parent / "val.npz")["raw"][:50]
    got = LiteRTSession((tmp_path / "x" / "models" / "tflite-fp32.tflite").read_bytes()).run(None, {"raw": raw})[0]
    np.testing.assert_allclose(got, keras_outputs(keras_digits / "model.keras", raw), atol=1e-5)


@pytest.mark.skipif(__import__("importlib").util.find_spec("tf2onnx") is None, reason="tf2onnx (edgepack[tflite]) is not installed")
def test_keras_model_builds_onnx_variants_through_tf2onnx(keras_digits, tmp_path):
    import onnxruntime as ort

    from edgepack.bundle import extract_bundle, load_public_key

    project = tflite_project(tmp_path / "p", keras_digits / "model.keras", ["fp32"], kind="keras")
    code, out, err = run("build", project)
    assert code == 0, (out, err)
    bundle = project.parent / "dist" / BUNDLE
    assert run("verify", bundle, "--key", project.parent / "keys" / "digits.pub")[0] == 0
    manifest = extract_bundle(bundle, tmp_path / "x", load_public_key(project.parent / "keys" / "digits.pub"))
    assert [v["id"] for v in manifest.variants] == ["onnx-fp32"]
    assert "tf2onnx" in manifest["lineage"]["source_model"]["description"]
    raw = np.load(project.parent / "val.npz")["raw"][:50]
    sess = ort.InferenceSession(str(tmp_path / "x" / "models" / "onnx-fp32.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"raw": raw})[0], keras_outputs(keras_digits / "model.keras", raw), atol=1e-5)


def test_keras_onnx_variants_without_tf2onnx_name_what_to_install(keras_digits, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    project = tflite_project(tmp_path / "p", keras_digits / "model.keras", ["fp32"], kind="keras")
    code, _out, err = run("build", project)
    assert code != 0 and "Traceback" not in err
    assert "need tf2onnx" in err and "edgepack[tflite]" in err and "tflite-* variants" in err


def test_keras_savedmodel_directory_builds_tflite_variants(keras_digits, tmp_path):
    """A SavedModel directory (model.export) is a Keras source too; its files are hashed for lineage."""
    import contextlib
    import io

    from edgepack.convert.tflite import load_keras

    saved = tmp_path / "p" / "saved"
    saved.parent.mkdir(parents=True)
    with contextlib.redirect_stdout(io.StringIO()):
        load_keras(keras_digits / "model.keras").export(str(saved))
    project = make_project(tmp_path / "p")
    config = yaml.safe_load(project.read_text())
    config["model"] = {"kind": "keras", "path": "saved"}
    config["input"]["image"]["layout"] = "NHWC"
    config["output"] = {"labels": [str(i) for i in range(10)]}
    config["targets"] = [{"device": "x86-gateway", "variants": ["tflite-fp32"]}]
    project.write_text(yaml.safe_dump(config, sort_keys=False))
    code, out, err = run("build", project)
    assert code == 0, (out, err)
    assert run("verify", project.parent / "dist" / BUNDLE, "--key", project.parent / "keys" / "digits.pub")[0] == 0
    files = manifest_of(project.parent / "dist" / BUNDLE)["lineage"]["source_model"]["files"]
    assert any(f["role"] == "savedmodel:saved_model.pb" and len(f["sha256"]) == 64 for f in files)


@pytest.mark.skipif(__import__("importlib").util.find_spec("tf2onnx") is None, reason="tf2onnx (edgepack[tflite]) is not installed")
def test_keras_model_builds_onnx_and_tflite_variants_in_one_bundle(keras_digits, tmp_path):
    """A Keras user asks for both engines: ONNX through tf2onnx, TFLite from that ONNX through onnx2tf,
    every variant gated against the same fp32 reference and checked against Keras itself."""
    from edgepack.bundle import extract_bundle, load_public_key
    from edgepack.convert.tflite import LiteRTSession

    project = tflite_project(tmp_path / "p", keras_digits / "model.keras", ["fp32", "tflite-fp32"], kind="keras")
    code, out, err = run("build", project)
    assert code == 0, (out, err)
    bundle = project.parent / "dist" / BUNDLE
    assert run("verify", bundle, "--key", project.parent / "keys" / "digits.pub")[0] == 0
    manifest = extract_bundle(bundle, tmp_path / "x", load_public_key(project.parent / "keys" / "digits.pub"))
    assert sorted(v["engine"] for v in manifest.variants) == ["litert", "onnxruntime"]
    raw = np.load(project.parent / "val.npz")["raw"][:50]
    expected = keras_outputs(keras_digits / "model.keras", raw)
    import onnxruntime as ort

    onnx_file = next(v["file"] for v in manifest.variants if v["engine"] == "onnxruntime")
    tfl_file = next(v["file"] for v in manifest.variants if v["engine"] == "litert")
    sess = ort.InferenceSession(str(tmp_path / "x" / onnx_file), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"raw": raw})[0], expected, atol=1e-5)
    got = LiteRTSession((tmp_path / "x" / tfl_file).read_bytes()).run(None, {"raw": raw})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
