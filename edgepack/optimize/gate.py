"""The accuracy gate: pure checks of measured numbers against declared thresholds."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .evaluate import Numerics


@dataclass(frozen=True)
class Gate:
    """Thresholds a candidate must meet, all as fractions in [0, 1].

    Attributes:
        max_accuracy_drop: Largest allowed fall in top-1 accuracy against the original
            (0.01 is one percentage point). Needs labelled validation data.
        min_agreement: Smallest allowed share of samples whose top-1 class matches the original.
        min_cosine: Smallest allowed cosine similarity of the first output (used for
            models whose output is not class scores).
    """

    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_accuracy_drop", "min_agreement", "min_cosine"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be a fraction between 0 and 1 (e.g. 0.01 for one percentage point), got {value}.")

    def describe(self) -> str:
        parts = []
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop ≤ {self.max_accuracy_drop * 100:.2f} pt")
        if self.min_agreement is not None:
            parts.append(f"agreement ≥ {self.min_agreement * 100:.2f}%")
        if self.min_cosine is not None:
            parts.append(f"cosine ≥ {self.min_cosine:.4f}")
        return ", ".join(parts) or "none"


def default_gate(has_labels: bool, class_output: bool) -> Gate:
    """The gate used when the user declares none: never ship unmeasured."""
    if has_labels and class_output:
        # Accuracy together with agreement: a candidate can keep the accuracy while changing
        # which samples it gets wrong, and devices act on each answer, not on the average.
        return Gate(max_accuracy_drop=0.01, min_agreement=0.98)
    if class_output:
        return Gate(min_agreement=0.99)
    return Gate(min_cosine=0.99)


def check(gate: Gate, numerics: Numerics) -> list[str]:
    """Reasons the candidate fails the gate (empty when it passes). Pure."""
    failures = []
    if not numerics.finite:
        failures.append("outputs contain NaN or infinity")
    if gate.max_accuracy_drop is not None:
        if numerics.accuracy is None or numerics.reference_accuracy is None:
            failures.append("accuracy drop cannot be measured: the validation data has no labels or the output is not class scores")
        else:
            drop = numerics.reference_accuracy - numerics.accuracy
            if drop > gate.max_accuracy_drop + 1e-12:
                failures.append(
                    f"accuracy dropped {drop * 100:.2f} pt ({numerics.reference_accuracy * 100:.2f}% → {numerics.accuracy * 100:.2f}%), "
                    f"above the allowed {gate.max_accuracy_drop * 100:.2f} pt"
                )
    if gate.min_agreement is not None:
        if numerics.agreement is None:
            failures.append("top-1 agreement cannot be measured: the first output is not a [N, classes] score matrix")
        elif numerics.agreement < gate.min_agreement - 1e-12:
            failures.append(f"top-1 agreement {numerics.agreement * 100:.2f}% is below the required {gate.min_agreement * 100:.2f}%")
    if gate.min_cosine is not None and numerics.cosine < gate.min_cosine:
        failures.append(f"cosine similarity {numerics.cosine:.4f} is below the required {gate.min_cosine:.4f}")
    return failures
