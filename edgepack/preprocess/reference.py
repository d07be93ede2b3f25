"""Pure numpy reference of the embedded pre- and post-processing.

Every step mirrors the ONNX nodes :mod:`edgepack.preprocess.graph` emits, in the same
order and in float32, so the two agree to float rounding. The bilinear resize copies
onnxruntime's CPU kernel arithmetic (float32 scale ``out / in``, half_pixel source
coordinates, clamping, four-tap weights) so even rounding mostly agrees.

Use :func:`check_raw_input` on device-side or test data before running either path:
the graph cannot raise readable errors, it can only produce garbage.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DataError
from .spec import LUMA_WEIGHTS, ImagePreprocess, Postprocess, Preprocess, TabularPreprocess

__all__ = ["apply_reference", "check_raw_input", "labels_for", "postprocess_reference", "unletterbox_boxes",
           "letterbox_reference"]

_F32 = np.float32


def check_raw_input(pre: Preprocess, raw: Any) -> None:
    """Reject raw input the preprocessing cannot handle, with a sentence saying why.

    Args:
        pre: The preprocessing spec.
        raw: Raw input: uint8 ``[N, H, W, C]`` images or float32 ``[N, columns]`` rows.

    Raises:
        DataError: Wrong type, dtype, rank, channel count or column count; an image
            size outside ``[min_size, max_size]``; an empty batch; NaN in a column
            without an impute value; an infinite value in a used column.
    """
    if not isinstance(raw, np.ndarray):
        raise DataError(f"Raw input must be a numpy array, got {type(raw).__name__}; wrap it with np.asarray(...).")
    if hasattr(pre, "check_raw"):  # plug-in kinds (audio, frames) carry their own checks
        pre.check_raw(raw)
    elif isinstance(pre, ImagePreprocess):
        _check_image(pre, raw)
    else:
        _check_tabular(pre, raw)


def _check_image(pre: ImagePreprocess, raw: np.ndarray) -> None:
    channels = pre.raw_channels
    expected = f"uint8 [N, H, W, {channels}] ({pre.color}, channels last)"
    if raw.dtype != np.uint8:
        raise DataError(f"Raw images must be {expected}, got dtype {raw.dtype}; pass 0-255 pixel values as uint8 "
                        f"(e.g. np.clip(x, 0, 255).astype(np.uint8)), not already-normalized floats.")
    if raw.ndim != 4:
        hint = ""
        if raw.ndim == 3 and raw.shape[-1] == channels:
            hint = " Add a batch axis with raw[None]."
        elif raw.ndim == 2 and channels == 1:
            hint = " Reshape a single gray image with raw[None, :, :, None]."
        elif raw.ndim == 3 and channels == 1:
            hint = " Add a channel axis with raw[..., None]."
        raise DataError(f"Raw images must be {expected}, got shape {list(raw.shape)}.{hint}")
    if raw.shape[3] != channels:
        hint = " It looks channels-first; transpose with raw.transpose(0, 2, 3, 1)." if raw.shape[1] == channels else ""
        raise DataError(f"Raw images must be {expected}, got {raw.shape[3]} channel(s) in shape "
                        f"{list(raw.shape)}; check the declared color ({pre.color!r}).{hint}")
    if raw.shape[0] == 0:
        raise DataError("The raw image batch is empty; pass at least one image.")
    height, width = raw.shape[1], raw.shape[2]
    (min_h, min_w), (max_h, max_w) = pre.min_size, pre.max_size
    if not (min_h <= height <= max_h and min_w <= width <= max_w):
        raise DataError(f"Raw image is {height}x{width} pixels (HxW) but this model accepts sizes from "
                        f"{min_h}x{min_w} to {max_h}x{max_w}; resize or reject the image before inference, "
                        f"or widen min_size/max_size in the preprocessing spec.")


def _check_tabular(pre: TabularPreprocess, raw: np.ndarray) -> None:
    width = len(pre.raw_columns)
    if raw.dtype != np.float32:
        raise DataError(f"Raw rows must be float32 [N, {width}] with NaN for missing values, got dtype {raw.dtype}; "
                        f"convert with raw.astype(np.float32).")
    if raw.ndim != 2 or raw.shape[1] != width:
        hint = " Add a batch axis with raw[None]." if raw.ndim == 1 and raw.shape[0] == width else ""
        raise DataError(f"Raw rows must be float32 [N, {width}] in the order {', '.join(pre.raw_columns)}, "
                        f"got shape {list(raw.shape)}.{hint}")
    if raw.shape[0] == 0:
        raise DataError("The raw row batch is empty; pass at least one row.")
    for column in pre.columns:
        values = raw[:, pre.raw_index(column.name)]
        missing = np.flatnonzero(np.isnan(values))
        if missing.size and column.impute is None:
            raise DataError(f"Column {column.name!r} is missing (NaN) in row(s) {_rows(missing)} but has no impute "
                            f"value; fill those values or set impute for the column.")
        infinite = np.flatnonzero(np.isinf(values))
        if infinite.size:
            raise DataError(f"Column {column.name!r} is infinite in row(s) {_rows(infinite)}; "
                            f"replace infinities with a finite value or NaN.")


def _rows(indices: np.ndarray) -> str:
    shown = ", ".join(str(i) for i in indices[:5])
    return shown + (f" and {indices.size - 5} more" if indices.size > 5 else "")


def apply_reference(pre: Preprocess, raw: np.ndarray) -> np.ndarray:
    """Compute the model input from raw input, exactly as the embedded graph does.

    Args:
        pre: The preprocessing spec (validated here).
        raw: Raw input accepted by :func:`check_raw_input`.

    Returns:
        float32 model input: ``[N, C, h, w]`` / ``[N, h, w, C]`` for images, ``[N, F]``
        for rows.

    Raises:
        ConfigError: The spec is invalid.
        DataError: The raw input is rejected by :func:`check_raw_input`.
    """
    pre.validate()
    check_raw_input(pre, raw)
    if hasattr(pre, "reference"):
        return pre.reference(raw)
    if isinstance(pre, ImagePreprocess):
        return _image(pre, raw)
    return _tabular(pre, raw)


def letterbox_reference(pre: ImagePreprocess, raw: np.ndarray) -> np.ndarray:
    """The embedded model's ``letterbox`` output (float32 ``[N, 6]``) for raw images of one size."""
    check_raw_input(pre, raw)
    row = pre.letterbox_transform(raw.shape[1], raw.shape[2])
    return np.tile(np.asarray(row, dtype=_F32), (raw.shape[0], 1))


