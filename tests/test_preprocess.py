"""Embedded preprocessing: ONNX graph vs numpy reference, folding, post-processing, errors.

Models are built with onnx.helper so every test knows exactly what the graph holds;
images are real photographs (scikit-image, scikit-learn samples), not noise, so
resize and color paths see real edges and gradients.
"""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import ConfigError, DataError, ModelError
from edgepack.preprocess import (
    METADATA_LABELS,
    METADATA_PREPROCESS,
    Column,
    ColumnPlan,
    ImagePreprocess,
    Postprocess,
    TabularPreprocess,
    apply_reference,
    check_raw_input,
    embed_preprocessing,
    fit_tabular,
    fold_normalization,
    labels_for,
    postprocess_reference,
    preprocess_from_dict,
    try_fold_normalization,
)

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
NORMALIZATION_OPS = {"Mul", "Div", "Sub", "Add"}
GRAPH_VS_REFERENCE_TOL = 1e-5
FOLD_TOL = 1e-4


# --------------------------------------------------------------------------- data


@cache
def _images() -> dict[str, np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    samples = load_sample_images()
    images = {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "china": samples.images[0],
        "flower": samples.images[1],
    }
    coffee = images["coffee"]
    images["odd_37x53"] = np.ascontiguousarray(coffee[101:138, 203:256])
    images["tiny_3x3"] = np.ascontiguousarray(coffee[200:203, 300:303])
    images["wide_17x91"] = np.ascontiguousarray(images["astronaut"][50:67, 100:191])
    return images


def rgb(name: str) -> np.ndarray:
    return _images()[name][None]


@cache
def _camera() -> np.ndarray:
    from skimage import data

    return data.camera()


def gray(crop: tuple[slice, slice] = (slice(None), slice(None))) -> np.ndarray:
    return np.ascontiguousarray(_camera()[crop])[None, :, :, None]


# --------------------------------------------------------------------------- models


def _model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def identity_model(shape, opset=17) -> onnx.ModelProto:
    """Returns its input, so the graph output IS the preprocessing output."""
    return _model([helper.make_node("Identity", ["input"], ["features"], name="identity")],
                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                  [helper.make_tensor_value_info("features", TensorProto.FLOAT, shape)], opset=opset)


def conv_model(channels=3, hw=(32, 32), layout="NCHW", pads=1, group=1, out_channels=6, auto_pad=None,
               opset=17, seed=0, head=True) -> onnx.ModelProto:
    """Conv (+ optional NHWC->NCHW Transpose) -> Relu -> global average -> Gemm logits."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 0.5, size=(out_channels, channels // group, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 0.1, size=out_channels).astype(np.float32)
    fc = rng.normal(0, 0.5, size=(out_channels, 5)).astype(np.float32)
    shape = ["N", channels, *hw] if layout == "NCHW" else ["N", *hw, channels]
    nodes, x = [], "input"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2], name="model_transpose"))
        x = "nchw"
    conv_attrs = {"auto_pad": auto_pad} if auto_pad else {"pads": [pads] * 4}
    nodes += [
        helper.make_node("Conv", [x, "conv_w", "conv_b"], ["conv"], name="conv", group=group, **conv_attrs),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc"),
    ]
    inits = [numpy_helper.from_array(weights, "conv_w"), numpy_helper.from_array(bias, "conv_b"),
             numpy_helper.from_array(fc, "fc_w"), numpy_helper.from_array(np.zeros(5, np.float32), "fc_b")]
    if not head:
        return _model(nodes[: len(nodes) - 4], [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                      [helper.make_tensor_value_info("conv", TensorProto.FLOAT, ["N", out_channels, "oh", "ow"])],
                      inits[:2], opset)
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits, opset)


def conv_map_model(**kwargs) -> onnx.ModelProto:
    """Same Conv but its full feature map is the output, so border pixels are visible."""
    return conv_model(head=False, **kwargs)


def linear_model(features, classes=4, op="Gemm", seed=1) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 0.5, size=(features, classes)).astype(np.float32)
    bias = rng.normal(0, 0.1, size=classes).astype(np.float32)
    if op == "Gemm":
        nodes = [helper.make_node("Gemm", ["input", "w", "b"], ["logits"], name="fc", alpha=0.5, beta=2.0)]
    else:
        nodes = [helper.make_node("MatMul", ["input", "w"], ["mm"], name="fc"),
                 helper.make_node("Add", ["mm", "b"], ["logits"], name="fc_bias")]
    inits = [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")]
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", features])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)


def run(model: onnx.ModelProto, raw: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: raw})))


def ops_before(model: onnx.ModelProto, op_types: tuple[str, ...]) -> list[str]:
    """Op types of the float-valued nodes ahead of the first ``op_types`` node that is not
    preprocessing; int64 shape arithmetic (resize sizes, crop offsets) is not normalization."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    out = []
    for node in model.graph.node:
        if node.op_type in op_types and not node.name.startswith("pre/"):
            return out
        if types.get(node.output[0]) == TensorProto.FLOAT:
            out.append(node.op_type)
    raise AssertionError(f"no {op_types} in graph")


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


# --------------------------------------------------------------------------- image: graph vs reference

IMAGE_SPECS = {
    "resize_imagenet_nchw": ImagePreprocess(resize=(224, 224), **IMAGENET),
    "shorter_crop_bgr_nhwc": ImagePreprocess(model_color="bgr", resize_shorter=64, center_crop=(56, 56),
                                             layout="NHWC", **IMAGENET),
    "gray_resize_nchw": ImagePreprocess(model_color="gray", resize=(40, 30), mean=(0.5,), std=(0.25,)),
    "dynamic_bgr_nhwc": ImagePreprocess(color="bgr", model_color="rgb", scale=1.0, mean=(100.0, 110, 120),
                                        std=(50.0,), layout="NHWC"),
    "shorter_only_nchw": ImagePreprocess(resize_shorter=33, **IMAGENET),
    "crop_only_nchw": ImagePreprocess(center_crop=(3, 3), min_size=(3, 3), **IMAGENET),
}


def _image_model_shape(pre: ImagePreprocess):
    size = pre.static_output_size
    h, w = size if size else ("h", "w")
    return ["N", pre.model_channels, h, w] if pre.layout == "NCHW" else ["N", h, w, pre.model_channels]


@pytest.mark.parametrize("spec_name", sorted(IMAGE_SPECS))
def test_image_graph_matches_reference_on_real_images(spec_name):
    pre = IMAGE_SPECS[spec_name]
    model = embed_preprocessing(identity_model(_image_model_shape(pre)), pre)
    for name in _images():
        raw = rgb(name)
        if pre.color == "bgr":
            raw = np.ascontiguousarray(raw[..., ::-1])
        got = run(model, raw)["features"]
        want = apply_reference(pre, raw)
        h, w = raw.shape[1:3]
        out_h, out_w = pre.output_size(h, w)
        expected_shape = (1, pre.model_channels, out_h, out_w) if pre.layout == "NCHW" else (1, out_h, out_w,
                                                                                           pre.model_channels)
        assert got.shape == expected_shape, (name, got.shape)
        assert max_err(got, want) <= GRAPH_VS_REFERENCE_TOL, (spec_name, name)


@pytest.mark.parametrize("model_color", ["gray", "rgb", "bgr"])
def test_gray_camera_graph_matches_reference(model_color):
    pre = ImagePreprocess(color="gray", model_color=model_color, resize=(100, 80), mean=(0.45,), std=(0.2,))
    model = embed_preprocessing(identity_model(_image_model_shape(pre)), pre)
    for raw in (gray(), gray((slice(10, 47), slice(20, 73)))):
        got = run(model, raw)["features"]
        assert got.shape == (1, pre.model_channels, 100, 80)
        assert max_err(got, apply_reference(pre, raw)) <= GRAPH_VS_REFERENCE_TOL
    if model_color != "gray":  # a repeated gray channel is identical in all three
        assert np.array_equal(got[:, 0], got[:, 2])


def test_color_conversions_mean_what_they_say():
    raw = rgb("chelsea")
    base = dict(scale=1.0, layout="NHWC")
    as_rgb = apply_reference(ImagePreprocess(**base), raw)
    as_bgr = apply_reference(ImagePreprocess(model_color="bgr", **base), raw)
    as_gray = apply_reference(ImagePreprocess(model_color="gray", **base), raw)
    assert np.array_equal(as_bgr, as_rgb[..., ::-1])
    luma = raw[..., 0] * 0.299 + raw[..., 1] * 0.587 + raw[..., 2] * 0.114
    assert np.max(np.abs(as_gray[..., 0] - luma)) < 1e-3
    from_bgr = apply_reference(ImagePreprocess(color="bgr", model_color="gray", **base), raw[..., ::-1].copy())
    assert max_err(from_bgr, as_gray) < 1e-4


def test_batch_of_two_real_images():
    pre = ImagePreprocess(resize_shorter=64, center_crop=(64, 64), **IMAGENET)
    raw = np.stack([_images()["china"], _images()["flower"]])
    got = run(embed_preprocessing(identity_model(_image_model_shape(pre)), pre), raw)["features"]
    assert got.shape == (2, 3, 64, 64)
    assert max_err(got, apply_reference(pre, raw)) <= GRAPH_VS_REFERENCE_TOL


def test_resize_is_plain_bilinear_half_pixel():
    # 2x upsampling of a ramp with half_pixel centers: interior values are exact averages.
    raw = np.tile(np.array([0, 40, 80, 120], np.uint8), (4, 1))[None, :, :, None]
    pre = ImagePreprocess(color="gray", model_color="gray", resize=(8, 8), scale=1.0, layout="NHWC")
    row = apply_reference(pre, raw)[0, 0, :, 0]
    assert np.allclose(row, [0, 10, 30, 50, 70, 90, 110, 120])
    got = run(embed_preprocessing(identity_model(_image_model_shape(pre)), pre), raw)["features"]
    assert np.allclose(got[0, 0, :, 0], row)


def test_resize_shorter_keeps_aspect_and_crop_is_centered():
    pre = ImagePreprocess(resize_shorter=256, center_crop=(224, 224))
    assert pre.resized_size(300, 451) == (256, 384)  # floor(451 * 256 / 300) = 384
    assert pre.resized_size(640, 427) == (383, 256)
    raw = np.arange(6 * 8, dtype=np.uint8).reshape(1, 6, 8, 1)
    crop = ImagePreprocess(color="gray", model_color="gray", center_crop=(3, 4), min_size=(3, 4), scale=1.0)
    assert np.array_equal(apply_reference(crop, raw)[0, 0], raw[0, 1:4, 2:6, 0].astype(np.float32))


# --------------------------------------------------------------------------- raw input checks


def test_one_pixel_image_rejected_with_clear_error():
    pre = ImagePreprocess(resize=(224, 224))
    with pytest.raises(DataError, match=r"1x1 pixels .* from 2x2 to 4096x4096"):
        check_raw_input(pre, np.zeros((1, 1, 1, 3), np.uint8))
    with pytest.raises(DataError, match="1x1"):
        apply_reference(pre, np.zeros((1, 1, 1, 3), np.uint8))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (np.zeros((1, 600, 10, 3), np.uint8), r"600x10 pixels .* to 512x512"),
        (np.zeros((1, 8, 8, 3), np.float32), "dtype float32"),
        (np.zeros((8, 8, 3), np.uint8), r"raw\[None\]"),
        (np.zeros((1, 8, 8, 4), np.uint8), "4 channel"),
        (np.zeros((1, 3, 8, 8), np.uint8), "channels-first"),
        (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
        ([[1, 2]], "numpy array"),
    ],
)
def test_bad_raw_images_rejected(raw, message):
    pre = ImagePreprocess(resize=(16, 16), max_size=(512, 512))
    with pytest.raises(DataError, match=message):
        check_raw_input(pre, raw)


