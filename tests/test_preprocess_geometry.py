"""Preprocessing geometry: keep-ratio + pad, letterbox, interpolation; lists of images on the device.

The embedded ONNX graph (run by onnxruntime) is compared with the numpy reference on
random images of many sizes (odd, 2-pixel, extreme aspect ratios), and with pipelines
written independently here (plain numpy/PIL) so "graph equals reference" cannot hide a
shared mistake. Models are built with onnx.helper; bundles are written with the real
bundle writer and served by the real runtime and daemon.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bundles
from edgepack.errors import ConfigError, ModelError
from edgepack.preprocess import (
    OUTPUT_LETTERBOX,
    ImagePreprocess,
    apply_reference,
    embed_preprocessing,
    letterbox_reference,
    preprocess_from_dict,
    try_fold_normalization,
    unletterbox_boxes,
)

GRAPH_VS_REFERENCE_TOL = 1e-5  # model units (after scale/mean/std); bilinear and nearest measure 0
SIZES = [(2, 2), (3, 997), (997, 3), (31, 7), (7, 301), (48, 192), (47, 193), (100, 100), (33, 900), (480, 64),
         (13, 1999), (97, 389), (2, 640), (641, 5)]
MODES = {
    "keep_ratio_pad": {"keep_ratio_pad": (48, 192)},
    "letterbox": {"letterbox": (64, 80)},
    "resize": {"resize": (40, 24)},
    "resize_shorter": {"resize_shorter": 20, "center_crop": (20, 20)},
}


# --------------------------------------------------------------------------- helpers


def identity_model(c: int, h: int | str, w: int | str, layout: str = "NCHW") -> onnx.ModelProto:
    shape = ["N", c, h, w] if layout == "NCHW" else ["N", h, w, c]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_classifier(c: int = 3, classes: int = 4, seed: int = 0) -> onnx.ModelProto:
    """NCHW float input (any size) -> Conv 3x3 pad 1 -> Relu -> GlobalAveragePool -> [N, classes]."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((classes, c, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(classes).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["logits"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes, "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def embedded(pre: ImagePreprocess, model: onnx.ModelProto | None = None) -> ort.InferenceSession:
    if model is None:
        size = pre.static_output_size
        model = identity_model(pre.model_channels, *(size or ("H", "W")), layout=pre.layout)
    return session(embed_preprocessing(model, pre))


def random_image(rng: np.random.Generator, h: int, w: int, c: int = 3, n: int = 1) -> np.ndarray:
    return rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)


# --------------------------------------------------------------------------- graph == reference


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest", "area"])
@pytest.mark.parametrize("mode", list(MODES))
def test_graph_matches_reference_on_odd_and_extreme_sizes(mode, interpolation):
    pre = ImagePreprocess(**MODES[mode], interpolation=interpolation, max_size=(2000, 2000),
                          pad_value=(114.0,) if mode in ("keep_ratio_pad", "letterbox") else (0.0,),
                          scale=1 / 127.5, mean=(1.0,))
    sess = embedded(pre)
    rng = np.random.default_rng(hash((mode, interpolation)) % 2**32)
    worst = 0.0
    for h, w in SIZES:
        raw = random_image(rng, h, w, n=2)
        outputs = sess.run(None, {"raw": raw})
        reference = apply_reference(pre, raw)
        assert outputs[0].shape == reference.shape, (h, w)
        worst = max(worst, float(np.abs(outputs[0] - reference).max()))
        if mode == "letterbox":
            np.testing.assert_array_equal(outputs[1], letterbox_reference(pre, raw))
    assert worst <= GRAPH_VS_REFERENCE_TOL, f"{mode}/{interpolation}: max abs diff {worst}"


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest", "area"])
def test_per_channel_pad_values_gray_and_layouts_match_reference(layout, interpolation):
    rng = np.random.default_rng(7)
    for color, model_color, pad in (("rgb", "bgr", (10.0, 128.0, 250.5)), ("gray", "gray", (127.5,)),
                                    ("rgb", "gray", (114.0,))):
        for mode in ({"letterbox": (33, 47)}, {"keep_ratio_pad": (16, 80)}):
            pre = ImagePreprocess(color=color, model_color=model_color, layout=layout, interpolation=interpolation,
                                  pad_value=pad, mean=(0.5,), std=(0.25,), **mode)
            sess = embedded(pre)
            for h, w in ((9, 200), (200, 9), (33, 47), (5, 5)):
                raw = random_image(rng, h, w, c=pre.raw_channels)
                out = sess.run(None, {"raw": raw})[0]
                assert np.abs(out - apply_reference(pre, raw)).max() <= GRAPH_VS_REFERENCE_TOL, (color, mode, h, w)


