"""Undoing the layout changes onnx2tf makes to a model's outputs.

onnx2tf computes in NHWC, and an output that is a feature map (a detector's score or box
map, a segmentation mask) comes back channels-last: ONNX ``[1, C, H, W]``, TFLite
``[1, H, W, C]``. The raw output schema of a bundle is the same for every variant, so the
permutation is detected on a real sample (shape first; values decide between
permutations that give the same shape, e.g. when C == H) and compiled into the TFLite
graph as a ``Transpose``: the TFLite file then returns exactly the ONNX layout.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["OutputMatch", "match_outputs"]

#: Beyond this rank only the identity is tried (6! = 720 permutations is still cheap).
MAX_RANK = 6


@dataclass(frozen=True)
class OutputMatch:
    """Where ONNX output ``index`` is among the TensorFlow outputs, and how to lay it out.

    Attributes:
        index: Position of the ONNX output.
        source: Position of the TensorFlow output that holds it.
        perm: ``np.transpose`` axes turning the TensorFlow output into the ONNX layout
            (None: already the same layout).
        max_abs_error: Difference on the sample after the permutation.
    """

    index: int
    source: int
    perm: tuple[int, ...] | None
    max_abs_error: float


def _error(a: np.ndarray, b: np.ndarray) -> float:
    if not a.size:
        return 0.0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(a64) & np.isfinite(b64)
    if not np.array_equal(np.isfinite(a64), np.isfinite(b64)):
        return float("inf")
    return float(np.max(np.abs(a64[finite] - b64[finite]))) if finite.any() else 0.0


def match_outputs(tf_outputs: Sequence[np.ndarray], onnx_outputs: Sequence[np.ndarray]) -> list[OutputMatch] | None:
    """Pair every ONNX output with a TensorFlow output and the permutation that makes them equal.

    Args:
        tf_outputs: The TensorFlow (or TFLite) outputs on one sample, in any order and layout.
        onnx_outputs: onnxruntime's outputs on the same sample.

    Returns:
        One match per ONNX output (closest values among same-shape candidates), or None
        when some ONNX output has no TensorFlow output of a compatible shape (validation
        then names it).
    """
    used: set[int] = set()
    matches: list[OutputMatch] = []
    for index, want in enumerate(onnx_outputs):
        want = np.asarray(want)
        best: OutputMatch | None = None
        for source, got in enumerate(tf_outputs):
            got = np.asarray(got)
            if source in used or got.size != want.size or (got.dtype.kind in "fc") != (want.dtype.kind in "fc"):
                continue
            perms = itertools.permutations(range(got.ndim)) if got.ndim <= MAX_RANK else [tuple(range(got.ndim))]
            for perm in perms:
                if tuple(got.shape[p] for p in perm) != want.shape:
                    continue
                err = _error(want, got.transpose(perm))
                identity = perm == tuple(range(got.ndim))
                # Ties go to the identity: never add a transpose that the values do not ask for.
                if best is None or err < best.max_abs_error or (err == best.max_abs_error and identity):
                    best = OutputMatch(index, source, None if identity else tuple(perm), err)
        if best is None:
            return None
        used.add(best.source)
        matches.append(best)
    return matches