def color_matrix(pre: ImagePreprocess) -> np.ndarray | None:
    """Luma weights ``[raw_channels, 1]`` for rgb/bgr -> gray, else None."""
    if pre.model_color != "gray" or pre.color == "gray":
        return None
    weights = LUMA_WEIGHTS if pre.color == "rgb" else LUMA_WEIGHTS[::-1]
    return np.asarray(weights, dtype=_F32).reshape(3, 1)


def color_indices(pre: ImagePreprocess) -> tuple[int, ...] | None:
    """Raw channel picked for each model channel (reorder or repeat), else None."""
    if pre.color == pre.model_color or pre.model_color == "gray":
        return None
    if pre.color == "gray":
        return (0, 0, 0)
    return (2, 1, 0)


def has_spatial_ops(pre: ImagePreprocess) -> bool:
    """True when resize, pad or crop run (they run channels-first, like the kernels expect)."""
    return pre.resize_mode is not None or pre.center_crop is not None


def pad_constants(pre: ImagePreprocess) -> tuple[float, np.ndarray | None]:
    """How the graph pads: ``(scalar, None)`` for one Pad with that value, or ``(0, per-channel
    [C, 1, 1] raw values)`` for Sub -> Pad(0) -> Add, since ONNX Pad takes one scalar."""
    values = np.asarray(pre.channel_pad_value(), dtype=_F32)
    if np.all(values == values[0]):
        return float(values[0]), None
    return 0.0, values.reshape(-1, 1, 1)


def unletterbox_boxes(boxes: np.ndarray, transform: np.ndarray, clip: bool = True) -> np.ndarray:
    """Map ``x1, y1, x2, y2`` boxes from letterboxed model-input pixels back to raw pixels.

    The same pure function as ``edgepack_runtime.unletterbox_boxes`` (the device side).

    Args:
        boxes: ``[..., 4]`` boxes, or ``[N, K, 4]`` with one transform row per image.
        transform: The model's ``letterbox`` output, ``[6]`` or ``[N, 6]``: ``resized_height,
            resized_width, pad_top, pad_left, raw_height, raw_width``.
        clip: Clip to the raw image (``0..raw_width``, ``0..raw_height``).

    Returns:
        float32 boxes of the same shape in raw pixel coordinates.
    """
    from edgepack_runtime.boxes import unletterbox_boxes as _device

    return _device(boxes, transform, clip)


