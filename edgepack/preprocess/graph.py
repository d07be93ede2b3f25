"""Compile a preprocessing spec into ONNX nodes in front of a model, and fold its normalization.

:func:`embed_preprocessing` makes the device feed RAW input (uint8 images, float32 rows
with NaN); the features are computed inside the model file by standard ONNX operators
(opset 13 forms, valid in every later opset), so training-side code and every runtime
compute them the same way. :mod:`edgepack.preprocess.reference` is the numpy twin.

:func:`fold_normalization` then moves the final per-channel affine ``(x - mean) / std``
into the first Conv/Gemm/MatMul, because normalization nodes inside the quantized
region cost int8 accuracy for no benefit.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ConfigError, ModelError
from .reference import color_indices, color_matrix, crop_start, has_spatial_ops, pad_constants, tabular_tables
from .spec import ImagePreprocess, Postprocess, Preprocess, TabularPreprocess

__all__ = [
    "AREA_NODE_PREFIX", "FoldResult", "METADATA_LABELS", "METADATA_POSTPROCESS", "METADATA_PREPROCESS", "MIN_OPSET", "OUTPUT_LETTERBOX",
    "embed_preprocessing", "fold_normalization", "try_fold_normalization",
]

#: Resize without roi/scales, Unsqueeze/Squeeze with axes as input and single-axis
#: Softmax all date from opset 13.
MIN_OPSET = 13
METADATA_PREPROCESS = "edgepack.preprocess"
METADATA_POSTPROCESS = "edgepack.postprocess"
METADATA_LABELS = "edgepack.labels"
OUTPUT_SCORES = "scores"
OUTPUT_TOP_K_INDICES = "top_k_indices"
OUTPUT_TOP_K_SCORES = "top_k_scores"
#: Extra output of a letterboxing model: float32 [N, 6] resized_h, resized_w, pad_top, pad_left, raw_h, raw_w.
OUTPUT_LETTERBOX = "letterbox"
PREFIX = "pre"
#: Names of the area resize's nodes (size-dependent box weights that must stay float).
AREA_NODE_PREFIX = PREFIX + "/area_"


# --------------------------------------------------------------------------- naming / building


def _graph_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.initializer}
    names |= {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
    names.discard("")
    return names


class _Builder:
    """Appends uniquely named nodes and constants; node and output share one name."""

    def __init__(self, prefix: str, taken: set[str]) -> None:
        self.prefix, self.taken = prefix, taken
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def name(self, stem: str) -> str:
        base = f"{self.prefix}/{stem}"
        candidate, counter = base, 1
        while candidate in self.taken:
            candidate, counter = f"{base}_{counter}", counter + 1
        self.taken.add(candidate)
        return candidate

    def const(self, stem: str, value: np.ndarray) -> str:
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: Iterable[str], stem: str, outputs: list[str] | None = None, **attrs) -> str:
        name = self.name(stem)
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs or [name], name=name, **attrs))
        return self.nodes[-1].output[0]


def _i64(values: Iterable[int]) -> np.ndarray:
    return np.asarray(list(values), dtype=np.int64)


# --------------------------------------------------------------------------- model inspection


def _default_opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise ModelError("The model declares no default-domain ONNX opset, so its operators cannot be interpreted; "
                         "re-export it with a standard exporter.")
    return versions[0]


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]


def _describe(dims: list[int | str | None] | None, elem_type: int) -> str:
    dtype = helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else "unknown dtype"
    shape = "unknown shape" if dims is None else "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
    return f"{shape} {dtype}"


def _model_input(model: onnx.ModelProto, feeds: str | None = None) -> onnx.ValueInfoProto:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if feeds is not None:
        # A multi-input model: the preprocessing computes the named input; the others stay graph inputs.
        chosen = [i for i in inputs if i.name == feeds]
        if not chosen:
            names = ", ".join(repr(i.name) for i in inputs) or "none"
            raise ConfigError(f"input.feeds names model input {feeds!r}, but the model's inputs are {names}; "
                              f"name the input the raw data is preprocessed into.")
        inputs = chosen
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise ModelError(f"Embedded preprocessing feeds exactly one model input, but the model has {len(inputs)} "
                         f"({names}); export a single-input model or combine the inputs inside the model.")
    value = inputs[0]
    if not value.type.HasField("tensor_type"):
        raise ModelError(f"The model input {value.name!r} is not a tensor; embedded preprocessing produces a "
                         f"float32 tensor.")
    return value


def _check_image_fit(pre: ImagePreprocess, value: onnx.ValueInfoProto) -> None:
    dims, elem = _dims(value), value.type.tensor_type.elem_type
    size = pre.static_output_size
    h, w = (str(size[0]), str(size[1])) if size else ("H'", "W'")
    c = pre.model_channels
    produced = f"[N, {c}, {h}, {w}]" if pre.layout == "NCHW" else f"[N, {h}, {w}, {c}]"
    both = (f"the model input {value.name!r} expects {_describe(dims, elem)} but the image preprocessing produces "
            f"{produced} float32 ({pre.layout}, model_color {pre.model_color!r})")
    if elem != TensorProto.FLOAT:
        raise ModelError(f"Cannot embed preprocessing: {both}; export the model with a float32 input.")
    if dims is None:
        return
    if len(dims) != 4:
        raise ConfigError(f"Cannot embed preprocessing: {both}; an image model needs a 4-D input.")
    c_axis, h_axis, w_axis = (1, 2, 3) if pre.layout == "NCHW" else (3, 1, 2)
    problems = []
    if isinstance(dims[c_axis], int) and dims[c_axis] != pre.model_channels:
        other = 3 if pre.layout == "NCHW" else 1
        hint = " (the model looks like the other layout; check layout)" if dims[other] == pre.model_channels else ""
        problems.append(f"{dims[c_axis]} channels vs {pre.model_channels}{hint}")
    for axis, index, label in ((h_axis, 0, "height"), (w_axis, 1, "width")):
        if not isinstance(dims[axis], int):
            continue
        if size is None:
            problems.append(f"the model has a fixed {label} {dims[axis]} but the preprocessing output size depends "
                            f"on the raw image; add resize or center_crop (or keep_ratio_pad, letterbox)")
        elif size[index] != dims[axis]:
            problems.append(f"{label} {dims[axis]} vs {size[index]}")
    if problems:
        raise ConfigError(f"Cannot embed preprocessing: {both} ({'; '.join(problems)}); "
                          f"fix resize/center_crop/model_color/layout in the spec or use a matching model.")


def _check_tabular_fit(pre: TabularPreprocess, value: onnx.ValueInfoProto) -> None:
    dims, elem = _dims(value), value.type.tensor_type.elem_type
    both = (f"the model input {value.name!r} expects {_describe(dims, elem)} but the tabular preprocessing produces "
            f"[N, {pre.n_features}] float32")
    if elem != TensorProto.FLOAT:
        raise ModelError(f"Cannot embed preprocessing: {both}; export the model with a float32 input.")
    if dims is None:
        return
    if len(dims) != 2 or (isinstance(dims[1], int) and dims[1] != pre.n_features):
        raise ConfigError(f"Cannot embed preprocessing: {both} ({pre.n_features} features = numeric columns + "
                          f"one per category); fix the columns in the spec or use a matching model.")


# --------------------------------------------------------------------------- preprocessing nodes


def _image_nodes(b: _Builder, pre: ImagePreprocess, raw: str) -> None:
    x = b.op("Cast", [raw], "to_float", to=TensorProto.FLOAT)
    if (matrix := color_matrix(pre)) is not None:
        x = b.op("MatMul", [x, b.const("luma_weights", matrix)], "to_gray")
    elif (indices := color_indices(pre)) is not None:
        x = b.op("Gather", [x, b.const("channel_map", _i64(indices))], "channels", axis=3)
    if has_spatial_ops(pre):
        # Resize/pad/crop run channels-first: that is the resize kernel every runtime has.
        x = b.op("Transpose", [x], "to_nchw", perm=[0, 3, 1, 2])
        if pre.resize_mode is not None:
            shape = b.op("Shape", [x], "shape")
            hw_in = b.op("Slice", [shape, b.const("hw_start", _i64([2])), b.const("hw_end", _i64([4]))], "hw_in")
            hw = _target_size_nodes(b, pre, hw_in)
            x = _RESIZERS[pre.interpolation](b, x, shape, hw_in, hw)
            if pre.pads:
                x = _pad_nodes(b, pre, x, shape, hw_in, hw)
        if pre.center_crop is not None:
            x = _crop_nodes(b, pre, x)
        if pre.layout == "NHWC":
            x = b.op("Transpose", [x], "to_nhwc", perm=[0, 2, 3, 1])
    elif pre.layout == "NCHW":
        x = b.op("Transpose", [x], "to_nchw", perm=[0, 3, 1, 2])
    shape = (-1, 1, 1) if pre.layout == "NCHW" else (-1,)
    mean = np.asarray(pre.channel_mean(), dtype=np.float32).reshape(shape)
    std = np.asarray(pre.channel_std(), dtype=np.float32).reshape(shape)
    # Identity steps are skipped; the reference still applies them, which is exact.
    if np.float32(pre.scale) != 1:
        x = b.op("Mul", [x, b.const("scale", np.asarray(pre.scale, dtype=np.float32))], "scale")
    if np.any(mean != 0):
        x = b.op("Sub", [x, b.const("mean", mean)], "sub_mean")
    if np.any(std != 1):
        b.op("Div", [x, b.const("std", std)], "div_std")


def _target_size_nodes(b: _Builder, pre: ImagePreprocess, hw_in: str) -> str:
    """int64 [2] (h, w) after the resize, by the integer rules of ``ImagePreprocess.resized_size``."""
    if pre.resize is not None:
        return b.const("resize_hw", _i64(pre.resize))
    height = b.op("Slice", [hw_in, b.const("h_start", _i64([0])), b.const("h_end", _i64([1]))], "h_in")
    width = b.op("Slice", [hw_in, b.const("w_start", _i64([1])), b.const("w_end", _i64([2]))], "w_in")
    one = b.const("one", _i64([1]))
    if pre.resize_shorter is not None:
        # floor(side * S / shorter side), in int64 so it equals the reference exactly.
        shorter = b.op("Min", [height, width], "shorter")
        scaled = b.op("Mul", [hw_in, b.const("shorter_target", _i64([pre.resize_shorter]))], "hw_scaled")
        return b.op("Div", [scaled, shorter], "resize_hw")
    if pre.keep_ratio_pad is not None:
        target_h, target_w = pre.keep_ratio_pad
        # ceil(Ht * W / H) = (Ht * W + H - 1) // H, clamped to [1, Wt].
        numerator = b.op("Add", [b.op("Mul", [width, b.const("target_h", _i64([target_h]))], "w_times_ht"),
                                 b.op("Sub", [height, one], "h_minus_1")], "ceil_numerator")
        ceil = b.op("Div", [numerator, height], "ceil_width")
        new_w = b.op("Max", [b.op("Min", [ceil, b.const("target_w", _i64([target_w]))], "clamp_width"), one],
                     "new_width")
        return b.op("Concat", [b.const("fixed_h", _i64([target_h])), new_w], "resize_hw", axis=0)
    target_h, target_w = pre.letterbox
    two = b.const("two_i", _i64([2]))
    ht, wt = b.const("target_h", _i64([target_h])), b.const("target_w", _i64([target_w]))
    # The limiting side is exactly its target; the other is round_half_up(side * scale).
    height_limits = b.op("GreaterOrEqual", [b.op("Mul", [height, wt], "h_times_wt"),
                                            b.op("Mul", [width, ht], "w_times_ht")], "height_limits")

    def rounded(side: str, target: str, other: str, stem: str) -> str:
        numerator = b.op("Add", [b.op("Mul", [b.op("Mul", [side, target], f"{stem}_scaled"), two], f"{stem}_twice"),
                                 other], f"{stem}_half_up")
        quotient = b.op("Div", [numerator, b.op("Mul", [other, two], f"{stem}_denominator")], f"{stem}_rounded")
        return b.op("Max", [quotient, one], f"{stem}_at_least_1")

    new_w = b.op("Where", [height_limits, rounded(width, ht, height, "lb_w"), wt], "new_width")
    new_h = b.op("Where", [height_limits, ht, rounded(height, wt, width, "lb_h")], "new_height")
    return b.op("Concat", [new_h, new_w], "resize_hw", axis=0)


def _sizes(b: _Builder, shape: str, hw: str) -> str:
    batch_channels = b.op("Slice", [shape, b.const("nc_start", _i64([0])), b.const("nc_end", _i64([2]))], "nc")
    return b.op("Concat", [batch_channels, hw], "resize_sizes", axis=0)


def _resize_bilinear(b: _Builder, x: str, shape: str, hw_in: str, hw: str) -> str:
    return b.op("Resize", [x, "", "", _sizes(b, shape, hw)], "resize", mode="linear",
                coordinate_transformation_mode="half_pixel")


def _resize_nearest(b: _Builder, x: str, shape: str, hw_in: str, hw: str) -> str:
    return b.op("Resize", [x, "", "", _sizes(b, shape, hw)], "resize", mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def _area_axis(b: _Builder, in_len: str, out_len: str, stem: str) -> str:
    """[out, in] float32 box weights by the exact int64 rule of ``reference.area_weights``."""
    axis0 = b.const(f"{stem}_axis0", _i64([0]))
    n = b.op("Squeeze", [in_len, axis0], f"{stem}_in")
    m = b.op("Squeeze", [out_len, axis0], f"{stem}_out")
    zero, one = b.const(f"{stem}_zero", np.int64(0)), b.const(f"{stem}_one", np.int64(1))
    i = b.op("Unsqueeze", [b.op("Range", [zero, m, one], f"{stem}_i"), b.const(f"{stem}_axis1", _i64([1]))],
             f"{stem}_i_col")
    j = b.op("Unsqueeze", [b.op("Range", [zero, n, one], f"{stem}_j"), axis0], f"{stem}_j_row")
    box_start = b.op("Mul", [i, n], f"{stem}_box_start")
    box_end = b.op("Mul", [b.op("Add", [i, one], f"{stem}_i_next"), n], f"{stem}_box_end")
    pixel_start = b.op("Mul", [j, m], f"{stem}_pixel_start")
    pixel_end = b.op("Mul", [b.op("Add", [j, one], f"{stem}_j_next"), m], f"{stem}_pixel_end")
    overlap = b.op("Sub", [b.op("Min", [box_end, pixel_end], f"{stem}_right"),
                           b.op("Max", [box_start, pixel_start], f"{stem}_left")], f"{stem}_overlap")
    covered = b.op("Cast", [b.op("Max", [overlap, zero], f"{stem}_covered")], f"{stem}_covered_f",
                   to=TensorProto.FLOAT)
    return b.op("Div", [covered, b.op("Cast", [n], f"{stem}_in_f", to=TensorProto.FLOAT)], f"{stem}_weights")


def _resize_area(b: _Builder, x: str, shape: str, hw_in: str, hw: str) -> str:
    # ONNX Resize has no area mode; a box average is two MatMuls with coverage weights
    # built from the runtime sizes, so one graph serves every input size.
    def pick(tensor: str, k: int, stem: str) -> str:
        return b.op("Slice", [tensor, b.const(f"{stem}_s", _i64([k])), b.const(f"{stem}_e", _i64([k + 1]))], stem)

    rows = _area_axis(b, pick(hw_in, 0, "area_h_in"), pick(hw, 0, "area_h_out"), "area_rows")
    cols = _area_axis(b, pick(hw_in, 1, "area_w_in"), pick(hw, 1, "area_w_out"), "area_cols")
    across = b.op("MatMul", [x, b.op("Transpose", [cols], "area_cols_t", perm=[1, 0])], "area_across")
    return b.op("MatMul", [rows, across], "area_resize")


#: interpolation name -> graph builder; reference.RESIZERS is the numpy twin.
_RESIZERS = {"bilinear": _resize_bilinear, "nearest": _resize_nearest, "area": _resize_area}


def _pad_nodes(b: _Builder, pre: ImagePreprocess, x: str, shape: str, hw_in: str, hw: str) -> str:
    target = b.const("pad_target", _i64(pre.keep_ratio_pad or pre.letterbox))
    extra = b.op("Sub", [target, hw], "pad_extra")
    if pre.keep_ratio_pad is not None:
        begin = b.const("pad_begin", _i64([0, 0]))
    else:
        begin = b.op("Div", [extra, b.const("two", _i64([2]))], "pad_begin")
        _letterbox_nodes(b, shape, hw_in, hw, begin)  # before the Pad: the last node must stay the model input
    end = b.op("Sub", [extra, begin], "pad_end")
    zeros = b.const("pad_nc", _i64([0, 0]))
    pads = b.op("Concat", [zeros, begin, zeros, end], "pads", axis=0)
    value, per_channel = pad_constants(pre)
    if per_channel is not None:
        # ONNX Pad takes one scalar: pad (x - c) with 0, then add c back, per channel.
        x = b.op("Sub", [x, b.const("pad_shift", per_channel)], "pad_shift")
    x = b.op("Pad", [x, pads, b.const("pad_value", np.asarray(value, dtype=np.float32))], "pad", mode="constant")
    if per_channel is not None:
        x = b.op("Add", [x, b.const("pad_unshift", per_channel)], "pad_unshift")
    return x


def _letterbox_nodes(b: _Builder, shape: str, hw_in: str, hw: str, begin: str) -> None:
    # All int64 (exact) with one Cast at the end: int8 quantizers only touch float tensors
    # feeding quantizable ops, so the transform stays exact in every variant.
    row = b.op("Concat", [hw, begin, hw_in], "lb_row", axis=0)
    row = b.op("Unsqueeze", [row, b.const("lb_axis0", _i64([0]))], "lb_row_2d")
    batch = b.op("Slice", [shape, b.const("lb_n_start", _i64([0])), b.const("lb_n_end", _i64([1]))], "lb_batch")
    rows = b.op("Expand", [row, b.op("Concat", [batch, b.const("lb_six", _i64([6]))], "lb_shape", axis=0)], "lb_rows")
    b.op("Cast", [rows], "letterbox", outputs=[OUTPUT_LETTERBOX], to=TensorProto.FLOAT)


def _crop_nodes(b: _Builder, pre: ImagePreprocess, x: str) -> str:
    crop = pre.center_crop
    axes = b.const("crop_axes", _i64([2, 3]))
    if pre.resize is not None:
        top, left = crop_start(pre.resize[0], crop[0]), crop_start(pre.resize[1], crop[1])
        starts = b.const("crop_starts", _i64([top, left]))
        ends = b.const("crop_ends", _i64([top + crop[0], left + crop[1]]))
    else:
        shape = b.op("Shape", [x], "crop_shape")
        hw = b.op("Slice", [shape, b.const("crop_hw_start", _i64([2])), b.const("crop_hw_end", _i64([4]))], "crop_hw")
        size = b.const("crop_size", _i64(crop))
        margin = b.op("Sub", [hw, size], "crop_margin")
        starts = b.op("Div", [margin, b.const("two", _i64([2]))], "crop_starts")
        ends = b.op("Add", [starts, size], "crop_ends")
    return b.op("Slice", [x, starts, ends, axes], "crop")


def _tabular_nodes(b: _Builder, pre: TabularPreprocess, raw: str) -> None:
    t = tabular_tables(pre)
    x = b.op("Gather", [raw, b.const("source_columns", t["source"])], "columns", axis=1)
    if not np.all(np.isnan(t["impute"])):
        # NaN entries in the table keep NaN (impute None): Where picks NaN either way.
        missing = b.op("IsNaN", [x], "is_missing")
        x = b.op("Where", [missing, b.const("impute", t["impute"]), x], "impute")
    if t["is_category"].any():
        hits = b.op("Equal", [x, b.const("categories", t["category"])], "category_hits")
        one_hot = b.op("Cast", [hits], "one_hot", to=TensorProto.FLOAT)
        x = b.op("Where", [b.const("is_category", t["is_category"]), one_hot, x], "encode")
    if np.any(t["offset"] != 0):
        x = b.op("Sub", [x, b.const("offset", t["offset"])], "sub_offset")
    if np.any(t["divisor"] != 1):
        b.op("Div", [x, b.const("divisor", t["divisor"])], "div_scale")


def _raw_input(pre: Preprocess, name: str, model_input: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    dims = _dims(model_input)
    batch = dims[0] if dims and dims[0] is not None else "batch"
    if hasattr(pre, "raw_value_info"):
        return pre.raw_value_info(name, batch)
    if isinstance(pre, ImagePreprocess):
        return helper.make_tensor_value_info(name, TensorProto.UINT8, [batch, "height", "width", pre.raw_channels])
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, len(pre.raw_columns)])


# --------------------------------------------------------------------------- post-processing nodes


def _post_nodes(b: _Builder, graph: onnx.GraphProto, post: Postprocess) -> list[onnx.ValueInfoProto]:
    if not graph.output:
        raise ModelError("The model has no outputs to post-process; export it with its logits as an output.")
    first = graph.output[0]
    dims, elem = _dims(first), first.type.tensor_type.elem_type
    if elem != TensorProto.FLOAT:
        raise ModelError(f"Post-processing needs a float32 first output, but {first.name!r} is "
                         f"{_describe(dims, elem)}; export the logits as float32.")
    classes = dims[1] if dims and len(dims) >= 2 and isinstance(dims[1], int) else None
    if dims is not None and len(dims) < 2:
        raise ConfigError(f"Post-processing works on classes along axis 1, but the model output {first.name!r} is "
                          f"{_describe(dims, elem)}; disable softmax/top_k or export [N, classes] logits.")
    if classes is not None and post.labels is not None and len(post.labels) != classes:
        raise ConfigError(f"The model output {first.name!r} has {classes} classes but {len(post.labels)} labels are "
                          f"declared; give one label per class.")
    if classes is not None and post.top_k is not None and post.top_k > classes:
        raise ConfigError(f"top_k is {post.top_k} but the model output {first.name!r} has only {classes} classes; "
                          f"lower top_k.")
    for name in (OUTPUT_SCORES, OUTPUT_TOP_K_INDICES, OUTPUT_TOP_K_SCORES):
        if name in b.taken:
            raise ModelError(f"The model already has a tensor named {name!r}, which post-processing outputs use; "
                             f"rename it in the exporter or disable post-processing.")
    outputs: list[onnx.ValueInfoProto] = []
    scores = first.name
    if post.softmax:
        scores = b.op("Softmax", [scores], "softmax", outputs=[OUTPUT_SCORES], axis=1)
        outputs.append(helper.make_tensor_value_info(OUTPUT_SCORES, TensorProto.FLOAT, dims))
    if post.top_k is not None:
        k = b.const("k", _i64([post.top_k]))
        b.op("TopK", [scores, k], "top_k", outputs=[OUTPUT_TOP_K_SCORES, OUTPUT_TOP_K_INDICES],
             axis=1, largest=1, sorted=1)
        k_dims = None if dims is None else [dims[0], post.top_k, *dims[2:]]
        outputs.append(helper.make_tensor_value_info(OUTPUT_TOP_K_INDICES, TensorProto.INT64, k_dims))
        outputs.append(helper.make_tensor_value_info(OUTPUT_TOP_K_SCORES, TensorProto.FLOAT, k_dims))
    return outputs


def _set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    kept = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.add(key=key, value=value)


_CHECK_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)


def _check(model: onnx.ModelProto, original: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except _CHECK_ERRORS as exc:
        # Blame the right side: an input model that is already invalid is not our bug.
        try:
            onnx.checker.check_model(original, full_check=True)
        except _CHECK_ERRORS as original_exc:
            raise ModelError(f"The model is not valid ONNX ({original_exc}); re-export it or fix it with "
                             f"onnx.checker before {what.lower()}.") from original_exc
        raise ModelError(f"{what} produced an invalid ONNX graph ({exc}); this is a bug in edgepack, "
                         f"please report it with the model.") from exc


# --------------------------------------------------------------------------- public: embed


def embed_preprocessing(model: onnx.ModelProto, pre: Preprocess, post: Postprocess | None = None,
                        raw_input_name: str = "raw", feeds: str | None = None) -> onnx.ModelProto:
    """Put preprocessing nodes in front of ``model`` (and post-processing after it).

    The raw input becomes the only graph input. New nodes and tensors are named
    ``pre/...``; nothing in the original graph is renamed, so the model's input tensor
    is now produced by the last preprocessing node. The specs are stored as JSON in
    ``metadata_props`` (``edgepack.preprocess``, ``edgepack.postprocess``,
    ``edgepack.labels``).

    Args:
        model: Single-input float32 model, default opset >= 13. Not modified.
        pre: Image or tabular preprocessing.
        post: Optional post-processing after the FIRST model output. Softmax gives
            output ``scores``; top-k gives ``top_k_indices`` (int64) and
            ``top_k_scores``. These replace the first output; other outputs stay.
            A ``letterbox`` spec adds the last output ``letterbox`` (float32 ``[N, 6]``,
            see :class:`ImagePreprocess`).
        raw_input_name: Name of the new raw graph input.
        feeds: For a model with several inputs, the one the preprocessing computes;
            the others stay graph inputs after the raw one (state, scalars, ...).

    Returns:
        A new, checked model.

    Raises:
        ConfigError: A spec is invalid or does not fit the model (the message names
            both sides).
        ModelError: The model's opset is below 13, it has several inputs, a non-float
            input, or a tensor name the new graph needs.
    """
    pre.validate()
    if post is not None:
        post.validate()
    opset = _default_opset(model)
    if opset < MIN_OPSET:
        raise ModelError(f"The model uses ONNX opset {opset}, but embedded preprocessing needs opset {MIN_OPSET} or "
                         f"newer (Resize, Softmax and TopK changed there); re-export the model with opset >= "
                         f"{MIN_OPSET}, e.g. torch.onnx.export(..., opset_version=17).")
    model_input = _model_input(model, feeds)
    if hasattr(pre, "check_fit"):
        pre.check_fit(_dims(model_input), model_input.type.tensor_type.elem_type, model_input.name, _describe)
    elif isinstance(pre, ImagePreprocess):
        _check_image_fit(pre, model_input)
    else:
        _check_tabular_fit(pre, model_input)

    out = copy.deepcopy(model)
    graph = out.graph
    taken = _graph_names(graph)
    if raw_input_name in taken:
        raise ModelError(f"The model already uses the name {raw_input_name!r}; pass another raw_input_name.")
    taken.add(raw_input_name)
    letterbox = isinstance(pre, ImagePreprocess) and pre.letterbox is not None
    if letterbox and OUTPUT_LETTERBOX in taken:
        raise ModelError(f"The model already has a tensor named {OUTPUT_LETTERBOX!r}, which the letterbox transform "
                         f"output uses; rename it in the exporter.")
    if letterbox:
        taken.add(OUTPUT_LETTERBOX)

    b = _Builder(PREFIX, taken)
    if hasattr(pre, "graph_nodes"):
        pre.graph_nodes(b, raw_input_name)
    else:
        (_image_nodes if isinstance(pre, ImagePreprocess) else _tabular_nodes)(b, pre, raw_input_name)
    b.nodes[-1].output[0] = model_input.name  # the model reads its input tensor, now computed

    initializer_inputs = [i for i in graph.input if i.name != model_input.name]
    del graph.input[:]
    graph.input.extend([_raw_input(pre, raw_input_name, model_input), *initializer_inputs])
    graph.value_info.append(model_input)  # keeps the declared shape as an annotation
    nodes = [*b.nodes, *graph.node]

    metadata = {METADATA_PREPROCESS: json.dumps(pre.to_dict(), sort_keys=True)}
    if post is not None:
        metadata[METADATA_POSTPROCESS] = json.dumps(post.to_dict(), sort_keys=True)
        if post.labels is not None:
            metadata[METADATA_LABELS] = json.dumps(list(post.labels))
        post_builder = _Builder("post", taken)
        new_outputs = _post_nodes(post_builder, graph, post)
        if new_outputs:
            rest = list(graph.output[1:])
            del graph.output[:]
            graph.output.extend([*new_outputs, *rest])
            nodes.extend(post_builder.nodes)
            b.initializers.extend(post_builder.initializers)

    if letterbox:
        # Last, so the model's own outputs keep their positions (the first stays the first).
        batch = _dims(model_input)[0] if _dims(model_input) and _dims(model_input)[0] is not None else "batch"
        graph.output.append(helper.make_tensor_value_info(OUTPUT_LETTERBOX, TensorProto.FLOAT, [batch, 6]))

    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(b.initializers)
    _set_metadata(out, metadata)
    _check(out, model, "Embedding preprocessing")
    return out


# --------------------------------------------------------------------------- public: fold

_AFFINE_OPS = ("Mul", "Div", "Add", "Sub")
_TARGET_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class FoldResult:
    """Outcome of :func:`try_fold_normalization`.

    Attributes:
        model: The folded model, or an unchanged copy when folding was not possible.
        folded: Whether anything was folded.
        reason: What was folded into which op, or why nothing was.
    """

    model: onnx.ModelProto
    folded: bool
    reason: str


class _NotFoldable(Exception):
    """Internal: folding is impossible for the stated reason."""


def fold_normalization(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold the affine in front of the first Conv/Gemm/MatMul into its weights.

    See :func:`try_fold_normalization`; this returns only the model (an unchanged copy
    when folding is not possible).
    """
    return try_fold_normalization(model).model