# --------------------------------------------------------------------------- the rules, by independent code


@pytest.mark.parametrize("h, w", [(48, 20), (48, 192), (32, 700), (97, 389), (3, 997), (997, 3), (31, 7)])
def test_keep_ratio_pad_is_paddleocr_height_48_ceil_width_pad_right(h, w):
    pre = ImagePreprocess(keep_ratio_pad=(48, 192), max_size=(2000, 2000), pad_value=(127.5,),
                          scale=1 / 127.5, mean=(1.0,))
    expected_w = max(1, min(192, math.ceil(Fraction(48 * w, h))))
    assert pre.resized_size(h, w) == (48, expected_w)
    raw = np.random.default_rng(1).integers(1, 255, (1, h, w, 3), dtype=np.uint8)
    out = embedded(pre).run(None, {"raw": raw})[0]
    assert out.shape == (1, 3, 48, 192)
    # Padding is exactly the raw pad value (127.5 -> 0 after (x/127.5 - 1)), on the right only.
    assert np.abs(out[..., expected_w:]).max(initial=0.0) <= 1e-6
    assert np.abs(out[..., :expected_w]).max(axis=(0, 1, 2)).min() > 0  # every resized column holds the image


@pytest.mark.parametrize("h, w", [(100, 100), (30, 200), (200, 30), (37, 61), (2, 640), (641, 50)])
def test_letterbox_centres_and_its_transform_maps_a_box_back_to_raw_pixels(h, w):
    """A bright rectangle drawn at a known raw box is found in the model input and mapped back."""
    target = (64, 96)
    pre = ImagePreprocess(letterbox=target, pad_value=(114.0,), scale=1.0, interpolation="nearest",
                          max_size=(700, 700))
    scale = min(Fraction(target[0], h), Fraction(target[1], w))
    nh, nw = (max(1, math.floor(h * scale + Fraction(1, 2))), max(1, math.floor(w * scale + Fraction(1, 2))))
    assert pre.resized_size(h, w) == (nh, nw)
    top, left = (target[0] - nh) // 2, (target[1] - nw) // 2
    raw = np.zeros((1, h, w, 3), np.uint8)
    y1, x1, y2, x2 = h // 4, w // 4, max(h // 4 + 1, 3 * h // 4), max(w // 4 + 1, 3 * w // 4)
    raw[0, y1:y2, x1:x2] = 255
    image, transform = embedded(pre).run(None, {"raw": raw})
    np.testing.assert_array_equal(transform, [[nh, nw, top, left, h, w]])
    band = np.ones((target[0], target[1]), bool)
    band[top:top + nh, left:left + nw] = False
    assert np.all(image[0][:, band] == 114.0), "the letterbox band must hold the pad value"
    ys, xs = np.nonzero(image[0, 0] == 255)
    assert ys.size, "the rectangle must survive the resize at these sizes"
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    back = unletterbox_boxes(found, transform)
    tolerance = np.array([1 / (nw / w), 1 / (nh / h)] * 2) + 1  # one model pixel, in raw pixels
    assert np.all(np.abs(back[0] - [x1, y1, x2, y2]) <= tolerance), (back, (x1, y1, x2, y2))