def crop_start(size: int, crop: int) -> int:
    """First index of a centered crop; floors, so extra pixels go to the end."""
    return (size - crop) // 2


def _image(pre: ImagePreprocess, raw: np.ndarray) -> np.ndarray:
    x = raw.astype(_F32)
    if (matrix := color_matrix(pre)) is not None:
        x = x @ matrix
    elif (indices := color_indices(pre)) is not None:
        x = x[..., list(indices)]
    if has_spatial_ops(pre):
        x = x.transpose(0, 3, 1, 2)
        height, width = x.shape[2], x.shape[3]
        if pre.resize_mode is not None:
            x = RESIZERS[pre.interpolation](x, pre.resized_size(height, width))
        if pre.pads:
            x = _pad_nchw(x, pre.pad_amounts(height, width), *pad_constants(pre))
        if pre.center_crop is not None:
            (ch, cw), (h, w) = pre.center_crop, x.shape[2:]
            top, left = crop_start(h, ch), crop_start(w, cw)
            x = x[:, :, top:top + ch, left:left + cw]
        if pre.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
    elif pre.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    shape = (-1, 1, 1) if pre.layout == "NCHW" else (-1,)
    mean = np.asarray(pre.channel_mean(), dtype=_F32).reshape(shape)
    std = np.asarray(pre.channel_std(), dtype=_F32).reshape(shape)
    x = x * _F32(pre.scale)
    x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=_F32)