def test_gray_image_without_axes_gets_a_hint():
    with pytest.raises(DataError, match=r"raw\[None, :, :, None\]"):
        check_raw_input(ImagePreprocess(color="gray", model_color="gray"), _camera())
    check_raw_input(ImagePreprocess(color="gray", model_color="gray"), gray())


# --------------------------------------------------------------------------- spec validation


def test_validate_lists_every_problem():
    bad = ImagePreprocess(resize=(224, 224), resize_shorter=256, min_size=(1, 1), std=(0.0, 1.0), color="rgba",
                          layout="CHW")
    problems = bad.validate(raise_errors=False)
    assert len(problems) >= 5
    with pytest.raises(ConfigError) as info:
        bad.validate()
    for fragment in ("mutually exclusive", "min_size", "std must not contain 0", "rgba", "CHW"):
        assert fragment in str(info.value)
    assert ImagePreprocess(**IMAGENET).validate() == []


def test_crop_must_fit_the_guaranteed_size():
    assert "min_size" in " ".join(ImagePreprocess(center_crop=(224, 224)).validate(raise_errors=False))
    assert ImagePreprocess(resize_shorter=100, center_crop=(101, 50)).validate(raise_errors=False)
    assert ImagePreprocess(resize_shorter=100, center_crop=(100, 100)).validate() == []