def test_unletterbox_boxes_is_one_function_on_both_sides_and_handles_batches():
    import edgepack_runtime

    # Rows: resized h, w, pad top, left, raw h, w -> scales (0.5, 0.25) and (2, 2).
    transform = np.array([[100, 100, 10, 3, 200, 400], [60, 80, 0, 8, 30, 40]], np.float32)
    scale_y, scale_x = (transform[:, 0] / transform[:, 4])[:, None, None], (transform[:, 1] / transform[:, 5])[:, None, None]
    raw_boxes = np.array([[[0, 0, 400, 200], [100, 50, 120, 60]], [[1, 2, 3, 4], [0, 0, 40, 30]]], np.float32)
    model_boxes = raw_boxes.copy()
    model_boxes[..., 0::2] = raw_boxes[..., 0::2] * scale_x + transform[:, None, 3:4]
    model_boxes[..., 1::2] = raw_boxes[..., 1::2] * scale_y + transform[:, None, 2:3]
    for fn in (unletterbox_boxes, edgepack_runtime.unletterbox_boxes):
        np.testing.assert_allclose(fn(model_boxes, transform), raw_boxes, atol=1e-4)
        np.testing.assert_allclose(fn(model_boxes[1], transform[1]), raw_boxes[1], atol=1e-4)
    clipped = edgepack_runtime.unletterbox_boxes(np.array([[-50, -50, 1e4, 1e4]]), transform[0])
    np.testing.assert_allclose(clipped, [[0, 0, 400, 200]])
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        edgepack_runtime.unletterbox_boxes(model_boxes, transform[:, :4])
    with pytest.raises(ValueError, match="one transform row per image"):
        edgepack_runtime.unletterbox_boxes(model_boxes[0][:1], transform)


