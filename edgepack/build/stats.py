"""Reference statistics of the validation data, for drift monitoring on devices.

``stats/reference.json`` describes what "normal" input and output look like:

* ``inputs``: per raw input, per feature (tabular ``[N, F]``: each column) or per
  channel (images ``[N, H, W, C]``: the last axis), the quantile bin edges (deciles,
  11 edges) plus min, max, mean and std, over the first :data:`MAX_SAMPLES` samples.
* ``predictions``: per variant, the predicted-class distribution (share of samples
  per class, argmax of the first output) and a 10-bin histogram of the top-1
  confidence in [0, 1] (the first output's max when it already sums to 1 per row,
  else the max of its softmax).

Everything is computed in float64 with numpy and written as canonical JSON, so the
file is byte-identical for the same data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["MAX_SAMPLES", "QUANTILES", "reference_stats", "stats_json"]

MAX_SAMPLES = 10_000
QUANTILES = tuple(i / 10 for i in range(11))
CONFIDENCE_BINS = 10


def _features(array: np.ndarray) -> tuple[str, np.ndarray]:
    """(axis kind, [features, values]) for one raw input array ``[N, ...]``."""
    array = np.asarray(array)
    if array.ndim == 1:
        return "value", array.reshape(1, -1)
    if array.ndim == 2:
        return "column", array.T
    channels = array.shape[-1]
    return "channel", np.moveaxis(array, -1, 0).reshape(channels, -1)


def _summary(values: np.ndarray) -> dict:
    v = values.astype(np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"count": 0, "missing": int(values.size)}
    return {
        "count": int(v.size),
        "missing": int(values.size - v.size),
        "min": float(v.min()),
        "max": float(v.max()),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "quantiles": [float(q) for q in np.quantile(v, QUANTILES)],
    }


def input_stats(raw: Mapping[str, np.ndarray], feature_names: Mapping[str, Sequence[str]] | None = None) -> dict:
    out = {}
    for name in sorted(raw):
        kind, features = _features(raw[name])
        names = list((feature_names or {}).get(name) or [])
        if len(names) != features.shape[0]:
            names = [str(i) for i in range(features.shape[0])]
        out[name] = {
            "per": kind,
            "samples": int(np.asarray(raw[name]).shape[0]),
            "features": [{"name": n, **_summary(f)} for n, f in zip(names, features)],
        }
    return out


def _confidences(scores: np.ndarray) -> np.ndarray:
    s = scores.astype(np.float64)
    sums = s.sum(axis=1)
    if np.all(s >= 0) and np.allclose(sums, 1.0, atol=1e-3):
        return s.max(axis=1)
    shifted = s - s.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=1, keepdims=True)).max(axis=1)


def prediction_stats(first_outputs: np.ndarray, labels: Sequence[str] | None) -> dict | None:
    """Class distribution and confidence histogram of ``[N, classes]`` scores (None otherwise)."""
    scores = np.asarray(first_outputs)
    if scores.ndim != 2 or scores.shape[1] < 2 or scores.dtype.kind != "f":
        return None
    classes = scores.shape[1]
    predicted = np.nan_to_num(scores, nan=-np.inf).argmax(axis=1)
    counts = np.bincount(predicted, minlength=classes)
    hist, edges = np.histogram(np.clip(_confidences(scores), 0.0, 1.0), bins=CONFIDENCE_BINS, range=(0.0, 1.0))
    names = list(labels) if labels is not None and len(labels) == classes else [str(i) for i in range(classes)]
    total = max(int(scores.shape[0]), 1)
    return {
        "samples": int(scores.shape[0]),
        "class_distribution": {n: float(c / total) for n, c in zip(names, counts)},
        "confidence_histogram": {"edges": [float(e) for e in edges], "shares": [float(h / total) for h in hist]},
    }


def reference_stats(raw: Mapping[str, np.ndarray], first_outputs: Mapping[str, np.ndarray],
                    labels: Sequence[str] | None, feature_names: Mapping[str, Sequence[str]] | None = None) -> dict:
    """The whole reference-statistics document."""
    return {
        "format": 1,
        "quantiles": list(QUANTILES),
        "inputs": input_stats(raw, feature_names),
        "predictions": {v: prediction_stats(first_outputs[v], labels) for v in sorted(first_outputs)},
    }


def stats_json(doc: dict) -> bytes:
    return (json.dumps(doc, sort_keys=True, indent=1, allow_nan=False) + "\n").encode("ascii")