def try_fold_normalization(model: onnx.ModelProto) -> FoldResult:
    """Fold the per-channel affine feeding the first Conv/Gemm/MatMul into that op.

    The chain is the run of Mul/Div/Add/Sub nodes with constant per-channel operands
    directly in front of the first Conv/Gemm/MatMul that is not itself preprocessing
    (node name not starting with ``pre/``), optionally through one Transpose (NHWC
    models). The chain ``y = a * x + b`` (per channel) is removed; Conv/Gemm weights are
    scaled by ``a`` and ``W @ b`` goes into the bias (MatMul gets an Add after it).

    Borders stay exact: a padded Conv pads with 0 in normalized space, i.e. with raw
    value ``-b / a`` (``mean / scale``), per channel. ONNX Pad takes one scalar, so a
    per-channel border is built as Slice -> Pad(value_c) -> Concat over channels (a
    single Pad when all values agree), and the Conv's own pads are set to 0.

    Args:
        model: Typically the output of :func:`embed_preprocessing`. Not modified.

    Returns:
        A :class:`FoldResult`; ``folded`` is False (and the graph unchanged) when the
        pattern is absent or unsafe, e.g. SAME auto-padding, non-constant weights, a
        chain tensor with other consumers.
    """
    work = copy.deepcopy(model)
    try:
        reason = _fold(work)
        _check(work, model, "Folding normalization")
    except (_NotFoldable, ModelError) as exc:
        return FoldResult(copy.deepcopy(model), False, str(exc))
    return FoldResult(work, True, reason)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, value)])


