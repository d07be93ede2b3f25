"""Accumulators fed batch by batch while a candidate runs beside the fp32 reference.

:class:`OutputStats` keeps, for EVERY output, what the per-output gate reads (cosine,
max abs error, error relative to the output's largest value, share of equal values for
integer outputs). :class:`TaskRun` decodes the task's outputs of both models per batch
and keeps only the decoded objects (boxes, strings, masks), then computes the task's
metrics. Their ``result()`` values are plain JSON-ready dicts, stored on
:class:`edgepack.optimize.evaluate.Numerics`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .spec import TaskSpec

__all__ = ["OutputStats", "TaskRun"]


class OutputStats:
    """Per-output agreement of a candidate with the reference, accumulated over batches."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._s = [{"dot": 0.0, "ref_sq": 0.0, "cand_sq": 0.0, "max_abs": 0.0, "peak": 0.0, "equal": 0, "total": 0,
                    "kind": None, "same_shape": True, "finite": True} for _ in self.names]

    def add(self, ref_out: Sequence[np.ndarray], cand_out: Sequence[np.ndarray]) -> None:
        for s, ref, cand in zip(self._s, ref_out, cand_out):
            ref, cand = np.asarray(ref), np.asarray(cand)
            if ref.shape != cand.shape:
                s["same_shape"] = False
                continue
            if ref.dtype.kind in "f" and cand.dtype.kind in "f":
                s["kind"] = "float"
                r, c = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
                ok = np.isfinite(r)
                if not np.all(np.isfinite(c[ok])):
                    s["finite"] = False
                r, c = np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0), np.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0)
                s["dot"] += float(r @ c)
                s["ref_sq"] += float(r @ r)
                s["cand_sq"] += float(c @ c)
                if r.size:
                    s["max_abs"] = max(s["max_abs"], float(np.max(np.abs(r - c))))
                    s["peak"] = max(s["peak"], float(np.max(np.abs(r))))
            else:
                s["kind"] = s["kind"] or "exact"
                s["equal"] += int(np.sum(ref == cand))
                s["total"] += int(ref.size)

    def result(self) -> list[dict]:
        out = []
        for name, s in zip(self.names, self._s):
            entry: dict = {"name": name, "kind": s["kind"] or "empty", "same_shape": s["same_shape"], "finite": s["finite"]}
            if s["kind"] == "float":
                if s["ref_sq"] == 0.0 and s["cand_sq"] == 0.0:
                    cosine = 1.0
                elif s["ref_sq"] == 0.0 or s["cand_sq"] == 0.0:
                    cosine = 0.0
                else:
                    cosine = s["dot"] / (np.sqrt(s["ref_sq"]) * np.sqrt(s["cand_sq"]))
                rel = s["max_abs"] / s["peak"] if s["peak"] > 0 else (0.0 if s["max_abs"] == 0 else float("inf"))
                entry.update(cosine=float(cosine), max_abs_error=s["max_abs"], rel_error=float(rel))
            elif s["kind"] == "exact":
                entry["match"] = s["equal"] / s["total"] if s["total"] else 1.0
            out.append(entry)
        return out


class TaskRun:
    """Decodes the task outputs of both models batch by batch; ``result()`` gives the metrics."""

    def __init__(self, task: TaskSpec, names: Sequence[str]) -> None:
        task.check_outputs(list(names))
        self.task = task
        self.names = list(names)
        self._ref: list = []
        self._cand: list = []
        self._labels: list = []

    def add(self, ref_out: Sequence[np.ndarray], cand_out: Sequence[np.ndarray], labels: np.ndarray | None) -> None:
        impl, params = self.task.impl, self.task.params
        self._ref.extend(impl.decode(params, dict(zip(self.names, ref_out))))
        self._cand.extend(impl.decode(params, dict(zip(self.names, cand_out))))
        if labels is not None:
            self._labels.append(np.asarray(labels))

    def result(self) -> dict:
        labels = np.concatenate(self._labels) if self._labels else None
        metrics = self.task.impl.compare(self.task.params, self._ref, self._cand, labels)
        return {"kind": self.task.kind, "samples": len(self._ref), "metrics": {k: _plain(v) for k, v in metrics.items()}}


def _plain(value):
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    return value