@pytest.mark.parametrize("factor", [(2, 2), (3, 3), (4, 2), (1, 5)])
def test_area_is_the_exact_block_mean_for_integer_factors(factor):
    fy, fx = factor
    raw = np.random.default_rng(3).integers(0, 256, (1, 12 * fy, 10 * fx, 3), dtype=np.uint8)
    pre = ImagePreprocess(resize=(12, 10), interpolation="area", scale=1.0)
    out = embedded(pre).run(None, {"raw": raw})[0]
    blocks = raw[0].astype(np.float64).reshape(12, fy, 10, fx, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    assert np.abs(out[0] - blocks).max() <= 1e-3  # raw units; float32 sums of up to 20 terms


@pytest.mark.parametrize("size", [(7, 9), (13, 5), (29, 31), (40, 60)])
def test_area_for_any_factor_is_a_box_average_that_keeps_the_mean(size):
    """Box averaging (not bilinear sampling): every input pixel contributes by its covered area."""
    raw = np.random.default_rng(4).integers(0, 256, (1, 29, 31, 1), dtype=np.uint8)
    pre = ImagePreprocess(color="gray", model_color="gray", resize=size, interpolation="area", scale=1.0)
    out = embedded(pre).run(None, {"raw": raw})[0]
    assert abs(out.mean() - raw.mean()) <= 1e-3
    # Independent coverage computation in float64 with fractions of pixels.
    def weights(n, m):
        w = np.zeros((m, n))
        for i in range(m):
            lo, hi = Fraction(i * n, m), Fraction((i + 1) * n, m)
            for j in range(n):
                w[i, j] = float(max(Fraction(0), min(hi, j + 1) - max(lo, Fraction(j))) / Fraction(n, m))
        return w
    expected = weights(29, size[0]) @ raw[0, :, :, 0].astype(np.float64) @ weights(31, size[1]).T
    assert np.abs(out[0, 0] - expected).max() <= 1e-3


def test_nearest_takes_floor_of_dst_over_the_float32_ratio():
    rng = np.random.default_rng(5)
    for (h, w), (oh, ow) in (((10, 7), (4, 3)), ((5, 6), (10, 18)), ((31, 29), (17, 40)), ((3, 997), (2, 192))):
        raw = rng.integers(0, 256, (1, h, w, 1), dtype=np.uint8)
        pre = ImagePreprocess(color="gray", model_color="gray", resize=(oh, ow), interpolation="nearest", scale=1.0,
                              max_size=(1000, 1000))
        out = embedded(pre).run(None, {"raw": raw})[0][0, 0]

        def src(n, m):
            return np.minimum(np.floor(np.arange(m, dtype=np.float32) / (np.float32(m) / np.float32(n))).astype(int),
                              n - 1)

        np.testing.assert_array_equal(out, raw[0, :, :, 0][src(h, oh)][:, src(w, ow)].astype(np.float32))
    # An integer upscale is plain pixel repetition.
    raw = rng.integers(0, 256, (1, 4, 5, 1), dtype=np.uint8)
    pre = ImagePreprocess(color="gray", model_color="gray", resize=(8, 15), interpolation="nearest", scale=1.0)
    out = embedded(pre).run(None, {"raw": raw})[0][0, 0]
    np.testing.assert_array_equal(out, np.repeat(np.repeat(raw[0, :, :, 0], 2, axis=0), 3, axis=1))


# --------------------------------------------------------------------------- the motivating bug


def _text_lines() -> list[np.ndarray]:
    """Rendered text lines (DejaVu Sans) of aspect ratios from about 1 to 12, with real glyph edges."""
    from PIL import Image, ImageDraw, ImageFont

    font_path = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    if not font_path.is_file():
        pytest.skip("DejaVu fonts are not installed")
    lines = []
    for k, text in enumerate(["Hi", "ok 42", "edge", "OCR line", "keep ratio", "pad to width 192",
                              "a much longer text line for the classifier", "0123456789 abcdef"]):
        size = 18 + 5 * (k % 4)
        font = ImageFont.truetype(str(font_path), size)
        left, top, right, bottom = font.getbbox(text)
        canvas = Image.new("RGB", (right - left + 8, bottom - top + 8), (235, 230, 220))
        ImageDraw.Draw(canvas).text((4 - left, 4 - top), text, font=font, fill=(20, 30, 60 + 20 * k))
        lines.append(np.asarray(canvas))
        # The same line turned 180 degrees (what a direction classifier sees).
        lines.append(np.ascontiguousarray(np.asarray(canvas)[::-1, ::-1]))
    return lines


def _paddle_cls_reference(image: np.ndarray, height: int = 48, width: int = 192) -> np.ndarray:
    """PaddleOCR's ClsResizeImg/resize_norm_img, written out with cv2.INTER_LINEAR's arithmetic in float64.

    ratio = W / H; resized_w = min(width, ceil(height * ratio)); bilinear resize
    (half-pixel centres, clamped, no antialias); (x / 255 - 0.5) / 0.5; zero padding on
    the right in normalized units. Independent of edgepack's reference.
    """
    h, w = image.shape[:2]
    resized_w = min(width, math.ceil(Fraction(height * w, h)))

    def taps(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = taps(h, height)
    x0, x1, fx = taps(w, resized_w)
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bottom = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    resized = top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]
    normalized = (resized.transpose(2, 0, 1) / 255 - 0.5) / 0.5
    out = np.zeros((3, height, width))
    out[:, :, :resized_w] = normalized
    return out


def test_text_lines_keep_ratio_pad_matches_paddleocr_where_stretch_resize_did_not():
    lines = _text_lines()
    keep = ImagePreprocess(keep_ratio_pad=(48, 192), pad_value=(127.5,), mean=(0.5,), std=(0.5,), max_size=(256, 2048))
    stretch = ImagePreprocess(resize=(48, 192), mean=(0.5,), std=(0.5,), max_size=(256, 2048))
    keep_sess, stretch_sess = embedded(keep), embedded(stretch)
    diffs = {"keep": {"below 4": [], "above 4": []}, "stretch": {"below 4": [], "above 4": []}}
    for line in lines:
        aspect = line.shape[1] / line.shape[0]
        group = "below 4" if aspect < 4 else "above 4"
        expected = _paddle_cls_reference(line)
        for name, sess in (("keep", keep_sess), ("stretch", stretch_sess)):
            got = sess.run(None, {"raw": line[None]})[0][0]
            diffs[name][group].append(float(np.abs(got - expected).max()))
    assert len(diffs["keep"]["below 4"]) >= 4 and len(diffs["keep"]["above 4"]) >= 4, "need both aspect groups"
    assert max(diffs["keep"]["below 4"] + diffs["keep"]["above 4"]) <= 1e-4
    # Stretching agrees only where PaddleOCR itself fills the width (aspect >= 4) ...
    assert max(diffs["stretch"]["above 4"]) <= 1e-4
    # ... and is far off on every shorter line: glyphs are widened and no padding exists.
    assert min(diffs["stretch"]["below 4"]) > 0.5


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fields, message", [
    ({"keep_ratio_pad": (48, 192), "letterbox": (64, 64)}, "keep_ratio_pad and letterbox are mutually exclusive"),
    ({"resize": (4, 4), "letterbox": (64, 64)}, "resize and letterbox are mutually exclusive"),
    ({"letterbox": (64, 64), "center_crop": (32, 32)}, "center_crop cannot follow letterbox"),
    ({"keep_ratio_pad": (48, 0)}, "keep_ratio_pad must be positive"),
    ({"letterbox": (64,)}, "letterbox must be a (height, width) pair"),
    ({"resize": (8, 8), "interpolation": "cubic"}, "interpolation must be one of bilinear, nearest, area"),
    ({"letterbox": (64, 64), "pad_value": (1.0, 2.0)}, "pad_value has 2 values but model_color 'rgb' has 3"),
    ({"letterbox": (64, 64), "pad_value": (float("nan"),)}, "pad_value must be a non-empty list of finite numbers"),
    ({"resize": (8, 8), "pad_value": (114.0,)}, "pad_value is only used by keep_ratio_pad or letterbox"),
])
def test_bad_geometry_specs_are_refused_with_a_sentence(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ImagePreprocess(**fields).validate()


def test_project_file_accepts_and_checks_the_geometry_keys():
    from edgepack.project import validate_project

    def project(image: dict) -> dict:
        return {"name": "lines", "version": "1.0.0", "model": {"kind": "onnx", "path": "m.onnx"},
                "input": {"image": image}}

    good = project({"keep_ratio_pad": [48, 192], "pad_value": [127.5], "interpolation": "area",
                    "mean": [0.5], "std": [0.5]})
    assert not [p for p in validate_project(good) if p.startswith("input")]
    problems = validate_project(project({"letterbox": [640, 640], "interpolation": "bicubic"}))
    assert any(p.startswith("input.image: interpolation must be one of") for p in problems), problems
    problems = validate_project(project({"keep_ratio": [48, 192]}))
    assert any("Unknown key(s) keep_ratio" in p and "keep_ratio_pad" in p for p in problems), problems
    round_trip = preprocess_from_dict(json.loads(json.dumps(ImagePreprocess(letterbox=(8, 9)).to_dict())))
    assert round_trip == ImagePreprocess(letterbox=(8, 9))


def test_letterbox_output_is_last_and_a_name_clash_is_refused():
    pre = ImagePreprocess(letterbox=(32, 32))
    model = embed_preprocessing(conv_classifier(), pre)
    assert [o.name for o in model.graph.output] == ["logits", OUTPUT_LETTERBOX]
    clash = identity_model(3, 32, 32)
    clash.graph.node[0].output[0] = OUTPUT_LETTERBOX
    clash.graph.output[0].name = OUTPUT_LETTERBOX
    with pytest.raises(ModelError, match="already has a tensor named 'letterbox'"):
        embed_preprocessing(clash, pre)


def test_normalization_folds_through_keep_ratio_pad_exactly():
    pre = ImagePreprocess(keep_ratio_pad=(24, 96), pad_value=(10.0, 128.0, 250.0), mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225))
    full = embed_preprocessing(conv_classifier(), pre)
    folded = try_fold_normalization(full)
    assert folded.folded, folded.reason
    raw = np.random.default_rng(6).integers(0, 256, (3, 20, 33, 3), dtype=np.uint8)
    a, b = session(full).run(None, {"raw": raw})[0], session(folded.model).run(None, {"raw": raw})[0]
    assert np.abs(a - b).max() <= 1e-4