def test_tabular_validation_and_round_trip():
    bad = TabularPreprocess(raw_columns=("a", "a", "b"), columns=(
        Column("a", "categorical", scaling="standard", categories=(1.0, 1.0)),
        Column("zz"),
        Column("b", scaling="minmax", min=2.0, max=2.0),
    ))
    text = " ".join(bad.validate(raise_errors=False))
    for fragment in ("unique", "set scaling to none", "distinct", "'zz' is not among", "max > min"):
        assert fragment in text
    good = TabularPreprocess(("x", "y"), (Column("y", impute=0.0, scaling="standard", mean=1.0, std=2.0),
                                          Column("x", "categorical", categories=(0.0, 1.0))))
    again = preprocess_from_dict(json.loads(json.dumps(good.to_dict())))
    assert again == good
    image = ImagePreprocess(resize=(8, 8), **IMAGENET)
    assert preprocess_from_dict(json.loads(json.dumps(image.to_dict()))) == image
    with pytest.raises(ConfigError, match="Unknown key"):
        preprocess_from_dict({"kind": "image", "size": 3})


# --------------------------------------------------------------------------- tabular


def _tiny_tabular() -> tuple[TabularPreprocess, np.ndarray, np.ndarray]:
    pre = TabularPreprocess(
        raw_columns=("age", "city", "income", "unused"),
        columns=(  # model order differs from raw order
            Column("income", impute=50.0, scaling="minmax", min=0.0, max=100.0),
            Column("city", "categorical", impute=2.0, categories=(1.0, 2.0, 3.0)),
            Column("age", impute=None, scaling="standard", mean=40.0, std=10.0),
        ),
    )
    nan = np.nan
    raw = np.array([
        [30.0, 1.0, 25.0, nan],
        [50.0, nan, nan, 7.0],   # imputed city (2) and income (50)
        [40.0, 9.0, 100.0, 0.0],  # unseen city -> all-zero one-hot
    ], dtype=np.float32)
    expected = np.array([
        [0.25, 1, 0, 0, -1.0],
        [0.50, 0, 1, 0, 1.0],
        [1.00, 0, 0, 0, 0.0],
    ], dtype=np.float32)
    return pre, raw, expected


