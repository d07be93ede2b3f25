"""Pure checks of raw input against the manifest's input schema (dtype, shape, range, size)."""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .errors import EdgepackError

MAX_INPUT_BYTES = 64 * 1024**2


class InputValidationError(EdgepackError):
    """Raw input does not match the bundle's declared schema (an HTTP 400)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _dims(spec: Mapping[str, Any]) -> List[Any]:
    return list(spec.get("shape") or [])


@functools.lru_cache(maxsize=None)
def _int_bounds(dtype: np.dtype) -> Tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


#: JSON lists of at most this many plain ints are checked in Python, which at this
#: size is faster than numpy's conversion plus two reductions (same result).
SMALL_INT_LIST = 64


def _small_int_list_bounds(value: list) -> Optional[Tuple[int, int]]:
    """(min, max) of a small rectangular nested list of plain ints; None for anything else."""
    level = [value]
    while True:
        first = level[0]
        if type(first) is list:
            width = len(first)
            if not width:
                return None
            flat: list = []
            for item in level:
                if type(item) is not list or len(item) != width:
                    return None
                flat.extend(item)
            if len(flat) > SMALL_INT_LIST:
                return None
            level = flat
        else:
            for item in level:
                if type(item) is not int:  # bool, float, str... go the general way
                    return None
            return min(level), max(level)


def check_input(spec: Mapping[str, Any], value: Any, max_bytes: int = MAX_INPUT_BYTES) -> np.ndarray:
    """Return ``value`` as an array of the declared dtype, or raise InputValidationError.

    Lists (from JSON) are converted only when every element fits the dtype exactly;
    nothing is silently clipped or rounded.
    """
    name = spec["name"]
    dtype = np.dtype(spec["dtype"])
    bounds = None  # (min, max) of the values, when already computed
    small = _small_int_list_bounds(value) if dtype.kind in "iu" and type(value) is list else None
    if isinstance(value, np.ndarray):
        array = value
    elif small is not None and _int_bounds(dtype)[0] <= small[0] and small[1] <= _int_bounds(dtype)[1]:
        array = np.array(value, dtype=dtype)  # exact: plain ints, all inside the dtype's range
        bounds = small
    else:
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InputValidationError(name, f"is not a rectangular array ({exc})") from None
        if array.dtype == object:
            raise InputValidationError(name, "is not a rectangular array of numbers")
        if array.dtype.kind in "iuf" and dtype.kind in "iu":
            # Integer lists are integral by construction; only floats need the checks.
            if array.size and array.dtype.kind == "f" and (not np.all(np.isfinite(array)) or not np.all(np.equal(np.mod(array, 1), 0))):
                raise InputValidationError(name, f"must hold integers for dtype {dtype}")
            info_min, info_max = _int_bounds(dtype)
            if array.size:
                bounds = (array.min(), array.max())
                if bounds[0] < info_min or bounds[1] > info_max:
                    raise InputValidationError(name, f"has values outside the {dtype} range {info_min}..{info_max}")
            array = array.astype(dtype)
        elif array.dtype.kind in "iuf" and dtype.kind == "f":
            array = array.astype(dtype)
        elif array.dtype.kind == "b" and dtype.kind == "b":
            pass
    if array.dtype != dtype:
        raise InputValidationError(name, f"has dtype {array.dtype}, expected {dtype}")
    if array.nbytes > max_bytes:
        raise InputValidationError(name, f"is {array.nbytes} bytes, above the {max_bytes}-byte limit")
    dims = _dims(spec)
    if dims and array.ndim != len(dims):
        raise InputValidationError(name, f"has shape {list(array.shape)}, expected {len(dims)} dimensions {dims}")
    for axis, (want, got) in enumerate(zip(dims, array.shape)):
        if isinstance(want, int) and want > 0 and want != got:
            raise InputValidationError(name, f"has shape {list(array.shape)}, expected size {want} on axis {axis} {dims}")
    if array.size == 0:
        raise InputValidationError(name, "is empty")
    size_range = spec.get("size_range")  # images: {"min": [h, w], "max": [h, w]} on NHWC axes 1, 2
    if array.ndim == 4 and isinstance(size_range, Mapping):
        (min_h, min_w), (max_h, max_w) = size_range["min"], size_range["max"]
        h, w = array.shape[1], array.shape[2]
        if not (min_h <= h <= max_h and min_w <= w <= max_w):
            raise InputValidationError(name, f"image size {h}x{w} is outside the accepted {min_h}x{min_w}..{max_h}x{max_w}")
    value_range = spec.get("value_range")
    if value_range and dtype.kind in "iuf":
        low, high = value_range
        if dtype.kind in "iu":
            info_min, info_max = _int_bounds(dtype)
            if (low is None or low <= info_min) and (high is None or high >= info_max):
                pass  # the dtype itself keeps every value inside the declared range
            else:
                lo, hi = bounds if bounds is not None else (array.min(), array.max())
                if (low is not None and lo < low) or (high is not None and hi > high):
                    raise InputValidationError(name, f"has values outside the declared range [{low}, {high}]")
        else:
            lo, hi = array.min(), array.max()  # NaN or an infinity shows up in min/max
            if math.isfinite(lo) and math.isfinite(hi):
                if (low is not None and lo < low) or (high is not None and hi > high):
                    raise InputValidationError(name, f"has values outside the declared range [{low}, {high}]")
            else:
                if not np.all(np.isfinite(array)) and not spec.get("allow_nan"):
                    raise InputValidationError(name, "contains NaN or infinity")
                finite = array[np.isfinite(array)]
                if finite.size and ((low is not None and finite.min() < low) or (high is not None and finite.max() > high)):
                    raise InputValidationError(name, f"has values outside the declared range [{low}, {high}]")
    return np.ascontiguousarray(array)


def check_feed(inputs: List[Mapping[str, Any]], feed: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Validate a whole request: every declared input present, nothing extra."""
    names = [spec["name"] for spec in inputs]
    if feed.keys() != set(names):
        unknown = sorted(set(feed) - set(names))
        if unknown:
            raise InputValidationError(unknown[0], f"is not an input of this model (inputs: {', '.join(names)})")
        missing = [n for n in names if n not in feed]
        if missing:
            raise InputValidationError(missing[0], "is missing")
    checked = {spec["name"]: check_input(spec, feed[spec["name"]]) for spec in inputs}
    # Constants (scalars, shared tensors) and state have no sample axis of their own.
    shared = {spec["name"] for spec in inputs if spec.get("role") in ("constant", "state")}
    batches = {a.shape[0] for n, a in checked.items() if a.ndim and n not in shared} if len(checked) > 1 else ()
    if len(batches) > 1:
        raise InputValidationError(names[0], f"inputs disagree on the batch size {sorted(batches)}")
    return checked


