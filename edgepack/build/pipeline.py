"""``edgepack build``: a project file and a trained model become one signed bundle.

Steps (each an existing edgepack piece, composed here):

1. :func:`edgepack.project.load_project` (every schema problem at once), device ids
   checked against the device profiles, the signing key loaded up front.
2. Import the model, embed the declared preprocessing (+ post-processing) so devices
   feed RAW input, fold the input normalization into the first layer when declared.
3. Variants: ``fp32`` = :func:`optimize_graph` of that model; ``int8`` = static QDQ
   quantization calibrated on raw calibration inputs; ``fp16`` = fp16 conversion.
   Quantization always runs after embedding, so the bundle's models are end to end.
4. Every variant is measured END TO END FROM RAW INPUTS against the embedded fp32
   model on the validation data (accuracy, agreement, max abs error, size, latency).
5. Gates (and ``--baseline``: champion/challenger on the same validation data). Any
   failure raises :class:`GateError` and nothing is written.
6. Golden vectors, reference statistics, manifest, signed and verified (:func:`.verify_step.write_verified`).

Determinism: the bundle holds no timestamps and no wall-clock numbers; latencies go
to the side report ``NAME-VERSION.build.json`` and the manifest records only the
latency gate's threshold and verdict.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, GateError
from . import golden as golden_mod
from . import stats as stats_mod
from .manifest import (
    FORMAT_VERSION,
    MIN_RUNTIME,
    PRECISIONS,
    file_sha256,
    git_commit,
    jsonable,
    resolved_config,
    tensor_schema,
    variant_engine,
    variant_file,
    variant_id,
)

__all__ = ["BuildResult", "VariantResult", "build"]

GOLDEN_FILE = "golden/vectors.npz"
STATS_FILE = "stats/reference.json"
THREADS = 1
LATENCY_RUNS = 30

Progress = Callable[[str], None]


def _noop(_: str) -> None:
    pass


@dataclass
class VariantResult:
    """One built variant and what was measured about it."""

    variant: str
    model_bytes: bytes = field(repr=False)
    numerics: Any = None
    latency: Any = None
    failures: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    audit: Any = None
    #: Set on a class-specific re-quantization (e.g. ``x86-avx2``): part of its id and file name.
    tag: str = ""
    #: The quantization settings (int8 only), as QuantOptions.describe() words them.
    quantization: str | None = None
    #: Per arithmetic class: a certify.ClassMeasurement (filled by certify.certify).
    classes: dict = field(default_factory=dict)
    #: The host session that measured it (kept for golden vectors and statistics).
    session: Any = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return variant_id(self.variant) + (f"-{self.tag}" if self.tag else "")

    @property
    def file(self) -> str:
        base = variant_file(self.variant)
        return base if not self.tag else base.replace(variant_id(self.variant), self.id, 1)

    @property
    def size_bytes(self) -> int:
        return len(self.model_bytes)


@dataclass
class BuildResult:
    """What ``build`` produced: the bundle (None when a gate failed) and the report."""

    bundle: Path | None
    report_path: Path | None
    manifest: dict | None
    report: dict


# --------------------------------------------------------------------------- loading


def _pre_dict(data: dict) -> dict:
    """A preprocessing mapping in ``preprocess_from_dict`` form (``kind`` + fields).

    ``Project.preprocess`` is the project-file form ``{"image": {...}}``; accept both.
    """
    if "kind" not in data and len(data) == 1 and next(iter(data)) in ("image", "tabular"):
        kind, fields = next(iter(data.items()))
        return {"kind": kind, **(fields or {})}
    return dict(data)


def _load(project_path: Path):
    from ..project import load_project

    return load_project(project_path)


def _check_devices(project) -> None:
    try:
        from ..devices import get_profile
    except ImportError:  # device profiles are optional
        return
    problems = []
    for index, target in enumerate(project.targets):
        try:
            profile = get_profile(target.device)
        except ConfigError as exc:
            problems.append(f"targets[{index}].device: {exc}")
            continue
        engines = getattr(profile, "engines", None)
        for engine in sorted({variant_engine(v) for v in target.variants}):
            if engines and engine not in engines:
                problems.append(f"targets[{index}].device: {target.device} does not run {engine} (engines: {', '.join(engines)})")
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"Project file {project.path} has {len(problems)} problem(s); fix them and retry:\n{listing}")


def _import_model(project) -> tuple[Any, dict]:
    """The trained model as ONNX, and its lineage entry (kind, files with sha256, description).

    Uses :mod:`edgepack.importers` when present (every model kind); otherwise only
    ``kind: onnx`` through :func:`load_model`.
    """
    from ..modelio import load_model

    kind = project.model["kind"]
    base = project.path.parent
    try:
        from ..importers import import_model, source_from_config
    except ImportError:
        import_model = None
    if import_model is None:
        if kind != "onnx":
            raise ConfigError(f"model.kind: {kind!r} models need edgepack's importers, which are not installed; "
                              "export the model to ONNX and set kind: onnx.")
        path = base / project.model["path"]
        return load_model(path), {"kind": kind, "file": project.model["path"], "sha256": file_sha256(path),
                                  "description": f"ONNX model {path.name}"}
    imported = import_model(kind, source_from_config(project.model, base_dir=base))
    if imported.kind != "onnx" or imported.model is None:
        raise ConfigError(f"model.kind: {kind!r} imports as {imported.kind}, but edgepack build packages ONNX models "
                          "for onnxruntime only; use an ONNX, PyTorch or scikit-learn model.")
    files = [{"role": f.role, "file": _relative(f.path, base), "sha256": f.sha256} for f in imported.source_files]
    return imported.model, {"kind": kind, "file": project.model.get("path"), "sha256": imported.source_sha256,
                            "description": imported.description, "files": files}


def _relative(path: Path, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return Path(path).name


def _datasets(project, inputs, pre, raw_name: str):
    from ..data import open_dataset
    from ..preprocess import check_raw_input
    from .. import stream as stream_mod

    opened = {}
    for role, ref in (("calibration", project.calibration), ("validation", project.validation)):
        try:
            if project.stream is not None:  # streams of chunks, run carrying the state
                opened[role] = stream_mod.open_streams(ref.path, role, raw_name, ref.key, ref.labels, project.extra_inputs, inputs)
            elif project.extra_inputs:  # several inputs: per-sample arrays plus constants
                opened[role] = stream_mod.open_inputs(ref.path, role, raw_name, ref.key, ref.labels, project.extra_inputs, inputs)
            else:
                opened[role] = open_dataset(ref.path, inputs, role, key=ref.key, labels_key=ref.labels)
        except DataError as exc:
            raise DataError(f"data.{role}: {exc}") from exc
    cal, val = opened["calibration"], opened["validation"]
    for role, ds in (("calibration", cal), ("validation", val)):
        if project.stream is not None:
            try:
                check_raw_input(pre, ds.raw_chunks())
            except DataError as exc:
                raise DataError(f"The {role} data {ds.source} is not valid raw input: {exc}") from None
            continue
        for start, feed in ds.batches(256):
            try:
                check_raw_input(pre, feed[raw_name])
            except DataError as exc:
                raise DataError(f"The {role} data {ds.source} (samples from {start}) is not valid raw input: {exc}") from None
    return cal, val


# --------------------------------------------------------------------------- running


def _fixed_batch(sess) -> int | None:
    for i in sess.get_inputs():
        if i.shape and isinstance(i.shape[0], int):
            return i.shape[0]
    return None


def _run(sess, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a feed of any row count, in chunks when the model fixes its batch size."""
    fixed = _fixed_batch(sess)
    rows = next(iter(feed.values())).shape[0]
    if fixed is None or fixed == rows:
        return [np.asarray(o) for o in sess.run(None, feed)]
    # Constants (a 0-d scalar, a shared [1, ...] tensor) go whole into every chunk; samples are sliced.
    parts = [sess.run(None, {k: v[s:s + fixed] if v.ndim and v.shape[0] == rows else v for k, v in feed.items()})
             for s in range(0, rows - rows % fixed, fixed)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))] if parts else []


