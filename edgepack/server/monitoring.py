"""Pure fleet-monitoring statistics: PSI, chi-square tests, prediction shift, accuracy, staleness.

No I/O, no clock, no numpy/scipy: plain Python on small lists of bin counts, so the
rules are unit-tested against known values and the server's tick only carries data.

Binning (see ``edgepack/build/stats.py`` and ``edgepack_runtime.monitor``): a feature's
reference is 11 decile quantiles ``q0 ≤ … ≤ q10``; the device reports ``edges`` (the
quantiles with duplicates merged) and ``len(edges) + 1`` counts with upper-bound
inclusive buckets (``≤ e0``, ``(e_{i-1}, e_i]``, ``> e_last``). The expected share of a
bucket is ``cum(e_i) − cum(e_{i-1})`` with ``cum(e) = (last index of e among the
quantiles) / 10`` (:func:`expected_from_quantiles`), so a point mass (duplicate
quantiles) keeps its 10 % steps. Without the quantiles, edges are taken as distinct
deciles (:func:`expected_shares`). Before testing, runs of equal edges and their
neighbouring buckets are merged, and the two outer buckets join their inner neighbour
(:func:`bin_groups`): a value equal to the reference min (discrete data) is in bucket 0,
whose nominal share is 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "EPSILON", "Shift", "accuracy", "bin_groups", "chi2_goodness_of_fit", "chi2_sf", "chi2_two_sample",
    "class_shares", "expected_from_quantiles", "expected_shares", "feature_drift", "gammaincc", "merge", "prediction_shift", "psi",
    "staleness",
]

EPSILON = 1e-4  # share floor in PSI (an empty bin would make the log infinite)
_EXPECTED_FLOOR = 1e-3  # expected-share floor in chi-square (an impossible bin still gets a finite weight)


# ------------------------------------------------------------------ special functions


def _gammainc_series(a: float, x: float) -> float:
    """Regularized lower incomplete gamma P(a, x) by its power series (x < a + 1)."""
    term = total = 1.0 / a
    n = a
    for _ in range(10_000):
        n += 1.0
        term *= x / n
        total += term
        if abs(term) < abs(total) * 1e-15:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _gammaincc_fraction(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) by its continued fraction (modified Lentz, x ≥ a + 1)."""
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def gammaincc(a: float, x: float) -> float:
    """Regularized upper incomplete gamma function Q(a, x) = Γ(a, x) / Γ(a), for a > 0, x ≥ 0."""
    if a <= 0:
        raise ValueError(f"gammaincc needs a > 0, got {a}")
    if x <= 0:
        return 1.0
    if x < a + 1.0:
        return max(0.0, 1.0 - _gammainc_series(a, x))
    return min(1.0, _gammaincc_fraction(a, x))


def chi2_sf(statistic: float, df: float) -> float:
    """P(X ≥ statistic) for X ~ chi-square(df): ``Q(df/2, statistic/2)``."""
    if df <= 0:
        return 1.0
    if not math.isfinite(statistic):
        return 0.0 if statistic > 0 else 1.0
    return gammaincc(df / 2.0, max(0.0, statistic) / 2.0)


# ---------------------------------------------------------------------------- binning


def bin_groups(edges: Sequence[float]) -> list[list[int]]:
    """Groups of bin indices (``len(edges) + 1`` bins) that are compared as one bin (module docstring)."""
    nbins = len(edges) + 1
    if nbins <= 2:
        return [list(range(nbins))]
    parent = list(range(nbins))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(j)] = find(i)

    union(0, 1)
    union(nbins - 2, nbins - 1)
    for j in range(len(edges)):
        k = j
        while k + 1 < len(edges) and edges[k + 1] == edges[j]:
            k += 1
        if k > j:  # edges j..k equal: bins j (ending there) .. k+1 (starting there)
            for b in range(j + 1, k + 2):
                union(j, b)
    groups: dict[int, list[int]] = {}
    for i in range(nbins):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