def test_tabular_reference_by_hand():
    pre, raw, expected = _tiny_tabular()
    assert pre.n_features == 5
    assert pre.feature_names == ("income", "city=1", "city=2", "city=3", "age")
    assert np.allclose(apply_reference(pre, raw), expected, atol=1e-7)


def test_tabular_graph_matches_reference():
    pre, raw, expected = _tiny_tabular()
    model = embed_preprocessing(identity_model(["N", 5]), pre)
    got = run(model, raw)["features"]
    assert max_err(got, apply_reference(pre, raw)) <= GRAPH_VS_REFERENCE_TOL
    assert np.allclose(got, expected, atol=1e-7)


def _wine_raw():
    from sklearn.datasets import load_wine

    wine = load_wine()
    rng = np.random.default_rng(3)
    X = wine.data.astype(np.float32)
    cls = wine.target.astype(np.float32)[:, None]  # stands in for a categorical input
    X = np.concatenate([X, cls], axis=1)
    X[rng.random(X.shape) < 0.1] = np.nan
    names = (*wine.feature_names, "cultivar")
    return names, X


def test_fit_tabular_on_real_data_graph_matches_reference():
    names, X = _wine_raw()
    plan = [ColumnPlan("proline", scaling="minmax"), ColumnPlan("cultivar", "categorical", categories=(0.0, 1.0)),
            ColumnPlan("alcohol", scaling="standard", impute="median"), "hue", ColumnPlan("ash", impute=0.0)]
    pre = fit_tabular(names, X[:120], plan)
    proline = X[:120, names.index("proline")]
    column = pre.columns[0]
    assert column.min == pytest.approx(np.nanmin(proline)) and column.max == pytest.approx(np.nanmax(proline))
    assert pre.columns[2].std == pytest.approx(np.nanstd(X[:120, 0]), rel=1e-5)
    assert pre.columns[3].impute == pytest.approx(np.nanmean(X[:120, names.index("hue")]), rel=1e-6)
    assert TabularPreprocess.fit(names, X[:120], plan) == pre
    held_out = X[120:]  # contains cultivar 2.0, unseen by the one-hot
    got = run(embed_preprocessing(identity_model(["N", pre.n_features]), pre), held_out)["features"]
    want = apply_reference(pre, held_out)
    assert max_err(got, want) <= GRAPH_VS_REFERENCE_TOL
    unseen = held_out[:, names.index("cultivar")] == 2.0
    assert unseen.any() and np.all(want[unseen][:, 1:3] == 0)
    assert not np.isnan(want).any()


