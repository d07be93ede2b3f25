"""Certifying each variant per arithmetic class: measured where it ships, re-quantized or refused.

The host's numbers say nothing about another CPU's int8 kernels (see
:mod:`edgepack_runtime.arith`). For every (target, variant) pair the build measures the
variant under the target's class (:mod:`edgepack.arith.measure`: natively, under qemu,
or by the reference evaluation) and gates it there. An int8 variant that misses its gate
on a class is re-quantized with the settings that avoid that class's failure mode
(:data:`REQUANT_CANDIDATES`), measured again under the same class, and shipped as a
class-specific file when one passes; otherwise that target does not get int8, and the
report says why, naming the class.

Float variants (fp32, tflite-fp32) run float kernels whose results do not depend on the
integer class; they are measured on the host and marked ``how: host``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import PRECISIONS, variant_engine

__all__ = ["REQUANT_CANDIDATES", "ClassMeasurement", "TargetVerdict", "certify"]

#: Settings tried, in order, when int8 misses its gate on one class: each removes a cause
#: of divergence (7-bit weights cannot saturate vpmaddubsw pairs; u8/u8 and s8/s8 take other
#: kernels; per-tensor scales and entropy calibration change where rounding lands).
REQUANT_CANDIDATES: tuple[tuple[str, dict], ...] = (
    ("reduce_range", {"reduce_range": True}),
    ("u8/u8", {"weights": "u8"}),
    ("s8/s8", {"activations": "s8"}),
    ("per-tensor reduce_range", {"per_channel": False, "reduce_range": True}),
    ("entropy calibration reduce_range", {"calibration_method": "entropy", "reduce_range": True}),
)


@dataclass
class ClassMeasurement:
    """One variant measured under one class.

    Attributes:
        klass: The arithmetic class.
        how: ``native``, ``emulated:<cpu>``, ``reference`` or ``host`` (float variants);
            None when it could not be measured.
        numerics: Validation numbers against the fp32 reference (None: not measured).
        failures: Gate failures under this class (or why it was not measured).
        golden: The variant's outputs on the golden inputs under this class.
    """

    klass: str
    how: str | None
    numerics: Any = None
    failures: list[str] = field(default_factory=list)
    golden: list[np.ndarray] | None = None
    #: True when an earlier measurement of the identical bytes, data, class and engine was reused.
    cached: bool = False

    @property
    def passed(self) -> bool:
        return self.how is not None and not self.failures

    def to_dict(self) -> dict:
        n = self.numerics
        return {"how": self.how, "passed": self.passed, "failures": list(self.failures), "cached": self.cached,
                **({} if n is None else {"accuracy": n.accuracy, "reference_accuracy": n.reference_accuracy,
                                         "agreement": n.agreement, "max_abs_error": n.max_abs_error,
                                         "cosine": n.cosine, "samples": n.samples,
                                         **({"task": n.task} if getattr(n, "task", None) is not None else {})}),
                # stream models: the per-stream decision agreement under this class
                **({"min_stream_agreement": n.min_stream_agreement, "stream_agreement": list(n.stream_agreement)}
                   if getattr(n, "stream_agreement", None) else {})}


@dataclass
class TargetVerdict:
    """What one declared (target, variant) pair became."""

    device: str
    klass: str
    variant: str
    status: str  # certified | replaced | refused
    shipped: str | None  # variant id shipped for it
    reason: str

    def to_dict(self) -> dict:
        return {"class": self.klass, "status": self.status, "shipped": self.shipped, "reason": self.reason}


def is_float(variant: str) -> bool:
    return PRECISIONS[variant] == "fp32"


def _describe_numerics(n) -> str:
    parts = []
    if n.accuracy is not None:
        parts.append(f"accuracy {n.accuracy * 100:.2f}%")
    if n.agreement is not None:
        parts.append(f"agreement {n.agreement * 100:.2f}%")
    parts.append(f"max error {n.max_abs_error:.3g}")
    return ", ".join(parts)


def measure(result, klass: str, *, host_class: str, host_session, reference, validation, batch: int,
            golden_feed: dict, gate: Callable, config, run: Callable, progress: Callable[[str], None],
            data_digest: Callable[[], str] | None = None, compare: Callable | None = None) -> ClassMeasurement:
    """Measure one built variant under ``klass`` and gate it there (reusing an identical earlier measurement)."""
    from ..arith import RemoteError, Unavailable, open_measurer
    from ..arith.cache import MeasurementCache
    from ..arith.measure import planned_how
    if compare is None:  # stream models pass their own (chunk by chunk, carrying state)
        from ..optimize.evaluate import compare

    if klass == host_class:
        return ClassMeasurement(klass, "native", result.numerics, gate(result, result.numerics), run(host_session, golden_feed))
    if is_float(result.variant):
        return ClassMeasurement(klass, "host", result.numerics, gate(result, result.numerics), run(host_session, golden_feed))
    engine = variant_engine(result.variant)
    cache = MeasurementCache(config.cache_dir if data_digest is not None else None)
    how = planned_how(klass, engine, config)
    key = cache.key(result.model_bytes, data_digest(), golden_feed, klass, how, engine) if how and cache.root else ""
    hit = cache.get(key) if key else None
    if hit is not None:
        numerics, golden = hit
        progress(f"Reusing the measurement of {result.id} under {klass} ({how}) of identical bytes and data")
        m = ClassMeasurement(klass, how, numerics, gate(result, numerics), golden)
        m.cached = True
        return m
    suffix = ".tflite" if engine == "litert" else ".onnx"
    with tempfile.TemporaryDirectory(prefix="edgepack-certify-") as tmp:
        path = Path(tmp) / f"{result.id}{suffix}"
        path.write_bytes(result.model_bytes)
        try:
            measurer = open_measurer(klass, path, variant_engine(result.variant), config)
        except (Unavailable, RemoteError) as exc:
            return ClassMeasurement(klass, None, None, [f"not measured under {klass}: {exc}"])
        try:
            progress(f"Measuring {result.id} under {klass} ({measurer.how})")
            numerics = compare(reference, measurer.session, validation, batch)
            golden = run(measurer.session, golden_feed)
        except RemoteError as exc:
            return ClassMeasurement(klass, None, None, [f"not measured under {klass}: {exc}"])
        finally:
            measurer.close()
    if key and measurer.how == how:
        cache.put(key, numerics, golden)
    return ClassMeasurement(klass, measurer.how, numerics, gate(result, numerics), golden)


def certify(project, results: dict, *, host_class: str, classes_of: dict[str, str], sessions: dict, reference,
            validation, calibration, batch: int, golden_feed: dict, gate: Callable, config, run: Callable,
            requantize: Callable[[dict], Any], progress: Callable[[str], None],
            data_digest: Callable[[], str] | None = None, compare: Callable | None = None) -> list[TargetVerdict]:
    """Measure every variant under every class that needs it; decide every (target, variant) pair.

    Args:
        results: variant name -> VariantResult (host-measured); re-quantized variants are
            added to it under ``"int8@<class>"`` keys.
        classes_of: target device -> arithmetic class.
        requantize: ``requantize(option_changes) -> VariantResult`` builds a new int8 file.
        data_digest: The validation data's digest, computed on first use (only an emulated
            measurement needs it, to reuse an identical earlier one); None: never reuse.

    Returns:
        One verdict per declared (target, variant) pair.
    """
    wanted: dict[str, set[str]] = {v: {host_class} for v in results}
    for target in project.targets:
        for variant in target.variants:
            if variant in wanted:
                wanted[variant].add(classes_of[target.device])
    for variant, result in list(results.items()):
        for klass in sorted(wanted[variant]):
            result.classes[klass] = measure(result, klass, host_class=host_class, host_session=sessions[variant],
                                            reference=reference, validation=validation, batch=batch, golden_feed=golden_feed,
                                            gate=gate, config=config, run=run, progress=progress, data_digest=data_digest,
                                            compare=compare)
    verdicts: list[TargetVerdict] = []
    replacements: dict[str, Any] = {}
    for target in project.targets:
        klass = classes_of[target.device]
        for variant in target.variants:
            result = results[variant]
            m = result.classes[klass]
            where = f"under {klass} ({m.how})" if m.how else f"under {klass}"
            if m.passed:
                verdicts.append(TargetVerdict(target.device, klass, variant, "certified", result.id,
                                              f"{result.id} passed its gates {where}: {_describe_numerics(m.numerics)}"))
                continue
            why = f"{result.id} failed its gates {where}: " + "; ".join(m.failures)
            if variant == "int8" and m.how is not None:
                if klass not in replacements:
                    replacements[klass] = _requantize_for(klass, requantize, results, sessions, host_class=host_class,
                                                          reference=reference, validation=validation, batch=batch,
                                                          golden_feed=golden_feed, gate=gate, config=config, run=run,
                                                          progress=progress, data_digest=data_digest, compare=compare)
                replacement, tried = replacements[klass]
                if replacement is not None:
                    verdicts.append(TargetVerdict(
                        target.device, klass, variant, "replaced", replacement.id,
                        f"{why}. Re-quantized for {klass} ({replacement.quantization}): {replacement.id} passed "
                        f"under {klass} ({replacement.classes[klass].how}): {_describe_numerics(replacement.classes[klass].numerics)}"))
                    continue
                why += ". Re-quantizing did not help: " + "; ".join(tried)
            verdicts.append(TargetVerdict(target.device, klass, variant, "refused", None,
                                          f"{target.device} does not get {variant}: {why}"))
    return verdicts


def _requantize_for(klass, requantize, results, sessions, **kw):
    """The first re-quantization that passes under ``klass``, and what each candidate scored."""
    tried = []
    for label, changes in REQUANT_CANDIDATES:
        try:
            candidate = requantize(changes)
        except Exception as exc:  # noqa: BLE001 - a setting the quantizer refuses is one more loser
            tried.append(f"{label}: could not quantize ({str(exc).splitlines()[0][:120]})")
            continue
        candidate.tag = klass
        kw["progress"](f"Re-quantizing int8 for {klass}: trying {label}")
        m = measure(candidate, klass, host_session=candidate.session, **kw)
        candidate.classes[klass] = m
        if m.passed:
            results[f"int8@{klass}"] = candidate
            sessions[f"int8@{klass}"] = candidate.session
            return candidate, tried
        tried.append(f"{label}: " + ("; ".join(m.failures) if m.failures else "not measured"))
    return None, tried