def expected_shares(edges: Sequence[float]) -> list[float]:
    """Expected share per bin (``len(edges) + 1`` bins) of decile edges: equal shares between edges, 0 outside."""
    inner = len(edges) - 1
    if inner < 1:
        return [1.0] * (len(edges) + 1) if not edges else [0.5, 0.5]
    return [0.0] + [1.0 / inner] * inner + [0.0]


def expected_from_quantiles(edges: Sequence[float], quantiles: Sequence[float]) -> list[float]:
    """Expected share per bucket (``len(edges) + 1``, upper bound inclusive) of the reference quantiles."""
    q = sorted(float(x) for x in quantiles)
    steps = len(q) - 1
    if steps < 1:
        return expected_shares(edges)

    def cum(e: float) -> float:
        below = sum(1 for x in q if x <= e)  # (last index of e) + 1 when e is a quantile
        return min(1.0, max(0.0, (below - 1) / steps))

    cums = [cum(e) for e in edges]
    return [cums[0]] + [max(0.0, b - a) for a, b in zip(cums, cums[1:])] + [max(0.0, 1.0 - cums[-1])]


def merge(values: Sequence[float], groups: Sequence[Sequence[int]]) -> list[float]:
    return [sum(values[i] for i in g) for g in groups]


# -------------------------------------------------------------------------- statistics


def _shares(counts: Sequence[float]) -> list[float]:
    total = float(sum(counts))
    return [c / total for c in counts] if total > 0 else [0.0] * len(counts)


def psi(expected: Sequence[float], actual: Sequence[float], epsilon: float = EPSILON) -> float:
    """Population stability index of two distributions (shares or counts; each is normalized).

    ``Σ (a − e) · ln(a / e)`` with every share floored at ``epsilon``. Rules of thumb:
    < 0.1 stable, 0.1–0.2 moderate, > 0.2 a significant shift.
    """
    if len(expected) != len(actual):
        raise ValueError(f"psi needs equal bin counts, got {len(expected)} and {len(actual)}")
    e, a = _shares(expected), _shares(actual)
    total = 0.0
    for ei, ai in zip(e, a):
        ei, ai = max(ei, epsilon), max(ai, epsilon)
        total += (ai - ei) * math.log(ai / ei)
    return total


