"""``edgepack build`` for a TFLite source model (``kind: tflite``, and Keras through it).

A TFLite file passes through unchanged, so its bundle has exactly one variant, named
after the file's own precision (``tflite-fp32``, ``tflite-fp16``, or ``tflite-int8`` for
an already-quantized model), run by LiteRT. The device still feeds RAW input: the
declared preprocessing is compiled to ONNX nodes (:mod:`edgepack.preprocess.graph`),
converted to a small TFLite graph with the onnx2tf path of ``edgepack convert``, and
spliced in front of the model (:func:`edgepack.convert.fuse.fuse_front`), so a device
with only LiteRT needs nothing else. Quantized outputs are dequantized in the graph.

The gate reference is the SOURCE model as given: numpy preprocessing
(:func:`edgepack.preprocess.apply_reference`, which the embedded graph matches), the
model's own input quantization, the unchanged ``.tflite`` in LiteRT. The shipped file
is then measured, certified per arithmetic class, golden-tested and signed like every
other variant, and the written bundle is verified before it is renamed into place.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..errors import ConfigError, GateError
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
)

__all__ = ["SourceReference", "build_from_tflite", "build_source", "builds_for_litert", "tflite_precision"]


def builds_for_litert(project) -> bool:
    """True when this module builds the project: a TFLite model, or a Keras model with only tflite-* variants."""
    from ..importers.keras_importer import litert_only

    kind = project.model.get("kind")
    return kind == "tflite" or (kind == "keras" and litert_only(project))


# --------------------------------------------------------------------------- the source model


def _details(model_bytes: bytes):
    from ..convert.tflite import LiteRTSession

    sess = LiteRTSession(model_bytes, 1)
    return sess, sess._in, sess._out


def tflite_precision(model_bytes: bytes) -> str:
    """``int8`` for a quantized model (integer input or int8 weights), ``fp16`` for float16
    weights, else ``fp32`` (read from the flatbuffer's tensor types)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils as fu

    model = fu.convert_bytearray_to_object(bytearray(model_bytes))
    types = {t.type for sub in model.subgraphs for t in sub.tensors}
    if types & {schema.TensorType.INT8, schema.TensorType.UINT8}:
        return "int8"
    if schema.TensorType.FLOAT16 in types:
        return "fp16"
    return "fp32"


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail.get("quantization") or (0.0, 0)
    if np.asarray(y).dtype.kind in "iu" and scale:
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
    return y


class SourceReference:
    """The source model as given, behind the session interface: numpy preprocessing, the model's
    own input quantization, the unchanged ``.tflite`` in LiteRT, quantized outputs dequantized."""

    def __init__(self, model_bytes: bytes, pre, raw_spec, output_names: list[str]) -> None:
        self._sess, self._in, self._out = _details(model_bytes)
        self._pre = pre
        self._raw = raw_spec
        self._names = output_names

    def get_inputs(self):
        return [SimpleNamespace(name=self._raw.name, shape=list(self._raw.shape), type=self._raw.dtype.name)]

    def get_outputs(self):
        return [SimpleNamespace(name=n, shape=None, type="float32") for n in self._names]

    def run(self, output_names, feed):
        from ..preprocess import apply_reference

        x = _quantize(apply_reference(self._pre, feed[self._raw.name]), self._in[0])
        outs = self._sess.run(None, {self._in[0]["name"]: x})
        return [_dequantize(np.asarray(o), d) for o, d in zip(outs, self._out)]


# --------------------------------------------------------------------------- the front


def _front(pre, raw_name: str, model_input: dict, calibration_raw: np.ndarray, progress) -> bytes:
    """The declared preprocessing as a TFLite graph: raw input -> the model's float input."""
    import onnx
    from onnx import TensorProto, helper

    from ..convert.tflite import convert_onnx_to_tflite
    from ..preprocess import embed_preprocessing

    shape = ["N", *[int(d) for d in model_input["shape"][1:]]]
    identity = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["model_input"], ["preprocessed"])], "preprocess",
                          [helper.make_tensor_value_info("model_input", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("preprocessed", TensorProto.FLOAT, shape)]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(identity)
    graph = embed_preprocessing(identity, pre, None, raw_name)
    progress("Compiling the preprocessing to TFLite")
    return convert_onnx_to_tflite(graph, ("fp32",), {raw_name: calibration_raw}, progress).models["fp32"]


def _check_variants(project, allowed: set[str], why: str) -> None:
    problems = []
    for index, target in enumerate(project.targets):
        other = [v for v in target.variants if v not in allowed]
        if other:
            problems.append(f"targets[{index}].variants: {', '.join(other)} cannot be built from a {project.model['kind']} "
                            f"model; {why}")
    if project.postprocess and (project.postprocess.get("softmax") or project.postprocess.get("top_k")):
        problems.append("output: softmax/top_k are not added in front of a TFLite model's outputs; put them in the model, "
                        "or keep only output.labels")
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"Project file {project.path} has {len(problems)} problem(s); fix them and retry:\n{listing}")


