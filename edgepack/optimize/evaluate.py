"""Measuring a candidate model against the original: numerics, accuracy and latency."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..data import Dataset
from ..modelio import TensorSpec


@dataclass(frozen=True)
class Numerics:
    """How a candidate's outputs compare with the original's on the same inputs.

    Attributes:
        samples: Samples compared.
        max_abs_error: Largest absolute difference over all float outputs.
        cosine: Cosine similarity of the flattened first output.
        agreement: Share of samples whose top-1 class matches (None for non-class outputs).
        accuracy: Top-1 accuracy against labels (None without labels).
        reference_accuracy: The original model's accuracy on the same samples.
        finite: False when the candidate produced NaN or infinity.
        close: Every output matches within ``rtol=1e-3, atol=1e-5`` (ONNX's own test
            tolerance family): a lossless rewrite must keep this True.
        outputs: Per output (every one, not only the first): ``{name, kind, cosine,
            max_abs_error, rel_error}`` for float outputs, ``{name, kind, match}`` for
            integer ones (see :class:`edgepack.tasks.OutputStats`).
        task: With a declared task: ``{kind, samples, metrics}`` after decoding both
            models' outputs alike (see :class:`edgepack.tasks.TaskRun`); else None.
        class_samples: Samples behind ``agreement`` and ``accuracy`` (0 for non-class outputs).
        agreed: Of those, samples whose top-1 class matches the original's.
        fp32_only: Samples the original classifies right and the candidate wrong (the paired
            count ``b`` of :mod:`edgepack.optimize.significance`; 0 without labels).
        candidate_only: Samples the candidate classifies right and the original wrong (``c``).
        label_outputs: Per further integer class-id output (a ``[N]`` or ``[N, 1]`` label such
            as scikit-learn's ``label``): ``[agreed, samples]`` against the original.
    """

    samples: int
    max_abs_error: float
    cosine: float
    agreement: float | None
    accuracy: float | None
    reference_accuracy: float | None
    finite: bool
    close: bool = True
    outputs: tuple = ()
    task: dict | None = None
    class_samples: int = 0
    agreed: int = 0
    fp32_only: int = 0
    candidate_only: int = 0
    label_outputs: dict = field(default_factory=dict)


# Tolerance for "this rewrite did not change the outputs".
RTOL = 1e-3
ATOL = 1e-5


@dataclass(frozen=True)
class Latency:
    """Per-inference latency in milliseconds."""

    median_ms: float
    p95_ms: float
    runs: int


def session(model_bytes: bytes, threads: int):
    """An onnxruntime CPU session with fixed threads (comparable across candidates)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def batch_size_for(inputs: Sequence[TensorSpec], preferred: int = 32) -> int:
    """Rows per inference: the static leading dimension when the model fixes it."""
    fixed = {s.shape[0] for s in inputs if s.shape and s.shape[0] is not None}
    return fixed.pop() if len(fixed) == 1 else preferred


def _is_class_output(array: np.ndarray) -> bool:
    return array.ndim == 2 and array.shape[1] > 1 and array.dtype.kind == "f"


def compare(reference, candidate, dataset: Dataset, batch_size: int, limit: int | None = None, task=None) -> Numerics:
    """Run both sessions over the dataset and compare the outputs sample by sample.

    Args:
        task: An :class:`edgepack.tasks.TaskSpec`: its outputs are decoded and compared too.
    """
    from ..tasks.measure import OutputStats, TaskRun

    names = [o.name for o in reference.get_outputs()]
    per_output = OutputStats(names)
    task_run = TaskRun(task, names) if task is not None else None
    max_err = 0.0
    dot = ref_sq = cand_sq = 0.0
    agree = class_rows = 0
    correct = ref_correct = fp32_only = candidate_only = 0
    finite = True
    close = True
    seen = 0
    labels = dataset.labels
    label_counts: dict[str, list[int]] = {}
    try:
        output_names = [o.name for o in reference.get_outputs()]
    except AttributeError:  # a session without output metadata: name the outputs by position
        output_names = []
    for start, feed in dataset.batches(batch_size, limit):
        rows = next(iter(feed.values())).shape[0] if feed else 0
        if rows != batch_size and batch_size_fixed(reference, batch_size):
            break  # a model with a fixed batch dimension cannot take the short tail
        ref_out = reference.run(None, feed)
        cand_out = candidate.run(None, feed)
        per_output.add(ref_out, cand_out)
        if task_run is not None:
            task_run.add(ref_out, cand_out, None if labels is None else labels[start : start + rows])
        for ref, cand in zip(ref_out, cand_out):
            ref = np.asarray(ref)
            cand = np.asarray(cand)
            if ref.shape != cand.shape or ref.dtype != cand.dtype:
                close = False
                max_err = float("inf")
            elif ref.dtype.kind in "fc":
                r64 = ref.astype(np.complex128 if ref.dtype.kind == "c" else np.float64)
                c64 = cand.astype(r64.dtype)
                ref_finite = np.isfinite(r64)
                cand_finite = np.isfinite(c64)
                if not np.all(cand_finite[ref_finite]):
                    finite = False
                    close = False
                    max_err = float("inf")
                elif ref.size:
                    # Non-finite reference values must be reproduced exactly (inf stays inf, NaN stays NaN).
                    same_nonfinite = np.array_equal(np.isnan(r64), np.isnan(c64)) and np.array_equal(
                        r64[~ref_finite & ~np.isnan(r64)], c64[~ref_finite & ~np.isnan(r64)]
                    )
                    diff = np.abs(r64[ref_finite] - c64[ref_finite])
                    if diff.size:
                        max_err = max(max_err, float(np.max(diff)))
                        if float(np.max(diff - RTOL * np.abs(r64[ref_finite]))) > ATOL:
                            close = False
                    if not same_nonfinite:
                        close = False
            elif not np.array_equal(ref, cand):
                close = False  # integer outputs (class ids, top-k indices) must match exactly
        for index, (ref, cand) in enumerate(zip(ref_out[1:], cand_out[1:]), start=1):
            ref, cand = np.asarray(ref), np.asarray(cand)
            if ref.dtype.kind in "iu" and ref.shape[:1] == (rows,) and ref.size == rows:
                # A class-id output beside the scores: devices act on it, so it is gated like them.
                name = output_names[index] if index < len(output_names) else f"output {index}"
                counts = label_counts.setdefault(name, [0, 0])
                same = cand.shape == ref.shape and cand.dtype.kind in "iu"
                counts[0] += int(np.sum(ref.reshape(-1) == cand.reshape(-1))) if same else 0
                counts[1] += rows
        first_ref = np.asarray(ref_out[0])
        first_cand = np.asarray(cand_out[0])
        if first_ref.dtype.kind == "f" and first_ref.shape == first_cand.shape:
            r = np.nan_to_num(first_ref.astype(np.float64).ravel(), nan=0.0, posinf=0.0, neginf=0.0)
            c = np.nan_to_num(first_cand.astype(np.float64).ravel(), nan=0.0, posinf=0.0, neginf=0.0)
            dot += float(r @ c)
            ref_sq += float(r @ r)
            cand_sq += float(c @ c)
        if _is_class_output(first_ref) and first_ref.shape == first_cand.shape and first_ref.shape[0] == rows:
            ref_top = first_ref.argmax(axis=1)
            cand_top = np.nan_to_num(first_cand, nan=-np.inf).argmax(axis=1)
            agree += int(np.sum(ref_top == cand_top))
            class_rows += rows
            if labels is not None:
                truth = labels[start : start + rows]
                cand_right, ref_right = cand_top == truth, ref_top == truth
                correct += int(np.sum(cand_right))
                ref_correct += int(np.sum(ref_right))
                # Paired counts: the significance of a drop rests on the flips, not on two totals.
                fp32_only += int(np.sum(ref_right & ~cand_right))
                candidate_only += int(np.sum(cand_right & ~ref_right))
        seen += rows
    if ref_sq == 0.0 and cand_sq == 0.0:
        cosine = 1.0
    elif ref_sq == 0.0 or cand_sq == 0.0:
        cosine = 0.0
    else:
        cosine = dot / (np.sqrt(ref_sq) * np.sqrt(cand_sq))
    has_acc = labels is not None and class_rows > 0
    return Numerics(
        samples=seen,
        max_abs_error=max_err,
        cosine=float(cosine),
        agreement=agree / class_rows if class_rows else None,
        accuracy=correct / class_rows if has_acc else None,
        reference_accuracy=ref_correct / class_rows if has_acc else None,
        finite=finite,
        close=close,
        outputs=tuple(per_output.result()),
        task=task_run.result() if task_run is not None else None,
        class_samples=class_rows,
        agreed=agree,
        fp32_only=fp32_only if has_acc else 0,
        candidate_only=candidate_only if has_acc else 0,
        label_outputs=label_counts,
    )


def batch_size_fixed(sess, batch_size: int) -> bool:
    """True when a session's inputs fix the leading dimension."""
    return any(isinstance(i.shape[0], int) for i in sess.get_inputs() if i.shape)


def measure_latency(sessions: dict[str, object], feed: dict[str, np.ndarray], runs: int, warmup: int, budget_s: float = 20.0) -> dict[str, Latency]:
    """Median and p95 latency of each session on one feed, interleaved.

    Runs rotate through the sessions (ABCABC...) so a noisy neighbour or CPU clock
    change hits every candidate alike. ``budget_s`` stops early on slow models, after
    at least 5 rounds.
    """
    names = list(sessions)
    for name in names:
        for _ in range(warmup):
            sessions[name].run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for round_index in range(runs):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            t0 = time.perf_counter_ns()
            sessions[name].run(None, feed)
            times[name].append((time.perf_counter_ns() - t0) / 1e6)
        if round_index >= 4 and time.perf_counter() - started > budget_s:
            break
    return {
        name: Latency(float(np.median(t)), float(np.percentile(t, 95)), len(t)) for name, t in times.items()
    }
