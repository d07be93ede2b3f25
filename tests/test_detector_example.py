"""The object-detector example: trained here on skimage's photos, letterboxed raw frames in, boxes out.

It builds with a declared detection task (every variant's boxes are matched with fp32's),
verifies, installs on a device cache and serves raw frames of different sizes in one
request through the daemon, whose boxes map back to the frames' raw pixels.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "detector"


def _train_module():
    import os

    spec = importlib.util.spec_from_file_location("detector_train", EXAMPLE / "train.py")
    module = importlib.util.module_from_spec(spec)
    # train.py pins BLAS to one thread for reproducible training; that must not leak into
    # this process's environment (subprocesses of later tests inherit it).
    saved = dict(os.environ)
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


@pytest.fixture(scope="module")
def train():
    return _train_module()


@pytest.fixture(scope="module")
def val():
    return dict(np.load(EXAMPLE / "val.npz"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The example built as a user would: keys generated, `edgepack build`, `edgepack verify`."""
    from typer.testing import CliRunner

    from edgepack.cli.app import app

    work = tmp_path_factory.mktemp("detector")
    for name in ("model.onnx", "calib.npz", "val.npz", "labels.txt", "edgepack.yaml"):
        shutil.copy(EXAMPLE / name, work / name)
    runner = CliRunner()
    result = runner.invoke(app, ["keys", "generate", "--dir", str(work / "keys"), "--name", "detector"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["build", str(work / "edgepack.yaml"), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    bundle = work / "dist" / "detector-1.0.0.epk"
    result = runner.invoke(app, ["verify", str(bundle), "--key", str(work / "keys" / "detector.pub")], catch_exceptions=False)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    report = json.loads((work / "dist" / "detector-1.0.0.build.json").read_text())
    return work, bundle, report


def test_model_is_a_detector_with_its_decode_in_the_graph(train):
    model = onnx.load(EXAMPLE / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "classes"]
    ops = {n.op_type for n in model.graph.node}
    assert {"TopK", "MaxPool", "GatherElements"} <= ops  # peak keep + top-k decode, not a raw head
    sess = ort.InferenceSession(str(EXAMPLE / "model.onnx"), providers=["CPUExecutionProvider"])
    boxes, scores, classes = sess.run(None, {"input": np.zeros((2, 3, *train.INPUT_HW), np.float32)})
    assert boxes.shape == (2, train.TOP_K, 4) and scores.shape == (2, train.TOP_K) and classes.dtype == np.int64
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_declared_spec_is_the_training_spec(train):
    import yaml

    from edgepack.preprocess import preprocess_from_dict

    declared = yaml.safe_load((EXAMPLE / "edgepack.yaml").read_text())["input"]["image"]
    assert preprocess_from_dict({"kind": "image", **declared}) == train.spec()
    labels = (EXAMPLE / "labels.txt").read_text().split()
    assert tuple(labels) == train.CLASSES


def test_files_fit_the_size_budget():
    total = sum((EXAMPLE / n).stat().st_size for n in ("model.onnx", "calib.npz", "val.npz"))
    assert total < 2_600_000, total


def test_committed_data_is_what_train_py_makes(train, val):
    """The frames are reproducible from skimage's photos (no download), held-out walls for validation."""
    raw, gt_boxes, gt_classes = train.scene_set(train.VAL_FRAMES, 0, train._STREAM_VAL, heldout=True)
    np.testing.assert_array_equal(raw, val["raw"])
    np.testing.assert_array_equal(gt_boxes, val["gt_boxes"])
    np.testing.assert_array_equal(gt_classes, val["gt_classes"])
    calib, _, _ = train.scene_set(train.CALIB_FRAMES, 0, train._STREAM_CALIB, heldout=False)
    np.testing.assert_array_equal(calib, np.load(EXAMPLE / "calib.npz")["raw"])
    assert (gt_classes >= 0).sum() >= 150  # 190 committed: enough boxes for the recall/precision gate to mean something


def test_fp32_finds_the_held_out_objects(train, val):
    """The model itself is good: against ground truth on held-out walls, not only against itself."""
    sess = ort.InferenceSession(str(EXAMPLE / "model.onnx"), providers=["CPUExecutionProvider"])
    x, transform = train.to_input(val["raw"])
    boxes, scores, classes = sess.run(None, {"input": x})
    from edgepack.preprocess import unletterbox_boxes

    recall, precision = train.recall_precision(unletterbox_boxes(boxes, transform), scores, classes,
                                               val["gt_boxes"], val["gt_classes"])
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)


def test_build_gates_every_variant_in_box_terms(built):
    from edgepack.bundle import read_member

    _work, bundle, report = built
    manifest = json.loads(read_member(bundle, "manifest.json"))
    results = manifest["gates"]["results"]
    assert {v["precision"] for v in manifest["variants"]} >= {"fp32"}
    for vid, result in results.items():
        task = result["task"]
        assert task["kind"] == "detection", task
        metrics = task["metrics"] if "metrics" in task else task
        assert metrics["box_recall"] >= 0.95 and metrics["box_precision"] >= 0.95, (vid, task)
    outputs = [o["name"] for o in manifest["io"]["outputs"]]
    assert outputs == ["boxes", "scores", "classes", "letterbox"]
    for target in ("rpi5", "x86-gateway"):
        assert manifest["targets"][target]["variants"], manifest["targets"]
    # A user reads the box metrics per target, not only a raw-output error.
    from typer.testing import CliRunner

    from edgepack.cli.app import app

    shown = CliRunner().invoke(app, ["inspect", str(bundle)], catch_exceptions=False).stdout
    assert shown.count("detection: box_recall") >= 2, shown


def test_daemon_serves_raw_frames_of_different_sizes_with_boxes_in_raw_pixels(built, val, train, tmp_path):
    from test_daemon import serve

    from edgepack_runtime import unletterbox_boxes
    from edgepack_runtime.bundle import load_public_key
    from edgepack_runtime.cache import CacheConfig
    from edgepack_runtime.model import RuntimeConfig, install

    work, bundle, _ = built
    pub = work / "keys" / "detector.pub"
    config = RuntimeConfig(CacheConfig(root=tmp_path / "cache", trusted_keys=(load_public_key(pub),)))
    install(bundle, config)
    (tmp_path / "cache" / "keys").mkdir(parents=True, exist_ok=True)
    shutil.copy(pub, tmp_path / "cache" / "keys" / "detector.pub")
    # A 72x96 frame, the same scene at 2x (144x192), and a portrait crop of a third: one request.
    frames = [val["raw"][0], np.repeat(np.repeat(val["raw"][1], 2, 0), 2, 1), val["raw"][2][:, :60]]
    with serve(tmp_path / "cache", tmp_path) as daemon:
        status, body = daemon.json("POST", "/predict", {"inputs": {"image": [f.tolist() for f in frames]}})
    assert status == 200, body
    out = body["outputs"]
    transform = np.asarray(out["letterbox"], np.float32)
    assert transform[:, 4:].tolist() == [[72, 96], [144, 192], [72, 60]]
    raw_boxes = unletterbox_boxes(np.asarray(out["boxes"], np.float32), transform)
    scores, classes = np.asarray(out["scores"]), np.asarray(out["classes"])
    gt = [val["gt_boxes"][0], val["gt_boxes"][1] * 2, val["gt_boxes"][2]]
    gt_classes = [val["gt_classes"][0], val["gt_classes"][1], val["gt_classes"][2].copy()]
    # Objects cut by the crop are not expected to be found.
    gt_classes[2][(gt[2][:, 2] > 60)] = -1
    recall, precision = train.recall_precision(raw_boxes, scores, classes, np.stack(gt), np.stack(gt_classes))
    assert recall == 1.0 and precision == 1.0, (recall, precision, raw_boxes[:, :3], gt)
