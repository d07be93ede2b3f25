"""Sample-size-aware verdicts for the accuracy-drop and agreement gates. Pure (math only).

A gate compares a number measured on a finite validation set with a threshold. On a
small set the measured number is noisy: 3 flips out of 75 samples is a 4-point drop
that can vanish on a larger set, and 0 flips out of 20 says little about the next
thousand inputs. This module turns the counts into one of three verdicts:

* ``pass``: the 95% confidence interval lies entirely on the allowed side of the
  threshold, so the data shows the gate is met.
* ``fail``: the data shows the gate is missed (rules below).
* ``undecided``: the data cannot tell; the verdict names how many samples would
  decide at the measured rates. Callers refuse an undecided gate unless the user
  explicitly accepts it (``gates.undecided: accept``): an undecided gate must never
  ship silently.

**Accuracy drop** (threshold ``δ``, e.g. 0.01). The two models run on the same
samples, so the counts are paired: ``b`` samples the original gets right and the
candidate wrong, ``c`` the reverse, ``a`` both right, ``d`` both wrong, ``n`` in all.
The drop is ``D = (b - c) / n``.

* Interval: Newcombe's hybrid score interval for a difference of *paired*
  proportions (Newcombe 1998, Statistics in Medicine 17:2635, method 10), built from
  the Wilson intervals of both accuracies and their correlation. An interval that
  ignored the pairing would be far too wide: two models that agree on 74 of 75
  samples are not two independent coin series.
* ``pass`` when the interval's upper bound is ≤ ``δ``.
* ``fail`` when ``D > δ`` **and** the exact McNemar test (two-sided binomial test of
  ``b`` against ``b + c`` discordant pairs at p = ½) says ``b > c`` is not chance, at
  ``α = 1 − confidence``. Why this rule and not "the lower bound exceeds ``δ``": the
  McNemar test asks whether the candidate is *really* worse, which is what a refusal
  must stand on (3 flips against 0 out of 75 has p = 0.25: noise, so no refusal);
  once the drop is real and measured above the allowance, demanding proof that it
  exceeds the allowance by a margin would let a real 1.5-point drop ship whenever the
  user accepts undecided gates.
* ``undecided`` otherwise: either the drop is within the allowance on this data but
  the interval reaches past it (the "0 flips in 20 samples" false acceptance), or it
  is above the allowance but the flips may be chance (the "3 in 75" false refusal).

**Agreement** (threshold ``a``, e.g. 0.98): ``k`` of ``n`` samples keep the top-1 class.
The interval is the Wilson score interval of ``k / n``; ``pass`` when its lower bound
is ≥ ``a``, ``fail`` when its upper bound is < ``a`` (the exact one-sample analogue of
"significantly below"), ``undecided`` otherwise.

**Zero-tolerance gates** (``max_accuracy_drop: 0`` or ``min_agreement: 1``) ask for no
flip at all on the data; no finite sample can bound a rate at exactly 0, so they are
decided on the data alone: pass without a flip the wrong way, fail with one.

**Samples needed**: the smallest sample count at which the same rule decides when the
measured rates (``b/n``, ``c/n`` or ``k/n``) hold, found by scaling the counts; None when no
count decides (the measured value sits on the threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

__all__ = [
    "CONFIDENCE",
    "UNDECIDED_POLICIES",
    "Verdict",
    "agreement_verdict",
    "drop_verdict",
    "mcnemar_exact",
    "paired_difference_interval",
    "wilson_interval",
]

#: Confidence of every interval and test (α = 0.05).
CONFIDENCE = 0.95
#: What a caller does with an undecided gate: refuse the candidate (default) or accept it with a warning.
UNDECIDED_POLICIES = ("refuse", "accept")
# Samples-needed search stops here: beyond it no validation set is realistic.
_MAX_SAMPLES = 10_000_000


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``.

    Args:
        successes: Count of successes (may be fractional when counts are scaled).
        n: Trials; must be positive.
        confidence: Two-sided confidence level.

    Returns:
        (lower, upper), both within [0, 1].
    """
    if n <= 0:
        raise ValueError("the Wilson interval needs at least one sample")
    z = _z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(max(p * (1.0 - p) / n + z * z / (4.0 * n * n), 0.0)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference_interval(a: float, b: float, c: float, d: float,
                               confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``p1 - p2 = (b - c) / n`` for paired proportions.

    ``p1 = (a + b) / n`` is the original's accuracy, ``p2 = (a + c) / n`` the candidate's.
    The correlation term uses Newcombe's continuity-corrected phi (zero when
    ``0 ≤ ad − bc ≤ n/2``), as in his method 10.

    Returns:
        (lower, upper) of the difference, clipped to [-1, 1].
    """
    n = a + b + c + d
    if n <= 0:
        raise ValueError("the paired interval needs at least one sample")
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, confidence)
    l2, u2 = wilson_interval(a + c, n, confidence)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0
    if margins > 0:
        cross = a * d - b * c
        corrected = cross - n / 2.0 if cross > n / 2.0 else (cross if cross < 0 else 0.0)
        phi = corrected / math.sqrt(margins)
    diff = p1 - p2
    lower = diff - math.sqrt(max((p1 - l1) ** 2 - 2.0 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    upper = diff + math.sqrt(max((p2 - l2) ** 2 - 2.0 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    return max(-1.0, lower), min(1.0, upper)


def _upper_tail(k: int, m: int) -> float:
    """P(X ≥ k) for X ~ Binomial(m, ½), exact to float precision.

    Only called with ``k ≥ m/2``, where the terms fall monotonically: the sum stops once
    they no longer change it (a few multiples of √m terms), so millions of pairs stay cheap.
    """
    if k <= 0:
        return 1.0
    if k > m:
        return 0.0
    term = math.exp(math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) + m * math.log(0.5))
    terms = [term]
    for i in range(k, m):
        term *= (m - i) / (i + 1)
        terms.append(term)
        if term < terms[0] * 1e-18 or term == 0.0:
            break
    return min(1.0, math.fsum(terms))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of ``b`` out of ``b + c`` at ½."""
    m = b + c
    if m == 0:
        return 1.0
    return min(1.0, 2.0 * _upper_tail(max(b, c), m))


@dataclass(frozen=True)
class Verdict:
    """One gate's statistical verdict on one candidate.

    Attributes:
        gate: ``accuracy_drop`` or ``agreement``.
        verdict: ``pass``, ``fail`` or ``undecided``.
        estimate: The measured drop or agreement (fraction).
        lower: Lower bound of the interval at :data:`CONFIDENCE`.
        upper: Upper bound.
        threshold: The gate's threshold (fraction).
        samples: Samples measured.
        counts: The counts behind it: ``{"b", "c"}`` (flips each way) for the drop,
            ``{"agreed", "flipped"}`` for agreement.
        p_value: Exact McNemar p-value of the flips (accuracy drop only).
        samples_needed: Samples at which the rule would decide at the measured rates
            (None when it already decides, or when no count can).
        output: For an agreement verdict on a further class-id output (e.g. ``label``), its
            name; None for the first output's top-1 class.
    """

    gate: str
    verdict: str
    estimate: float
    lower: float
    upper: float
    threshold: float
    samples: int
    counts: dict
    p_value: float | None = None
    samples_needed: int | None = None
    output: str | None = None

    def interval_text(self) -> str:
        """``[-2.1, 6.3] pt`` for the drop, ``[93.1, 99.8]%`` for agreement."""
        if self.gate == "accuracy_drop":
            return f"[{self.lower * 100:.1f}, {self.upper * 100:.1f}] pt"
        return f"[{self.lower * 100:.1f}, {self.upper * 100:.1f}]%"

    def sentence(self) -> str:
        """The measurement with its interval and counts; when undecided, the samples that would decide it.

        E.g. ``undecided: with 75 samples the accuracy drop is 4.00 pt, 95% interval [-1.8, 11.0] pt
        (3 samples fp32 right and candidate wrong, 0 the reverse; exact McNemar p = 0.25); the
        1.00 pt gate needs ~138 samples at this flip rate to decide``.
        """
        pct = int(round(CONFIDENCE * 100))
        if self.gate == "accuracy_drop":
            body = (f"with {self.samples} samples the accuracy drop is {self.estimate * 100:.2f} pt, "
                    f"{pct}% interval {self.interval_text()} ({self.counts['b']} samples fp32 right and candidate wrong, "
                    f"{self.counts['c']} the reverse; exact McNemar p = {self.p_value:.3g})")
            gate = f"the {self.threshold * 100:.2f} pt gate"
        else:
            what = "top-1 agreement" if self.output is None else f"agreement of output {self.output!r}"
            body = (f"with {self.samples} samples the {what} is {self.estimate * 100:.2f}% "
                    f"({self.counts['flipped']} flipped), {pct}% interval {self.interval_text()}")
            gate = f"the {self.threshold * 100:.2f}% gate"
        if self.verdict != "undecided":
            return body
        if self.samples_needed is None:
            return f"undecided: {body}; no sample count decides {gate} at this rate (the measured value sits on it)"
        return f"undecided: {body}; {gate} needs ~{self.samples_needed:,} samples at this flip rate to decide"

    def to_dict(self) -> dict:
        return {
            "gate": self.gate, "verdict": self.verdict, "estimate": self.estimate,
            "interval": [self.lower, self.upper], "confidence": CONFIDENCE, "threshold": self.threshold,
            "samples": self.samples, "counts": dict(self.counts), "p_value": self.p_value,
            "samples_needed": self.samples_needed, "output": self.output,
        }


def _drop_rule(a: float, b: float, c: float, d: float, threshold: float, confidence: float) -> tuple[str, float, float, float]:
    n = a + b + c + d
    lower, upper = paired_difference_interval(a, b, c, d, confidence)
    p = mcnemar_exact(int(round(b)), int(round(c)))
    drop = (b - c) / n
    if threshold <= 0.0:
        return ("pass" if drop <= 1e-12 else "fail"), lower, upper, p
    # 1e-12: a drop equal to the threshold is within it, whatever the float rounding.
    if upper <= threshold + 1e-12:
        return "pass", lower, upper, p
    if drop > threshold + 1e-12 and b > c and p < 1.0 - confidence:
        return "fail", lower, upper, p
    return "undecided", lower, upper, p


def _agreement_rule(agreed: float, n: float, threshold: float, confidence: float) -> tuple[str, float, float]:
    lower, upper = wilson_interval(agreed, n, confidence)
    if threshold >= 1.0:
        return ("pass" if agreed >= n - 1e-9 else "fail"), lower, upper
    if lower >= threshold - 1e-12:
        return "pass", lower, upper
    if upper < threshold - 1e-12:
        return "fail", lower, upper
    return "undecided", lower, upper


def _samples_needed(decides, n: int) -> int | None:
    """Smallest N ≥ n at which ``decides(N)`` holds (doubling, then bisection); None past the cap."""
    low, high = n, n
    while not decides(high):
        if high >= _MAX_SAMPLES:
            return None
        low, high = high, min(high * 2, _MAX_SAMPLES)
    while high - low > max(1, low // 100):  # 1% is precise enough for "about N samples"
        mid = (low + high) // 2
        if decides(mid):
            high = mid
        else:
            low = mid
    return high


def drop_verdict(samples: int, reference_correct: int, fp32_only: int, candidate_only: int, threshold: float,
                 confidence: float = CONFIDENCE) -> Verdict:
    """The accuracy-drop gate's verdict from paired counts.

    Args:
        samples: Samples compared (``n``).
        reference_correct: Samples the original gets right (``a + b``).
        fp32_only: ``b``: the original right, the candidate wrong.
        candidate_only: ``c``: the candidate right, the original wrong.
        threshold: Largest allowed drop (fraction).
        confidence: Confidence of the interval and the test.
    """
    n, b, c = samples, fp32_only, candidate_only
    a = reference_correct - b
    d = n - a - b - c
    if n <= 0 or min(a, b, c, d) < 0:
        raise ValueError(f"inconsistent paired counts: n={n}, a={a}, b={b}, c={c}, d={d}")
    verdict, lower, upper, p = _drop_rule(a, b, c, d, threshold, confidence)
    needed = None
    if verdict == "undecided":
        def decides(m: int) -> bool:
            s = m / n
            return _drop_rule(a * s, b * s, c * s, d * s, threshold, confidence)[0] != "undecided"

        needed = _samples_needed(decides, n)
    return Verdict("accuracy_drop", verdict, (b - c) / n, lower, upper, threshold, n, {"b": b, "c": c}, p, needed)


def agreement_verdict(samples: int, agreed: int, threshold: float, confidence: float = CONFIDENCE,
                      output: str | None = None) -> Verdict:
    """The agreement gate's verdict: ``agreed`` of ``samples`` keep the original's top-1 class
    (or, with ``output``, that class-id output's value)."""
    if samples <= 0 or not 0 <= agreed <= samples:
        raise ValueError(f"inconsistent agreement counts: {agreed} of {samples}")
    verdict, lower, upper = _agreement_rule(agreed, samples, threshold, confidence)
    needed = None
    if verdict == "undecided":
        rate = agreed / samples
        needed = _samples_needed(lambda m: _agreement_rule(rate * m, m, threshold, confidence)[0] != "undecided", samples)
    return Verdict("agreement", verdict, agreed / samples, lower, upper, threshold, samples,
                   {"agreed": agreed, "flipped": samples - agreed}, None, needed, output)
