"""`edgepack build` / `init` / `keys generate` / `inspect` / `verify` through the real CLI.

Each test works on a copy of examples/digits in a temp dir with a fresh signing key.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
BUNDLE = "digits-1.0.0.epk"


def run(*args) -> tuple[int, str, str]:
    from edgepack.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def make_project(directory: Path, keys: bool = True, **changes) -> Path:
    """Copy the digits example into ``directory``; ``changes`` update top-level yaml sections."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "calib.npz", "val.npz", "edgepack.yaml"):
        shutil.copy(DIGITS / name, directory / name)
    if changes:
        config = yaml.safe_load((directory / "edgepack.yaml").read_text())
        config.update(changes)
        (directory / "edgepack.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if keys:
        code, out, err = run("keys", "generate", "--dir", directory / "keys", "--name", "digits")
        assert code == 0, err
    return directory / "edgepack.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One successful digits build shared by the read-only tests; returns the project dir."""
    project = make_project(tmp_path_factory.mktemp("digits"))
    code, out, err = run("build", project)
    assert code == 0, (out, err)
    return project.parent


def manifest_of(bundle: Path) -> dict:
    from edgepack.bundle import read_member

    return json.loads(read_member(bundle, "manifest.json"))


# --- the happy path -----------------------------------------------------------------------


def test_build_writes_signed_bundle_with_fp32_and_int8(built):
    bundle = built / "dist" / BUNDLE
    assert bundle.is_file()
    manifest = manifest_of(bundle)
    assert manifest["format_version"] == 1 and manifest["name"] == "digits" and manifest["version"] == "1.0.0"
    variants = {v["id"]: v for v in manifest["variants"]}
    assert set(variants) == {"onnx-fp32", "onnx-int8"}
    assert variants["onnx-int8"] == {**variants["onnx-int8"], "file": "models/onnx-int8.onnx", "engine": "onnxruntime",
                                     "precision": "int8", "min_runtime": "0.1.0", "devices": ["rpi4"]}
    assert variants["onnx-fp32"]["devices"] == ["rpi4", "x86-gateway"]
    assert set(manifest["files"]) == {"models/onnx-fp32.onnx", "models/onnx-int8.onnx", "golden/vectors.npz",
                                      "stats/reference.json"}
    # Gates: thresholds and per-variant measured values, all passed.
    gates = manifest["gates"]
    assert gates["passed"] is True and gates["thresholds"]["max_accuracy_drop"] == 0.01
    for vid in variants:
        result = gates["results"][vid]
        assert result["accuracy"] >= 0.98 and result["agreement"] >= 0.98 and result["size_bytes"] > 0
        assert result["passed"] is True
    assert gates["results"]["onnx-int8"]["size_bytes"] < gates["results"]["onnx-fp32"]["size_bytes"]
    # io schema of the RAW input and the post-processed output.
    (inp,) = manifest["io"]["inputs"]
    assert inp["name"] == "raw" and inp["dtype"] == "uint8" and inp["shape"] == [None, 8, 8, 1] and inp["value_range"] == [0, 255]
    out = manifest["io"]["outputs"][0]
    assert out["name"] == "scores" and out["labels"] == [str(i) for i in range(10)] and out["value_range"] == [0.0, 1.0]
    # Lineage and golden tolerances.
    lineage = manifest["lineage"]
    assert len(lineage["source_model"]["sha256"]) == 64 and len(lineage["validation"]["sha256"]) == 64
    assert set(lineage["tools"]) == {"edgepack", "onnx", "onnxruntime", "numpy"}
    assert lineage["project"]["data"]["validation"]["path"] == "val.npz"
    assert lineage["steps"]["fold_normalization"]["applied"] is True
    assert set(manifest["golden"]["tolerances"]) == set(variants)
    # No wall-clock numbers in the bundle; they are in the side report.
    assert "median" not in json.dumps(manifest)
    report = json.loads((built / "dist" / "digits-1.0.0.build.json").read_text())
    assert report["variants"]["onnx-int8"]["latency_ms"]["median"] > 0


def test_bundle_models_run_end_to_end_from_raw_input(built, tmp_path):
    """The fp32 golden outputs equal numpy preprocessing + the ORIGINAL model + softmax."""
    import onnxruntime as ort

    from edgepack.build.golden import read_npz
    from edgepack.bundle import extract_bundle, load_public_key
    from edgepack.preprocess import apply_reference, preprocess_from_dict

    manifest = extract_bundle(built / "dist" / BUNDLE, tmp_path / "x", load_public_key(built / "keys" / "digits.pub"))
    arrays = read_npz((tmp_path / "x" / "golden" / "vectors.npz").read_bytes())
    raw = arrays["input:raw"]
    assert raw.dtype == np.uint8 and raw.shape == (8, 8, 8, 1)
    pre = preprocess_from_dict(manifest["io"]["inputs"][0]["preprocess"])
    sess = ort.InferenceSession(str(DIGITS / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": apply_reference(pre, raw)})[0].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(arrays["output:onnx-fp32:scores"], probs, atol=1e-5)
    assert (arrays["output:onnx-int8:scores"].argmax(1) == probs.argmax(1)).all()
    stats = json.loads((tmp_path / "x" / "stats" / "reference.json").read_text())
    feature = stats["inputs"]["raw"]["features"][0]
    assert stats["inputs"]["raw"]["per"] == "channel" and len(feature["quantiles"]) == 11
    assert feature["min"] >= 0 and feature["max"] <= 16
    dist = stats["predictions"]["onnx-int8"]["class_distribution"]
    assert set(dist) == {str(i) for i in range(10)} and abs(sum(dist.values()) - 1) < 1e-9
    assert abs(sum(stats["predictions"]["onnx-fp32"]["confidence_histogram"]["shares"]) - 1) < 1e-9


def test_verify_passes_and_inspect_summarizes(built):
    bundle = built / "dist" / BUNDLE
    code, out, err = run("verify", bundle, "--key", built / "keys" / "digits.pub", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["verified"] is True and result["golden"] == {"onnx-fp32": "ok", "onnx-int8": "ok"}
    code, out, err = run("verify", bundle, "--key", built / "keys" / "digits.pub")
    assert code == 0 and "signature OK" in out
    code, out, err = run("inspect", bundle)
    assert code == 0, err
    for text in ("digits 1.0.0", "onnx-int8", "int8", "onnxruntime", "max_accuracy_drop=0.01", "lineage", "calib.npz"):
        assert text in out
    code, out, err = run("inspect", bundle, "--json")
    assert code == 0 and json.loads(out)["name"] == "digits"


def test_build_twice_is_byte_identical(built, tmp_path):
    first = (built / "dist" / BUNDLE).read_bytes()
    other = make_project(tmp_path / "again", keys=False)
    shutil.copytree(built / "keys", other.parent / "keys")
    code, out, err = run("build", other, "--json")
    assert code == 0, err
    assert json.loads(out)["bundle"].endswith(BUNDLE)
    assert (other.parent / "dist" / BUNDLE).read_bytes() == first
    code, _, err = run("build", other)  # and again in place
    assert code == 0, err
    assert (other.parent / "dist" / BUNDLE).read_bytes() == first


def test_deterministic_npz_round_trips():
    from edgepack.build.golden import read_npz, write_npz

    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([1, 2], dtype=np.uint8)}
    data = write_npz(arrays)
    assert data == write_npz(dict(reversed(list(arrays.items()))))
    back = read_npz(data)
    assert set(back) == {"a", "b"} and all(np.array_equal(back[k], arrays[k]) for k in arrays)


# --- tampering and keys -------------------------------------------------------------------


def test_flipping_a_byte_in_any_member_fails_verify_naming_it(built, tmp_path):
    bundle = built / "dist" / BUNDLE
    data = bundle.read_bytes()
    with tarfile.open(bundle) as tar:
        members = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
    assert [name for name, _, _ in members][:2] == ["manifest.json", "manifest.sig"]
    assert len(members) == 6
    for name, offset, size in members:
        damaged = bytearray(data)
        damaged[offset + size // 2] ^= 0x01
        path = tmp_path / f"{name.replace('/', '_')}.epk"
        path.write_bytes(bytes(damaged))
        code, out, err = run("verify", path, "--key", built / "keys" / "digits.pub")
        assert code == 1, (name, out, err)
        assert repr(name) in err or name in err, (name, err)
        assert "Traceback" not in err


def test_wrong_key_fails_verify(built, tmp_path):
    code, _, err = run("keys", "generate", "--dir", tmp_path, "--name", "other")
    assert code == 0, err
    code, out, err = run("verify", built / "dist" / BUNDLE, "--key", tmp_path / "other.pub")
    assert code == 1
    assert "not among the trusted keys" in err


def test_verify_bad_input_exits_2(built, tmp_path):
    code, _, err = run("verify", tmp_path / "missing.epk", "--key", built / "keys" / "digits.pub")
    assert code == 2 and "does not exist" in err
    code, _, err = run("verify", built / "dist" / BUNDLE, "--key", tmp_path / "missing.pub")
    assert code == 2 and "does not exist" in err


def test_golden_vectors_mismatch_is_reported_per_variant(built, tmp_path):
    """A correctly signed bundle whose int8 golden outputs are wrong fails on the host, naming the variant."""
    from edgepack.build.golden import read_npz, write_npz
    from edgepack.bundle import extract_bundle, load_public_key, write_bundle

    root = tmp_path / "x"
    manifest = extract_bundle(built / "dist" / BUNDLE, root, load_public_key(built / "keys" / "digits.pub"))
    arrays = read_npz((root / "golden" / "vectors.npz").read_bytes())
    arrays["output:onnx-int8:scores"] = arrays["output:onnx-int8:scores"] + 0.25
    members = {name: root / name for name in manifest.files}
    members["golden/vectors.npz"] = write_npz(arrays)
    doc = {k: v for k, v in manifest.items() if k != "files"}
    out = write_bundle(tmp_path / "bad.epk", doc, members, built / "keys" / "digits.key")
    code, stdout, err = run("verify", out, "--key", built / "keys" / "digits.pub", "--json")
    assert code == 1
    result = json.loads(stdout)
    assert result["golden"]["onnx-fp32"] == "ok" and result["golden"]["onnx-int8"] != "ok"
    assert "onnx-int8" in err and "scores" in err


def test_keys_generate_refuses_to_overwrite(tmp_path):
    assert run("keys", "generate", "--dir", tmp_path, "--name", "k")[0] == 0
    code, _, err = run("keys", "generate", "--dir", tmp_path, "--name", "k")
    assert code == 2 and "already exists" in err
    assert run("keys", "generate", "--dir", tmp_path, "--name", "k", "--force")[0] == 0


# --- refusals -------------------------------------------------------------------------------


def test_failed_gate_exits_1_and_writes_no_bundle(tmp_path):
    project = make_project(tmp_path / "p", gates={"max_accuracy_drop": 0.01, "min_accuracy": 0.9999})
    code, out, err = run("build", project)
    assert code == 1, (out, err)
    assert "min_accuracy 99.99%" in err and "accuracy 99.33%" in err
    assert not list((tmp_path / "p").glob("dist/*.epk"))


def test_baseline_with_better_accuracy_refuses_the_build(tmp_path):
    good = make_project(tmp_path / "good")
    assert run("build", good)[0] == 0
    baseline = tmp_path / "good" / "dist" / BUNDLE
    # A challenger that never predicts class 0: clearly worse on the same validation data.
    worse = make_project(tmp_path / "worse", keys=False, version="1.1.0")
    shutil.copytree(tmp_path / "good" / "keys", tmp_path / "worse" / "keys")
    model = onnx.load(str(tmp_path / "worse" / "model.onnx"))
    bias = next(t for t in model.graph.initializer if t.name == "fc2.bias")
    values = onnx.numpy_helper.to_array(bias).copy()
    values[0] -= 1000.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values, "fc2.bias"))
    onnx.save(model, str(tmp_path / "worse" / "model.onnx"))
    code, out, err = run("build", worse, "--baseline", baseline)
    assert code == 1, (out, err)
    assert "baseline" in err and "digits 1.0.0" in err
    assert not (tmp_path / "worse" / "dist" / "digits-1.1.0.epk").exists()
    # The unchanged model (equal accuracy) is accepted against the same baseline.
    same = make_project(tmp_path / "same", keys=False, version="1.0.1")
    shutil.copytree(tmp_path / "good" / "keys", tmp_path / "same" / "keys")
    code, out, err = run("build", same, "--baseline", baseline)
    assert code == 0, err
    assert manifest_of(tmp_path / "same" / "dist" / "digits-1.0.1.epk")["gates"]["baseline"]["passed"] is True


def test_schema_errors_are_reported_at_once_with_field_paths(tmp_path):
    project = make_project(
        tmp_path / "p", keys=False, name="Digits!", version=1.0,
        gates={"max_accuracy_drop": 5, "max_acuracy": 1},
        targets=[{"device": "rpi4", "variants": ["int4"]}],
    )
    code, out, err = run("build", project)
    assert code == 2
    for text in ("name:", "version:", "gates.max_accuracy_drop", "gates.max_acuracy", "did you mean 'max_accuracy_drop'",
                 "targets[0].variants"):
        assert text in err, (text, err)
    assert "Traceback" not in err


def test_unknown_device_is_reported(tmp_path):
    project = make_project(tmp_path / "p", targets=[{"device": "rpi44", "variants": ["fp32"]}])
    code, out, err = run("build", project)
    assert code == 2 and "targets[0].device" in err and "rpi44" in err


def test_missing_signing_key_names_keys_generate(tmp_path):
    project = make_project(tmp_path / "p", keys=False)
    code, out, err = run("build", project)
    assert code == 2
    assert "signing.key" in err and "edgepack keys generate" in err
    assert not (tmp_path / "p" / "dist").exists()


def test_init_writes_template_and_refuses_to_overwrite(tmp_path):
    code, out, err = run("init", tmp_path / "new")
    assert code == 0, err
    text = (tmp_path / "new" / "edgepack.yaml").read_text()
    config = yaml.safe_load(text)
    assert "#" in text and {"name", "version", "model", "input", "data", "targets", "gates", "signing"} <= set(config)
    code, _, err = run("init", tmp_path / "new")
    assert code == 2 and "already exists" in err


def test_fp16_variant_builds_and_verifies(tmp_path):
    project = make_project(tmp_path / "p", targets=[{"device": "x86-gateway", "variants": ["fp32", "fp16"]}])
    code, out, err = run("build", project)
    assert code == 0, err
    bundle = tmp_path / "p" / "dist" / BUNDLE
    manifest = manifest_of(bundle)
    assert [(v["id"], v["precision"]) for v in manifest["variants"]] == [("onnx-fp32", "fp32"), ("onnx-fp16", "fp16")]
    code, out, err = run("verify", bundle, "--key", tmp_path / "p" / "keys" / "digits.pub", "--json")
    assert code == 0, err
    assert json.loads(out)["golden"] == {"onnx-fp32": "ok", "onnx-fp16": "ok"}


def test_missing_labels_array_is_reported(tmp_path):
    project = make_project(tmp_path / "p", data={"calibration": {"path": "calib.npz", "key": "raw"},
                                                 "validation": {"path": "val.npz", "key": "raw", "labels": "truth"}})
    code, out, err = run("build", project)
    assert code == 2 and "data.validation" in err and "no labels array 'truth'" in err


def test_latency_gate_is_enforced_but_only_its_verdict_is_signed(tmp_path):
    slow = make_project(tmp_path / "slow", gates={"max_latency_ms": 0.000001})
    code, out, err = run("build", slow)
    assert code == 1 and "max_latency_ms" in err and "median latency" in err
    assert not list((tmp_path / "slow").glob("dist/*.epk"))
    ok = make_project(tmp_path / "ok", gates={"max_accuracy_drop": 0.01, "max_latency_ms": 10000, "max_size_mb": 10})
    code, out, err = run("build", ok)
    assert code == 0, err
    gates = manifest_of(tmp_path / "ok" / "dist" / BUNDLE)["gates"]
    assert gates["thresholds"]["max_latency_ms"] == 10000 and gates["thresholds"]["max_size_bytes"] == 10_000_000
    assert all(r["latency"].startswith("passed") for r in gates["results"].values())
    assert "median" not in json.dumps(gates)
