"""The project file (``edgepack.yaml``): typed, frozen, validated as a whole.

:func:`validate_project` is pure: it takes the parsed YAML and returns every problem
at once, each with its field path (and a suggestion for a misspelt key).
:func:`load_project` does the I/O: reads the YAML, resolves paths relative to the
project file, checks that referenced files exist, and returns a :class:`Project`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack_runtime.semver import is_valid as is_valid_version

from .errors import ConfigError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VARIANTS = ("fp32", "int8", "fp16", "tflite-fp32", "tflite-fp16", "tflite-int8")
MODEL_KINDS = ("onnx", "pytorch", "sklearn", "tflite", "keras")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INPUT_KINDS = ("image", "tabular", "audio", "frames")
#: Mirrors edgepack.optimize.significance.UNDECIDED_POLICIES (kept here so validating a project imports no numerics).
UNDECIDED_POLICIES = ("refuse", "accept")


@dataclass(frozen=True)
class DataRef:
    """A dataset file and which arrays in it hold raw inputs and labels."""

    path: Path
    key: str = "raw"
    labels: str | None = None


@dataclass(frozen=True)
class Target:
    """A device profile and the variants built for it."""

    device: str
    variants: tuple[str, ...]


@dataclass(frozen=True)
class Gates:
    """Thresholds every variant must meet (fractions; sizes in bytes; latency in ms)."""

    max_accuracy_drop: float | None = None
    min_accuracy: float | None = None
    min_agreement: float | None = None
    max_size_bytes: int | None = None
    max_latency_ms: float | None = None
    #: Task and per-output thresholds (``min_box_recall``, ``min_output_cosine``...; see edgepack.tasks).
    task: dict[str, float] = field(default_factory=dict)
    #: ``refuse`` (default) or ``accept`` an accuracy/agreement gate the validation set is too
    #: small to decide (see :mod:`edgepack.optimize.significance`).
    undecided: str = "refuse"


@dataclass(frozen=True)
class Project:
    """A resolved project file."""

    path: Path
    name: str
    version: str
    description: str
    model: dict[str, Any]
    preprocess: dict[str, Any]  # preprocess_from_dict form: {"kind": "image"|"tabular", **fields}
    postprocess: dict[str, Any] | None
    fold_normalization: bool
    calibration: DataRef
    validation: DataRef
    golden_vectors: int
    targets: tuple[Target, ...]
    per_channel: bool
    calibration_method: str
    gates: Gates
    signing_key: Path
    output_dir: Path
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    #: The model input the preprocessing computes (None: the model's only input).
    feeds: str | None = None
    #: Other model inputs with their roles (edgepack.stream.ExtraInput).
    extra_inputs: tuple = ()
    #: The stateful model's declaration (edgepack.stream.StreamSpec), or None.
    stream: Any = None
    #: Node name patterns (fnmatch) that int8 leaves in float, e.g. a signal front end.
    keep_float: tuple[str, ...] = ()
    #: The declared task (an edgepack.tasks.TaskSpec), or None: gate the first output as a classifier/cosine.
    task: Any = None

    @property
    def variants(self) -> tuple[str, ...]:
        """Every variant some target asks for, in canonical order."""
        wanted = {v for t in self.targets for v in t.variants}
        return tuple(v for v in VARIANTS if v in wanted)


from .tasks.spec import TASK_GATE_KEYS as _TASK_GATE_KEYS

# Allowed keys per section: the source of "unknown key" errors and suggestions.
_KEYS: dict[str, tuple[str, ...]] = {
    "": ("name", "version", "description", "model", "input", "output", "data", "targets", "quantization", "gates", "signing", "output_dir",
         "inputs", "stream", "task"),
    "model": ("kind", "path", "module", "weights", "input_shape", "input_dtype", "input_name", "output_name", "n_features", "opset"),
    "input": ("name", "image", "tabular", "audio", "frames", "feeds", "fold_normalization"),
    "output": ("softmax", "top_k", "labels"),
    "data": ("calibration", "validation", "golden_vectors"),
    "data.calibration": ("path", "key", "labels"),
    "data.validation": ("path", "key", "labels"),
    "targets[]": ("device", "variants"),
    "quantization": ("per_channel", "calibration_method", "keep_float"),
    "gates": ("max_accuracy_drop", "min_accuracy", "min_agreement", "max_size_mb", "max_latency_ms", *_TASK_GATE_KEYS, "undecided"),
    "signing": ("key",),
}


def _unknown(section: str, data: dict, path: str, problems: list[str]) -> None:
    allowed = _KEYS[section]
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(allowed)})"
            problems.append(f"{path + '.' if path else ''}{key}: unknown key{hint}")


def _section(data: dict, key: str, path: str, problems: list[str], required: bool = True) -> dict:
    value = data.get(key)
    if value is None:
        if required:
            problems.append(f"{path}{key}: required section is missing")
        return {}
    if not isinstance(value, dict):
        problems.append(f"{path}{key}: must be a mapping, got {type(value).__name__}")
        return {}
    return value


def _fraction(data: dict, key: str, path: str, problems: list[str]) -> None:
    value = data.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        problems.append(f"{path}.{key}: must be a fraction between 0 and 1 (0.01 is one percentage point), got {value!r}")


def _positive(data: dict, key: str, path: str, problems: list[str], kind=(int, float)) -> None:
    value = data.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        problems.append(f"{path}.{key}: must be a positive number, got {value!r}")


def _data_ref(data: dict, key: str, problems: list[str]) -> None:
    value = data.get(key)
    path = f"data.{key}"
    if value is None:
        problems.append(f"{path}: required (a .npz with raw inputs{' and labels' if key == 'validation' else ''})")
    elif isinstance(value, str):
        return
    elif isinstance(value, dict):
        _unknown(path, value, path, problems)
        if not isinstance(value.get("path"), str):
            problems.append(f"{path}.path: required string")
    else:
        problems.append(f"{path}: must be a file path or a mapping with 'path', got {type(value).__name__}")


def validate_project(data: Any) -> list[str]:
    """Every problem in a parsed project file, each with its field path. Pure."""
    if not isinstance(data, dict):
        return [f"the project file must be a mapping of sections, got {type(data).__name__}"]
    problems: list[str] = []
    _unknown("", data, "", problems)
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        problems.append(f"name: must be lower-case letters, digits, '.', '_' or '-' (max 64), got {name!r}")
    version = data.get("version")
    if not is_valid_version(version):
        problems.append(f"version: must be a semantic version such as 1.0.0 (quote it in YAML), got {version!r}")
    if "description" in data and not isinstance(data["description"], str):
        problems.append("description: must be a string")

    model = _section(data, "model", "", problems)
    if model:
        _unknown("model", model, "model", problems)
        kind = model.get("kind", "onnx")
        if kind not in MODEL_KINDS:
            close = difflib.get_close_matches(str(kind), MODEL_KINDS, n=1)
            problems.append(f"model.kind: must be one of {', '.join(MODEL_KINDS)}, got {kind!r}" + (f" (did you mean '{close[0]}'?)" if close else ""))
        if not isinstance(model.get("path"), str) and kind != "pytorch":
            problems.append("model.path: required string (the model file, relative to the project file)")

    inp = _section(data, "input", "", problems)
    if inp:
        _unknown("input", inp, "input", problems)
        kinds = [k for k in INPUT_KINDS if k in inp]
        if len(kinds) != 1:
            problems.append(f"input: declare exactly one of {', '.join(repr(k) for k in INPUT_KINDS)} preprocessing")
        else:
            from .preprocess import preprocess_from_dict

            section = inp[kinds[0]]
            try:
                if not isinstance(section, dict):
                    raise ConfigError(f"must be a mapping of {kinds[0]} preprocessing fields")
                preprocess_from_dict({"kind": kinds[0], **section}).validate()
            except ConfigError as exc:
                for line in str(exc).splitlines()[1:] or [str(exc)]:
                    problems.append(f"input.{kinds[0]}: {line.strip().lstrip('- ')}")
            except (TypeError, ValueError) as exc:
                problems.append(f"input.{kinds[0]}: {exc}")
        if "name" in inp and (not isinstance(inp["name"], str) or not inp["name"]):
            problems.append("input.name: must be a non-empty string")
        if "feeds" in inp and (not isinstance(inp["feeds"], str) or not inp["feeds"]):
            problems.append("input.feeds: must be the name of the model input the raw input is preprocessed into")
        if "fold_normalization" in inp and not isinstance(inp["fold_normalization"], bool):
            problems.append("input.fold_normalization: must be true or false")

    out = _section(data, "output", "", problems, required=False)
    if out:
        _unknown("output", out, "output", problems)
        if "labels" in out and not (
            isinstance(out["labels"], list) and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in out["labels"])
        ):
            # YAML reads bare yes/no/on/off as booleans: make the user quote them.
            problems.append("output.labels: must be a list of class names (quote names such as \"no\" or \"yes\")")
        if "top_k" in out and (isinstance(out["top_k"], bool) or not isinstance(out["top_k"], int) or out["top_k"] < 1):
            problems.append(f"output.top_k: must be a positive integer, got {out['top_k']!r}")
        if "softmax" in out and not isinstance(out["softmax"], bool):
            problems.append("output.softmax: must be true or false")

    dat = _section(data, "data", "", problems)
    if dat:
        _unknown("data", dat, "data", problems)
        _data_ref(dat, "calibration", problems)
        _data_ref(dat, "validation", problems)
        gv = dat.get("golden_vectors", 8)
        if isinstance(gv, bool) or not isinstance(gv, int) or not 1 <= gv <= 1000:
            problems.append(f"data.golden_vectors: must be an integer from 1 to 1000, got {gv!r}")

    targets = data.get("targets")
    if not isinstance(targets, list) or not targets:
        problems.append("targets: required list of {device, variants} entries")
    else:
        for i, target in enumerate(targets):
            path = f"targets[{i}]"
            if not isinstance(target, dict):
                problems.append(f"{path}: must be a mapping with 'device' and 'variants'")
                continue
            _unknown("targets[]", target, path, problems)
            if not isinstance(target.get("device"), str):
                problems.append(f"{path}.device: required device profile id (see `edgepack devices list`)")
            variants = target.get("variants")
            if not isinstance(variants, list) or not variants:
                problems.append(f"{path}.variants: required non-empty list from {', '.join(VARIANTS)}")
            else:
                for v in variants:
                    if v not in VARIANTS:
                        close = difflib.get_close_matches(str(v), VARIANTS, n=1)
                        problems.append(f"{path}.variants: unknown variant {v!r}" + (f" (did you mean '{close[0]}'?)" if close else f" (choose from {', '.join(VARIANTS)})"))

    quant = _section(data, "quantization", "", problems, required=False)
    if quant:
        _unknown("quantization", quant, "quantization", problems)
        if "per_channel" in quant and not isinstance(quant["per_channel"], bool):
            problems.append("quantization.per_channel: must be true or false")
        keep = quant.get("keep_float", [])
        if not isinstance(keep, list) or not all(isinstance(k, str) and k for k in keep):
            problems.append("quantization.keep_float: must be a list of node names or name patterns such as 'frontend/*'")
        if quant.get("calibration_method", "minmax") not in CALIBRATION_METHODS:
            problems.append(f"quantization.calibration_method: must be one of {', '.join(CALIBRATION_METHODS)}")

    gates = _section(data, "gates", "", problems, required=False)
    if gates:
        _unknown("gates", gates, "gates", problems)
        for key in ("max_accuracy_drop", "min_accuracy", "min_agreement"):
            _fraction(gates, key, "gates", problems)
        for key in ("max_size_mb", "max_latency_ms"):
            _positive(gates, key, "gates", problems)
        if gates.get("undecided", "refuse") not in UNDECIDED_POLICIES:
            problems.append(f"gates.undecided: must be one of {', '.join(UNDECIDED_POLICIES)} (what a gate the validation "
                            f"data is too small to decide does), got {gates.get('undecided')!r}")
    if gates or "task" in data:
        from .tasks import validate_task, validate_task_gates

        if "task" in data:
            problems += validate_task(data["task"])
        problems += validate_task_gates(gates if isinstance(gates, dict) else {}, data.get("task"))
        if "task" in data and data.get("stream") is not None:
            problems.append("task: a stream model is gated per stream by stream.decision (carrying its state); "
                            "declare the decision there and drop task")

    from .stream import validate_section

    problems.extend(validate_section(data))  # inputs: (roles) and stream: (state, decision)

    signing = _section(data, "signing", "", problems)
    if signing:
        _unknown("signing", signing, "signing", problems)
        if not isinstance(signing.get("key"), str):
            problems.append("signing.key: required path of the ed25519 private key (create one with `edgepack keys generate`)")
    if "output_dir" in data and not isinstance(data["output_dir"], str):
        problems.append("output_dir: must be a directory path")
    return problems


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Project file {path} does not exist; create one with `edgepack init`.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read project file {path}: {exc}.") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"Project file {path} is not valid YAML{where}: {problem}; fix the syntax and retry.") from exc


def _ref(base: Path, value: Any) -> DataRef:
    # Labels not named: use a 'labels'/'y' array when the file has one.
    if isinstance(value, str):
        return DataRef(base / value, "raw", None)
    return DataRef(base / value["path"], value.get("key", "raw"), value.get("labels"))


def _missing_files(data: dict, base: Path) -> list[str]:
    """Referenced files that do not exist (checked for every field that is a path string)."""
    def get(*keys: str) -> Any:
        node: Any = data
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    files = {"model.path": get("model", "path"), "model.weights": get("model", "weights"), "signing.key": get("signing", "key")}
    for key in ("calibration", "validation"):
        ref = get("data", key)
        files[f"data.{key}"] = ref.get("path") if isinstance(ref, dict) else ref
    problems = []
    for field_path, rel in files.items():
        if isinstance(rel, str) and not (base / rel).exists():
            hint = ""
            if field_path == "signing.key":
                key = base / rel
                hint = f"; create it with `edgepack keys generate --dir {key.parent} --name {key.stem}` and keep it out of version control"
            problems.append(f"{field_path}: file {base / rel} does not exist{hint}")
    return problems


def load_project(path: str | Path) -> Project:
    """Read, validate and resolve a project file.

    Raises:
        ConfigError: Listing every problem at once, each with its field path.
    """
    path = Path(path)
    data = _read_yaml(path)
    problems = validate_project(data)
    base = path.parent
    if isinstance(data, dict):
        problems += _missing_files(data, base)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"Project file {path} has {len(problems)} problem(s); fix them and retry:\n{listing}")
    inp = data["input"]
    kind = next(k for k in INPUT_KINDS if k in inp)
    from .stream import parse_project

    extra_inputs, stream = parse_project(data)
    quant = data.get("quantization") or {}
    gates = data.get("gates") or {}
    out = data.get("output") or None
    return Project(
        path=path,
        name=data["name"],
        version=data["version"],
        description=data.get("description", ""),
        model={**data["model"], "kind": data["model"].get("kind", "onnx")},
        preprocess={"kind": kind, **inp[kind]},
        postprocess=out,
        fold_normalization=inp.get("fold_normalization", True),
        calibration=_ref(base, data["data"]["calibration"]),
        validation=_ref(base, data["data"]["validation"]),
        golden_vectors=data["data"].get("golden_vectors", 8),
        targets=tuple(Target(t["device"], tuple(t["variants"])) for t in data["targets"]),
        per_channel=quant.get("per_channel", True),
        calibration_method=quant.get("calibration_method", "minmax"),
        gates=Gates(
            max_accuracy_drop=gates.get("max_accuracy_drop"),
            min_accuracy=gates.get("min_accuracy"),
            min_agreement=gates.get("min_agreement"),
            max_size_bytes=int(gates["max_size_mb"] * 1_000_000) if gates.get("max_size_mb") else None,
            max_latency_ms=gates.get("max_latency_ms"),
            task={k: gates[k] for k in _TASK_GATE_KEYS if gates.get(k) is not None},
            undecided=gates.get("undecided", "refuse"),
        ),
        signing_key=base / data["signing"]["key"],
        output_dir=base / data.get("output_dir", "dist"),
        raw=data,
        feeds=inp.get("feeds"),
        extra_inputs=extra_inputs,
        stream=stream,
        keep_float=tuple(quant.get("keep_float", ())),
        task=_task(data, base),
    )


def _task(data: dict, base: Path):
    if data.get("task") is None:
        return None
    from .tasks import task_from_dict

    return task_from_dict(data["task"], base)