# --------------------------------------------------------------------------- build


def build_source(project, **kwargs):
    """Import a ``kind: tflite`` model (or convert a Keras one) and build it."""
    from ..importers import import_model, source_from_config
    from .pipeline import _relative

    base = project.path.parent
    if project.model.get("kind") == "keras":
        return build_keras(project, **kwargs)
    imported = import_model(project.model["kind"], source_from_config(project.model, base_dir=base))
    files = [{"role": f.role, "file": _relative(f.path, base), "sha256": f.sha256} for f in imported.source_files]
    lineage = {"kind": project.model["kind"], "file": project.model.get("path"), "sha256": imported.source_sha256,
               "description": imported.description, "files": files}
    return build_from_tflite(project, imported.data, lineage, **kwargs)


def _raw_spec(pre, raw_name: str):
    from ..modelio import TensorSpec

    if pre.to_dict().get("kind") == "image":
        fixed = tuple(pre.min_size) == tuple(pre.max_size)
        return TensorSpec(raw_name, np.dtype(np.uint8), (None, *(pre.min_size if fixed else (None, None)), pre.raw_channels))
    return TensorSpec(raw_name, np.dtype(np.float32), (None, len(pre.raw_columns)))


class KerasReference(SourceReference):
    """The Keras model itself, behind the declared preprocessing in numpy (the gate reference)."""

    def __init__(self, path: Path, pre, raw_spec) -> None:
        from ..convert.tflite import TensorFlowSession

        self._tf = TensorFlowSession(path)
        self._pre = pre
        self._raw = raw_spec
        self._names = [o.name for o in self._tf.get_outputs()]

    def run(self, output_names, feed):
        from ..preprocess import apply_reference

        x = apply_reference(self._pre, feed[self._raw.name]).astype(np.float32)
        return [np.asarray(o) for o in self._tf.run(None, {self._tf.get_inputs()[0].name: x})]


def build_keras(project, **kwargs):
    """A Keras model's ``tflite-*`` variants straight through TensorFlow's converter, fused and gated against Keras."""
    from ..convert.tflite import convert_tensorflow_to_tflite, require_tflite
    from ..importers import source_from_config
    from ..importers.keras_importer import KerasSource, keras_files
    from ..preprocess import apply_reference, preprocess_from_dict
    from . import pipeline as P

    require_tflite(onnx2tf=True)  # onnx2tf compiles the preprocessing
    source = source_from_config(project.model, base_dir=project.path.parent)
    assert isinstance(source, KerasSource)
    files = keras_files(source.path)
    variants = sorted({v for t in project.targets for v in t.variants})
    _check_variants(project, {"tflite-fp32", "tflite-fp16", "tflite-int8"}, "a Keras model builds tflite-fp32, tflite-fp16 "
                    "and tflite-int8 through TensorFlow's converter (ONNX variants need tf2onnx: list no tflite-* "
                    "variant next to them)")
    raw_name = (project.raw.get("input") or {}).get("name", "raw")
    pre = preprocess_from_dict(P._pre_dict(project.preprocess))
    pre.validate()
    raw_spec = _raw_spec(pre, raw_name)
    reference = KerasReference(source.path, pre, raw_spec)
    calibration, _validation = P._datasets(project, [raw_spec], pre, raw_name)
    calib_raw = calibration.batch(0, min(len(calibration), 200))[raw_name]
    names = [i.name for i in reference._tf.get_inputs()]
    progress = kwargs["progress"]
    progress(f"Converting the Keras model to TFLite ({', '.join(variants)})")
    converted = convert_tensorflow_to_tflite(source.path, [v.split("-", 1)[1] for v in variants],
                                             {names[0]: apply_reference(pre, calib_raw).astype(np.float32)})
    kwargs["warnings"].extend(converted.notes)
    models = {v: converted.models[v.split("-", 1)[1]] for v in variants}
    from .pipeline import _relative

    base = project.path.parent
    digest = files[0].sha256 if len(files) == 1 else hashlib.sha256(
        "".join(f"{f.role}:{f.sha256}\n" for f in files).encode()).hexdigest()
    lineage = {"kind": "keras", "file": project.model.get("path"), "sha256": digest,
               "description": f"Keras model {source.path.name} converted to TFLite with TensorFlow's converter",
               "files": [{"role": f.role, "file": _relative(f.path, base), "sha256": f.sha256} for f in files]}
    return build_litert_bundle(project, models, reference, lineage, pre=pre, raw_spec=raw_spec,
                               reference_words="the Keras model with the declared preprocessing in numpy, end to end "
                                               "from raw validation inputs", **kwargs)