def _fold(model: onnx.ModelProto) -> str:
    graph = model.graph
    consts = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}

    def sole_use(tensor: str) -> bool:
        return len(consumers[tensor]) == 1 and tensor not in graph_outputs

    target = next((n for n in graph.node if n.op_type in _TARGET_OPS and n.domain in ("", "ai.onnx")
                   and not n.name.startswith(PREFIX + "/")), None)
    if target is None:
        raise _NotFoldable("The model has no Conv, Gemm or MatMul to fold the normalization into.")
    label = f"{target.op_type} {target.name or target.output[0]!r}"
    if len(target.input) < 2 or target.input[1] not in consts:
        raise _NotFoldable(f"The weights of {label} are not constant, so the normalization cannot be folded.")
    weights = consts[target.input[1]]
    if weights.dtype != np.float32:
        raise _NotFoldable(f"The weights of {label} are {weights.dtype}, only float32 weights are folded.")

    # Channel axis in the target's input space, and channel count.
    if target.op_type == "Conv":
        rank, axis, channels = weights.ndim, 1, weights.shape[1] * _attr(target, "group", 1)
    elif target.op_type == "Gemm":
        if _attr(target, "transA", 0):
            raise _NotFoldable(f"{label} transposes its input (transA=1); folding supports transA=0 only.")
        rank, axis = 2, 1
        channels = weights.shape[1] if _attr(target, "transB", 0) else weights.shape[0]
    else:
        if weights.ndim != 2:
            raise _NotFoldable(f"{label} has {weights.ndim}-D weights; only 2-D MatMul weights are folded.")
        rank, axis, channels = None, -1, weights.shape[0]

    tensor = target.input[0]
    transpose = None
    producer = producers.get(tensor)
    if producer is not None and producer.op_type == "Transpose" and sole_use(tensor):
        transpose = producer
        perm = list(_attr(producer, "perm", []))
        if not perm or (rank is not None and len(perm) != rank):
            raise _NotFoldable(f"The Transpose in front of {label} has no usable perm attribute.")
        rank = len(perm)
        axis = perm[axis % rank]  # the input axis that becomes the target's channel axis
        tensor = producer.input[0]
    chain_axis = axis - rank if rank is not None else axis  # negative: constants broadcast from the right

    chain: list[tuple[onnx.NodeProto, int, np.ndarray]] = []
    while (producer := producers.get(tensor)) is not None and producer.op_type in _AFFINE_OPS and sole_use(tensor):
        first, second = producer.input
        if second in consts and first not in consts:
            position = 0
        elif first in consts and second not in consts:
            position = 1
        else:
            break
        vector = _channel_vector(consts[producer.input[1 - position]], chain_axis, rank, channels)
        if vector is None:
            break
        chain.append((producer, position, vector))
        tensor = producer.input[position]
    if not chain:
        raise _NotFoldable(f"No per-channel Mul/Div/Add/Sub with constants feeds {label}; nothing to fold.")
    chain.reverse()
    source = tensor

    scale, shift = np.ones(channels), np.zeros(channels)
    for node, position, c in chain:
        if node.op_type == "Mul":
            scale, shift = scale * c, shift * c
        elif node.op_type == "Div":
            if position != 0 or np.any(c == 0):
                raise _NotFoldable(f"{node.op_type} {node.name!r} divides by the data or by zero; cannot fold.")
            scale, shift = scale / c, shift / c
        elif node.op_type == "Add":
            shift = shift + c
        else:
            scale, shift = (scale, shift - c) if position == 0 else (-scale, c - shift)
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift)) and np.all(scale != 0)):
        raise _NotFoldable(f"The affine in front of {label} is degenerate (zero or non-finite factor); not folded.")

    names = _graph_names(graph)
    b = _Builder(PREFIX + "/fold", names)
    first_consumer = transpose if transpose is not None else target
    first_consumer.input[0] = source
    fold = {"Conv": _fold_conv, "Gemm": _fold_gemm, "MatMul": _fold_matmul}[target.op_type]
    before, after, note = fold(b, target, consts, scale, shift)

    removed = {node.output[0] for node, _, _ in chain}
    chain_nodes = {id(node) for node, _, _ in chain}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in chain_nodes:
            continue
        if node is target:
            nodes.extend(before)
            nodes.append(node)
            nodes.extend(after)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(b.initializers)
    kept_info = [v for v in graph.value_info if v.name not in removed]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    _prune(graph)
    ops = ", ".join(node.op_type for node, _, _ in chain)
    return f"Folded {ops} into {label}{note}."