def _collect(sess, dataset, batch: int, limit: int) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = []
    for _start, feed in dataset.batches(batch, limit):
        chunks.append(_run(sess, feed))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def _session(model_bytes: bytes, what: str):
    from ..modelio import runtime_load_error
    from ..optimize.evaluate import session

    try:
        return session(model_bytes, THREADS)
    except Exception as exc:  # noqa: BLE001 - translated
        raise runtime_load_error(exc, what) from exc


# --------------------------------------------------------------------------- variants


def _variants(project, fp32_bytes: bytes, calibration, options, progress: Progress, warnings: list[str]) -> dict[str, VariantResult]:
    out: dict[str, VariantResult] = {}
    # One quantization per variant here; class-specific re-quantizations happen in certify.
    for variant in project.variants:
        devices = [t.device for t in project.targets if variant in t.variants]
        if variant.startswith("tflite-"):
            continue  # converted and validated in build() (edgepack.convert)
        if variant == "fp32":
            out[variant] = VariantResult(variant, fp32_bytes, devices=devices)
            continue
        progress(f"Quantizing ({variant})")
        mode = "static" if variant == "int8" else "fp16"
        data, audit = _quantize_bytes(mode, fp32_bytes, options, calibration if mode == "static" else None)
        if audit.left_float:
            warnings.append(f"{variant}: {len(audit.left_float)} of {audit.weights_total} weight ops stayed float: "
                            + ", ".join(audit.left_float[:5]))
        out[variant] = VariantResult(variant, data, devices=devices, audit=audit,
                                     quantization=options.describe() if mode == "static" else None)
    return out


def _quant_options(project, fp32_bytes: bytes, batch: int):
    import onnx

    from ..optimize.quantize import QuantOptions
    from ..preprocess.graph import AREA_NODE_PREFIX

    # Post-processing (softmax, top-k) stays float: quantized probabilities
    # lose the confidence resolution monitoring and thresholds rely on. So do the area
    # resize's box weights: they depend on the image size and calibration sees one size
    # (int8 would turn 0.5 into 0.504 for every size it did not see).
    from fnmatch import fnmatchcase

    keep = tuple(getattr(project, "keep_float", ()))  # quantization.keep_float patterns
    post_nodes = tuple(n.name for n in onnx.load_from_string(fp32_bytes).graph.node
                       if n.name.startswith(("post/", AREA_NODE_PREFIX)) or any(fnmatchcase(n.name, k) for k in keep))
    return QuantOptions(per_channel=project.per_channel, calibration_method=project.calibration_method,
                        calibration_batch=batch, exclude_nodes=post_nodes)


