"""The accuracy gate: pure checks of measured numbers against declared thresholds.

The accuracy-drop and agreement gates are decided by :mod:`.significance` from the
counts behind the numbers (pass / fail / undecided at 95% confidence), so a gate on a
small validation set neither refuses on a few chance flips nor passes on too little
evidence. An undecided gate refuses the candidate with the number of samples that
would decide it, unless the user accepts undecided gates (``undecided="accept"``);
an accepted undecided gate is still reported (:func:`notes`), never silent.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from . import significance
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
        undecided: What an accuracy-drop or agreement gate that the data cannot decide
            does: ``refuse`` (default: the candidate fails, naming the samples needed) or
            ``accept`` (it passes, with a warning carrying the same sentence).
    """

    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None
    undecided: str = "refuse"

    def __post_init__(self) -> None:
        if self.undecided not in significance.UNDECIDED_POLICIES:
            raise ConfigError(f"undecided must be one of {', '.join(significance.UNDECIDED_POLICIES)}, got '{self.undecided}'.")
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
        if parts and self.undecided == "accept" and (self.max_accuracy_drop is not None or self.min_agreement is not None):
            parts.append("undecided accepted")
        return ", ".join(parts) or "none"


def default_gate(has_labels: bool, class_output: bool, undecided: str = "refuse") -> Gate:
    """The gate used when the user declares none: never ship unmeasured."""
    if has_labels and class_output:
        # Accuracy together with agreement: a candidate can keep the accuracy while changing
        # which samples it gets wrong, and devices act on each answer, not on the average.
        return Gate(max_accuracy_drop=0.01, min_agreement=0.98, undecided=undecided)
    if class_output:
        return Gate(min_agreement=0.99, undecided=undecided)
    return Gate(min_cosine=0.99, undecided=undecided)


def assess(gate: Gate, numerics: Numerics, statistical: bool = True) -> list[significance.Verdict]:
    """Statistical verdicts of the accuracy-drop and agreement gates that the counts allow. Pure.

    Numbers without their counts (``class_samples == 0``, e.g. built by hand), measured
    on synthetic inputs (``statistical=False``: random samples are no sample of the
    deployment data, so their count proves nothing), or of a candidate that reproduced
    every output of the reference within the lossless tolerance (``numerics.close``: the
    reference itself, or a float rewrite of it; the sample-size question is about
    candidates whose arithmetic changes answers) get no verdict here and are checked on
    the measured values by :func:`check`.
    """
    verdicts = []
    n = numerics.class_samples
    if n <= 0 or not statistical or numerics.close:
        return verdicts
    if gate.max_accuracy_drop is not None and numerics.reference_accuracy is not None and numerics.accuracy is not None:
        reference_correct = int(round(numerics.reference_accuracy * n))
        verdicts.append(significance.drop_verdict(n, reference_correct, numerics.fp32_only, numerics.candidate_only,
                                                  gate.max_accuracy_drop))
    if gate.min_agreement is not None and numerics.agreement is not None:
        verdicts.append(significance.agreement_verdict(n, numerics.agreed, gate.min_agreement))
    if gate.min_agreement is not None:
        for name, (agreed, rows) in sorted(numerics.label_outputs.items()):
            if rows > 0:
                verdicts.append(significance.agreement_verdict(rows, agreed, gate.min_agreement, output=name))
    return verdicts


def _fail_text(verdict: significance.Verdict, numerics: Numerics) -> str:
    """The failure sentence: the measurement against the threshold, then the evidence."""
    if verdict.gate == "accuracy_drop":
        head = (f"accuracy dropped {verdict.estimate * 100:.2f} pt ({numerics.reference_accuracy * 100:.2f}% → "
                f"{numerics.accuracy * 100:.2f}%), above the allowed {verdict.threshold * 100:.2f} pt")
    else:
        what = "top-1 agreement" if verdict.output is None else f"agreement of output {verdict.output!r}"
        head = f"{what} {verdict.estimate * 100:.2f}% is below the required {verdict.threshold * 100:.2f}%"
    return f"{head} ({verdict.sentence()})"


def notes(gate: Gate, numerics: Numerics, statistical: bool = True) -> list[str]:
    """Sentences for undecided gates that ``gate.undecided == "accept"`` let pass (to report as warnings)."""
    if gate.undecided != "accept" or not numerics.finite:
        return []
    return [f"accepted although {v.sentence()}" for v in assess(gate, numerics, statistical) if v.verdict == "undecided"]


def check(gate: Gate, numerics: Numerics, statistical: bool = True) -> list[str]:
    """Reasons the candidate fails the gate (empty when it passes). Pure.

    Args:
        gate: The thresholds.
        numerics: What was measured.
        statistical: Decide the accuracy-drop and agreement gates from their counts (see
            :func:`assess`); False judges them on the measured values alone.
    """
    failures = []
    if not numerics.finite:
        failures.append("outputs contain NaN or infinity")
    every = assess(gate, numerics, statistical)
    verdicts = {v.gate: v for v in every if v.output is None}
    for verdict in every:
        if verdict.output is not None:  # further class-id outputs: judged like the top-1 agreement
            if verdict.verdict == "fail":
                failures.append(_fail_text(verdict, numerics))
            elif verdict.verdict == "undecided" and gate.undecided == "refuse":
                failures.append(f"output {verdict.output!r} {verdict.sentence()} (add validation samples, or accept "
                                "undecided gates: gates.undecided: accept / --undecided accept)")

    def judged(name: str) -> bool:
        verdict = verdicts.get(name)
        if verdict is None:
            return False
        if verdict.verdict == "fail":
            failures.append(_fail_text(verdict, numerics))
        elif verdict.verdict == "undecided" and gate.undecided == "refuse":
            label = "accuracy drop" if name == "accuracy_drop" else "top-1 agreement"
            failures.append(f"{label} {verdict.sentence()} (add validation samples, or accept undecided gates: "
                            "gates.undecided: accept / --undecided accept)")
        return True

    if gate.max_accuracy_drop is not None and not judged("accuracy_drop"):
        if numerics.accuracy is None or numerics.reference_accuracy is None:
            failures.append("accuracy drop cannot be measured: the validation data has no labels or the output is not class scores")
        else:
            drop = numerics.reference_accuracy - numerics.accuracy
            if drop > gate.max_accuracy_drop + 1e-12:
                failures.append(
                    f"accuracy dropped {drop * 100:.2f} pt ({numerics.reference_accuracy * 100:.2f}% → {numerics.accuracy * 100:.2f}%), "
                    f"above the allowed {gate.max_accuracy_drop * 100:.2f} pt"
                )
    if gate.min_agreement is not None and not judged("agreement"):
        if numerics.agreement is None:
            failures.append("top-1 agreement cannot be measured: the first output is not a [N, classes] score matrix")
        elif numerics.agreement < gate.min_agreement - 1e-12:
            failures.append(f"top-1 agreement {numerics.agreement * 100:.2f}% is below the required {gate.min_agreement * 100:.2f}%")
    if gate.min_agreement is not None and not any(v.output is not None for v in every):
        for name, (agreed, rows) in sorted(numerics.label_outputs.items()):
            if rows and agreed / rows < gate.min_agreement - 1e-12:
                failures.append(f"agreement of output {name!r} {agreed / rows * 100:.2f}% is below the required "
                                f"{gate.min_agreement * 100:.2f}%")
    if gate.min_cosine is not None and numerics.cosine < gate.min_cosine:
        failures.append(f"cosine similarity {numerics.cosine:.4f} is below the required {gate.min_cosine:.4f}")
    return failures