def chi2_goodness_of_fit(observed: Sequence[float], expected_share: Sequence[float]) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of observed counts against expected shares.

    Expected shares are floored at 0.1 % and renormalized, so a bin that should be empty
    but is not counts heavily without dividing by zero.
    """
    n = float(sum(observed))
    k = len(observed)
    if n <= 0 or k < 2:
        return 0.0, 0, 1.0
    floored = [max(p, _EXPECTED_FLOOR) for p in expected_share]
    scale = sum(floored)
    stat = 0.0
    for o, p in zip(observed, floored):
        e = n * p / scale
        stat += (o - e) ** 2 / e
    return stat, k - 1, chi2_sf(stat, k - 1)


def chi2_two_sample(a: Sequence[float], b: Sequence[float]) -> tuple[float, int, float]:
    """(statistic, df, p-value) of the chi-square test of homogeneity of two count vectors (2 x k table).

    Bins empty in both samples are dropped.
    """
    if len(a) != len(b):
        raise ValueError(f"chi2_two_sample needs equal bin counts, got {len(a)} and {len(b)}")
    na, nb = float(sum(a)), float(sum(b))
    cols = [(x, y) for x, y in zip(a, b) if x + y > 0]
    if na <= 0 or nb <= 0 or len(cols) < 2:
        return 0.0, 0, 1.0
    n = na + nb
    stat = 0.0
    for x, y in cols:
        col = x + y
        ea, eb = na * col / n, nb * col / n
        stat += (x - ea) ** 2 / ea + (y - eb) ** 2 / eb
    df = len(cols) - 1
    return stat, df, chi2_sf(stat, df)


@dataclass(frozen=True)
class Shift:
    """One comparison: PSI (effect size), chi-square p-value (evidence) and the sample sizes."""
    psi: float
    statistic: float
    df: int
    p_value: float
    n: int
    n_reference: Optional[int] = None

    def drifted(self, psi_threshold: float, p_threshold: float, min_samples: int) -> bool:
        """A shift that is both large (PSI) and significant (p), over enough samples."""
        enough = self.n >= min_samples and (self.n_reference is None or self.n_reference >= min_samples)
        return enough and self.psi > psi_threshold and self.p_value < p_threshold


def feature_drift(edges: Sequence[float], counts: Sequence[float], quantiles: Optional[Sequence[float]] = None) -> Shift:
    """Drift of one feature's binned live counts against its reference (decile ``quantiles``,
    or the edges themselves taken as distinct deciles)."""
    if len(counts) != len(edges) + 1:
        raise ValueError(f"{len(counts)} counts for {len(edges)} edges; expected {len(edges) + 1}")
    groups = bin_groups(edges)
    observed = merge(counts, groups)
    shares = expected_from_quantiles(edges, quantiles) if quantiles else expected_shares(edges)
    expected = merge(shares, groups)
    stat, df, p = chi2_goodness_of_fit(observed, expected)
    return Shift(psi(expected, observed), stat, df, p, int(sum(counts)))


def class_shares(counts: Mapping[str, float]) -> dict[str, float]:
    total = float(sum(counts.values()))
    return {k: (v / total if total else 0.0) for k, v in counts.items()}


def prediction_shift(control: Mapping[str, float], canary: Mapping[str, float]) -> Shift:
    """Shift of the predicted-class distribution of ``canary`` counts against ``control`` counts
    (PSI on class shares, chi-square two-sample test on the counts)."""
    classes = sorted(set(control) | set(canary))
    a = [float(control.get(c, 0)) for c in classes]
    b = [float(canary.get(c, 0)) for c in classes]
    stat, df, p = chi2_two_sample(a, b)
    value = psi(a, b) if sum(a) > 0 and sum(b) > 0 else 0.0
    return Shift(value, stat, df, p, int(sum(b)), int(sum(a)))


def reference_prediction_shift(reference_shares: Mapping[str, float], live: Mapping[str, float]) -> Shift:
    """Shift of live class counts against the reference class distribution (goodness of fit)."""
    classes = sorted(set(reference_shares) | set(live))
    expected = [float(reference_shares.get(c, 0.0)) for c in classes]
    observed = [float(live.get(c, 0)) for c in classes]
    stat, df, p = chi2_goodness_of_fit(observed, expected)
    return Shift(psi(expected, observed) if sum(observed) > 0 else 0.0, stat, df, p, int(sum(observed)))


def accuracy(correct: int, total: int) -> tuple[Optional[float], float]:
    """(accuracy or None without labels, its standard error)."""
    if total <= 0:
        return None, float("inf")
    acc = correct / total
    return acc, math.sqrt(max(acc * (1 - acc), 1.0 / total) / total)


def accuracy_worse(new: tuple[int, int], previous: tuple[int, int], margin: float = 0.0, z: float = 2.0) -> bool:
    """Whether the new version's live accuracy is below the previous one's by more than ``margin``
    plus ``z`` standard errors of the difference (counts as (correct, total))."""
    a_new, se_new = accuracy(*new)
    a_old, se_old = accuracy(*previous)
    if a_new is None or a_old is None:
        return False
    return a_old - a_new > margin + z * math.sqrt(se_new ** 2 + se_old ** 2)


def staleness(now: float, bundle_created_at: Optional[float], last_seen: Optional[float]) -> dict[str, Optional[float]]:
    """Age of the running bundle and time since the device was last seen, in seconds."""
    return {"bundle_age_s": None if bundle_created_at is None else max(0.0, now - bundle_created_at),
            "last_seen_s": None if last_seen is None else max(0.0, now - last_seen)}