def test_tabular_nan_without_impute_rejected():
    pre, raw, _ = _tiny_tabular()
    raw[2, 0] = np.nan
    with pytest.raises(DataError, match=r"'age' is missing \(NaN\) in row\(s\) 2"):
        check_raw_input(pre, raw)
    raw[2, 0] = 1.0
    raw[0, 3] = np.inf  # unused column: ignored
    check_raw_input(pre, raw)
    with pytest.raises(DataError, match="float32"):
        check_raw_input(pre, raw.astype(np.float64))
    with pytest.raises(DataError, match=r"\[N, 4\]"):
        check_raw_input(pre, raw[:, :3])


# --------------------------------------------------------------------------- embedding structure


def test_embedded_graph_structure():
    pre = ImagePreprocess(resize_shorter=40, center_crop=(32, 32), **IMAGENET)
    original = conv_model(opset=13)
    full = embed_preprocessing(original, pre, Postprocess(softmax=True, top_k=2, labels=tuple("abcde")))
    graph = full.graph
    assert [i.name for i in graph.input] == ["raw"]
    raw_type = graph.input[0].type.tensor_type
    assert raw_type.elem_type == TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in raw_type.shape.dim] == ["N", "height", "width", 3]
    assert [o.name for o in graph.output] == ["scores", "top_k_indices", "top_k_scores"]
    assert full.opset_import[0].version == 13
    by_name = {n.name: n for n in graph.node}
    for node in original.graph.node:  # nothing original renamed or rewired
        assert by_name[node.name] == node
    new = [n for n in graph.node if n.name not in {m.name for m in original.graph.node}]
    assert all(n.name.startswith(("pre/", "post/")) for n in new)
    assert len({n.name for n in graph.node}) == len(graph.node)
    meta = {p.key: p.value for p in full.metadata_props}
    assert preprocess_from_dict(json.loads(meta[METADATA_PREPROCESS])) == pre
    assert json.loads(meta[METADATA_LABELS]) == list("abcde")
    onnx.checker.check_model(full, full_check=True)


def test_old_opset_refused():
    with pytest.raises(ModelError, match="opset 11.*opset 13 or newer.*re-export"):
        embed_preprocessing(conv_model(opset=11), ImagePreprocess(resize=(32, 32)))


@pytest.mark.parametrize(
    ("model", "pre", "fragments"),
    [
        (conv_model(channels=3, hw=(32, 32)), ImagePreprocess(resize=(28, 28)), ["[N, 3, 32, 32]", "[N, 3, 28, 28]"]),
        (conv_model(channels=3), ImagePreprocess(model_color="gray", resize=(32, 32)), ["3 channels vs 1"]),
        (conv_model(layout="NCHW"), ImagePreprocess(resize=(32, 32), layout="NHWC"), ["other layout"]),
        (conv_model(), ImagePreprocess(**IMAGENET), ["fixed height 32", "add resize or center_crop"]),
        (linear_model(6), TabularPreprocess(("a",), (Column("a", "categorical", categories=(1.0, 2.0)),)),
         ["[N, 6] float32", "[N, 2] float32"]),
        (identity_model(["N", 3, 32, 32]), TabularPreprocess(("a",), (Column("a"),)), ["[N, 1] float32"]),
    ],
)
def test_mismatch_names_both_sides(model, pre, fragments):
    with pytest.raises(ConfigError) as info:
        embed_preprocessing(model, pre)
    message = str(info.value)
    assert "model input 'input' expects" in message and "preprocessing produces" in message
    for fragment in fragments:
        assert fragment in message