def _quantize_bytes(mode: str, fp32_bytes: bytes, options, calibration):
    from ..optimize.quantize import quantize

    with tempfile.TemporaryDirectory(prefix="edgepack-quant-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / f"{mode}.onnx"
        src.write_bytes(fp32_bytes)
        audit = quantize(mode, src, dst, options, calibration)
        return dst.read_bytes(), audit


def _tflite_tools() -> dict[str, str]:
    from ..convert.tflite import tool_versions

    return tool_versions()


#: Gates every int8/fp16 variant must pass against fp32 when the project sets none of its kind:
#: an accuracy gate alone misses a variant that trades errors (same accuracy, other mistakes).
DEFAULT_MIN_AGREEMENT = 0.98
DEFAULT_MIN_COSINE = 0.99


def _numeric_gate(project, result: VariantResult, n):
    """The optimize-style gate (accuracy drop, agreement, cosine) a variant's numerics are checked against."""
    from ..optimize.gate import Gate

    g = project.gates
    min_agreement, min_cosine = g.min_agreement, None
    task = getattr(project, "task", None)
    if task is not None:
        min_agreement = None  # the task's gates (edgepack.tasks) replace the raw first-output gate
    elif PRECISIONS[result.variant] != "fp32":
        if min_agreement is None and n.agreement is not None:
            min_agreement = DEFAULT_MIN_AGREEMENT
        if n.agreement is None:
            min_cosine = DEFAULT_MIN_COSINE
    return Gate(max_accuracy_drop=g.max_accuracy_drop if task is None else None, min_agreement=min_agreement,
                min_cosine=min_cosine, undecided=getattr(g, "undecided", "refuse"))


def _gate_verdicts(project, result: VariantResult, numerics=None) -> tuple[list, list[str]]:
    """(statistical verdicts with intervals and counts, notes on accepted undecided gates) of one variant."""
    from ..optimize.gate import assess, notes

    n = numerics if numerics is not None else result.numerics
    if n is None:
        return [], []
    gate = _numeric_gate(project, result, n)
    return assess(gate, n), notes(gate, n)


def _gate_failures(project, result: VariantResult, numerics=None, graph_bytes: bytes | None = None) -> list[str]:
    from ..optimize.gate import check

    g = project.gates
    n = numerics if numerics is not None else result.numerics
    failures = check(_numeric_gate(project, result, n), n)
    if PRECISIONS[result.variant] != "fp32":
        from ..stream import state_gate_failures

        failures.extend(state_gate_failures(n))  # stream models: every output, the state included
    from ..tasks.gates import for_project

    failures += for_project(project, n, defaults=PRECISIONS[result.variant] != "fp32", model_bytes=graph_bytes)
    if g.min_accuracy is not None:
        if n.accuracy is None:
            failures.append("min_accuracy cannot be measured: the validation data has no labels or the output is not class scores")
        elif n.accuracy < g.min_accuracy - 1e-12:
            failures.append(f"accuracy {n.accuracy * 100:.2f}% is below min_accuracy {g.min_accuracy * 100:.2f}%")
    if g.max_size_bytes is not None and result.size_bytes > g.max_size_bytes:
        failures.append(f"size {result.size_bytes:,} B is above max_size_mb {g.max_size_bytes / 1e6:g} MB ({g.max_size_bytes:,} B)")
    if g.max_latency_ms is not None and result.latency is not None and result.latency.median_ms > g.max_latency_ms:
        failures.append(f"median latency {result.latency.median_ms:.3f} ms on this host is above max_latency_ms {g.max_latency_ms:g} ms")
    return failures


def _target_classes(project) -> dict[str, str]:
    """Each target device's arithmetic class (its profile's, or derived from its simd flags)."""
    from ..devices import get_profile

    return {t.device: get_profile(t.device).arith_class for t in project.targets}


def _slower_than_fp32(result: VariantResult, results: dict) -> bool | None:
    fp32 = results.get("fp32")
    if result.variant == "fp32" or fp32 is None or result.latency is None or fp32.latency is None:
        return None
    # 10% margin, as optimize uses: sub-microsecond noise on a shared host is not "slower".
    return result.latency.median_ms > fp32.latency.median_ms * 1.1


def _baseline(path: Path, project, batch: int) -> dict:
    """Verify the old bundle with our own public key and measure its fp32 accuracy on our validation data."""
    from ..bundle import extract_bundle, load_private_key, public_key_of
    from ..data import open_dataset
    from ..modelio import graph_inputs, load_model
    from ..optimize.evaluate import compare

    public = public_key_of(load_private_key(project.signing_key))
    with tempfile.TemporaryDirectory(prefix="edgepack-baseline-") as tmp:
        root = Path(tmp) / "baseline"
        manifest = extract_bundle(path, root, public)
        variants = manifest.variants
        chosen = next((v for v in variants if v.get("precision") == "fp32"), variants[0] if variants else None)
        if chosen is None:
            raise ConfigError(f"Baseline bundle {path} has no model variant to compare against.")
        model_path = root / chosen["file"]
        model = load_model(model_path)
        inputs = graph_inputs(model)
        dataset = open_dataset(project.validation.path, inputs, "validation",
                               key=project.validation.key, labels_key=project.validation.labels)
        sess = _session(model_path.read_bytes(), f"baseline {chosen['file']}")
        try:
            numerics = compare(sess, sess, dataset, batch)
        except Exception as exc:  # noqa: BLE001 - different inputs than the validation data
            raise DataError(f"The baseline bundle {path} ({manifest.name} {manifest.version}) cannot run the validation "
                            f"data ({str(exc).splitlines()[0][:200]}); a baseline must take the same raw input.") from exc
    if numerics.accuracy is None:
        raise DataError(f"--baseline needs labelled validation data to compare accuracy, but {project.validation.path} "
                        "has no labels; add labels or drop --baseline.")
    return {
        "name": manifest.name,
        "version": manifest.version,
        "variant": chosen.get("id"),
        "manifest_sha256": hashlib.sha256(manifest.raw).hexdigest(),
        "accuracy": numerics.accuracy,
        "samples": numerics.samples,
    }


# --------------------------------------------------------------------------- schema


def _io_schema(embedded, pre, post, val_raw: dict[str, np.ndarray], fp32_outputs: list[np.ndarray]) -> dict:
    from ..modelio import graph_inputs, graph_outputs

    inputs = []
    for spec in graph_inputs(embedded):
        raw = val_raw.get(spec.name)
        if spec.dtype is not None and spec.dtype.kind in "iu":
            info = np.iinfo(spec.dtype)
            value_range = [int(info.min), int(info.max)]
        elif raw is not None and np.isfinite(raw).any():
            value_range = [float(np.nanmin(raw)), float(np.nanmax(raw))]
        else:
            value_range = None
        extra: dict[str, Any] = {"preprocess": pre.to_dict()}
        if hasattr(pre, "schema_extra"):  # audio, frames
            extra.update(pre.schema_extra())
            value_range = extra.pop("value_range", value_range)
        elif pre.to_dict().get("kind") == "image":
            extra["layout"] = "NHWC"
            extra["size_range"] = {"min": list(pre.min_size), "max": list(pre.max_size)}
            if spec.shape is not None and len(spec.shape) == 4 and tuple(pre.min_size) == tuple(pre.max_size):
                from dataclasses import replace

                spec = replace(spec, shape=(spec.shape[0], *pre.min_size, spec.shape[3]))
        else:
            extra["columns"] = list(pre.raw_columns)
        inputs.append(tensor_schema(spec, value_range, **extra))
    outputs = []
    labels = list(post.labels) if post is not None and post.labels else None
    for index, spec in enumerate(graph_outputs(embedded)):
        values = fp32_outputs[index] if index < len(fp32_outputs) else None
        extra = {}
        if spec.name == "scores" and post is not None and post.softmax:
            value_range: list | None = [0.0, 1.0]
            extra["meaning"] = "class probabilities (softmax)"
        elif spec.name == "top_k_indices":
            value_range = [0, (len(labels) - 1) if labels else None]
            extra["meaning"] = "class indices, best first"
        elif spec.name == "letterbox" and pre.to_dict().get("letterbox") is not None:
            value_range = None  # exact integers of the preprocessing, not a model value to monitor
            extra["meaning"] = ("letterbox transform per image: resized_h, resized_w, pad_top, pad_left, raw_h, raw_w "
                                "(edgepack_runtime.unletterbox_boxes maps boxes back to raw pixels)")
        elif values is not None and values.size and values.dtype.kind in "fiu":
            value_range = [float(np.nanmin(values)), float(np.nanmax(values))]
            extra["value_range_observed"] = True
        else:
            value_range = None
        if labels and (index == 0 or spec.name == "top_k_indices"):
            extra["labels"] = labels
        outputs.append(tensor_schema(spec, value_range, **extra))
    return {"inputs": inputs, "outputs": outputs}


def _io_with_roles(project, raw_name: str, schema: dict, validation) -> dict:
    """Multi-input/stateful models: each input's role in the schema (constants with their value)."""
    if not project.extra_inputs and project.stream is None:
        return schema
    from ..stream import annotate_schema

    constants = getattr(validation, "constants", None)
    if constants is None:
        constants = {k: v for k, v in validation.batch(0, 1).items()
                     if k in {e.name for e in project.extra_inputs if e.role == "constant"}}
    return annotate_schema(schema, raw_name, project.extra_inputs, project.stream, constants)


def _numerics_dict(n) -> dict | None:
    if n is None:
        return None
    return jsonable({k: getattr(n, k) for k in n.__dataclass_fields__})


def _golden_entries(ship: dict, host_cls: str, golden_feed: dict, run_fn) -> tuple[dict, dict, dict]:
    """Golden inputs and, per shipped variant, its host outputs with tolerances and one entry per
    certified class (its own outputs only where they differ from the host's).

    Returns:
        ``(arrays, tolerances, classes)`` for ``golden.npz`` and the manifest's ``golden`` block.
    """
    arrays = {golden_mod.input_key(k): v for k, v in golden_feed.items()}
    tolerances: dict[str, dict[str, float]] = {}
    golden_classes: dict[str, dict[str, dict]] = {}
    for result in ship.values():
        names = [o.name for o in result.session.get_outputs()]
        host_m = result.classes.get(host_cls)
        outs = host_m.golden if host_m is not None and host_m.golden is not None else run_fn(result.session, golden_feed)
        tolerances[result.id] = {}
        for name, value in zip(names, outs):
            arrays[golden_mod.output_key(result.id, name)] = value
            tolerances[result.id][name] = golden_mod.tolerance(value, result.numerics.max_abs_error)
        golden_classes[result.id] = {}
        for klass, m in result.classes.items():
            if not m.passed:
                continue
            same = all(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc") for a, b in zip(m.golden, outs))
            key = result.id if same else f"{result.id}@{klass}"
            others = [o.golden for c, o in result.classes.items() if c != klass and o.golden is not None]
            entry = {"outputs": key, "how": m.how, "tolerances": {}}
            for index, (name, value) in enumerate(zip(names, m.golden)):
                if key != result.id:
                    arrays[golden_mod.output_key(key, name)] = value
                entry["tolerances"][name] = golden_mod.class_tolerance(
                    value, [o[index] for o in others if index < len(o)], m.numerics.max_abs_error)
            golden_classes[result.id][klass] = entry
    return arrays, tolerances, golden_classes


# --------------------------------------------------------------------------- main


def build(project_path: str | Path, baseline: str | Path | None = None, progress: Progress = _noop,
          source_date_epoch: int | None = None, measure_config: Any = None) -> BuildResult:
    """Build, measure, gate, sign and write ``output_dir/NAME-VERSION.epk``.

    Raises:
        ConfigError / ModelError / DataError / InputError: Bad input (nothing written).
        GateError: A gate (or the baseline comparison) failed; the error carries
            ``report`` and nothing is written.
    """
    import onnx
    import onnxruntime

    from .. import __version__
    from ..bundle import bundle_filename, load_private_key
    from ..modelio import graph_inputs
    from ..optimize.evaluate import batch_size_for, compare, measure_latency
    from ..optimize.graph import optimize_graph
    from ..preprocess import Postprocess, embed_preprocessing, preprocess_from_dict, try_fold_normalization
    from .._atomic import atomic_write_bytes

    from ..arith import MeasureConfig

    measure_config = (measure_config or MeasureConfig(threads=THREADS)).resolved()
    progress("Loading project")
    project = _load(Path(project_path))
    _check_devices(project)
    load_private_key(project.signing_key)  # fail now, not after minutes of work
    baseline_path = Path(baseline) if baseline is not None else None
    if baseline_path is not None and not baseline_path.is_file():
        raise ConfigError(f"Baseline bundle {baseline_path} does not exist; pass the .epk currently in production.")
    warnings: list[str] = []

    from .tflite_source import builds_for_litert

    if builds_for_litert(project):  # LiteRT-only bundles: a TFLite model as given, or Keras through TFLiteConverter
        from .tflite_source import build_source

        return build_source(project, baseline_path=baseline_path, progress=progress, source_date_epoch=source_date_epoch,
                            measure_config=measure_config, warnings=warnings)

    progress("Importing model")
    source, source_lineage = _import_model(project)
    from .opset_step import convert_source, prove_source

    source, opset_pending = convert_source(source, f"The model {source_lineage.get('file') or project.model.get('path')}")
    raw_name = (project.raw.get("input") or {}).get("name", "raw")
    pre = preprocess_from_dict(_pre_dict(project.preprocess))
    pre.validate()
    post = None
    if project.postprocess:
        spec = dict(project.postprocess)
        if spec.get("labels") is not None:
            spec["labels"] = [str(x) for x in spec["labels"]]
        post = Postprocess(**spec)

    progress("Embedding preprocessing")
    embedded = embed_preprocessing(source, pre, post, raw_name, feeds=project.feeds)
    fold_info: dict[str, Any] = {"requested": project.fold_normalization, "applied": False, "detail": "not requested"}
    base = embedded
    if project.fold_normalization:
        folded = try_fold_normalization(embedded)
        base = folded.model
        fold_info.update(applied=folded.folded, detail=folded.reason)
    inputs = graph_inputs(embedded)
    if project.task is not None:
        project.task.check_outputs([o.name for o in embedded.graph.output])
    batch = batch_size_for(inputs)
    stream = project.stream
    if project.extra_inputs or stream is not None:
        from .. import stream as stream_mod
        from ..modelio import graph_outputs

        stream_mod.check_model(project.extra_inputs, stream, raw_name, project.feeds, inputs, graph_outputs(embedded))
        tflite = [v for v in project.variants if v.startswith("tflite-")]
        if tflite:
            raise ConfigError(f"targets: {', '.join(tflite)} cannot be built for a model with several inputs or state yet "
                              "(the TFLite check feeds one input); use the onnx variants fp32/int8/fp16.")
    calibration, validation = _datasets(project, inputs, pre, raw_name)
    prove_source(opset_pending, pre, raw_name, {"calibration": calibration, "validation": validation}, source_lineage,
                 f"The model {source_lineage.get('file') or project.model.get('path')}")
    if stream is not None:
        def compare_fn(ref, cand, data, _batch):
            return stream_mod.compare_streams(ref, cand, data, stream)
    else:
        compare_fn = functools.partial(compare, task=project.task)  # a declared task is decoded and measured too

    progress("Optimizing graph")
    optimized, graph_report = optimize_graph(base, THREADS)
    fp32_bytes = optimized.SerializeToString()
    embedded_bytes = embedded.SerializeToString()
    reference = _session(embedded_bytes, "the embedded model")
    check = compare_fn(reference, _session(fp32_bytes, "the optimized model"), validation, batch)
    if stream is not None:  # quantize on the states fp32 really carries into each chunk
        calibration = stream_mod.calibration_dataset(reference, calibration, stream)
    graph_info = {"applied": graph_report.applied, "nodes_before": graph_report.nodes_before,
                  "nodes_after": graph_report.nodes_after, "note": graph_report.note}
    if not check.close:
        # Safety net: a rewrite (folding or graph optimization) that changes outputs is not shipped.
        fp32_bytes = embedded_bytes
        note = f"the folded/optimized graph changed outputs (max abs error {check.max_abs_error:.3g}); shipped the embedded graph as is"
        graph_info.update(applied=False, note=note)
        fold_info.update(applied=False, detail=note)
        warnings.append(note)

    quant_options = _quant_options(project, fp32_bytes, batch)
    results = _variants(project, fp32_bytes, calibration, quant_options, progress, warnings)
    tflite = [v for v in project.variants if v.startswith("tflite-")]
    if tflite:
        from ..convert.tflite import build_tflite_variants

        for variant, (data, check_report, notes) in build_tflite_variants(fp32_bytes, tflite, calibration, validation, progress).items():
            results[variant] = VariantResult(variant, data, devices=[t.device for t in project.targets if variant in t.variants],
                                             audit=check_report)
            warnings.extend(f"{variant}: {n}" for n in notes)
    sessions = {}
    for variant, result in results.items():
        progress(f"Measuring {variant} on validation data")
        if variant.startswith("tflite-"):
            from ..convert.tflite import LiteRTSession

            sessions[variant] = LiteRTSession(result.model_bytes, THREADS)
        else:
            sessions[variant] = _session(result.model_bytes, f"the {variant} variant")
        result.numerics = compare_fn(reference, sessions[variant], validation, batch)
    progress("Measuring latency")
    timings = measure_latency({v: s for v, s in sessions.items()}, validation.batch(0, batch_size_for(inputs, 1)),
                              LATENCY_RUNS, warmup=3)
    for variant, result in results.items():
        result.latency = timings.get(variant)
        result.session = sessions[variant]
        result.failures = _gate_failures(project, result, graph_bytes=fp32_bytes)

    # A fixed-batch model runs its golden vectors in its own batch size (verify and the device too).
    fixed_batch = _fixed_batch(reference)
    golden_layout = None
    if stream is not None:
        golden_feed, golden_layout = stream_mod.golden_stream(validation, stream, project.golden_vectors)
        run_fn = stream_mod.golden_runner(golden_layout)
        count = golden_layout["steps"]
    else:
        count = golden_mod.golden_count(project.golden_vectors, len(validation), fixed_batch)
        golden_feed = validation.batch(0, count)
        run_fn = _run
    host_cls = measure_config.resolved().host_class
    classes_of = _target_classes(project)

    def requantize(changes: dict) -> VariantResult:
        from dataclasses import replace

        options = replace(quant_options, **changes)
        data, audit = _quantize_bytes("static", fp32_bytes, options, calibration)
        sess = _session(data, f"int8 re-quantized with {options.describe()}")
        candidate = VariantResult("int8", data, audit=audit, quantization=options.describe(), session=sess)
        candidate.numerics = compare_fn(reference, sess, validation, batch)
        return candidate

    from ..arith.cache import dataset_digest
    from .certify import certify

    verdicts = certify(project, results, host_class=host_cls, classes_of=classes_of, sessions=sessions, reference=reference,
                       validation=validation, calibration=calibration, batch=batch, golden_feed=golden_feed,
                       gate=lambda r, n: _gate_failures(project, r, n, fp32_bytes), config=measure_config, run=run_fn,
                       requantize=requantize, progress=progress, compare=compare_fn,
                       # A reused measurement must also have decoded the same task alike.
                       data_digest=functools.cache(lambda: dataset_digest(validation, batch)
                                                   + (project.task.digest() if project.task else ""))
                       if measure_config.cache_dir and stream is None else None)
    shipped_ids = {v.shipped for v in verdicts if v.shipped}
    ship = {key: r for key, r in results.items() if r.id in shipped_ids}
    for r in results.values():
        r.devices = [t.device for t in project.targets if any(v.device == t.device and v.shipped == r.id for v in verdicts)]
    for r in results.values():
        if r.id in shipped_ids:
            warnings.extend(f"{r.id}: {note}" for note in _gate_verdicts(project, r)[1])
    warnings.extend(v.reason for v in verdicts if v.status == "refused")
    warnings.extend(v.reason for v in verdicts if v.status == "replaced")

    baseline_info = None
    baseline_failure = None
    if baseline_path is not None:
        progress("Comparing with the baseline")
        baseline_info = _baseline(baseline_path, project, batch)
        new_acc = results["fp32"].numerics.accuracy if "fp32" in results else None
        if new_acc is None:
            new_acc = check.reference_accuracy
        baseline_info["new_accuracy"] = new_acc
        if new_acc is None or new_acc < baseline_info["accuracy"] - 1e-12:
            shown = "unmeasurable" if new_acc is None else f"{new_acc * 100:.2f}%"
            baseline_failure = (f"baseline: the new fp32 accuracy {shown} is below the baseline "
                                f"{baseline_info['name']} {baseline_info['version']}'s {baseline_info['accuracy'] * 100:.2f}% "
                                "on the same validation data; refusing to replace a better model")
        baseline_info["passed"] = baseline_failure is None

    report: dict[str, Any] = {
        "project": str(project.path),
        "name": project.name,
        "version": project.version,
        "host": f"{platform.machine()} {platform.system()} python {platform.python_version()}",
        "threads": THREADS,
        "validation": {"source": validation.source, "samples": len(validation), "labels": validation.labels is not None},
        "calibration": {"source": calibration.source, "samples": len(calibration)},
        "fold_normalization": fold_info,
        "graph_optimization": graph_info,
        "host_class": host_cls,
        "variants": {
            r.id: {
                "precision": r.variant,
                "size_bytes": r.size_bytes,
                "numerics": _numerics_dict(r.numerics),
                "latency_ms": None if r.latency is None else {"median": r.latency.median_ms, "p95": r.latency.p95_ms, "runs": r.latency.runs},
                "gate_failures": r.failures,
                "gate_verdicts": [v.to_dict() for v in _gate_verdicts(project, r)[0]],
                "devices": r.devices,
                "shipped": r.id in shipped_ids,
                "quantization": r.quantization,
                "classes": {c: m.to_dict() for c, m in r.classes.items()},
                "slower_than_fp32_on_host": _slower_than_fp32(r, results),
            }
            for r in results.values()
        },
        "targets": {
            t.device: {"class": classes_of[t.device],
                       "variants": {v.variant: v.to_dict() for v in verdicts if v.device == t.device}}
            for t in project.targets
        },
        "gates": jsonable({**project.gates.__dict__}),
        "baseline": baseline_info,
        "warnings": warnings,
        "bundle": None,
    }
    for r in results.values():
        if r.variant.startswith("tflite-") and r.audit is not None:
            report["variants"][r.id]["tflite_validation"] = r.audit.to_dict()
    failures = []
    for t in project.targets:
        mine = [v for v in verdicts if v.device == t.device]
        if not any(v.shipped for v in mine):
            failures.append(f"{t.device} ({classes_of[t.device]}): no declared variant passed its gates there: "
                            + "; ".join(v.reason for v in mine))
    for r in ship.values():
        names = [o.name for o in r.session.get_outputs()]
        broken = sorted({f"{r.id}: its output {name!r} on the golden inputs contains NaN or infinity under {m.klass}; "
                         "the model is broken on these inputs"
                         for m in r.classes.values() if m.passed
                         for name, value in zip(names, m.golden or [])
                         if np.asarray(value).dtype.kind in "fc" and not np.all(np.isfinite(value))})
        failures.extend(broken)
    if baseline_failure:
        failures.append(baseline_failure)
    if failures:
        error = GateError("The build failed its gates; no bundle was written:\n" + "\n".join(f"  - {f}" for f in failures))
        error.report = report  # type: ignore[attr-defined]
        raise error

    progress("Writing golden vectors")
    arrays, tolerances, golden_classes = _golden_entries(ship, host_cls, golden_feed, run_fn)
    golden_bytes = golden_mod.write_npz(arrays)

    progress("Computing reference statistics")
    limit = stats_mod.MAX_SAMPLES
    val_raw: dict[str, list[np.ndarray]] = {}
    per_sample = {raw_name, *(e.name for e in project.extra_inputs if e.role == "per_sample")}
    if stream is not None:
        val_raw_arrays = {raw_name: validation.raw_chunks()[:limit]}
        outputs = {r.id: [o[:limit] for o in stream_mod.collect(r.session, validation, stream)] for r in ship.values()}
    else:
        for _start, feed in validation.batches(256, limit):
            for k, v in feed.items():
                if k in per_sample:  # constants are not samples
                    val_raw.setdefault(k, []).append(v)
        val_raw_arrays = {k: np.concatenate(v) for k, v in val_raw.items()}
        outputs = {r.id: _collect(r.session, validation, batch, limit) for r in ship.values()}
    labels = list(post.labels) if post is not None and post.labels else None
    feature_names = {raw_name: list(pre.raw_columns)} if hasattr(pre, "raw_columns") else None
    stats_doc = stats_mod.reference_stats(val_raw_arrays, {v: o[0] for v, o in outputs.items()}, labels, feature_names)
    stats_bytes = stats_mod.stats_json(stats_doc)
    fp32_key = results["fp32"].id if "fp32" in results and results["fp32"].id in outputs else next(iter(outputs))

    progress("Signing the bundle")
    base_dir = project.path.parent
    g = project.gates
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": project.name,
        "version": project.version,
        "description": project.description,
        "io": _io_with_roles(project, raw_name, _io_schema(embedded, pre, post, val_raw_arrays, outputs[fp32_key]),
                             validation),
        "variants": [
            {"id": r.id, "file": r.file, "engine": variant_engine(r.variant), "precision": PRECISIONS[r.variant], "min_runtime": MIN_RUNTIME,
             "devices": r.devices, "size_bytes": r.size_bytes,
             **({"quantization": r.quantization} if r.quantization else {}),
             # The classes it is certified for, each with how its numbers were obtained.
             "classes": {c: {k: v for k, v in m.to_dict().items() if k not in ("passed", "failures", "cached")}
                         for c, m in r.classes.items() if m.passed}}
            for r in ship.values()
        ],
        "targets": {t.device: {"class": classes_of[t.device],
                               "variants": [v.shipped for v in verdicts if v.device == t.device and v.shipped]}
                    for t in project.targets},
        "golden": {"file": GOLDEN_FILE, "count": count, **({"batch": fixed_batch} if fixed_batch else {}),
                   "rule": golden_mod.RULE, "tolerances": tolerances,
                   "class_rule": golden_mod.CLASS_RULE, "classes": golden_classes,
                   **({"stream": golden_layout} if golden_layout else {})},
        "reference_stats": {"file": STATS_FILE},
        "lineage": {
            "source_model": source_lineage,
            "calibration": {"file": project.calibration.path.name, "sha256": file_sha256(project.calibration.path),
                            "description": f"{len(calibration)} raw samples from array '{project.calibration.key}'"},
            "validation": {"file": project.validation.path.name, "sha256": file_sha256(project.validation.path),
                           "description": f"{len(validation)} raw samples from array '{project.validation.key}'"
                           + (f", labels '{project.validation.labels or 'auto'}'" if validation.labels is not None else ", no labels")},
            "tools": {"edgepack": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                      "numpy": np.__version__, **(_tflite_tools() if tflite else {})},
            "git_commit": git_commit(base_dir),
            "steps": {"fold_normalization": fold_info, "graph_optimization": graph_info},
            "project": resolved_config(project, pre.to_dict(), post.to_dict() if post is not None else None),
        },
        "gates": jsonable({
            "thresholds": {
                "max_accuracy_drop": g.max_accuracy_drop, "min_accuracy": g.min_accuracy,
                "min_agreement": g.min_agreement, "max_size_bytes": g.max_size_bytes, "max_latency_ms": g.max_latency_ms,
                **g.task,
                # Said in the signed manifest: a device operator can see undecided gates were let through.
                "undecided": g.undecided,
            },
            **({"task": project.task.to_dict()} if project.task is not None else {}),
            "reference": "the fp32 model with embedded preprocessing, end to end from raw validation inputs",
            "results": {
                r.id: {
                    "accuracy": r.numerics.accuracy,
                    "reference_accuracy": r.numerics.reference_accuracy,
                    "agreement": r.numerics.agreement,
                    "max_abs_error": r.numerics.max_abs_error,
                    "samples": r.numerics.samples,
                    # Task metrics after decoding (with their sample count) and every output's agreement.
                    **({"task": r.numerics.task} if r.numerics.task is not None else {}),
                    "outputs": list(r.numerics.outputs),
                    "size_bytes": r.size_bytes,
                    "latency": "not gated" if g.max_latency_ms is None else "passed (measured on the build host; see the build report)",
                    "measured_on": host_cls,
                    "passed": True,
                    # "cached" stays in the build report: the bundle is the same whether a number was reused or not.
                    "classes": {c: {k: v for k, v in m.to_dict().items() if k != "cached"} for c, m in r.classes.items()},
                    "targets": {v.device: v.to_dict() for v in verdicts if v.shipped == r.id},
                }
                for r in ship.values()
            },
            "refused": [v.reason for v in verdicts if v.status == "refused"],
            "baseline": baseline_info,
            "passed": True,
        }),
    }
    members: dict[str, bytes] = {r.file: r.model_bytes for r in ship.values()}
    members[GOLDEN_FILE] = golden_bytes
    members[STATS_FILE] = stats_bytes
    try:
        project.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from ..errors import OutputError

        raise OutputError(f"Cannot create the output directory {project.output_dir}: {exc.strerror or exc}.") from exc
    out = project.output_dir / bundle_filename(project.name, project.version)
    from .verify_step import write_verified

    write_verified(out, manifest, members, project.signing_key, source_date_epoch, progress)
    report["bundle"] = str(out)
    report["bundle_sha256"] = file_sha256(out)
    report_path = project.output_dir / f"{project.name}-{project.version}.build.json"
    import json

    atomic_write_bytes(report_path, (json.dumps(jsonable(report), indent=2, sort_keys=True) + "\n").encode())
    return BuildResult(out, report_path, manifest, report)
