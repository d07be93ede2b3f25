"""Map detector boxes from letterboxed model-input pixels back to raw image pixels.

A bundle whose preprocessing letterboxes (keep ratio, pad centred) has an extra output
``letterbox``: float32 ``[N, 6]`` rows of exact integers ``resized_height,
resized_width, pad_top, pad_left, raw_height, raw_width``; the per-axis scale is
``resized / raw`` (integers, not a rounded ratio, so int8 variants carry it exactly). This
module is pure numpy so a device needs nothing else; ``edgepack.preprocess`` re-exports
the same function for training-side code.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TRANSFORM_FIELDS", "unletterbox_boxes"]

#: Column order of the ``letterbox`` output.
TRANSFORM_FIELDS = ("resized_height", "resized_width", "pad_top", "pad_left", "raw_height", "raw_width")


def unletterbox_boxes(boxes, transform, clip: bool = True) -> np.ndarray:
    """Map ``x1, y1, x2, y2`` boxes in model-input pixels to raw pixels.

    ``raw_x = (x - pad_left) * raw_width / resized_width``, likewise for y.

    Args:
        boxes: ``[..., 4]`` boxes for one image (``transform`` ``[6]`` or ``[1, 6]``),
            or ``[N, ..., 4]`` with one ``transform`` row per image (``[N, 6]``).
        transform: The model's ``letterbox`` output.
        clip: Clip to the raw image, ``0..raw_width`` and ``0..raw_height``.

    Returns:
        float32 boxes of the same shape, in raw pixel coordinates.

    Raises:
        ValueError: The shapes do not fit (the message says which).
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    t = np.asarray(transform, dtype=np.float64)
    if boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [..., 4] (x1, y1, x2, y2), got shape {list(boxes.shape)}")
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != len(TRANSFORM_FIELDS):
        raise ValueError(f"transform must be the letterbox output [N, 6] ({', '.join(TRANSFORM_FIELDS)}), "
                         f"got shape {list(np.shape(transform))}")
    if t.shape[0] == 1:
        row = t[0]
    elif boxes.ndim >= 2 and boxes.shape[0] == t.shape[0]:
        row = t.reshape((t.shape[0],) + (1,) * (boxes.ndim - 2) + (6,))
    else:
        raise ValueError(f"{t.shape[0]} transform rows but boxes have shape {list(boxes.shape)}; "
                         f"pass [N, ..., 4] boxes with one transform row per image")
    new_h, new_w, top, left, height, width = (row[..., k] for k in range(6))
    if np.any(np.asarray(new_h) <= 0) or np.any(np.asarray(new_w) <= 0) or np.any(np.asarray(height) <= 0) \
            or np.any(np.asarray(width) <= 0):
        raise ValueError("transform has a non-positive size; pass the model's letterbox output unchanged")
    scale_y, scale_x = np.asarray(new_h / height), np.asarray(new_w / width)
    out = np.empty_like(boxes)
    out[..., 0::2] = (boxes[..., 0::2] - np.asarray(left)[..., None]) / scale_x[..., None]
    out[..., 1::2] = (boxes[..., 1::2] - np.asarray(top)[..., None]) / scale_y[..., None]
    if clip:
        out[..., 0::2] = np.clip(out[..., 0::2], 0, np.asarray(width)[..., None])
        out[..., 1::2] = np.clip(out[..., 1::2], 0, np.asarray(height)[..., None])
    return out.astype(np.float32)
