"""Pure task metrics: boxes, masks, decoded strings, embeddings, per-stream decisions.

Every function here takes numpy arrays or Python sequences and returns numbers; none
runs a model. The task kinds (:mod:`edgepack.tasks.kinds`) decode model outputs into the
objects these functions compare, always the candidate against the fp32 reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "BOX_FORMATS", "average_precision", "box_iou", "character_error_rate", "connected_components", "ctc_greedy",
    "edit_distance", "mask_iou", "match_boxes", "nms", "per_sample_cosine", "stream_decision_agreement", "to_xyxy",
]

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


def to_xyxy(boxes: np.ndarray, box_format: str) -> np.ndarray:
    """Boxes ``[..., 4]`` in ``box_format`` as corner boxes ``(x1, y1, x2, y2)`` (float64)."""
    b = np.asarray(boxes, dtype=np.float64)
    if box_format == "xyxy":
        return b.copy()
    if box_format == "xywh":
        return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:4]], axis=-1)
    if box_format == "cxcywh":
        half = b[..., 2:4] / 2.0
        return np.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)
    raise ValueError(f"box format must be one of {', '.join(BOX_FORMATS)}, got {box_format!r}")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every pair of corner boxes: ``[len(a), len(b)]``.

    Degenerate boxes (zero or negative area) have IoU 0 with everything.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, classes: np.ndarray | None = None) -> np.ndarray:
    """Greedy non-maximum suppression; indices of the kept boxes, best score first.

    A box is dropped when it overlaps an already kept box (of the same class, when
    ``classes`` is given) with IoU strictly above ``iou_threshold``. Ties in score keep
    the lower index first (a stable sort), so the result is deterministic.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    if not len(order):
        return order.astype(np.int64)
    iou = box_iou(boxes, boxes)
    same = np.ones_like(iou, dtype=bool) if classes is None else (np.asarray(classes)[:, None] == np.asarray(classes)[None, :])
    suppressed = np.zeros(len(scores), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= (iou[i] > iou_threshold) & same[i]
    return np.asarray(keep, dtype=np.int64)


def match_boxes(reference: np.ndarray, candidate: np.ndarray, iou_threshold: float,
                ref_classes: np.ndarray | None = None, cand_classes: np.ndarray | None = None) -> int:
    """How many boxes match one to one at IoU ≥ ``iou_threshold`` (and equal class).

    Pairs are taken greedily from the highest IoU down, each box used once, which is
    optimal for the usual well-separated boxes and never counts a box twice.
    """
    iou = box_iou(reference, candidate)
    if not iou.size:
        return 0
    if ref_classes is not None and cand_classes is not None:
        iou = np.where(np.asarray(ref_classes)[:, None] == np.asarray(cand_classes)[None, :], iou, 0.0)
    pairs = np.argwhere(iou >= iou_threshold)
    if not len(pairs):
        return 0
    pairs = pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")]
    used_r: set[int] = set()
    used_c: set[int] = set()
    for r, c in pairs:
        if r not in used_r and c not in used_c:
            used_r.add(int(r))
            used_c.add(int(c))
    return len(used_r)


def average_precision(truth: Sequence[np.ndarray], predicted: Sequence[np.ndarray], scores: Sequence[np.ndarray],
                      iou_threshold: float = 0.5) -> float:
    """All-points interpolated average precision (VOC 2010+) of one class.

    Args:
        truth: Per sample, the reference boxes ``[k, 4]`` (corner format).
        predicted: Per sample, the candidate boxes ``[m, 4]``.
        scores: Per sample, the candidate scores ``[m]``.
        iou_threshold: A prediction is a true positive when it overlaps a not yet
            matched truth box of its sample with IoU ≥ this.

    Returns:
        AP in [0, 1]; 1.0 when there is neither truth nor prediction, 0.0 when only one
        side has boxes.
    """
    total = sum(len(t) for t in truth)
    flat = [(float(s), i, j) for i, ss in enumerate(scores) for j, s in enumerate(np.asarray(ss).reshape(-1))]
    if total == 0:
        return 1.0 if not flat else 0.0
    if not flat:
        return 0.0
    flat.sort(key=lambda x: (-x[0], x[1], x[2]))
    used = [np.zeros(len(t), dtype=bool) for t in truth]
    tp = np.zeros(len(flat))
    for k, (_s, i, j) in enumerate(flat):
        if not len(truth[i]):
            continue
        iou = box_iou(np.asarray(predicted[i]).reshape(-1, 4)[j:j + 1], truth[i])[0]
        iou[used[i]] = -1.0
        best = int(np.argmax(iou))
        if iou[best] >= iou_threshold:
            used[i][best] = True
            tp[k] = 1.0
    ctp = np.cumsum(tp)
    recall = ctp / total
    precision = ctp / np.arange(1, len(flat) + 1)
    # Precision envelope (monotonically non-increasing), integrated over recall steps.
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a 2-D boolean mask: ``(labels, count)``, labels 1..count.

    Label propagation in numpy (each pass takes the minimum label of the 4 neighbours),
    so it needs no scipy; passes stop when nothing changes.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                        padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(mask, neighbours, big)
        if np.array_equal(new, labels):
            break
        labels = new
    out = np.zeros((h, w), dtype=np.int64)
    roots = np.unique(labels[mask])
    for index, root in enumerate(roots, start=1):
        out[labels == root] = index
    return out, len(roots)


def ctc_greedy(logits: np.ndarray, blank: int = 0) -> list[int]:
    """Best-path CTC decode of one sequence ``[T, C]``: argmax, merge repeats, drop blanks."""
    best = np.asarray(logits).argmax(axis=-1).reshape(-1)
    out: list[int] = []
    previous = None
    for index in best.tolist():
        if index != previous and index != blank:
            out.append(index)
        previous = index
    return out


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions and substitutions cost 1)."""
    a, b = list(a), list(b)
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def character_error_rate(reference: Sequence[Sequence], candidate: Sequence[Sequence]) -> float:
    """Total edit distance over total reference length (0 when both are all empty)."""
    errors = sum(edit_distance(r, c) for r, c in zip(reference, candidate))
    length = sum(len(r) for r in reference)
    if length == 0:
        return 0.0 if errors == 0 else float(errors)
    return errors / length


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty (nothing to disagree on)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    union = int(np.sum(a | b))
    return 1.0 if union == 0 else int(np.sum(a & b)) / union


def per_sample_cosine(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (row) after flattening; 1 when both rows are zero."""
    r = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    c = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    dot = np.sum(r * c, axis=1)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
    both_zero = (np.linalg.norm(r, axis=1) == 0) & (np.linalg.norm(c, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, cos)


def stream_decision_agreement(reference: Sequence[Sequence], candidate: Sequence[Sequence]) -> dict:
    """Agreement of per-stream decision sequences (e.g. speech / no speech per chunk).

    Args:
        reference: One decision sequence per stream, from the fp32 model.
        candidate: The candidate's sequences for the same streams, same lengths.

    Returns:
        ``decision_agreement`` (share of all decisions equal), ``streams_identical``
        (share of streams whose whole sequence is equal), ``min_stream_agreement``
        (the worst stream), ``per_stream`` (each stream's agreement), ``streams`` and
        ``decisions`` (counts).

    Raises:
        ValueError: The two sides have different numbers of streams or a stream differs in length.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference streams but {len(candidate)} candidate streams")
    equal = total = identical = 0
    worst = 1.0
    per_stream = []
    for index, (r, c) in enumerate(zip(reference, candidate)):
        r, c = np.asarray(r).reshape(-1), np.asarray(c).reshape(-1)
        if len(r) != len(c):
            raise ValueError(f"stream {index} has {len(r)} reference decisions but {len(c)} candidate decisions")
        same = int(np.sum(r == c))
        equal += same
        total += len(r)
        identical += int(same == len(r))
        per_stream.append(same / len(r) if len(r) else 1.0)
        worst = min(worst, per_stream[-1])
    return {"decision_agreement": equal / total if total else 1.0,
            "streams_identical": identical / len(reference) if len(reference) else 1.0,
            "min_stream_agreement": worst, "per_stream": per_stream, "streams": len(reference), "decisions": total}