# --------------------------------------------------------------------------- lists of images on the device


def _image_bundle(out_dir: Path, key: Path, pre: ImagePreprocess, model: onnx.ModelProto, name: str) -> Path:
    """A signed bundle, in build's format, whose raw input is an image of any size in pre's range."""
    from edgepack.bundle import write_bundle

    full = embed_preprocessing(model, pre)
    raw = np.random.default_rng(2).integers(0, 256, (2, 20, 50, 3), dtype=np.uint8)
    outputs = session(full).run(None, {"raw": raw})
    names = [o.name for o in full.graph.output]
    variant = "onnx-fp32"
    manifest = {
        "format_version": 1, "name": name, "version": "1.0.0",
        "io": {
            "inputs": [{"name": "raw", "dtype": "uint8", "shape": [None, None, None, 3], "value_range": [0, 255],
                        "layout": "NHWC", "size_range": {"min": list(pre.min_size), "max": list(pre.max_size)},
                        "preprocess": pre.to_dict()}],
            "outputs": [{"name": n, "dtype": "float32", "shape": [None, int(o.shape[1])]} for n, o in zip(names, outputs)],
        },
        "variants": [{"id": variant, "file": f"models/{variant}.onnx", "engine": "onnxruntime", "precision": "fp32",
                      "min_runtime": "0.1.0", "devices": ["x86-gateway"]}],
        "golden": {"file": "golden/vectors.npz", "tolerances": {variant: {n: 1e-4 for n in names}}},
    }
    vectors = {"input:raw": raw, **{f"output:{variant}:{n}": o for n, o in zip(names, outputs)}}
    members = {f"models/{variant}.onnx": full.SerializeToString(), "golden/vectors.npz": bundles.npz_bytes(vectors)}
    out = out_dir / f"{name}-1.0.0.epk"
    write_bundle(out, manifest, members, key, source_date_epoch=0)
    return out