def _channel_vector(value: np.ndarray, axis: int, rank: int | None, channels: int) -> np.ndarray | None:
    """The constant as one float64 value per channel, or None if it is not per-channel."""
    if value.dtype.kind != "f":
        return None
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    if rank is not None and value.ndim > rank:
        return None
    varying = [i - value.ndim for i, d in enumerate(value.shape) if d != 1]
    if varying != [axis] or value.shape[axis] != channels:
        return None
    return value.astype(np.float64).reshape(-1)


def _fold_conv(b: _Builder, conv: onnx.NodeProto, consts: dict[str, np.ndarray], scale: np.ndarray,
               shift: np.ndarray) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto], str]:
    weights = consts[conv.input[1]].astype(np.float64)
    out_channels, per_group, spatial = weights.shape[0], weights.shape[1], weights.ndim - 2
    group = _attr(conv, "group", 1)
    auto_pad = _attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        raise _NotFoldable(f"Conv {conv.name!r} uses auto_pad={auto_pad}, whose border depends on the input size; "
                           f"export it with explicit pads to allow folding.")
    if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in consts:
        raise _NotFoldable(f"Conv {conv.name!r} has a non-constant bias; cannot fold.")
    # Input channel read by weight [o, j]: group (o // outputs per group), offset j.
    source = (np.arange(out_channels)[:, None] // (out_channels // group)) * per_group + np.arange(per_group)[None, :]
    expand = (out_channels, per_group) + (1,) * spatial
    new_weights = weights * scale[source].reshape(expand)
    bias = consts[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
    bias = bias + (weights * shift[source].reshape(expand)).sum(axis=tuple(range(1, weights.ndim)))
    weight_name = b.const("weights", new_weights.astype(np.float32))
    bias_name = b.const("bias", np.asarray(bias, dtype=np.float32).reshape(out_channels))
    conv.input[1] = weight_name
    if len(conv.input) > 2:
        conv.input[2] = bias_name
    else:
        conv.input.append(bias_name)

    pads = list(_attr(conv, "pads", [0] * (2 * spatial))) if auto_pad == "NOTSET" else [0] * (2 * spatial)
    if not any(pads):
        return [], [], ""
    # Zero in normalized space is raw value -shift/scale; pad with that, per channel.
    border = (-shift / scale).astype(np.float32)
    full = _i64([0, 0, *pads[:spatial], 0, 0, *pads[spatial:]])
    x = conv.input[0]
    before_count = len(b.nodes)
    pad_amounts = b.const("pads", full)
    if np.all(border == border[0]):
        padded = b.op("Pad", [x, pad_amounts, b.const("border", border[:1].reshape(()))], "pad", mode="constant")
    else:
        axis_one = b.const("channel_axis", _i64([1]))
        parts = []
        for c, value in enumerate(border):
            part = b.op("Slice", [x, b.const(f"c{c}_start", _i64([c])), b.const(f"c{c}_end", _i64([c + 1])), axis_one],
                        f"channel{c}")
            parts.append(b.op("Pad", [part, pad_amounts, b.const(f"c{c}_border", np.asarray(value, np.float32))],
                              f"pad{c}", mode="constant"))
        padded = b.op("Concat", parts, "padded", axis=1)
    conv.input[0] = padded
    _set_attr(conv, "pads", [0] * (2 * spatial))
    return b.nodes[before_count:], [], " with a per-channel border Pad replacing its zero padding"


def _fold_gemm(b: _Builder, gemm: onnx.NodeProto, consts: dict[str, np.ndarray], scale: np.ndarray,
               shift: np.ndarray) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto], str]:
    trans_b = _attr(gemm, "transB", 0)
    alpha, beta = float(_attr(gemm, "alpha", 1.0)), float(_attr(gemm, "beta", 1.0))
    if len(gemm.input) > 2 and gemm.input[2] and gemm.input[2] not in consts:
        raise _NotFoldable(f"Gemm {gemm.name!r} has a non-constant C input; cannot fold.")
    weights = consts[gemm.input[1]].astype(np.float64)
    features_first = weights.T if trans_b else weights  # [F, M]
    new_weights = scale[:, None] * features_first
    bias = alpha * (shift @ features_first)
    if len(gemm.input) > 2 and gemm.input[2]:
        bias = beta * consts[gemm.input[2]].astype(np.float64) + bias
    weight_name = b.const("weights", (new_weights.T if trans_b else new_weights).astype(np.float32))
    bias_name = b.const("bias", np.asarray(bias, dtype=np.float32))
    gemm.input[1] = weight_name
    if len(gemm.input) > 2:
        gemm.input[2] = bias_name
    else:
        gemm.input.append(bias_name)
    _set_attr(gemm, "beta", 1.0)
    return [], [], ""


def _fold_matmul(b: _Builder, matmul: onnx.NodeProto, consts: dict[str, np.ndarray], scale: np.ndarray,
                 shift: np.ndarray) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto], str]:
    weights = consts[matmul.input[1]].astype(np.float64)
    matmul.input[1] = b.const("weights", (scale[:, None] * weights).astype(np.float32))
    bias = shift @ weights
    if not np.any(bias):
        return [], [], ""
    # MatMul has no bias input: keep its output name on a new Add so consumers are untouched.
    original = matmul.output[0]
    matmul.output[0] = b.name("matmul")
    start = len(b.nodes)
    b.op("Add", [matmul.output[0], b.const("bias", bias.astype(np.float32))], "bias", outputs=[original])
    return [], b.nodes[start:], " with an Add for the bias"


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used |= _used_names(sub)
    return used


def _prune(graph: onnx.GraphProto) -> None:
    """Drop initializers and Constant nodes nothing reads any more."""
    used = _used_names(graph)
    nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(nodes)
    inputs = {i.name for i in graph.input}
    kept = [i for i in graph.initializer if i.name in used or i.name in inputs]
    del graph.initializer[:]
    graph.initializer.extend(kept)