def build_from_tflite(project, source_bytes: bytes, source_lineage: dict, **kwargs):
    """Build the bundle of a TFLite source model: one variant, the file as given, behind the declared preprocessing.

    Raises:
        ConfigError: Variants, post-processing or ``--baseline`` that a pass-through cannot honour.
        GateError: The fused model diverges from the source model on the validation data.
    """
    from ..convert.tflite import _signature_names
    from ..preprocess import preprocess_from_dict
    from . import pipeline as P

    precision = tflite_precision(source_bytes)
    variant = f"tflite-{precision}"
    _check_variants(project, {variant}, f"this {precision} TFLite file ships as {variant} (it passes through unchanged)")
    raw_name = (project.raw.get("input") or {}).get("name", "raw")
    pre = preprocess_from_dict(P._pre_dict(project.preprocess))
    pre.validate()
    source_bytes = _signature_names(source_bytes)  # outputs named after the signature, not StatefulPartitionedCall:0
    _sess, src_in, src_out = _details(source_bytes)
    if len(src_in) != 1:
        raise ConfigError(f"The TFLite model has {len(src_in)} inputs; building it needs a single-input model.")
    raw_spec = _raw_spec(pre, raw_name)
    reference = SourceReference(source_bytes, pre, raw_spec, [d["name"] for d in src_out])
    lineage = {**source_lineage, "passthrough": {
        "precision": precision,
        "preprocessing": "compiled to TFLite (onnx2tf) and fused in front of the unchanged model"
                         + ("; quantized outputs dequantized in the graph" if precision == "int8" else "")}}
    return build_litert_bundle(project, {variant: source_bytes}, reference, lineage, pre=pre, raw_spec=raw_spec,
                               reference_words="the source TFLite model with the declared preprocessing in numpy, end to "
                                               "end from raw validation inputs", **kwargs)