def test_model_side_problems_refused():
    two_inputs = _model([helper.make_node("Add", ["a", "b"], ["c"], name="add")],
                        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 2]) for n in "ab"],
                        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 2])])
    with pytest.raises(ModelError, match="exactly one model input.*'a', 'b'"):
        embed_preprocessing(two_inputs, TabularPreprocess(("x", "y"), (Column("x"), Column("y"))))
    ints = _model([helper.make_node("Identity", ["input"], ["out"], name="id")],
                  [helper.make_tensor_value_info("input", TensorProto.INT64, ["N", 2])],
                  [helper.make_tensor_value_info("out", TensorProto.INT64, ["N", 2])])
    with pytest.raises(ModelError, match="int64 but the tabular preprocessing produces"):
        embed_preprocessing(ints, TabularPreprocess(("x", "y"), (Column("x"), Column("y"))))
    with pytest.raises(ConfigError, match="mutually exclusive"):
        embed_preprocessing(conv_model(), ImagePreprocess(resize=(32, 32), resize_shorter=32))


# --------------------------------------------------------------------------- folding


def _fold_spec(layout="NCHW", **overrides) -> ImagePreprocess:
    kwargs = dict(resize_shorter=36, center_crop=(32, 32), layout=layout, **IMAGENET)
    kwargs.update(overrides)
    return ImagePreprocess(**kwargs)


@pytest.mark.parametrize(
    ("layout", "pads", "group"),
    [("NCHW", 1, 1), ("NHWC", 1, 1), ("NCHW", 0, 1), ("NCHW", 1, 3)],
)
def test_fold_into_conv_is_exact_on_real_images(layout, pads, group):
    pre = _fold_spec(layout)
    full = embed_preprocessing(conv_map_model(layout=layout, pads=pads, group=group, out_channels=6), pre)
    assert {"Mul", "Sub", "Div"} <= set(ops_before(full, ("Conv",)))
    result = try_fold_normalization(full)
    assert result.folded, result.reason
    assert not NORMALIZATION_OPS & set(ops_before(result.model, ("Conv",)))
    assert ("Pad" in ops_before(result.model, ("Conv",))) == bool(pads)
    for name in ("astronaut", "chelsea", "odd_37x53", "flower"):
        want, got = run(full, rgb(name))["conv"], run(result.model, rgb(name))["conv"]
        assert max_err(got, want) <= FOLD_TOL, name
        # Borders explicitly: the first/last rows and columns are where zero padding lives.
        for edge in (np.s_[..., 0, :], np.s_[..., -1, :], np.s_[..., :, 0], np.s_[..., :, -1]):
            assert max_err(got[edge], want[edge]) <= FOLD_TOL


def test_naive_fold_would_be_wrong_at_the_border():
    """Control: folding but keeping the Conv's zero padding breaks exactly the borders,
    so the exactness test above is sensitive to them."""
    pre = _fold_spec()
    full = embed_preprocessing(conv_map_model(pads=1), pre)
    folded = fold_normalization(full)
    naive = onnx.ModelProto()
    naive.CopyFrom(folded)
    pad_nodes = [n for n in naive.graph.node if n.name.startswith("pre/fold/")]
    conv = next(n for n in naive.graph.node if n.op_type == "Conv")
    first_slice = next(n for n in pad_nodes if n.op_type == "Slice")
    conv.input[0] = first_slice.input[0]
    for node in pad_nodes:
        naive.graph.node.remove(node)
    del conv.attribute[:]
    conv.attribute.extend([helper.make_attribute("pads", [1, 1, 1, 1]), helper.make_attribute("group", 1)])
    raw = rgb("coffee")
    want, bad = run(full, raw)["conv"], run(naive, raw)["conv"]
    assert max_err(bad[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1]) <= FOLD_TOL
    assert max_err(bad, want) > 0.1


def test_fold_single_mean_uses_one_pad_and_gray():
    pre = ImagePreprocess(color="gray", model_color="gray", resize=(32, 32), mean=(0.5,), std=(0.25,))
    full = embed_preprocessing(conv_map_model(channels=1), pre)
    result = try_fold_normalization(full)
    assert result.folded
    before = ops_before(result.model, ("Conv",))
    assert before.count("Pad") == 1 and "Concat" not in before and not NORMALIZATION_OPS & set(before)
    raw = gray()
    assert max_err(run(result.model, raw)["conv"], run(full, raw)["conv"]) <= FOLD_TOL