@pytest.fixture(scope="module")
def line_cache(tmp_path_factory):
    """A device cache serving a letterboxing classifier (sizes 2x2..300x600)."""
    from edgepack_runtime.bundle import load_public_key
    from edgepack_runtime.cache import CacheConfig
    from edgepack_runtime.model import RuntimeConfig, install

    root = tmp_path_factory.mktemp("geomcache")
    priv, pub = bundles.keys(root)
    pre = ImagePreprocess(letterbox=(32, 64), pad_value=(114.0,), interpolation="area", max_size=(300, 600))
    config = RuntimeConfig(CacheConfig(root=root / "cache", trusted_keys=(load_public_key(pub),)))
    install(_image_bundle(root, priv, pre, conv_classifier(), "lines"), config)
    (root / "cache" / "keys").mkdir(parents=True, exist_ok=True)
    shutil.copy(pub, root / "cache" / "keys" / "test.pub")
    return root, config, pre


def _three_sizes() -> list[np.ndarray]:
    rng = np.random.default_rng(9)
    return [random_image(rng, h, w)[0] for h, w in ((20, 50), (7, 300), (120, 31))]


def test_runtime_predicts_a_list_of_images_of_different_sizes_in_request_order(line_cache):
    from edgepack_runtime.model import load

    _, config, pre = line_cache
    model = load(config)
    images = _three_sizes()
    together = model.predict(images)
    one_by_one = [model.predict(image[None]) for image in images]
    for name in ("logits", OUTPUT_LETTERBOX):
        np.testing.assert_array_equal(together[name], np.concatenate([o[name] for o in one_by_one]))
    assert together["logits"].shape == (3, 4)
    # Each image was letterboxed at its own size: the transform rows say so, in order.
    np.testing.assert_array_equal(together[OUTPUT_LETTERBOX][:, :2], [pre.resized_size(20, 50), pre.resized_size(7, 300),
                                                                     pre.resized_size(120, 31)])
    np.testing.assert_allclose(together[OUTPUT_LETTERBOX][:, 4:], [[20, 50], [7, 300], [120, 31]])
    # The dict form and JSON-style nested lists give the same answer.
    np.testing.assert_array_equal(model.predict({"raw": [i.tolist() for i in images]})["logits"], together["logits"])
    # A list of same-size images is an ordinary batch.
    same = [images[0], images[0][::-1].copy()]
    np.testing.assert_array_equal(model.predict(same)["logits"], model.predict(np.stack(same))["logits"])


