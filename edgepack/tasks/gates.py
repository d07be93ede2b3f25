"""Task gates and the per-output gate: pure checks of measured numbers against thresholds.

These run beside :func:`edgepack.optimize.gate.check` (which keeps the first-output
accuracy/agreement/cosine gate): :func:`task_failures` gates the task's metrics,
:func:`output_failures` gates every output neither covers, naming it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .kinds import GateRule
from .spec import OUTPUT_GATES, TaskSpec

__all__ = ["check", "output_failures", "task_failures", "thresholds"]


def thresholds(rules: Iterable[GateRule], given: Mapping[str, float | None], defaults: bool) -> dict[str, float]:
    """The threshold of each rule: the declared one, else its default when ``defaults``."""
    out = {}
    for rule in rules:
        value = given.get(rule.key)
        if value is None and defaults:
            value = rule.default
        if value is not None:
            out[rule.key] = float(value)
    return out


def _breach(rule: GateRule, value: float, limit: float) -> bool:
    return value < limit - 1e-12 if rule.bound == "min" else value > limit + 1e-12


def task_failures(task: TaskSpec, given: Mapping[str, float | None], result: dict | None, defaults: bool = True) -> list[str]:
    """Reasons the task metrics fail (empty: passed). ``result`` is ``Numerics.task``."""
    limits = thresholds(task.gate_rules, given, defaults)
    if not limits:
        return []
    if result is None:
        return [f"the {task.kind} task metrics were not measured (no validation run decoded the task outputs)"]
    failures = []
    metrics = result.get("metrics", {})
    for rule in task.gate_rules:
        if rule.key not in limits:
            continue
        value = metrics.get(rule.metric)
        if value is None:
            failures.append(f"{rule.label} cannot be measured for this {task.kind} task (gates.{rule.key}): "
                            + ("the validation data has no labels" if rule.metric.startswith("accuracy") else "no value"))
            continue
        if _breach(rule, value, limits[rule.key]):
            word = "below the required" if rule.bound == "min" else "above the allowed"
            failures.append(f"{task.kind} {rule.label} {rule.show(value)} on {result.get('samples', 0)} samples is {word} "
                            f"{rule.show(limits[rule.key])} (gates.{rule.key}, after decoding the task outputs)")
    return failures


def output_failures(outputs: Iterable[dict], covered: Iterable[str], given: Mapping[str, float | None],
                    defaults: bool = True) -> list[str]:
    """Reasons an output not covered by another gate fails the per-output gate, each naming the output."""
    limits = thresholds(OUTPUT_GATES, given, defaults)
    covered = set(covered)
    failures = []
    for entry in outputs:
        name = entry["name"]
        if name in covered:
            continue
        if not entry.get("same_shape", True):
            failures.append(f"output {name!r} changed shape or type against fp32")
            continue
        if not entry.get("finite", True):
            failures.append(f"output {name!r} contains NaN or infinity where fp32 is finite")
            continue
        for rule in OUTPUT_GATES:
            value = entry.get(rule.metric)
            if rule.key in limits and value is not None and _breach(rule, value, limits[rule.key]):
                word = "below the required" if rule.bound == "min" else "above the allowed"
                failures.append(f"output {name!r}: {rule.label} {rule.show(value)} is {word} {rule.show(limits[rule.key])} "
                                f"(gates.{rule.key}; max abs error {entry.get('max_abs_error', 0.0):.4g})"
                                if rule.metric != "match" else
                                f"output {name!r}: {rule.label} {rule.show(value)} is {word} {rule.show(limits[rule.key])} "
                                f"(gates.{rule.key})")
    return failures


def check(numerics, task: TaskSpec | None, given: Mapping[str, float | None], covered: Iterable[str],
          defaults: bool = True) -> list[str]:
    """Task failures plus per-output failures for one measured candidate. Pure."""
    failures = []
    if task is not None:
        failures += task_failures(task, given, getattr(numerics, "task", None), defaults)
    failures += output_failures(getattr(numerics, "outputs", None) or (), covered, given, defaults)
    return failures


def for_project(project, numerics, defaults: bool, model_bytes: bytes | None = None) -> list[str]:
    """Task and per-output failures of one build variant (``defaults``: apply the default thresholds).

    Without a task the first output keeps the build's first-output gate; with one, the
    task's outputs are gated by it. Outputs computed from those (read from ``model_bytes``'
    graph, e.g. post-processing's scores and top-k) are covered with them; every other
    output is gated here.
    """
    from .coverage import covered_outputs_of_bytes

    g = project.gates
    task = getattr(project, "task", None)
    given = {**getattr(g, "task", {}), "min_agreement": g.min_agreement, "max_accuracy_drop": g.max_accuracy_drop}
    outputs = getattr(numerics, "outputs", None) or ()
    primary = task.outputs if task is not None else tuple(o["name"] for o in outputs)[:1]
    return check(numerics, task, given, covered_outputs_of_bytes(model_bytes, primary), defaults)