class ImageListFeed(dict):
    """A validated request holding a LIST of raw images of different sizes for one input.

    Maps the input name to a list of ``[1, H, W, C]`` arrays (request order). The
    embedded preprocessing handles one image size per run, so :func:`run_image_list`
    runs each image on its own and concatenates the outputs along the batch axis.
    """


def _image_shape(element: Any) -> Optional[Tuple[int, ...]]:
    """Shape of one image given as an array, or (H, W) of a nested list, without converting it."""
    if isinstance(element, np.ndarray):
        return tuple(element.shape)
    if type(element) is list and element and type(element[0]) is list:
        return (len(element), len(element[0]))
    return None


def is_image_list(spec: Mapping[str, Any], value: Any) -> bool:
    """True when ``value`` is a list of images of DIFFERENT sizes for an image input.

    A list whose images all share one size is an ordinary ``[N, H, W, C]`` batch and
    takes the usual (faster) path with the same result.
    """
    if not isinstance(spec.get("size_range"), Mapping) or type(value) not in (list, tuple) or len(value) < 2:
        return False
    return len({_image_shape(e) for e in value}) > 1


def check_image_list(spec: Mapping[str, Any], value: Any, max_bytes: int = MAX_INPUT_BYTES) -> List[np.ndarray]:
    """Validate each image of a list on its own; errors name the element (``raw[2]``)."""
    name = spec["name"]
    images: List[np.ndarray] = []
    left = max_bytes
    for index, element in enumerate(value):
        field = f"{name}[{index}]"
        shape = element.shape if isinstance(element, np.ndarray) else None
        if shape is not None and len(shape) != 3:
            raise InputValidationError(field, f"must be one image [H, W, C] in a list of images, got shape {list(shape)}")
        channels = (_dims(spec) or [None])[-1]
        if shape is not None and isinstance(channels, int) and channels > 0 and shape[2] != channels:
            raise InputValidationError(field, f"has shape {list(shape)}, expected {channels} channel(s) [H, W, {channels}]")
        if shape is None and not (type(element) is list and element and type(element[0]) is list):
            raise InputValidationError(field, "must be one image [H, W, C] (nested lists of pixel values)")
        array = check_input(dict(spec, name=field), element[None] if shape is not None else [element], left)
        left -= array.nbytes
        images.append(array)
    return images


def run_image_list(run: Any, feed: ImageListFeed, output_names: List[str]) -> Tuple[List[np.ndarray], List[Tuple[Dict[str, np.ndarray], List[np.ndarray]]]]:
    """Run each image of ``feed`` on its own; outputs concatenated along axis 0, in request order.

    Returns:
        The concatenated outputs and, per image, its own ``(feed, outputs)`` (one model
        run each, for statistics).

    Raises:
        InputValidationError: The images give outputs of different shapes beyond the
            batch axis (the model's output depends on the image size).
    """
    ((name, images),) = feed.items()
    parts = []
    for image in images:
        single = {name: image}
        parts.append((single, list(run(single))))
    first = parts[0][1]
    outputs = []
    for k, out in enumerate(first):
        label = output_names[k] if k < len(output_names) else str(k)
        for index, (_, other) in enumerate(parts[1:], start=1):
            if not isinstance(out, np.ndarray) or out.ndim == 0 or other[k].shape[1:] != out.shape[1:]:
                shapes = f"{list(np.shape(out))} and {list(np.shape(other[k]))}"
                raise InputValidationError(f"{name}[{index}]", f"gives output {label!r} shaped {shapes} for images 0 and {index}; "
                                                               f"this model's outputs depend on the image size, so send these images in separate requests")
        outputs.append(np.concatenate([p[1][k] for p in parts], axis=0))
    return outputs, parts