@pytest.mark.parametrize("bad, field, reason", [
    (lambda imgs: [imgs[0], imgs[1][..., :1]], "raw[1]", "has shape [7, 300, 1], expected 3 channel(s)"),
    (lambda imgs: [imgs[0], imgs[1], imgs[2].astype(np.float32)], "raw[2]", "dtype float32, expected uint8"),
    (lambda imgs: [imgs[0], np.zeros((1, 9, 3), np.uint8)], "raw[1]", "image size 1x9 is outside the accepted 2x2..300x600"),
    (lambda imgs: [imgs[0], np.zeros((400, 9, 3), np.uint8)], "raw[1]", "image size 400x9 is outside"),
    (lambda imgs: [imgs[0], imgs[1][None]], "raw[1]", "must be one image [H, W, C]"),
    (lambda imgs: [imgs[0].tolist(), [[[0, 0, 300]] * 4] * 4], "raw[1]", "outside the uint8 range"),
])
def test_each_list_element_is_validated_and_named(line_cache, bad, field, reason):
    from edgepack_runtime import InputValidationError
    from edgepack_runtime.model import load

    model = load(line_cache[1])
    with pytest.raises(InputValidationError) as info:
        model.predict(bad(_three_sizes()))
    assert info.value.field == field and reason in info.value.reason, str(info.value)


def test_size_dependent_outputs_are_refused_for_a_list(tmp_path):
    """resize_shorter without a crop: the model input (and this model's output) depends on the size."""
    from edgepack_runtime import InputValidationError
    from edgepack_runtime.bundle import load_public_key
    from edgepack_runtime.cache import CacheConfig
    from edgepack_runtime.model import RuntimeConfig, install, load

    priv, pub = bundles.keys(tmp_path)
    pre = ImagePreprocess(resize_shorter=8, max_size=(300, 600))
    flat = identity_model(3, "H", "W")
    flat.graph.node.append(helper.make_node("Flatten", ["y"], ["flat"]))
    flat.graph.output[0].CopyFrom(helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["N", "F"]))
    config = RuntimeConfig(CacheConfig(root=tmp_path / "cache", trusted_keys=(load_public_key(pub),)))
    install(_image_bundle(tmp_path, priv, pre, flat, "sized"), config)
    with pytest.raises(InputValidationError) as info:
        load(config).predict(_three_sizes())
    assert info.value.field == "raw[1]" and "send these images in separate requests" in info.value.reason


