"""Task kinds: which outputs mean what, how they decode, and the metrics that gate them.

Each kind is a small class registered in :data:`KINDS`. Its ``decode`` turns one batch
of model outputs (by output name) into one decoded object per sample and its
``compare`` turns the decoded reference and candidate into metric values; both are
pure. ``validate`` checks a declaration without touching a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from . import metrics as m

__all__ = ["KINDS", "GateRule", "Kind"]

_NUMBER = (int, float)


@dataclass(frozen=True)
class GateRule:
    """One task gate: ``gates.<key>`` bounds ``metric`` from below (min) or above (max).

    Attributes:
        key: The ``gates:`` key (and the optimize task file's).
        metric: The metric it reads from the task result.
        bound: ``min`` or ``max``.
        default: Applied when the task is declared and the key is not set (None: report only).
        label: How failure messages name the metric.
        fraction: The value is a fraction (shown as a percentage, validated in [0, 1]).
    """

    key: str
    metric: str
    bound: str
    default: float | None
    label: str
    fraction: bool = True

    def show(self, value: float) -> str:
        return f"{value * 100:.2f}%" if self.fraction else f"{value:.4g}"


def _is_number(value: Any) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def _name(params: dict, key: str, problems: list[str], required: bool = True) -> None:
    value = params.get(key)
    if value is None:
        if required:
            problems.append(f"task.{key}: required (the name of the model output)")
    elif not isinstance(value, str) or not value:
        problems.append(f"task.{key}: must be an output name (a non-empty string), got {value!r}")


def _choice(params: dict, key: str, choices: tuple[str, ...], problems: list[str]) -> None:
    if key in params and params[key] not in choices:
        problems.append(f"task.{key}: must be one of {', '.join(choices)}, got {params[key]!r}")


def _range(params: dict, key: str, problems: list[str], low: float | None = None, high: float | None = None,
           integer: bool = False) -> None:
    if key not in params:
        return
    value = params[key]
    ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else _is_number(value)
    if ok and low is not None and value < low:
        ok = False
    if ok and high is not None and value > high:
        ok = False
    if not ok:
        what = "an integer" if integer else "a number"
        bounds = "" if low is None and high is None else f" from {low if low is not None else '-inf'} to {high if high is not None else 'inf'}"
        problems.append(f"task.{key}: must be {what}{bounds}, got {value!r}")


def _per_sample(array: np.ndarray, name: str, min_ndim: int) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim < min_ndim:
        from ..errors import ModelError

        raise ModelError(f"The task output {name!r} has shape {list(a.shape)}; it needs at least {min_ndim} dimensions "
                         "(a leading batch axis).")
    return a


class Kind:
    """Base of the task kinds. Subclasses set ``name``, ``keys``, ``gates`` and implement the rest."""

    name = ""
    #: Allowed declaration keys (besides ``kind``) with their defaults; None: no default.
    keys: MappingProxyType = MappingProxyType({})
    gates: tuple[GateRule, ...] = ()

    def validate(self, params: dict) -> list[str]:
        return []

    def outputs(self, params: dict) -> tuple[str, ...]:
        """The model outputs this task reads (so they are gated by it, not by the per-output gate)."""
        return tuple(params[k] for k in self.output_keys if params.get(k))

    output_keys: tuple[str, ...] = ()

    def decode(self, params: dict, outputs: dict[str, np.ndarray]) -> list:
        raise NotImplementedError

    def compare(self, params: dict, reference: list, candidate: list, labels: np.ndarray | None) -> dict:
        raise NotImplementedError


class Classification(Kind):
    name = "classification"
    keys = MappingProxyType({"output": None})
    output_keys = ("output",)
    gates = (
        GateRule("min_agreement", "agreement", "min", 0.98, "top-1 agreement"),
        GateRule("max_accuracy_drop", "accuracy_drop", "max", 0.01, "accuracy drop"),
    )

    def validate(self, params):
        problems: list[str] = []
        _name(params, "output", problems)
        return problems

    def decode(self, params, outputs):
        scores = _per_sample(outputs[params["output"]], params["output"], 2)
        scores = np.nan_to_num(scores.reshape(len(scores), -1).astype(np.float64), nan=-np.inf)
        return [int(i) for i in scores.argmax(axis=1)]

    def compare(self, params, reference, candidate, labels):
        ref, cand = np.asarray(reference), np.asarray(candidate)
        out = {"agreement": float(np.mean(ref == cand)) if len(ref) else 1.0}
        if labels is not None and len(labels) == len(ref):
            out["accuracy"] = float(np.mean(cand == labels))
            out["reference_accuracy"] = float(np.mean(ref == labels))
            out["accuracy_drop"] = out["reference_accuracy"] - out["accuracy"]
        return out


class Detection(Kind):
    """Boxes the graph emits (``boxes`` [+ ``scores``, ``classes``]) or a dense score map decoded here.

    Dense heads: ``score_map`` ``[N, H, W]`` or ``[N, 1, H, W]``. ``decode: connected``
    boxes each 4-connected region above ``threshold`` (score: the region's peak);
    ``decode: grid`` makes one box per cell above ``threshold``, from ``box_offsets``
    ``[N, 4, H, W]`` (left, top, right, bottom distances in input pixels from the cell
    centre, anchor-free) or the cell itself. Map cells are ``stride`` input pixels.
    Then NMS at ``nms_iou``.
    """

    name = "detection"
    keys = MappingProxyType({"boxes": None, "box_format": "xyxy", "scores": None, "classes": None, "score_map": None, "box_offsets": None,
            "decode": "connected", "threshold": 0.5, "stride": 1, "min_area": 1, "nms_iou": None, "match_iou": 0.5,
            "max_detections": 300})
    output_keys = ("boxes", "scores", "classes", "score_map", "box_offsets")
    gates = (
        GateRule("min_box_recall", "box_recall", "min", 0.95, "box recall"),
        GateRule("min_box_precision", "box_precision", "min", 0.95, "box precision"),
        GateRule("min_map50", "map50", "min", None, "mAP@0.5"),
    )

    def validate(self, params):
        problems: list[str] = []
        dense = params.get("score_map") is not None
        if dense == (params.get("boxes") is not None):
            problems.append("task: a detection task declares either 'boxes' (the model emits boxes) or 'score_map' "
                            "(a dense head decoded here), not both or neither")
        for key in self.output_keys:
            _name(params, key, problems, required=False)
        if dense:
            for key in ("scores", "classes", "box_format"):
                if key in params:
                    problems.append(f"task.{key}: applies to models that emit boxes, not to a score_map head")
        else:
            for key in ("box_offsets", "decode", "stride", "min_area"):
                if key in params:
                    problems.append(f"task.{key}: applies to a score_map head, not to models that emit boxes")
        _choice(params, "box_format", m.BOX_FORMATS, problems)
        _choice(params, "decode", ("connected", "grid"), problems)
        if params.get("decode") == "connected" and "box_offsets" in params:
            problems.append("task.box_offsets: used by decode: grid only")
        for key in ("threshold", "match_iou"):
            _range(params, key, problems, 0.0, 1.0) if key == "match_iou" else _range(params, key, problems)
        if params.get("nms_iou") is not None:
            _range(params, "nms_iou", problems, 0.0, 1.0)
        _range(params, "stride", problems, 1e-9)
        _range(params, "min_area", problems, 1, integer=True)
        _range(params, "max_detections", problems, 1, integer=True)
        return problems

    def _nms_iou(self, params) -> float | None:
        if params.get("nms_iou") is not None:
            return float(params["nms_iou"])
        # Dense grid cells each vote for a box: without NMS one object is many boxes.
        return 0.5 if params.get("score_map") and params.get("decode", "connected") == "grid" else None

    def decode(self, params, outputs):
        p = {**self.keys, **params}
        if p["score_map"]:
            raw = self._decode_dense(p, outputs)
        else:
            raw = self._decode_boxes(p, outputs)
        iou = self._nms_iou(params)
        out = []
        for boxes, scores, classes in raw:
            if iou is not None and len(boxes):
                keep = m.nms(boxes, scores, iou, classes)
                boxes, scores, classes = boxes[keep], scores[keep], None if classes is None else classes[keep]
            order = np.argsort(-scores, kind="stable")[: int(p["max_detections"])]
            out.append((boxes[order], scores[order], None if classes is None else classes[order]))
        return out

    def _decode_boxes(self, p, outputs):
        boxes = _per_sample(outputs[p["boxes"]], p["boxes"], 2)
        n = len(boxes)
        boxes = m.to_xyxy(boxes.reshape(n, -1, 4), p["box_format"])
        scores = (np.asarray(outputs[p["scores"]], dtype=np.float64).reshape(n, -1) if p["scores"]
                  else np.ones(boxes.shape[:2]))
        classes = np.asarray(outputs[p["classes"]]).reshape(n, -1).astype(np.int64) if p["classes"] else None
        if scores.shape[1] != boxes.shape[1] or (classes is not None and classes.shape[1] != boxes.shape[1]):
            from ..errors import ModelError

            raise ModelError(f"The detection outputs disagree: {boxes.shape[1]} boxes per sample but "
                             f"{scores.shape[1]} scores" + ("" if classes is None else f" and {classes.shape[1]} classes"))
        result = []
        for i in range(n):
            keep = np.nan_to_num(scores[i], nan=-np.inf) >= float(p["threshold"])
            result.append((boxes[i][keep], scores[i][keep], None if classes is None else classes[i][keep]))
        return result

    def _decode_dense(self, p, outputs):
        heat = _per_sample(outputs[p["score_map"]], p["score_map"], 3).astype(np.float64)
        if heat.ndim == 4:
            if heat.shape[1] != 1:
                from ..errors import ModelError

                raise ModelError(f"The score map {p['score_map']!r} has shape {list(heat.shape)}; a dense detection head "
                                 "needs [N, H, W] or [N, 1, H, W].")
            heat = heat[:, 0]
        stride = float(p["stride"])
        threshold = float(p["threshold"])
        offsets = np.asarray(outputs[p["box_offsets"]], dtype=np.float64) if p["box_offsets"] else None
        result = []
        for i in range(len(heat)):
            on = np.nan_to_num(heat[i], nan=-np.inf) > threshold
            if p["decode"] == "connected":
                labels, count = m.connected_components(on)
                boxes, scores = [], []
                for label in range(1, count + 1):
                    ys, xs = np.nonzero(labels == label)
                    if len(ys) < int(p["min_area"]):
                        continue
                    boxes.append([xs.min() * stride, ys.min() * stride, (xs.max() + 1) * stride, (ys.max() + 1) * stride])
                    scores.append(float(heat[i][ys, xs].max()))
                result.append((np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64), None))
            else:
                ys, xs = np.nonzero(on)
                cx, cy = (xs + 0.5) * stride, (ys + 0.5) * stride
                if offsets is not None:
                    l, t, r, b = (offsets[i, k, ys, xs] for k in range(4))
                else:
                    l = t = r = b = np.full(len(xs), stride / 2.0)
                boxes = np.stack([cx - l, cy - t, cx + r, cy + b], axis=1) if len(xs) else np.zeros((0, 4))
                result.append((boxes, heat[i][ys, xs], None))
        return result

    def compare(self, params, reference, candidate, labels):
        p = {**self.keys, **params}
        iou = float(p["match_iou"])
        matched = ref_total = cand_total = 0
        for (rb, _rs, rc), (cb, _cs, cc) in zip(reference, candidate):
            matched += m.match_boxes(rb, cb, iou, rc, cc)
            ref_total += len(rb)
            cand_total += len(cb)
        classes = sorted({int(c) for r in reference if r[2] is not None for c in r[2]}
                         | {int(c) for r in candidate if r[2] is not None for c in r[2]})
        if reference and reference[0][2] is not None and classes:
            aps = []
            for k in classes:
                truth = [r[0][r[2] == k] for r in reference]
                pred = [c[0][c[2] == k] for c in candidate]
                scores = [c[1][c[2] == k] for c in candidate]
                if sum(len(t) for t in truth):
                    aps.append(m.average_precision(truth, pred, scores, 0.5))
            map50 = float(np.mean(aps)) if aps else (1.0 if cand_total == 0 else 0.0)
        else:
            map50 = m.average_precision([r[0] for r in reference], [c[0] for c in candidate], [c[1] for c in candidate], 0.5)
        return {
            "box_recall": matched / ref_total if ref_total else 1.0,
            "box_precision": matched / cand_total if cand_total else 1.0,
            "map50": map50,
            "reference_boxes": ref_total,
            "candidate_boxes": cand_total,
            "matched_boxes": matched,
            "match_iou": iou,
        }


class Segmentation(Kind):
    """Mask logits/probabilities: ``decode: threshold`` (binary, ``[N, H, W]`` or ``[N, 1, H, W]``)
    or ``decode: argmax`` over ``channel_axis`` (classes). Metric: mean per-sample mask IoU
    (for argmax, the mean IoU over the classes present in either mask)."""

    name = "segmentation"
    keys = MappingProxyType({"output": None, "decode": "threshold", "threshold": 0.5, "channel_axis": 1})
    output_keys = ("output",)
    gates = (GateRule("min_mask_iou", "mask_iou", "min", 0.95, "mean mask IoU"),)

    def validate(self, params):
        problems: list[str] = []
        _name(params, "output", problems)
        _choice(params, "decode", ("threshold", "argmax"), problems)
        _range(params, "threshold", problems)
        _range(params, "channel_axis", problems, 1, integer=True)
        return problems

    def decode(self, params, outputs):
        p = {**self.keys, **params}
        a = _per_sample(outputs[p["output"]], p["output"], 3).astype(np.float64)
        if p["decode"] == "argmax":
            return list(np.nan_to_num(a, nan=-np.inf).argmax(axis=int(p["channel_axis"])))
        if a.ndim == 4 and a.shape[1] == 1:
            a = a[:, 0]
        return list(np.nan_to_num(a, nan=-np.inf) > float(p["threshold"]))

    def compare(self, params, reference, candidate, labels):
        p = {**self.keys, **params}
        ious = []
        for r, c in zip(reference, candidate):
            if p["decode"] == "argmax":
                present = np.union1d(np.unique(r), np.unique(c))
                ious.append(float(np.mean([m.mask_iou(r == k, c == k) for k in present])))
            else:
                ious.append(m.mask_iou(r, c))
        return {"mask_iou": float(np.mean(ious)) if ious else 1.0, "min_mask_iou": float(np.min(ious)) if ious else 1.0}


class CTC(Kind):
    """Sequence text: ``logits`` ``[N, T, C]`` (``layout: NTC``) or ``[T, N, C]`` (``TNC``),
    greedy (best-path) CTC decode with ``blank``; ``alphabet`` (or ``alphabet_file``, one
    symbol per line) lists the symbols of the non-blank classes in class order."""

    name = "ctc"
    keys = MappingProxyType({"logits": None, "layout": "NTC", "blank": 0, "alphabet": None, "alphabet_file": None})
    output_keys = ("logits",)
    gates = (
        GateRule("min_string_agreement", "string_agreement", "min", 0.98, "decoded-string agreement"),
        GateRule("max_cer", "cer", "max", None, "character error rate"),
    )

    def validate(self, params):
        problems: list[str] = []
        _name(params, "logits", problems)
        _choice(params, "layout", ("NTC", "TNC"), problems)
        _range(params, "blank", problems, 0, integer=True)
        if params.get("alphabet") is not None and params.get("alphabet_file") is not None:
            problems.append("task: give either alphabet or alphabet_file, not both")
        if params.get("alphabet") is not None and (not isinstance(params["alphabet"], str) or not params["alphabet"]):
            problems.append("task.alphabet: must be a non-empty string of the symbols, in class order without the blank")
        if params.get("alphabet_file") is not None and not isinstance(params["alphabet_file"], str):
            problems.append("task.alphabet_file: must be a file path")
        return problems

    def decode(self, params, outputs):
        p = {**self.keys, **params}
        logits = _per_sample(outputs[p["logits"]], p["logits"], 3)
        if p["layout"] == "TNC":
            logits = np.swapaxes(logits, 0, 1)
        alphabet = p.get("alphabet")
        blank = int(p["blank"])
        classes = logits.shape[-1]
        if alphabet is not None and len(alphabet) + 1 != classes:
            from ..errors import ConfigError

            raise ConfigError(f"task.alphabet has {len(alphabet)} symbols but the output {p['logits']!r} has {classes} "
                              f"classes; the alphabet lists every class except the blank ({classes - 1} symbols).")
        out = []
        for seq in logits:
            indices = m.ctc_greedy(np.nan_to_num(seq.astype(np.float64), nan=-np.inf), blank)
            if alphabet is None:
                out.append(tuple(indices))
            else:
                out.append("".join(alphabet[i - (i > blank)] for i in indices))
        return out

    def compare(self, params, reference, candidate, labels):
        same = sum(r == c for r, c in zip(reference, candidate))
        return {"string_agreement": same / len(reference) if reference else 1.0,
                "cer": m.character_error_rate(reference, candidate),
                "changed_strings": len(reference) - same}


class Embedding(Kind):
    name = "embedding"
    keys = MappingProxyType({"output": None})
    output_keys = ("output",)
    gates = (GateRule("min_embedding_cosine", "min_cosine", "min", 0.95, "worst per-sample embedding cosine", False),)

    def validate(self, params):
        problems: list[str] = []
        _name(params, "output", problems)
        return problems

    def decode(self, params, outputs):
        return list(_per_sample(outputs[params["output"]], params["output"], 1).astype(np.float64))

    def compare(self, params, reference, candidate, labels):
        if not reference:
            return {"min_cosine": 1.0, "mean_cosine": 1.0}
        cos = m.per_sample_cosine(np.stack(reference), np.stack(candidate))
        return {"min_cosine": float(np.min(cos)), "mean_cosine": float(np.mean(cos))}


class Regression(Kind):
    """Values compared directly: max abs error, and max relative error = max |candidate − fp32|
    over the largest |fp32| value of the output (stable where single values are near 0)."""

    name = "regression"
    keys = MappingProxyType({"output": None})
    output_keys = ("output",)
    gates = (
        GateRule("max_abs_error", "max_abs_error", "max", None, "max abs error", False),
        GateRule("max_rel_error", "max_rel_error", "max", 0.05, "max relative error", False),
    )

    def validate(self, params):
        problems: list[str] = []
        _name(params, "output", problems)
        return problems

    def decode(self, params, outputs):
        return list(_per_sample(outputs[params["output"]], params["output"], 1).astype(np.float64))

    def compare(self, params, reference, candidate, labels):
        if not reference:
            return {"max_abs_error": 0.0, "max_rel_error": 0.0, "mean_abs_error": 0.0}
        r, c = np.stack(reference), np.stack(candidate)
        diff = np.abs(r - c)
        diff = np.where(np.isnan(diff), np.inf, diff)
        peak = float(np.max(np.abs(r))) if r.size else 0.0
        worst = float(np.max(diff)) if diff.size else 0.0
        return {"max_abs_error": worst, "max_rel_error": worst / peak if peak > 0 else (0.0 if worst == 0 else float("inf")),
                "mean_abs_error": float(np.mean(diff)) if diff.size else 0.0}


class Streaming(Kind):
    """Per-step decisions of a streaming model: ``output`` thresholded at ``threshold`` (one
    value per sample) or its argmax (several). Without per-stream evaluation the samples
    form one stream in order; stateful evaluation calls :func:`metrics.stream_decision_agreement`."""

    name = "streaming"
    keys = MappingProxyType({"output": None, "threshold": 0.5})
    output_keys = ("output",)
    gates = (GateRule("min_decision_agreement", "decision_agreement", "min", 0.98, "per-stream decision agreement"),)

    def validate(self, params):
        problems: list[str] = []
        _name(params, "output", problems)
        _range(params, "threshold", problems)
        return problems

    @staticmethod
    def decisions(params: dict, values: np.ndarray) -> np.ndarray:
        """One decision per sample of one output batch (pure; also used by stateful evaluation)."""
        a = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
        if a.shape[1] == 1:
            return (np.nan_to_num(a[:, 0], nan=-np.inf) > float(params.get("threshold", 0.5))).astype(np.int64)
        return np.nan_to_num(a, nan=-np.inf).argmax(axis=1)

    def decode(self, params, outputs):
        return [int(d) for d in self.decisions(params, _per_sample(outputs[params["output"]], params["output"], 1))]

    def compare(self, params, reference, candidate, labels):
        return m.stream_decision_agreement([reference], [candidate])


#: Task kinds by name (the ``task.kind`` values).
KINDS: dict[str, Kind] = {k.name: k for k in (Classification(), Detection(), Segmentation(), CTC(), Embedding(),
                                               Regression(), Streaming())}
