"""A signed bundle always passes its own verification: fixed-batch models, and the verify step.

Regression: a batch-1 model built and was signed although ``edgepack verify`` failed on
it (its golden vectors were one batch of 8 rows the model cannot take).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_build import make_project, manifest_of, run

BUNDLE = "digits-1.0.0.epk"


def _fix_batch(model_path: Path, batch: int) -> None:
    """Pin the leading dimension of the model's input and output (as batch-1 exporters do)."""
    model = onnx.load(model_path)
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    onnx.checker.check_model(model)
    onnx.save(model, model_path)


@pytest.fixture(scope="module")
def batch1(tmp_path_factory) -> Path:
    project = make_project(tmp_path_factory.mktemp("batch1"))
    _fix_batch(project.parent / "model.onnx", 1)
    code, out, err = run("build", project)
    assert code == 0, (out, err)
    return project.parent


def test_batch1_model_builds_a_bundle_that_verifies(batch1):
    bundle = batch1 / "dist" / BUNDLE
    code, out, err = run("verify", bundle, "--key", batch1 / "keys" / "digits.pub", "--json")
    assert code == 0, (out, err)
    assert json.loads(out)["golden"] == {"onnx-fp32": "ok", "onnx-int8": "ok"}
    manifest = manifest_of(bundle)
    # Golden vectors are run one row per call, as the model takes them; all 8 requested are shipped.
    assert manifest["golden"]["batch"] == 1 and manifest["golden"]["count"] == 8
    assert manifest["io"]["inputs"][0]["shape"][0] == 1


def test_batch1_bundle_passes_the_device_self_test(batch1, tmp_path):
    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-m", "edgepack_runtime.cli", "install", str(batch1 / "dist" / BUNDLE),
                             "--cache", str(cache), "--key", str(batch1 / "keys" / "digits.pub")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    import edgepack_runtime

    model = edgepack_runtime.open(cache)
    raw = np.load(batch1 / "val.npz")["raw"][:1]
    assert model.predict(raw)["scores"].shape == (1, 10)


def test_golden_count_is_a_whole_number_of_fixed_batches():
    from edgepack.build.golden import golden_count

    assert golden_count(8, 450, None) == 8
    assert golden_count(8, 5, None) == 5
    assert golden_count(8, 450, 1) == 8
    assert golden_count(8, 450, 3) == 6
    assert golden_count(2, 450, 4) == 4  # at least one full batch


def test_fixed_batch_golden_vectors_run_in_chunks_of_the_batch():
    from edgepack_runtime.selftest import run_golden

    calls = []

    def fake_run(feed):
        calls.append(feed["x"].shape[0])
        return [feed["x"] * 2]

    x = np.arange(6, dtype=np.float32).reshape(6, 1)
    (out,) = run_golden(fake_run, {"x": x}, 2)
    assert calls == [2, 2, 2] and np.array_equal(out, x * 2)
    calls.clear()
    run_golden(fake_run, {"x": x}, None)
    assert calls == [6]


def test_a_bundle_that_fails_verification_is_never_left_on_disk(tmp_path, monkeypatch):
    """Inject a golden-vector failure into the build's verify step: exit 1, no .epk, no temp file."""
    from edgepack.build import verify_step
    from edgepack.bundle.check import BundleCheck

    seen = []

    def failing(path, key):
        seen.append(Path(path))
        assert Path(path).is_file()  # it really checks the signed file that was written
        return BundleCheck(manifest=None, golden={"onnx-fp32": ["onnx-fp32: output 'scores' differs by 0.5, more than the 1e-05 tolerance"]})

    monkeypatch.setattr(verify_step, "_verify", failing)
    project = make_project(tmp_path / "p")
    code, out, err = run("build", project)
    assert code == 1, (out, err)
    assert "failed its own verification" in err and "differs by 0.5" in err
    assert seen and not seen[0].exists()
    dist = project.parent / "dist"
    assert not list(dist.glob("*.epk")) and not [p for p in dist.iterdir() if "unverified" in p.name]