def test_daemon_accepts_a_json_list_of_images_and_names_a_bad_element(line_cache, tmp_path):
    from test_daemon import serve

    from edgepack_runtime.model import load

    root, config, _ = line_cache
    images = _three_sizes()
    expected = load(config).predict(images)
    with serve(root / "cache", tmp_path) as daemon:
        status, body = daemon.json("POST", "/predict", {"inputs": {"raw": [i.tolist() for i in images]}})
        assert status == 200, body
        np.testing.assert_allclose(body["outputs"]["logits"], expected["logits"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(body["outputs"][OUTPUT_LETTERBOX], expected[OUTPUT_LETTERBOX])
        status, body = daemon.json("POST", "/predict", {"raw": [images[0].tolist(), images[1][..., :2].tolist()]})
        assert status == 400 and body["error"]["field"] == "raw[1]", body
        # Statistics count one model run per image.
        samples = daemon.metrics()
        runs = [v for (name, labels), v in samples.items() if name == "edgepack_input_samples_total"]
        assert runs == [3.0], samples


def test_letterbox_transform_stays_exact_in_a_static_int8_model(tmp_path):
    """A float transform would get QDQ nodes and come back as 1.37 instead of 1.3; it is int64 until the output."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    pre = ImagePreprocess(letterbox=(32, 64), pad_value=(114.0,), max_size=(300, 600))
    onnx.save(embed_preprocessing(conv_classifier(), pre), tmp_path / "fp32.onnx")
    rng = np.random.default_rng(8)
    calibration = [{"raw": random_image(rng, 20, 50)} for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    int8 = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(tmp_path / "int8.onnx").graph.node)
    for h, w in ((20, 50), (7, 300), (120, 31)):
        raw = random_image(rng, h, w)
        np.testing.assert_array_equal(int8.run([OUTPUT_LETTERBOX], {"raw": raw})[0], letterbox_reference(pre, raw))


def test_letterbox_digits_build_verify_and_serve_a_list_of_sizes(cli, digits, tmp_path):
    """The real build: the extra ``letterbox`` output is scheduled, golden-tested and served.

    Digits shown at 1x, 2x and 3x (pixel repetition) letterbox back (area) to exactly the
    8x8 the model was trained on, so one list request must answer like the 8x8 batch.
    """
    import yaml

    from edgepack.bundle import read_member
    from edgepack_runtime.bundle import load_public_key
    from edgepack_runtime.cache import CacheConfig
    from edgepack_runtime.model import RuntimeConfig, install, load

    for name in ("model.onnx", "calib.npz", "val.npz", "edgepack.yaml"):
        shutil.copy(digits / name, tmp_path / name)
    config = yaml.safe_load((tmp_path / "edgepack.yaml").read_text())
    config["input"]["image"].update(min_size=[4, 4], max_size=[64, 64], letterbox=[8, 8], interpolation="area")
    (tmp_path / "edgepack.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert cli("keys", "generate", "--dir", tmp_path / "keys", "--name", "digits")[0] == 0
    code, out, err = cli("build", tmp_path / "edgepack.yaml")
    assert code == 0, (out, err)
    bundle = tmp_path / "dist" / "digits-1.0.0.epk"
    code, out, err = cli("verify", bundle, "--key", tmp_path / "keys" / "digits.pub")
    assert code == 0, (out, err)
    manifest = json.loads(read_member(bundle, "manifest.json"))
    outputs = {o["name"]: o for o in manifest["io"]["outputs"]}
    assert list(outputs) == ["scores", OUTPUT_LETTERBOX] and "resized_h" in outputs[OUTPUT_LETTERBOX]["meaning"]

    device = RuntimeConfig(CacheConfig(root=tmp_path / "device", trusted_keys=(load_public_key(tmp_path / "keys" / "digits.pub"),)))
    install(bundle, device)
    model = load(device)
    raw = np.load(tmp_path / "val.npz")["raw"][:3]
    images = [np.repeat(np.repeat(raw[k], k + 1, axis=0), k + 1, axis=1) for k in range(3)]
    together = model.predict(images)
    np.testing.assert_allclose(together["scores"], model.predict(raw)["scores"], atol=1e-6)
    np.testing.assert_array_equal(together[OUTPUT_LETTERBOX], [[8, 8, 0, 0, 8, 8], [8, 8, 0, 0, 16, 16], [8, 8, 0, 0, 24, 24]])
    # Every variant, int8 included, keeps the area weights in float: calibration saw only
    # 8x8, and a quantized 0.5 (2x) or 1/3 (3x) weight moved scores by 0.006.
    assert {v["precision"] for v in manifest["variants"]} >= {"fp32", "int8"}
    for variant in manifest["variants"]:
        sess = ort.InferenceSession(read_member(bundle, variant["file"]), providers=["CPUExecutionProvider"])
        at_1x = sess.run(["scores"], {"raw": raw})[0]
        for k in (1, 2):
            scaled = sess.run(["scores"], {"raw": np.ascontiguousarray(np.repeat(np.repeat(raw, k + 1, 1), k + 1, 2))})[0]
            np.testing.assert_allclose(scaled, at_1x, atol=1e-6, err_msg=variant["id"])