@pytest.mark.parametrize("opset", [13, 21])
def test_fold_full_classifier_with_postprocessing(opset):
    pre = _fold_spec()
    post = Postprocess(softmax=True, top_k=3)
    full = embed_preprocessing(conv_model(opset=opset), pre, post)
    assert full.opset_import[0].version == opset
    folded = fold_normalization(full)
    for name in ("china", "coffee"):
        want, got = run(full, rgb(name)), run(folded, rgb(name))
        assert max_err(got["scores"], want["scores"]) <= FOLD_TOL
        assert np.array_equal(got["top_k_indices"], want["top_k_indices"])


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_fold_tabular_into_linear(op):
    names, X = _wine_raw()
    pre = fit_tabular(names, X, [ColumnPlan(n, scaling="standard") for n in names[:6]]
                      + [ColumnPlan("cultivar", "categorical")])
    full = embed_preprocessing(linear_model(pre.n_features, op=op), pre)
    result = try_fold_normalization(full)
    assert result.folded, result.reason
    assert not NORMALIZATION_OPS & set(ops_before(result.model, (op,)))
    assert max_err(run(result.model, X)["logits"], run(full, X)["logits"]) <= FOLD_TOL


def test_fold_refuses_same_padding_and_leaves_graph_unchanged():
    pre = ImagePreprocess(resize=(32, 32), **IMAGENET)
    full = embed_preprocessing(conv_model(auto_pad="SAME_UPPER"), pre)
    result = try_fold_normalization(full)
    assert not result.folded and "auto_pad=SAME_UPPER" in result.reason
    assert result.model.SerializeToString() == full.SerializeToString()


def test_fold_without_normalization_is_a_no_op():
    pre = ImagePreprocess(resize=(32, 32), scale=1.0)
    result = try_fold_normalization(embed_preprocessing(conv_model(), pre))
    assert not result.folded and "nothing to fold" in result.reason


# --------------------------------------------------------------------------- post-processing


def test_postprocess_graph_matches_reference_with_labels():
    labels = ("cat", "dog", "car", "cup", "sky")
    post = Postprocess(softmax=True, top_k=3, labels=labels)
    pre = ImagePreprocess(resize=(32, 32), **IMAGENET)
    model = conv_model()
    full = embed_preprocessing(model, pre, post)
    raw = np.stack([_images()[n][100:200, 150:270] for n in ("astronaut", "chelsea", "coffee")])
    got = run(full, raw)
    logits = run(model, apply_reference(pre, raw))["logits"]
    want = postprocess_reference(post, logits)
    assert max_err(got["scores"], want["scores"]) <= GRAPH_VS_REFERENCE_TOL
    assert np.array_equal(got["top_k_indices"], want["top_k_indices"])
    assert max_err(got["top_k_scores"], want["top_k_scores"]) <= GRAPH_VS_REFERENCE_TOL
    assert got["top_k_indices"].dtype == np.int64
    assert np.array_equal(labels_for(post, got["top_k_indices"]), want["top_k_labels"])
    assert want["top_k_labels"][0, 0] == labels[want["top_k_indices"][0, 0]]


def test_top_k_without_softmax_and_ties():
    post = Postprocess(top_k=2)
    logits = np.array([[1.0, 3.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0]], np.float32)
    pre = TabularPreprocess(tuple("abcd"), tuple(Column(n) for n in "abcd"))
    full = embed_preprocessing(identity_model(["N", 4]), pre, post)
    got = run(full, logits)
    want = postprocess_reference(post, logits)
    assert [o.name for o in full.graph.output] == ["top_k_indices", "top_k_scores"]
    assert np.array_equal(got["top_k_indices"], want["top_k_indices"])
    assert want["top_k_indices"].tolist() == [[1, 2], [0, 1]]  # ties: lower index first
    assert np.array_equal(got["top_k_scores"], want["top_k_scores"])


def test_postprocess_mismatch_refused():
    pre = ImagePreprocess(resize=(32, 32))
    with pytest.raises(ConfigError, match="5 classes but 3 labels"):
        embed_preprocessing(conv_model(), pre, Postprocess(labels=("a", "b", "c")))
    with pytest.raises(ConfigError, match="top_k is 6 .* only 5 classes"):
        embed_preprocessing(conv_model(), pre, Postprocess(top_k=6))
    with pytest.raises(DataError, match="outside the 2 declared labels"):
        labels_for(Postprocess(labels=("a", "b")), np.array([[0, 2]]))
