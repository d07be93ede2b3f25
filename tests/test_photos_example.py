"""Checks for the photos example (``examples/photos``): raw RGB in, preprocessing embedded.

The model, its calibration/validation frames and its project file are committed, so
these tests guard them: the model is valid, the declared preprocessing (the project
file) is the one the model was trained with, embedding + folding it gives the same
logits from RAW frames as ``apply_reference`` + the bare model, accuracy holds, the
held-out split really is held out, and the files stay small.
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
import yaml
from onnx import TensorProto, numpy_helper

from edgepack.preprocess import (
    Postprocess,
    apply_reference,
    embed_preprocessing,
    postprocess_reference,
    preprocess_from_dict,
    try_fold_normalization,
)
from edgepack.project import validate_project

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "photos"
COMMITTED = ("train.py", "README.md", "edgepack.yaml", "labels.txt", "model.onnx", "calib.npz", "val.npz")
SIZE_BUDGET = 1_500_000
MIN_ACCURACY = 0.9
ATOL = 1e-4


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _run(model: onnx.ModelProto, feed: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {inp.name: feed})))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def train() -> ModuleType:
    """examples/photos/train.py, imported by path (``examples`` is not a package)."""
    spec = importlib.util.spec_from_file_location("photos_train", PHOTOS / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def project() -> dict:
    return yaml.safe_load((PHOTOS / "edgepack.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(PHOTOS / "model.onnx")


@pytest.fixture(scope="module")
def val() -> dict[str, np.ndarray]:
    with np.load(PHOTOS / "val.npz") as f:
        return dict(f)


@pytest.fixture(scope="module")
def calib() -> dict[str, np.ndarray]:
    with np.load(PHOTOS / "calib.npz") as f:
        return dict(f)


@pytest.fixture(scope="module")
def spec(project):
    """The preprocessing exactly as the project file declares it."""
    return preprocess_from_dict({"kind": "image", **project["input"]["image"]})


@pytest.fixture(scope="module")
def folded(model, spec, project):
    """Declared preprocessing embedded in front of the model, then normalization folded."""
    embedded = embed_preprocessing(model, spec, raw_input_name=project["input"]["name"])
    return embedded, try_fold_normalization(embedded)


@pytest.fixture(scope="module")
def photos(train) -> list[np.ndarray]:
    return train.load_photos()


# --------------------------------------------------------------------------- model and project file


def test_model_is_valid_with_expected_io(model):
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17)}
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, _dims(inp), inp.type.tensor_type.elem_type) == ("input", ["N", 3, 32, 32], TensorProto.FLOAT)
    assert (out.name, _dims(out), out.type.tensor_type.elem_type) == ("logits", ["N", 6], TensorProto.FLOAT)
    assert {n.op_type for n in model.graph.node} <= {
        "Conv", "Relu", "MaxPool", "GlobalMaxPool", "Flatten", "Gemm"}
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert first_conv.input[0] == "input"
    pads = next(a.ints for a in first_conv.attribute if a.name == "pads")
    assert list(pads) == [1, 1, 1, 1]  # so folding must rebuild the border


def test_project_file_validates(project):
    assert validate_project(project) == []
    assert project["name"] == "photos" and project["version"] == "1.0.0"
    assert project["model"] == {"kind": "onnx", "path": "model.onnx"}
    assert project["input"]["name"] == "image" and project["input"]["fold_normalization"] is True
    assert project["output"]["softmax"] is True and project["output"]["top_k"] == 3
    assert project["data"]["calibration"] == {"path": "calib.npz", "key": "raw"}
    assert project["data"]["validation"] == {"path": "val.npz", "key": "raw", "labels": "labels"}
    assert {t["device"]: t["variants"] for t in project["targets"]} == {
        "rpi5": ["fp32", "int8"], "x86-gateway": ["fp32", "int8"]}
    assert project["quantization"]["per_channel"] is True
    assert project["gates"]["max_accuracy_drop"] == 0.02
    assert project["signing"]["key"] == "keys/photos.key"
    assert project["output_dir"] == "dist"
    for key in ("model", "data"):
        paths = [project["model"]["path"]] if key == "model" else [r["path"] for r in project["data"].values()
                                                                    if isinstance(r, dict)]
        for rel in paths:
            assert (PHOTOS / rel).is_file(), rel


def test_declared_spec_is_the_training_spec(spec, train):
    # Training computed its features with train.SPEC; the device will run the declared one.
    assert spec.validate() == []
    assert spec == train.SPEC
    assert (spec.resize_shorter, spec.center_crop, spec.layout) == (36, (32, 32), "NCHW")
    assert np.float32(spec.scale) == np.float32(1 / 255)


def test_labels_agree(project, train):
    lines = (PHOTOS / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert lines == list(train.CLASSES) == project["output"]["labels"]
    assert len(lines) == 6


def test_files_fit_the_size_budget():
    for name in COMMITTED:
        assert (PHOTOS / name).is_file(), name
    # Everything that would be committed: keys/, dist/ and caches are git-ignored.
    ignored = {"keys", "dist", "__pycache__"}
    sizes = {str(p.relative_to(PHOTOS)): p.stat().st_size for p in PHOTOS.rglob("*")
             if p.is_file() and not ignored & set(p.relative_to(PHOTOS).parts)}
    assert sum(sizes.values()) < SIZE_BUDGET, sizes


# --------------------------------------------------------------------------- data files


@pytest.mark.parametrize("name, count", [("calib", 102), ("val", 198)])
def test_data_layout(name, count, calib, val, train):
    data = {"calib": calib, "val": val}[name]
    raw, labels, boxes = data["raw"], data["labels"], data["boxes"]
    assert raw.dtype == np.uint8 and raw.shape == (count, *train.RAW_SIZE, 3)
    assert raw.shape[1] != raw.shape[2]  # non-square: resize_shorter and the crop both work
    assert labels.dtype == np.int64 and labels.shape == (count,)
    assert np.bincount(labels, minlength=6).tolist() == [count // 6] * 6
    assert boxes.dtype == np.int64 and boxes.shape == (count, 4)
    assert raw.std() > 20  # real photo content, not blank frames


def test_val_is_held_out_and_calib_is_not(calib, val, photos, train):
    for label, box in zip(val["labels"], val["boxes"]):
        tiles = train.heldout_boxes(photos[label].shape)
        assert any(train.inside(tuple(box), t) for t in tiles), box
    for label, box in zip(calib["labels"], calib["boxes"]):
        tiles = train.heldout_boxes(photos[label].shape)
        assert not any(train.overlaps(tuple(box), t) for t in tiles), box
    # No val frame shares a single photo pixel with a calib frame.
    for vl, vb in zip(val["labels"], val["boxes"]):
        for cl, cb in zip(calib["labels"], calib["boxes"]):
            assert vl != cl or not train.overlaps(tuple(vb), tuple(cb))


def test_training_boxes_avoid_held_out_tiles(photos, train):
    rng = np.random.default_rng(123)
    for photo in photos:
        tiles = train.heldout_boxes(photo.shape)
        for _ in range(300):
            box = train.sample_train_box(rng, photo.shape)
            assert not any(train.overlaps(box, t) for t in tiles)
            assert 0 <= box[0] < box[2] <= photo.shape[0] and 0 <= box[1] < box[3] <= photo.shape[1]


@pytest.mark.parametrize("name", ["calib", "val"])
def test_raw_frames_are_the_stored_boxes(name, calib, val, photos, train):
    # The boxes are the evidence for the split, so they must be what the frames show.
    data = {"calib": calib, "val": val}[name]
    for raw, label, box in zip(data["raw"], data["labels"], data["boxes"]):
        np.testing.assert_array_equal(raw, train.render(photos[label], tuple(box), train.RAW_SIZE))


# --------------------------------------------------------------------------- embedded preprocessing


def test_folding_removes_normalization_before_first_conv(folded):
    embedded, result = folded
    assert result.folded, result.reason
    assert "Conv 'conv1'" in result.reason
    onnx.checker.check_model(result.model, full_check=True)

    def float_affine_before_first_conv(m: onnx.ModelProto) -> list[str]:
        float_consts = {i.name for i in m.graph.initializer if i.data_type == TensorProto.FLOAT}
        producers = {out: n for n in m.graph.node for out in n.output}
        conv = next(n for n in m.graph.node if n.op_type == "Conv")
        found, stack, seen = [], [conv.input[0]], set()
        while stack:
            node = producers.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            # int64 Mul/Sub/Div compute the resize/crop sizes; float constants are normalization.
            if node.op_type in ("Mul", "Sub", "Div", "Add") and float_consts & set(node.input):
                found.append(node.op_type)
            stack.extend(node.input)
        return sorted(found)

    assert float_affine_before_first_conv(embedded) == ["Div", "Mul", "Sub"]
    assert float_affine_before_first_conv(result.model) == []
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    assert list(next(a.ints for a in conv.attribute if a.name == "pads")) == [0, 0, 0, 0]
    assert "Pad" in {n.op_type for n in result.model.graph.node}  # the border, in raw units


def test_embedded_graph_takes_raw_uint8(folded, project):
    (inp,) = folded[1].model.graph.input
    assert inp.name == project["input"]["name"]
    assert inp.type.tensor_type.elem_type == TensorProto.UINT8
    assert _dims(inp)[1:] == ["height", "width", 3]


@pytest.mark.parametrize("name", ["val", "calib"])
def test_raw_through_folded_graph_matches_reference(name, folded, model, spec, calib, val):
    data = {"calib": calib, "val": val}[name]
    raw, labels = data["raw"], data["labels"]
    reference = _run(model, apply_reference(spec, raw))["logits"]
    for graph in folded[0], folded[1].model:
        logits = _run(graph, raw)["logits"]
        np.testing.assert_allclose(logits, reference, rtol=0, atol=ATOL)
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    reference_accuracy = float((reference.argmax(axis=1) == labels).mean())
    assert accuracy == reference_accuracy
    assert accuracy >= MIN_ACCURACY, (name, accuracy)


def test_numpy_trainer_matches_onnx(model, spec, val, train):
    # The exported graph computes the trained function (NHWC trainer vs NCHW graph).
    params = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    x = apply_reference(spec, val["raw"][:32])
    np.testing.assert_allclose(train.forward(params, x)[0], _run(model, x)["logits"], rtol=0, atol=ATOL)


def test_any_raw_size_matches_reference(folded, model, spec, photos, train):
    # Devices may send other frame sizes and aspects; the embedded resize/crop handle them.
    rng = np.random.default_rng(7)
    for height, width in [(32, 32), (48, 64), (75, 100), (120, 40), (33, 200), (160, 160)]:
        label = int(rng.integers(len(photos)))
        photo = photos[label]
        y0 = int(rng.integers(0, photo.shape[0] - height + 1))
        x0 = int(rng.integers(0, photo.shape[1] - width + 1))
        raw = np.ascontiguousarray(photo[None, y0:y0 + height, x0:x0 + width])
        expected = _run(model, apply_reference(spec, raw))["logits"]
        got = _run(folded[1].model, raw)["logits"]
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL, err_msg=f"{height}x{width}")


def test_declared_post_processing(model, spec, project, val):
    out = project["output"]
    post = Postprocess(softmax=out["softmax"], top_k=out["top_k"], labels=tuple(out["labels"]))
    full = try_fold_normalization(embed_preprocessing(model, spec, post, raw_input_name=project["input"]["name"]))
    assert full.folded
    got = _run(full.model, val["raw"])
    expected = postprocess_reference(post, _run(model, apply_reference(spec, val["raw"]))["logits"])
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=0, atol=ATOL)
    # Top-1 must agree; lower ranks may swap only on (near-)ties.
    np.testing.assert_array_equal(got["top_k_indices"][:, 0], expected["top_k_indices"][:, 0])
    accuracy = float((got["top_k_indices"][:, 0] == val["labels"]).mean())
    assert accuracy >= MIN_ACCURACY


# --------------------------------------------------------------------------- regeneration


@pytest.mark.slow
def test_train_script_is_deterministic_and_data_matches_commit(tmp_path):
    # A short training run keeps this cheap; calib/val/labels do not depend on the
    # training length or on floating point, so they must equal the committed files.
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        subprocess.run([sys.executable, str(PHOTOS / "train.py"), "--out-dir", str(out),
                        "--per-class", "100", "--epochs", "1"],
                       check=True, capture_output=True, text=True, timeout=300)
        outputs.append({f: (out / f).read_bytes() for f in ("model.onnx", "calib.npz", "val.npz", "labels.txt")})
    assert outputs[0] == outputs[1]
    for f in ("calib.npz", "val.npz", "labels.txt"):
        assert outputs[0][f] == (PHOTOS / f).read_bytes(), f
