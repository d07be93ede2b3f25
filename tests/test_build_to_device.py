"""The workstation's bundle runs on the device runtime: build → install → predict from raw input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits_bundle(tmp_path_factory):
    from typer.testing import CliRunner

    from edgepack.cli.app import app

    work = tmp_path_factory.mktemp("digits")
    for name in ("model.onnx", "calib.npz", "val.npz", "edgepack.yaml"):
        shutil.copy(ROOT / "examples" / "digits" / name, work / name)
    runner = CliRunner()
    result = runner.invoke(app, ["keys", "generate", "--dir", str(work / "keys"), "--name", "digits"])
    assert result.exit_code == 0, result.stderr
    result = runner.invoke(app, ["build", str(work / "edgepack.yaml"), "--json"])
    assert result.exit_code == 0, result.stderr
    return work, work / "dist" / "digits-1.0.0.epk", work / "keys" / "digits.pub", json.loads(result.stdout)


def runtime(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack_runtime.cli", *args], capture_output=True, text=True, timeout=120)


def test_built_bundle_installs_and_predicts_raw_digits_on_the_device(digits_bundle, tmp_path):
    _, bundle, pub, _ = digits_bundle
    cache = tmp_path / "cache"
    result = runtime("install", str(bundle), "--cache", str(cache), "--key", str(pub), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["version"] == "1.0.0"

    import edgepack_runtime

    model = edgepack_runtime.open(cache)
    val = np.load(ROOT / "examples" / "digits" / "val.npz")
    scores = model.predict(val["raw"])["scores"]
    accuracy = float((scores.argmax(1) == val["labels"]).mean())
    assert accuracy >= 0.98
    assert np.allclose(scores.sum(axis=1), 1.0, atol=1e-4)  # softmax is inside the artifact


def test_device_refuses_raw_input_outside_the_manifest_schema(digits_bundle, tmp_path):
    _, bundle, pub, _ = digits_bundle
    cache = tmp_path / "cache"
    assert runtime("install", str(bundle), "--cache", str(cache), "--key", str(pub)).returncode == 0

    import edgepack_runtime

    model = edgepack_runtime.open(cache)
    with pytest.raises(edgepack_runtime.InputValidationError, match="raw"):
        model.predict(np.zeros((1, 9, 9, 1), np.uint8))  # wrong image size
    with pytest.raises(edgepack_runtime.InputValidationError, match="dtype"):
        model.predict(np.zeros((1, 8, 8, 1), np.float32))  # not raw pixels


def test_device_prefers_the_variant_it_is_told_to(digits_bundle, tmp_path):
    _, bundle, pub, _ = digits_bundle
    cache = tmp_path / "cache"
    assert runtime("install", str(bundle), "--cache", str(cache), "--key", str(pub)).returncode == 0
    for prefer in ("onnx-fp32", "onnx-int8"):
        result = runtime("verify", "--cache", str(cache), "--prefer", prefer, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["variant"] == prefer


@pytest.mark.slow
def test_photo_example_builds_a_signed_fp32_and_int8_bundle_that_verifies_and_runs(tmp_path):
    """The image-classification example: raw RGB photos in, resize/crop/normalize inside the bundle."""
    from typer.testing import CliRunner

    from edgepack.cli.app import app

    work = tmp_path / "photos"
    shutil.copytree(ROOT / "examples" / "photos", work, ignore=shutil.ignore_patterns("keys", "dist"))
    runner = CliRunner()
    assert runner.invoke(app, ["keys", "generate", "--dir", str(work / "keys"), "--name", "photos"]).exit_code == 0
    result = runner.invoke(app, ["build", str(work / "edgepack.yaml"), "--json"])
    assert result.exit_code == 0, result.stderr
    bundle = work / "dist" / "photos-1.0.0.epk"
    result = runner.invoke(app, ["verify", str(bundle), "--key", str(work / "keys" / "photos.pub"), "--json"])
    assert result.exit_code == 0, result.stderr

    from edgepack_runtime.bundle import load_public_key, verify_bundle

    manifest = verify_bundle(bundle, load_public_key(work / "keys" / "photos.pub"))
    assert {v["precision"] for v in manifest.variants} == {"fp32", "int8"}
    gates = manifest["gates"]
    assert gates["passed"] is True and set(gates["results"]) >= {"onnx-fp32", "onnx-int8"}

    cache = tmp_path / "cache"
    assert runtime("install", str(bundle), "--cache", str(cache), "--key", str(work / "keys" / "photos.pub")).returncode == 0
    import edgepack_runtime

    val = np.load(ROOT / "examples" / "photos" / "val.npz")
    out = edgepack_runtime.open(cache).predict(val["raw"])
    assert float((out["scores"].argmax(1) == val["labels"]).mean()) >= 0.9


@pytest.mark.parametrize("example", ["digits", "photos"])
def test_example_bundles_serve_through_the_daemon_with_validated_raw_input(example, tmp_path):
    """The examples' built bundles, served by the real daemon over its Unix socket."""
    from typer.testing import CliRunner

    from edgepack.cli.app import app
    from test_daemon import npy, serve

    work = tmp_path / example
    shutil.copytree(ROOT / "examples" / example, work, ignore=shutil.ignore_patterns("keys", "dist", "train.py"))
    runner = CliRunner()
    assert runner.invoke(app, ["keys", "generate", "--dir", str(work / "keys"), "--name", example]).exit_code == 0
    result = runner.invoke(app, ["build", str(work / "edgepack.yaml")])
    assert result.exit_code == 0, result.stderr
    bundle = next((work / "dist").glob("*.epk"))
    cache = tmp_path / "cache"
    assert runtime("install", str(bundle), "--cache", str(cache), "--key", str(work / "keys" / f"{example}.pub")).returncode == 0

    val = np.load(ROOT / "examples" / example / "val.npz")
    raw, labels = val["raw"][:16], val["labels"][:16]
    import edgepack_runtime

    model = edgepack_runtime.open(cache)
    expected = model.predict(raw)["scores"]
    name = model.inputs[0]["name"]
    with serve(cache, tmp_path) as daemon:
        status, body = daemon.json("POST", "/predict", {"inputs": {name: raw.tolist()}}, conn=daemon.unix())
        assert status == 200, body
        scores = np.asarray(body["outputs"]["scores"], np.float32)
        np.testing.assert_allclose(scores, expected, atol=1e-6)
        assert (scores.argmax(1) == labels).mean() >= 0.85
        status, _, payload = daemon.request("POST", "/predict", npy(raw), {"Content-Type": "application/x-npy"}, conn=daemon.unix())
        assert status == 200
        # Raw input the manifest does not allow: fractional pixels, values above 255, an image of the wrong size.
        for bad in (raw.astype(np.float32) + 0.5, raw.astype(np.int64) + 256, np.zeros((1, 3, 3, raw.shape[-1]), np.uint8)):
            status, body = daemon.json("POST", "/predict", {"inputs": {name: bad.tolist()}}, conn=daemon.unix())
            assert status == 400 and body["error"]["field"] == name, body


@pytest.mark.slow
def test_main_job_fleet_demo_rolls_the_example_out_and_predicts_on_the_device(digits_bundle, tmp_path):
    """`python3 dev.py demo`'s over-the-air part, so the README's main job cannot rot."""
    _, bundle, pub, _ = digits_bundle
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "fleet_demo.py"), str(bundle), str(pub), str(tmp_path / "fleet")],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "committed 1.0.0; the server agrees" in result.stdout
    assert result.stdout.count("predicted ") == 5
