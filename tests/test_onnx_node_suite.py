"""``optimize --quantize none`` against the ONNX backend node test suite.

A correctness check on a suite nobody here wrote: every node test case that the
``onnx`` package ships (``onnx.backend.test.loader.load_model_tests(kind="node")``)
whose original model onnxruntime runs correctly must come out of
``edgepack optimize --quantize none`` (no data given, so the self-check uses random
inputs) with outputs unchanged within the backend tests' own tolerance.

Counting:
    * skipped_by_type: a graph input is not a tensor (sequence/optional/map);
      ``optimize`` refuses such models by design and they cannot be fed as arrays.
    * ort_failed_before: onnxruntime (CPU) cannot load/run the ORIGINAL model or its
      outputs miss the expected ones; these say nothing about ``optimize``.
    * eligible: the rest. For each, a regression is counted when ``optimize`` raises,
      the written model fails to load/run, or any output differs from the original
      model's output beyond tolerance.

The counts are printed (``pytest -s``) and written to
``test-artifacts/onnx_node_suite.json``.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = ROOT / "test-artifacts" / "onnx_node_suite.json"
WORKERS = 2
# Every CLI_EVERY-th case also goes through the real CLI (typer CliRunner) instead of the API.
CLI_EVERY = 150
# Measured: 1571 eligible cases (onnx 1.23.2, onnxruntime 1.32). The floor (~90%) fails
# the test if the suite silently shrinks (loader change, everything skipped, ...).
MIN_ELIGIBLE = 1410
STDERR_LOG = ROOT / "test-artifacts" / "onnx_node_suite.stderr.log"


# --------------------------------------------------------------------------- tolerance


def _as_array(value: Any) -> Any:
    """TensorProto/SequenceProto/OptionalProto to numpy/list/None (the runner's normalisation)."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, onnx.SequenceProto):
        return numpy_helper.to_list(value)
    if isinstance(value, onnx.OptionalProto):
        return numpy_helper.to_optional(value)
    if isinstance(value, (list, tuple)):
        return [_as_array(v) for v in value]
    if isinstance(value, np.generic):  # some cases hold numpy scalars; onnxruntime takes 0-d arrays
        return np.asarray(value)
    return value


def _mismatch(expected: Any, actual: Any, rtol: float, atol: float, where: str = "output") -> str | None:
    """None when ``actual`` matches ``expected`` like onnx's backend runner checks it.

    Same rule as ``onnx.backend.test.runner.Runner.assert_similar_outputs``: equal
    shape and dtype, strings exactly, numbers with ``assert_allclose`` (NaN == NaN),
    bfloat16 with at least two bfloat16 ULPs of relative tolerance; sequences element
    by element.
    """
    if expected is None or actual is None:
        return None if expected is None and actual is None else f"{where}: optional presence differs"
    if isinstance(expected, (list, tuple)) or isinstance(actual, (list, tuple)):
        if not isinstance(expected, (list, tuple)) or not isinstance(actual, (list, tuple)):
            return f"{where}: sequence vs tensor"
        if len(expected) != len(actual):
            return f"{where}: sequence length {len(actual)} != {len(expected)}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            problem = _mismatch(e, a, rtol, atol, f"{where}[{i}]")
            if problem:
                return problem
        return None
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    if expected.shape != actual.shape:
        return f"{where}: shape {actual.shape} != {expected.shape}"
    if expected.dtype == object or actual.dtype == object:
        return None if np.array_equal(expected, actual) else f"{where}: strings differ"
    if expected.dtype != actual.dtype:
        return f"{where}: dtype {actual.dtype} != {expected.dtype}"
    out_rtol = rtol
    if expected.dtype.name == "bfloat16":
        out_rtol = max(rtol, 2**-6)
    if expected.dtype.name in ("bfloat16",) or expected.dtype.kind == "V" or expected.dtype.name.startswith(("float8", "float4", "int4", "uint4", "int2", "uint2")):
        expected = expected.astype(np.float32)
        actual = actual.astype(np.float32)
    try:
        np.testing.assert_allclose(actual, expected, rtol=out_rtol, atol=atol, equal_nan=True)
    except AssertionError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return f"{where}: " + " | ".join(lines[1:4])[:300]
    return None


def _mismatches(expected: list, actual: list, rtol: float, atol: float) -> str | None:
    if len(expected) != len(actual):
        return f"{len(actual)} outputs != {len(expected)}"
    for i, (e, a) in enumerate(zip(expected, actual)):
        problem = _mismatch(e, a, rtol, atol, f"output {i}")
        if problem:
            return problem
    return None


# --------------------------------------------------------------------------- one case


def _session(model_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _run(sess, inputs: list) -> list:
    # Positional inputs, as onnxruntime's own ONNX backend binds them.
    feed = {spec.name: value for spec, value in zip(sess.get_inputs(), inputs)}
    return list(sess.run(None, feed))


def _non_tensor_io(model: onnx.ModelProto) -> str | None:
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in initializers and not vi.type.HasField("tensor_type"):
            return f"input '{vi.name}' is {vi.type.WhichOneof('value')}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def check_case(payload: dict) -> dict:
    """Evaluate one node test case; returns a plain dict (it crosses process boundaries)."""
    name = payload["name"]
    rtol, atol = payload["rtol"], payload["atol"]
    model = onnx.ModelProto()
    model.ParseFromString(payload["model"])
    data_sets = payload["data_sets"]
    result: dict[str, Any] = {"name": name}

    reason = _non_tensor_io(model)
    if reason:
        return {**result, "status": "skipped_by_type", "detail": reason}

    # 1. Does onnxruntime run the ORIGINAL model correctly?
    try:
        original = _session(payload["model"])
        original_outputs = []
        for inputs, expected in data_sets:
            outputs = _run(original, inputs)
            problem = _mismatches(expected, outputs, rtol, atol)
            if problem:
                return {**result, "status": "ort_failed_before", "detail": "wrong result: " + problem}
            original_outputs.append(outputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the original excludes the case
        return {**result, "status": "ort_failed_before", "detail": _first_line(exc)}

    # 2. The real optimize entry point, as `edgepack optimize --quantize none` runs it.
    from edgepack.optimize import OptimizeConfig, optimize

    with tempfile.TemporaryDirectory(prefix="edgepack-node-") as tmp:
        src = Path(tmp) / "model.onnx"
        dst = Path(tmp) / "optimized.onnx"
        src.write_bytes(payload["model"])
        try:
            if payload.get("cli"):
                graph, result["unchecked"] = _optimize_cli(src, dst)
                result["via"] = "cli"
            else:
                report = optimize(OptimizeConfig(model=src, output=dst, quantize="none", latency_runs=1)).to_dict()
                graph = report["graph"]
                result["via"] = "api"
                result["unchecked"] = any("not numerically checked" in w for w in report["warnings"])
        except Exception as exc:  # noqa: BLE001 - optimize failing on a model that runs is a regression
            return {**result, "status": "regression", "detail": "optimize raised " + _first_line(exc),
                    "traceback": traceback.format_exc()[-2000:]}
        result["graph"] = graph

        # 3. The written model must reproduce the original's outputs.
        try:
            optimized = _session(dst.read_bytes())
            for (inputs, _), before in zip(data_sets, original_outputs):
                problem = _mismatches(before, _run(optimized, inputs), rtol, atol)
                if problem:
                    return {**result, "status": "regression", "detail": "outputs changed: " + problem}
        except Exception as exc:  # noqa: BLE001
            return {**result, "status": "regression", "detail": "optimized model does not run: " + _first_line(exc)}
    return {**result, "status": "ok"}


def _optimize_cli(src: Path, dst: Path) -> tuple[dict, bool]:
    from typer.testing import CliRunner

    from edgepack.cli.app import app

    run = CliRunner().invoke(app, ["optimize", str(src), "-o", str(dst), "--quantize", "none", "--runs", "1", "--json"])
    if run.exit_code != 0:
        raise RuntimeError(f"CLI exit code {run.exit_code}: {(run.stderr if hasattr(run, 'stderr') else run.output).strip()[:300]}")
    text = run.stdout
    report = json.loads(text[text.index("{"):])
    return report["graph"], any("not numerically checked" in w for w in report["warnings"])


# --------------------------------------------------------------------------- the suite


def _payloads() -> list[dict]:
    import warnings

    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = load_model_tests(kind="node")
    payloads = []
    for case in cases:
        if case.model is not None and case.data_sets is not None:
            model = case.model
            data_sets = [([_as_array(x) for x in inputs], [_as_array(y) for y in outputs]) for inputs, outputs in case.data_sets]
        else:  # on-disk layout: model.onnx + test_data_set_*/input_*.pb, output_*.pb
            model, data_sets = _load_case_dir(Path(case.model_dir))
        payloads.append({"name": case.name, "model": model.SerializeToString(), "data_sets": data_sets,
                         "rtol": case.rtol, "atol": case.atol})
    return payloads


def _load_case_dir(case_dir: Path) -> tuple[onnx.ModelProto, list]:
    model = onnx.load(str(case_dir / "model.onnx"))

    def load(path: Path, type_proto: onnx.TypeProto) -> Any:
        data = path.read_bytes()
        kind = type_proto.WhichOneof("value")
        proto = {"sequence_type": onnx.SequenceProto, "optional_type": onnx.OptionalProto}.get(kind, onnx.TensorProto)()
        proto.ParseFromString(data)
        return _as_array(proto)

    data_sets = []
    for data_dir in sorted(case_dir.glob("test_data_set_*")):
        inputs = [load(data_dir / f"input_{i}.pb", model.graph.input[i].type) for i in range(len(list(data_dir.glob("input_*.pb"))))]
        outputs = [load(data_dir / f"output_{i}.pb", model.graph.output[i].type) for i in range(len(list(data_dir.glob("output_*.pb"))))]
        data_sets.append((inputs, outputs))
    return model, data_sets


def _worker_init() -> None:
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    # onnxruntime logs every random input a model rejects (expected here) straight to fd 2;
    # keep `pytest -s` readable and the log inspectable.
    log = open(STDERR_LOG, "a")  # noqa: SIM115 - lives as long as the worker process
    os.dup2(log.fileno(), 2)


def run_suite(workers: int = WORKERS) -> tuple[dict, list[dict]]:
    payloads = _payloads()
    # Which cases go through the CLI is decided up front (deterministic); every case is checked.
    for payload in payloads[::CLI_EVERY]:
        payload["cli"] = True
    if workers > 1:
        STDERR_LOG.parent.mkdir(exist_ok=True)
        STDERR_LOG.write_text("")
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
            results = list(pool.map(check_case, payloads, chunksize=8))
    else:
        results = [check_case(p) for p in payloads]
    status = collections.Counter(r["status"] for r in results)
    checked = [r for r in results if r["status"] in ("ok", "regression") and r.get("graph")]
    counts = {
        "total": len(results),
        "skipped_by_type": status["skipped_by_type"],
        "ort_failed_before": status["ort_failed_before"],
        "eligible": status["ok"] + status["regression"],
        "graph_changed": sum(1 for r in checked if r["graph"]["applied"] and r["graph"]["nodes_after"] != r["graph"]["nodes_before"]),
        "applied_unchanged_node_count": sum(1 for r in checked if r["graph"]["applied"] and r["graph"]["nodes_after"] == r["graph"]["nodes_before"]),
        "fell_back": sum(1 for r in checked if not r["graph"]["applied"]),
        "optimized_without_self_check": sum(1 for r in checked if r.get("unchecked")),
        "via_cli": sum(1 for r in results if r.get("via") == "cli"),
        "regressions": status["regression"],
    }
    return counts, results


@pytest.mark.slow
def test_optimize_none_changes_no_node_suite_output():
    started = time.perf_counter()
    counts, results = run_suite()
    counts["seconds"] = round(time.perf_counter() - started, 1)
    regressions = [r for r in results if r["status"] == "regression"]
    ops_removed: collections.Counter = collections.Counter()
    for r in results:
        if r.get("graph") and r["graph"]["applied"]:
            ops_removed.update(r["graph"]["ops_removed"])
    fallbacks = collections.Counter(r["graph"]["note"].split("(")[0].strip() for r in results
                                    if r.get("graph") and not r["graph"]["applied"])
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps({
        "onnx": onnx.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "counts": counts,
        "fallback_notes": dict(fallbacks),
        "ops_removed": dict(ops_removed.most_common()),
        "graph_changed_cases": sorted(r["name"] for r in results if r.get("graph") and r["graph"]["applied"]
                                      and r["graph"]["nodes_after"] != r["graph"]["nodes_before"]),
        "regressions": [{k: r.get(k) for k in ("name", "detail", "graph")} for r in regressions],
        "ort_failed_before": {r["name"]: r["detail"] for r in results if r["status"] == "ort_failed_before"},
        "skipped_by_type": {r["name"]: r["detail"] for r in results if r["status"] == "skipped_by_type"},
    }, indent=1, sort_keys=True, default=str))
    print("\nonnx node suite, optimize --quantize none:", json.dumps(counts))
    for r in regressions[:20]:
        print(f"  REGRESSION {r['name']}: {r['detail']}")
    assert counts["via_cli"] >= 5, counts
    assert counts["eligible"] >= MIN_ELIGIBLE, counts
    assert counts["regressions"] == 0, [f"{r['name']}: {r['detail']}" for r in regressions]