def build_litert_bundle(project, models: dict[str, bytes], reference, source_lineage: dict, *, pre, raw_spec, reference_words: str,
                        baseline_path, progress, source_date_epoch, measure_config, warnings: list[str]):
    """Fuse the preprocessing in front of each TFLite model, gate each against ``reference``,
    certify, golden-test, sign, verify and write the bundle.

    Args:
        models: Variant name (``tflite-fp32`` ...) -> TFLite bytes taking the MODEL input.
        reference: Session-like reference on raw input (the source model).
    """
    from .. import __version__
    from .._atomic import atomic_write_bytes
    from ..bundle import bundle_filename
    from ..convert.fuse import fuse_front
    from ..convert.tflite import LiteRTSession, tool_versions
    from ..modelio import TensorSpec
    from ..optimize.evaluate import compare, measure_latency
    from . import pipeline as P
    from .certify import certify
    from .verify_step import write_verified

    if baseline_path is not None:
        raise ConfigError("--baseline is not supported for TFLite or Keras source models yet; build without it.")
    raw_name = raw_spec.name
    kind = pre.to_dict().get("kind")
    labels = [str(x) for x in (project.postprocess or {}).get("labels") or []] or None
    calibration, validation = P._datasets(project, [raw_spec], pre, raw_name)
    first_in = _details(next(iter(models.values())))[1][0]
    front = _front(pre, raw_name, first_in, calibration.batch(0, min(len(calibration), 200))[raw_name], progress)
    batch = 32
    results: dict[str, Any] = {}
    sessions: dict[str, Any] = {}
    for variant, model in models.items():
        progress(f"Fusing the preprocessing in front of the model ({variant})")
        fused = fuse_front(front, model, raw_name)
        result = P.VariantResult(variant, fused, devices=[t.device for t in project.targets if variant in t.variants])
        sessions[variant] = result.session = LiteRTSession(fused, P.THREADS)
        progress(f"Measuring {variant} against the source model on validation data")
        result.numerics = compare(reference, result.session, validation, batch)
        result.failures = P._gate_failures(project, result)
        results[variant] = result
    timings = measure_latency(sessions, validation.batch(0, 1), P.LATENCY_RUNS, warmup=3)
    for variant, result in results.items():
        result.latency = timings.get(variant)

    count = golden_mod.golden_count(project.golden_vectors, len(validation), None)
    golden_feed = validation.batch(0, count)
    host_cls = measure_config.host_class
    classes_of = P._target_classes(project)

    def requantize(_changes):
        raise ConfigError("a TFLite variant is not re-quantized per class")

    from ..arith.cache import dataset_digest

    verdicts = certify(project, results, host_class=host_cls, classes_of=classes_of, sessions=sessions,
                       reference=reference, validation=validation, calibration=calibration, batch=batch,
                       golden_feed=golden_feed, gate=lambda r, n: P._gate_failures(project, r, n), config=measure_config,
                       run=P._run, requantize=requantize, progress=progress,
                       data_digest=functools.cache(lambda: dataset_digest(validation, batch)) if measure_config.cache_dir else None)
    shipped = {v.shipped for v in verdicts if v.shipped}
    ship = {k: r for k, r in results.items() if r.id in shipped}
    for r in results.values():
        r.devices = [t.device for t in project.targets if any(v.device == t.device and v.shipped == r.id for v in verdicts)]
    warnings.extend(v.reason for v in verdicts if v.status == "refused")
    fp32 = results.get("tflite-fp32")

    report: dict[str, Any] = {
        "project": str(project.path), "name": project.name, "version": project.version,
        "host": f"{platform.machine()} {platform.system()} python {platform.python_version()}", "threads": P.THREADS,
        "validation": {"source": validation.source, "samples": len(validation), "labels": validation.labels is not None},
        "calibration": {"source": calibration.source, "samples": len(calibration)},
        "fold_normalization": {"requested": project.fold_normalization, "applied": False,
                               "detail": "the preprocessing runs in front of the TFLite model"},
        "graph_optimization": {"applied": False, "note": "TFLite models are shipped as converted"},
        "host_class": host_cls,
        "variants": {r.id: {
            "precision": r.variant, "size_bytes": r.size_bytes, "numerics": P._numerics_dict(r.numerics),
            "latency_ms": None if r.latency is None else {"median": r.latency.median_ms, "p95": r.latency.p95_ms, "runs": r.latency.runs},
            "gate_failures": r.failures, "devices": r.devices, "shipped": r.id in shipped, "quantization": None,
            "classes": {c: m.to_dict() for c, m in r.classes.items()},
            "slower_than_fp32_on_host": None if fp32 is None or r is fp32 or r.latency is None or fp32.latency is None
            else r.latency.median_ms > fp32.latency.median_ms * 1.1}
            for r in results.values()},
        "targets": {t.device: {"class": classes_of[t.device],
                               "variants": {v.variant: v.to_dict() for v in verdicts if v.device == t.device}}
                    for t in project.targets},
        "gates": jsonable({**project.gates.__dict__}), "baseline": None, "warnings": warnings, "bundle": None,
    }
    failures = [f"{t.device} ({classes_of[t.device]}): no declared variant passed its gates there: "
                + "; ".join(v.reason for v in verdicts if v.device == t.device)
                for t in project.targets if not any(v.shipped for v in verdicts if v.device == t.device)]
    if failures:
        error = GateError("The build failed its gates; no bundle was written:\n" + "\n".join(f"  - {f}" for f in failures))
        error.report = report  # type: ignore[attr-defined]
        raise error

    progress("Writing golden vectors")
    arrays, tolerances, golden_classes = P._golden_entries(ship, host_cls, golden_feed, P._run)

    progress("Computing reference statistics")
    val_raw: dict[str, list[np.ndarray]] = {}
    for _start, feed in validation.batches(256, stats_mod.MAX_SAMPLES):
        for k, v in feed.items():
            val_raw.setdefault(k, []).append(v)
    val_raw_arrays = {k: np.concatenate(v) for k, v in val_raw.items()}
    outputs = {r.id: P._collect(r.session, validation, batch, stats_mod.MAX_SAMPLES) for r in ship.values()}
    feature_names = {raw_name: list(pre.raw_columns)} if hasattr(pre, "raw_columns") else None
    stats_doc = stats_mod.reference_stats(val_raw_arrays, {v: o[0] for v, o in outputs.items()}, labels, feature_names)

    extra: dict[str, Any] = {"preprocess": pre.to_dict()}
    if kind == "image":
        extra["layout"] = "NHWC"
        extra["size_range"] = {"min": list(pre.min_size), "max": list(pre.max_size)}
    else:
        extra["columns"] = list(pre.raw_columns)
    raw = val_raw_arrays[raw_name]
    value_range = [0, 255] if raw_spec.dtype == np.uint8 else [float(np.nanmin(raw)), float(np.nanmax(raw))]
    first = next(iter(ship.values()))
    io_outputs = []
    for index, (name, values) in enumerate(zip([o.name for o in first.session.get_outputs()], outputs[first.id])):
        spec = TensorSpec(name, np.dtype(values.dtype), (None, *values.shape[1:]))
        doc_extra: dict[str, Any] = {"value_range_observed": True}
        if labels and index == 0:
            doc_extra["labels"] = labels
        io_outputs.append(tensor_schema(spec, [float(np.nanmin(values)), float(np.nanmax(values))] if values.size else None,
                                        **doc_extra))
    g = project.gates
    manifest = {
        "format_version": FORMAT_VERSION, "name": project.name, "version": project.version, "description": project.description,
        "io": {"inputs": [tensor_schema(raw_spec, value_range, **extra)], "outputs": io_outputs},
        "variants": [{"id": r.id, "file": r.file, "engine": variant_engine(r.variant), "precision": PRECISIONS[r.variant],
                      "min_runtime": MIN_RUNTIME, "devices": r.devices, "size_bytes": r.size_bytes,
                      "classes": {c: {k: v for k, v in m.to_dict().items() if k not in ("passed", "failures", "cached")}
                                  for c, m in r.classes.items() if m.passed}}
                     for r in ship.values()],
        "targets": {t.device: {"class": classes_of[t.device],
                               "variants": [v.shipped for v in verdicts if v.device == t.device and v.shipped]}
                    for t in project.targets},
        "golden": {"file": P.GOLDEN_FILE, "count": count, "rule": golden_mod.RULE, "tolerances": tolerances,
                   "class_rule": golden_mod.CLASS_RULE, "classes": golden_classes},
        "reference_stats": {"file": P.STATS_FILE},
        "lineage": {
            "source_model": source_lineage,
            "calibration": {"file": project.calibration.path.name, "sha256": file_sha256(project.calibration.path),
                            "description": f"{len(calibration)} raw samples from array '{project.calibration.key}'"},
            "validation": {"file": project.validation.path.name, "sha256": file_sha256(project.validation.path),
                           "description": f"{len(validation)} raw samples from array '{project.validation.key}'"
                           + (f", labels '{project.validation.labels or 'auto'}'" if validation.labels is not None else ", no labels")},
            "tools": {"edgepack": __version__, "numpy": np.__version__, **tool_versions()},
            "git_commit": git_commit(project.path.parent),
            "steps": {"fold_normalization": report["fold_normalization"], "graph_optimization": report["graph_optimization"]},
            "project": resolved_config(project, pre.to_dict(), project.postprocess or None),
        },
        "gates": jsonable({
            "thresholds": {"max_accuracy_drop": g.max_accuracy_drop, "min_accuracy": g.min_accuracy,
                           "min_agreement": g.min_agreement, "max_size_bytes": g.max_size_bytes, "max_latency_ms": g.max_latency_ms},
            "reference": reference_words,
            "results": {r.id: {
                "accuracy": r.numerics.accuracy, "reference_accuracy": r.numerics.reference_accuracy,
                "agreement": r.numerics.agreement, "max_abs_error": r.numerics.max_abs_error,
                "samples": r.numerics.samples, "size_bytes": r.size_bytes,
                "latency": "not gated" if g.max_latency_ms is None else "passed (measured on the build host; see the build report)",
                "measured_on": host_cls, "passed": True,
                "classes": {c: {k: v for k, v in m.to_dict().items() if k != "cached"} for c, m in r.classes.items()},
                "targets": {v.device: v.to_dict() for v in verdicts if v.shipped == r.id}}
                for r in ship.values()},
            "refused": [v.reason for v in verdicts if v.status == "refused"], "baseline": None, "passed": True,
        }),
    }
    members: dict[str, bytes] = {r.file: r.model_bytes for r in ship.values()}
    members[P.GOLDEN_FILE] = golden_mod.write_npz(arrays)
    members[P.STATS_FILE] = stats_mod.stats_json(stats_doc)
    try:
        project.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from ..errors import OutputError

        raise OutputError(f"Cannot create the output directory {project.output_dir}: {exc.strerror or exc}.") from exc
    out = project.output_dir / bundle_filename(project.name, project.version)
    progress("Signing the bundle")
    write_verified(out, manifest, members, project.signing_key, source_date_epoch, progress)
    report["bundle"] = str(out)
    report["bundle_sha256"] = file_sha256(out)
    report_path = project.output_dir / f"{project.name}-{project.version}.build.json"
    import json

    atomic_write_bytes(report_path, (json.dumps(jsonable(report), indent=2, sort_keys=True) + "\n").encode())
    return P.BuildResult(out, report_path, manifest, report)
