"""The task declaration (``task:`` in edgepack.yaml, or ``edgepack optimize --task FILE``).

:func:`validate_task` and :func:`validate_task_gates` are pure and return every problem
with its field path; :func:`task_from_dict` resolves a valid declaration (reading an
``alphabet_file`` relative to the file that names it) into a frozen :class:`TaskSpec`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .kinds import KINDS, GateRule

__all__ = ["OUTPUT_GATES", "TASK_GATE_KEYS", "TaskSpec", "load_task_file", "task_from_dict", "validate_task",
           "validate_task_gates"]

#: The per-output gate, applied to every output the task (or, without a task, the
#: first-output gate) does not cover: a state or auxiliary output that moves is refused
#: by name. ``max_output_rel_error`` is max |candidate − fp32| over the output's largest |fp32|.
OUTPUT_GATES: tuple[GateRule, ...] = (
    GateRule("min_output_cosine", "cosine", "min", 0.99, "cosine", False),
    GateRule("max_output_rel_error", "rel_error", "max", 0.1, "max error relative to its largest value", False),
    GateRule("min_output_match", "match", "min", 0.99, "share of equal values"),
)

#: Every gate key a task or the per-output gate adds to ``gates:``.
TASK_GATE_KEYS: tuple[str, ...] = tuple(dict.fromkeys(
    [r.key for k in KINDS.values() for r in k.gates if r.key not in ("min_agreement", "max_accuracy_drop")]
    + [r.key for r in OUTPUT_GATES]))


@dataclass(frozen=True)
class TaskSpec:
    """A validated task declaration.

    Attributes:
        kind: A key of :data:`edgepack.tasks.kinds.KINDS`.
        params: The declaration without ``kind`` (an ``alphabet_file`` already read into ``alphabet``).
    """

    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def impl(self):
        return KINDS[self.kind]

    @property
    def outputs(self) -> tuple[str, ...]:
        """Model outputs the task reads and gates."""
        return self.impl.outputs(self.params)

    @property
    def gate_rules(self) -> tuple[GateRule, ...]:
        return self.impl.gates

    def to_dict(self) -> dict:
        return {"kind": self.kind, **self.params}

    def digest(self) -> str:
        """sha256 of the declaration: measurements reused across builds must have decoded alike."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def check_outputs(self, names: list[str]) -> None:
        """Raise ConfigError naming every declared output the model does not have."""
        missing = [(k, self.params[k]) for k in self.impl.output_keys if self.params.get(k) and self.params[k] not in names]
        if missing:
            listing = "; ".join(f"task.{k}: the model has no output {v!r}" for k, v in missing)
            raise ConfigError(f"{listing} (its outputs: {', '.join(names)}); name the output the task reads.")


def validate_task(data: Any, path: str = "task") -> list[str]:
    """Every problem in a task declaration (a mapping with ``kind``). Pure."""
    if not isinstance(data, dict):
        return [f"{path}: must be a mapping with 'kind' ({', '.join(KINDS)}), got {type(data).__name__}"]
    kind = data.get("kind")
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), list(KINDS), n=1)
        return [f"{path}.kind: must be one of {', '.join(KINDS)}, got {kind!r}" + (f" (did you mean '{close[0]}'?)" if close else "")]
    impl = KINDS[kind]
    problems = []
    allowed = ("kind", *impl.keys)
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (a {kind} task takes: {', '.join(allowed)})"
            problems.append(f"{path}.{key}: unknown key{hint}")
    params = {k: v for k, v in data.items() if k != "kind"}
    problems += [p.replace("task", path, 1) for p in impl.validate(params)]
    return problems


def validate_task_gates(gates: dict, task: Any) -> list[str]:
    """Problems with the task and per-output keys of a ``gates:`` mapping. Pure.

    A key of another task kind (``min_box_recall`` on a ctc task) is refused: it would
    never be checked.
    """
    problems = []
    kind = task.get("kind") if isinstance(task, dict) else None
    rules = {r.key: r for r in OUTPUT_GATES}
    owners: dict[str, list[str]] = {}
    for name, impl in KINDS.items():
        for r in impl.gates:
            owners.setdefault(r.key, []).append(name)
            rules.setdefault(r.key, r)
    for key, value in gates.items():
        if key not in TASK_GATE_KEYS:
            continue
        rule = rules[key]
        if key in owners and kind not in owners[key]:
            where = f"task.kind is {kind}" if kind else "no task is declared"
            problems.append(f"gates.{key}: applies to a {' or '.join(owners[key])} task, but {where}")
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        if ok and rule.fraction and value > 1:
            ok = False
        if ok and rule.key.endswith("cosine") and value > 1:
            ok = False
        if not ok:
            what = "a fraction between 0 and 1" if rule.fraction or key.endswith("cosine") else "a non-negative number"
            problems.append(f"gates.{key}: must be {what}, got {value!r}")
    return problems


def task_from_dict(data: dict, base_dir: Path | None = None) -> TaskSpec:
    """A TaskSpec from a declaration that :func:`validate_task` accepted.

    Raises:
        ConfigError: Invalid declaration, or an ``alphabet_file`` that cannot be read.
    """
    problems = validate_task(data)
    if problems:
        raise ConfigError("The task declaration has problems: " + "; ".join(problems) + ".")
    params = {k: v for k, v in data.items() if k != "kind"}
    if params.get("alphabet_file") is not None:
        path = Path(params.pop("alphabet_file"))
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            symbols = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"task.alphabet_file: cannot read {path}: {exc}; give a UTF-8 file with one symbol per line.") from exc
        if symbols and symbols[-1] == "":
            symbols.pop()
        if any(len(s) != 1 for s in symbols) or not symbols:
            raise ConfigError(f"task.alphabet_file: {path} must hold one single-character symbol per line.")
        params["alphabet"] = "".join(symbols)
    return TaskSpec(data["kind"], params)


def load_task_file(path: Path) -> tuple[TaskSpec, dict]:
    """``(task, gate thresholds)`` from a YAML file with a ``task:`` mapping and optional ``gates:``.

    An edgepack.yaml works as is (its other sections are ignored).

    Raises:
        ConfigError: Missing or unreadable file, or any problem in the two sections.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Task file {path} does not exist; write a YAML file with a 'task:' mapping.") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read task file {path}: {str(exc).splitlines()[0]}; give a YAML file with a 'task:' mapping.") from exc
    if not isinstance(data, dict) or "task" not in data:
        raise ConfigError(f"Task file {path} has no 'task:' mapping; declare e.g. task: {{kind: ctc, logits: logits}}.")
    gates = data.get("gates") or {}
    problems = validate_task(data["task"])
    if not isinstance(gates, dict):
        problems.append("gates: must be a mapping")
        gates = {}
    problems += validate_task_gates(gates, data["task"])
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"Task file {path} has {len(problems)} problem(s); fix them and retry:\n{listing}")
    spec = task_from_dict(data["task"], Path(path).parent)
    thresholds = {k: v for k, v in gates.items() if k in TASK_GATE_KEYS or k in ("min_agreement", "max_accuracy_drop")}
    return spec, thresholds
