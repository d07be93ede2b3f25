"""The bundle manifest: io schema, variants, golden vectors, statistics, lineage, gates.

Only deterministic facts go in here (no timestamps, no latencies, no absolute
paths), so the same project and inputs always sign the same manifest bytes.
"""

from __future__ import annotations

import math
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edgepack_runtime.cache import file_sha256

from ..modelio import TensorSpec

__all__ = ["ENGINE", "MIN_RUNTIME", "PRECISIONS", "file_sha256", "git_commit", "jsonable", "resolved_config",
           "tensor_schema", "variant_engine", "variant_file", "variant_id"]

FORMAT_VERSION = 1
ENGINE = "onnxruntime"
MIN_RUNTIME = "0.1.0"
PRECISIONS = {"fp32": "fp32", "int8": "int8", "fp16": "fp16",
              "tflite-fp32": "fp32", "tflite-int8": "int8", "tflite-fp16": "fp16"}
TFLITE_PREFIX = "tflite-"


def variant_id(variant: str) -> str:
    return variant if variant.startswith(TFLITE_PREFIX) else f"onnx-{variant}"


def variant_file(variant: str) -> str:
    suffix = ".tflite" if variant.startswith(TFLITE_PREFIX) else ".onnx"
    return f"models/{variant_id(variant)}{suffix}"


def variant_engine(variant: str) -> str:
    """The runtime engine that runs a variant: LiteRT for ``tflite-*``, onnxruntime otherwise."""
    return "litert" if variant.startswith(TFLITE_PREFIX) else ENGINE


def git_commit(directory: Path) -> str | None:
    """HEAD commit of the repository holding ``directory``, or None (no git, not a repo)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and len(commit) == 40 else None


def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, tuples as lists, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _rel(path: Path, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return Path(path).name


def resolved_config(project, pre_dict: dict, post_dict: dict | None) -> dict:
    """The project as built: defaults filled in, paths relative to the project file."""
    base = project.path.parent
    model = {k: v for k, v in project.model.items()}
    for key in ("path", "weights"):
        if isinstance(model.get(key), str):
            model[key] = _rel(base / model[key], base)

    def ref(r) -> dict:
        return {"path": _rel(r.path, base), "key": r.key, "labels": r.labels}

    return jsonable({
        "name": project.name,
        "version": project.version,
        "description": project.description,
        "model": model,
        "input": {"name": project.raw.get("input", {}).get("name", "raw"), "preprocess": pre_dict,
                  "fold_normalization": project.fold_normalization},
        "output": post_dict,
        "data": {"calibration": ref(project.calibration), "validation": ref(project.validation),
                 "golden_vectors": project.golden_vectors},
        "targets": [{"device": t.device, "variants": list(t.variants)} for t in project.targets],
        "quantization": {"per_channel": project.per_channel, "calibration_method": project.calibration_method},
        "gates": asdict(project.gates),
        "signing": {"key": _rel(project.signing_key, base)},
        "output_dir": _rel(project.output_dir, base),
    })


def _dims(spec: TensorSpec) -> list | None:
    return None if spec.shape is None else [d for d in spec.shape]


def tensor_schema(spec: TensorSpec, value_range: list | None, **extra: Any) -> dict:
    doc = {"name": spec.name, "dtype": None if spec.dtype is None else spec.dtype.name, "shape": _dims(spec),
           "value_range": value_range}
    doc.update(extra)
    return jsonable(doc)