def _axis_taps(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # onnxruntime derives the scale from the sizes in float32 and maps coordinates in
    # float32; doing the same here keeps the interpolation weights bit-identical.
    scale = _F32(out_len) / _F32(in_len)
    resized = np.arange(out_len, dtype=_F32)
    coord = resized if scale == 1 else (resized + _F32(0.5)) / scale - _F32(0.5)
    coord = np.clip(coord, _F32(0), _F32(in_len - 1)).astype(_F32)
    first = np.minimum(coord.astype(np.int64), in_len - 1)
    second = np.minimum(first + 1, in_len - 1)
    d_first = np.abs(coord - first.astype(_F32))
    d_second = np.abs(coord - second.astype(_F32))
    same = first == second
    d_first[same] = _F32(0.5)
    d_second[same] = _F32(0.5)
    return first, second, d_first, d_second


def _resize_bilinear_nchw(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``[N, C, H, W]`` float32, half_pixel, no antialias."""
    y1, y2, dy1, dy2 = _axis_taps(x.shape[2], size[0])
    x1, x2, dx1, dx2 = _axis_taps(x.shape[3], size[1])
    rows1, rows2 = x[:, :, y1, :], x[:, :, y2, :]
    x11, x21 = rows1[..., x1], rows1[..., x2]
    x12, x22 = rows2[..., x1], rows2[..., x2]
    w11 = dy2[:, None] * dx2[None, :]
    w21 = dy2[:, None] * dx1[None, :]
    w12 = dy1[:, None] * dx2[None, :]
    w22 = dy1[:, None] * dx1[None, :]
    return (w11 * x11 + w21 * x21 + w12 * x12 + w22 * x22).astype(_F32)


def _nearest_nchw(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize, ``src = floor(dst / (out / in))`` in float32 (ONNX asymmetric + floor)."""
    def index(in_len: int, out_len: int) -> np.ndarray:
        scale = _F32(out_len) / _F32(in_len)
        coord = np.arange(out_len, dtype=_F32) / scale
        return np.clip(np.floor(coord).astype(np.int64), 0, in_len - 1)

    return x[:, :, index(x.shape[2], size[0])][:, :, :, index(x.shape[3], size[1])]


def area_weights(in_len: int, out_len: int) -> np.ndarray:
    """``[out, in]`` box-average weights: the covered fraction of each input pixel / the box size.

    Coordinates are counted in units of ``1 / (in * out)`` so every edge is an exact
    integer (output box ``i`` spans ``[i * in, (i + 1) * in)``, input pixel ``j`` spans
    ``[j * out, (j + 1) * out)``); the only rounding is the final float32 ``overlap / in``.
    The graph does the same int64 arithmetic, so both build the same matrix.
    """
    i = np.arange(out_len, dtype=np.int64)[:, None]
    j = np.arange(in_len, dtype=np.int64)[None, :]
    overlap = np.maximum(np.minimum((i + 1) * in_len, (j + 1) * out_len) - np.maximum(i * in_len, j * out_len), 0)
    return overlap.astype(_F32) / _F32(in_len)


def _area_nchw(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Exact box average (any factor): ``rows @ x @ cols.T`` with :func:`area_weights`."""
    rows, cols = area_weights(x.shape[2], size[0]), area_weights(x.shape[3], size[1])
    return (rows @ (x @ cols.T)).astype(_F32)


#: interpolation name -> ``[N, C, H, W]`` float32 resize to ``(h, w)``; graph.py has the twin registry.
RESIZERS = {"bilinear": _resize_bilinear_nchw, "nearest": _nearest_nchw, "area": _area_nchw}


def _pad_nchw(x: np.ndarray, amounts: tuple[int, int, int, int], value: float, per_channel: np.ndarray | None
              ) -> np.ndarray:
    top, left, bottom, right = amounts
    if per_channel is not None:
        x = x - per_channel
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=_F32(value))
    return x + per_channel if per_channel is not None else x


def tabular_tables(pre: TabularPreprocess) -> dict[str, np.ndarray]:
    """Per-feature constants shared by the graph and the reference.

    Returns:
        ``source`` (raw column index per feature), ``impute`` (NaN where NaN stays),
        ``category`` (one-hot value; 0 for numeric), ``is_category`` (bool),
        ``offset`` and ``divisor`` (final ``(x - offset) / divisor``).
    """
    source, impute, category, is_category, offset, divisor = [], [], [], [], [], []
    for column in pre.columns:
        index = pre.raw_index(column.name)
        fill = np.nan if column.impute is None else column.impute
        if column.kind == "categorical":
            for value in column.categories:
                source.append(index), impute.append(fill), category.append(value), is_category.append(True)
                offset.append(0.0), divisor.append(1.0)
        else:
            off, div = column.offset_and_divisor()
            source.append(index), impute.append(fill), category.append(0.0), is_category.append(False)
            offset.append(off), divisor.append(div)
    return {
        "source": np.asarray(source, dtype=np.int64),
        "impute": np.asarray(impute, dtype=_F32),
        "category": np.asarray(category, dtype=_F32),
        "is_category": np.asarray(is_category, dtype=bool),
        "offset": np.asarray(offset, dtype=_F32),
        "divisor": np.asarray(divisor, dtype=_F32),
    }


def _tabular(pre: TabularPreprocess, raw: np.ndarray) -> np.ndarray:
    t = tabular_tables(pre)
    x = raw[:, t["source"]]
    x = np.where(np.isnan(x), t["impute"], x)
    x = np.where(t["is_category"], (x == t["category"]).astype(_F32), x)
    return ((x - t["offset"]) / t["divisor"]).astype(_F32)


def postprocess_reference(post: Postprocess, logits: np.ndarray) -> dict[str, np.ndarray]:
    """Compute what the appended post-processing nodes return, plus label names.

    Args:
        post: The post-processing spec.
        logits: The model's first output; classes along axis 1.

    Returns:
        ``scores`` (when softmax), ``top_k_indices`` (int64) and ``top_k_scores``
        (when top_k), and ``top_k_labels`` (str array, when top_k and labels).
    """
    post.validate()
    x = np.asarray(logits, dtype=_F32)
    out: dict[str, np.ndarray] = {}
    scores = x
    if post.softmax:
        shifted = x.astype(np.float64) - x.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        scores = (e / e.sum(axis=1, keepdims=True)).astype(_F32)
        out["scores"] = scores
    if post.top_k is not None:
        # A stable sort of the negated scores keeps the lower index first on ties, as TopK does.
        order = np.argsort(-scores, axis=1, kind="stable")[:, : post.top_k]
        out["top_k_indices"] = order.astype(np.int64)
        out["top_k_scores"] = np.take_along_axis(scores, order, axis=1)
        if post.labels is not None:
            out["top_k_labels"] = labels_for(post, out["top_k_indices"])
    return out


def labels_for(post: Postprocess, indices: np.ndarray) -> np.ndarray:
    """Map class indices (as returned by the graph) to label strings.

    Raises:
        DataError: No labels are declared, or an index is out of range.
    """
    if not post.labels:
        raise DataError("No labels are declared in the post-processing spec; add labels to map indices to names.")
    indices = np.asarray(indices)
    bad = indices[(indices < 0) | (indices >= len(post.labels))]
    if bad.size:
        raise DataError(f"Class index {int(bad.reshape(-1)[0])} is outside the {len(post.labels)} declared labels; "
                        f"the labels do not match the model's classes.")
    return np.asarray(post.labels, dtype=object)[indices].astype(str)
