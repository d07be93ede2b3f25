"""Benchmark edgepack's quantization modes: size, latency and numerics against fp32.

For each model this builds the variants edgepack can produce from it:

* ``fp32 graph-optimized`` (``--quantize none``),
* ``dynamic int8``,
* ``static int8 per-tensor`` and ``static int8 per-channel`` (minmax calibration),
* ``fp16`` (float32 inputs/outputs kept),

with edgepack's own API (:func:`edgepack.optimize.graph.optimize_graph` and
:func:`edgepack.optimize.quantize.quantize`, exactly as ``optimize`` does: every
quantizer starts from the graph-optimized model). It then times the *original*
fp32 model and every variant in ONE interleaved run
(:func:`edgepack.optimize.evaluate.measure_latency`, rounds ABCDEF, BCDEFA, ...)
with fixed threads, so machine noise hits all of them alike, and reports every
number as a ratio against the original measured in the same run.

Models:

* ``mobilenetv2-random``: the MobileNetV2-shaped model of
  ``examples/heavy/make_mobilenetv2.py`` (seed 0) with 32 calibration and 32
  validation images. Its weights are RANDOM, so its logits are near-ties and
  top-1 agreement is low for any lossy variant by nature; cosine is the more
  telling number there, and there is no accuracy.
* ``digits``: the committed ``examples/digits`` CNN with its calibration split and
  labelled validation split, so accuracy is reported too.

Results go to ``<out-dir>/quantize-<hostname>-<date>.json`` and ``.md``; the
Markdown is also printed on stdout, progress goes to stderr.

Usage::

    python benchmarks/bench_quantize.py [--threads 1] [--runs 30] [--out-dir benchmarks/results]

This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgepack.data import open_dataset
from edgepack.modelio import graph_inputs, load_model
from edgepack.optimize.evaluate import batch_size_for, compare, measure_latency, session
from edgepack.optimize.graph import optimize_graph
from edgepack.optimize.quantize import QuantOptions, quantize

from _common import cpu_model, progress

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
MNV2_SCRIPT = ROOT / "examples" / "heavy" / "make_mobilenetv2.py"
ORIGINAL = "fp32 original"

# (label, edgepack mode, per-channel)
VARIANTS = (
    ("fp32 graph-optimized", "none", False),
    ("dynamic int8", "dynamic", False),
    ("static int8 per-tensor", "static", False),
    ("static int8 per-channel", "static", True),
    ("fp16", "fp16", False),
)

_T0 = time.perf_counter()




# --------------------------------------------------------------------------- inputs


def make_heavy(work: Path, seed: int = 0, calib: int = 32, val: int = 32) -> tuple[Path, Path, Path]:
    """Generate the MobileNetV2-shaped model and its calib/val data with the example's own CLI."""
    spec = importlib.util.spec_from_file_location("make_mobilenetv2", MNV2_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    model, calib_path, val_path = work / "mobilenetv2.onnx", work / "mnv2_calib.npz", work / "mnv2_val.npz"
    argv = ["-o", str(model), "--seed", str(seed), "--calib", str(calib_path), "--calib-samples", str(calib),
            "--val", str(val_path), "--val-samples", str(val)]
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the Markdown table
        module.main(argv)
    return model, calib_path, val_path


def machine_info(threads: int) -> dict:
    """CPU model, core counts and library versions of this host."""
    cpu = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "threads": threads,
    }


# --------------------------------------------------------------------------- one model


def bench_model(name: str, model_path: Path, calib_path: Path, val_path: Path, work: Path,
                threads: int, runs: int, budget_s: float) -> dict:
    """Build every variant of one model, compare it with the original and time all in one run."""
    work.mkdir(parents=True, exist_ok=True)
    progress(f"{name}: loading {model_path.name}")
    original = load_model(model_path)
    original_bytes = model_path.read_bytes()
    inputs = graph_inputs(original)
    calibration = open_dataset(calib_path, inputs, "calibration")
    validation = open_dataset(val_path, inputs, "validation")
    batch = batch_size_for(inputs)
    # Same calibration batching as edgepack.optimize.pipeline.optimize.
    calib_batch = 1 if batch_size_for(inputs, 1) == 1 else batch

    progress(f"{name}: graph optimization")
    t = time.perf_counter()
    base_model, graph_report = optimize_graph(original, threads)
    base_bytes = base_model.SerializeToString()
    base_path = work / "base.onnx"
    base_path.write_bytes(base_bytes)
    graph_seconds = time.perf_counter() - t

    reference = session(original_bytes, threads)
    sessions: dict[str, object] = {ORIGINAL: reference}
    rows: dict[str, dict] = {
        ORIGINAL: {"variant": ORIGINAL, "mode": None, "size_bytes": len(original_bytes), "build_seconds": 0.0},
    }
    for label, mode, per_channel in VARIANTS:
        row = {"variant": label, "mode": mode, "per_channel": per_channel}
        rows[label] = row
        t = time.perf_counter()
        if mode == "none":
            data = base_bytes
            row["graph"] = {"applied": graph_report.applied, "nodes_before": graph_report.nodes_before,
                            "nodes_after": graph_report.nodes_after, "ops_removed": graph_report.ops_removed,
                            "note": graph_report.note}
        else:
            progress(f"{name}: quantizing {label}")
            out = work / f"{mode}{'-pc' if per_channel else ''}.onnx"
            options = QuantOptions(per_channel=per_channel, calibration_batch=calib_batch)
            try:
                audit = quantize(mode, base_path, out, options, calibration if mode == "static" else None)
            except Exception as exc:  # noqa: BLE001 - a failing mode is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {exc}"
                progress(f"{name}: {label} FAILED: {row['error']}")
                continue
            row["weights_quantized"], row["weights_total"] = audit.weights_quantized, audit.weights_total
            data = out.read_bytes()
        row["build_seconds"] = time.perf_counter() - t
        row["size_bytes"] = len(data)
        try:
            sessions[label] = session(data, threads)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"does not load in onnxruntime: {str(exc).strip().splitlines()[0][:200]}"
            progress(f"{name}: {label} FAILED: {row['error']}")

    reference_accuracy = None
    for label, sess in sessions.items():
        progress(f"{name}: comparing {label} on {len(validation)} validation samples")
        n = compare(reference, sess, validation, batch)
        rows[label].update(samples=n.samples, agreement=n.agreement, cosine=n.cosine, max_abs_error=n.max_abs_error,
                           accuracy=n.accuracy, finite=n.finite, close=n.close)
        reference_accuracy = n.reference_accuracy

    progress(f"{name}: timing {len(sessions)} models interleaved ({runs} rounds, {threads} thread(s))")
    feed = validation.batch(0, batch_size_for(inputs, 1))
    timings = measure_latency(sessions, feed, runs, warmup=3, budget_s=budget_s)
    base_lat = timings[ORIGINAL]
    for label, lat in timings.items():
        rows[label].update(median_ms=lat.median_ms, p95_ms=lat.p95_ms, runs=lat.runs,
                           latency_ratio=lat.median_ms / base_lat.median_ms)
    for row in rows.values():
        if "size_bytes" in row:
            row["size_ratio"] = row["size_bytes"] / len(original_bytes)
    return {
        "name": name,
        "model": str(model_path),
        "inputs": [s.describe() for s in inputs],
        "calibration_samples": len(calibration),
        "validation_samples": len(validation),
        "labels": validation.labels is not None,
        "reference_accuracy": reference_accuracy,
        "graph_seconds": graph_seconds,
        "variants": list(rows.values()),
    }


# --------------------------------------------------------------------------- output


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def render_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Quantization benchmark — {m['hostname']}, {result['date']}",
        "",
        f"- CPU: {m['cpu']} ({m['cores']} cores, {m['cores_usable']} usable), {m['machine']}, {m['os']}",
        f"- onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, numpy {m['numpy']}, python {m['python']}",
        f"- threads: {m['threads']}; latency: one batch-1 sample, {result['runs']} interleaved rounds over all "
        "models of a table (3 warm-up runs each)",
        "- ratios are variant ÷ fp32 original measured in the same run (size ÷ < 1 is smaller, "
        "latency ÷ < 1 is faster); agreement/cosine are against the fp32 original on the validation samples",
        f"- total wall time: {result['wall_seconds']:.0f} s",
        "",
    ]
    for bench in result["models"]:
        note = ""
        if bench["name"].startswith("mobilenetv2"):
            note = (" — RANDOM weights: logits are near-ties, so top-1 agreement is low for any lossy "
                    "variant by nature; look at cosine. No labels, no accuracy.")
        lines += [
            f"## {bench['name']}",
            "",
            f"{bench['inputs'][0]}; {bench['calibration_samples']} calibration / "
            f"{bench['validation_samples']} validation samples{note}",
            "",
            "| variant | size (bytes) | size ÷ fp32 | median ms | p95 ms | latency ÷ fp32 | top-1 agreement | cosine | accuracy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in bench["variants"]:
            if "error" in row:
                lines.append(f"| {row['variant']} | {_fmt(row.get('size_bytes'), ',')} | | | | | | | failed: {row['error'][:80]} |")
                continue
            lines.append(
                f"| {row['variant']} | {row['size_bytes']:,} | {row['size_ratio']:.3f} | {_ms(row.get('median_ms'))} | "
                f"{_ms(row.get('p95_ms'))} | {_fmt(row.get('latency_ratio'), '.2f')} | "
                f"{_fmt(row.get('agreement'), '.3f')} | {_fmt(row.get('cosine'), '.5f')} | {_fmt(row.get('accuracy'), '.4f')} |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results", help="where result files go")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for every session (default 1)")
    ap.add_argument("--runs", type=int, default=30, help="interleaved timing rounds (default 30)")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds after which a timing run stops early (after >= 5 rounds); default 60")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep generated models here (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.runs < 1:
        ap.error("--threads and --runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    now = _dt.datetime.now().astimezone()
    machine = machine_info(args.threads)
    progress(f"host {machine['hostname']}: {machine['cpu']}, onnxruntime {machine['onnxruntime']}, "
             f"{args.threads} thread(s), {args.runs} runs")
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgepack-bench-")))
        else:
            work = args.work_dir
            work.mkdir(parents=True, exist_ok=True)
        progress("generating MobileNetV2-shaped model (seed 0) + 32 calib / 32 val images")
        heavy, heavy_calib, heavy_val = make_heavy(work)
        models = [
            bench_model("mobilenetv2-random", heavy, heavy_calib, heavy_val, work / "mnv2",
                        args.threads, args.runs, args.budget),
            bench_model("digits", DIGITS / "model.onnx", DIGITS / "calib.npz", DIGITS / "val.npz", work / "digits",
                        args.threads, args.runs, args.budget),
        ]
    result = {
        "benchmark": "quantize",
        "date": now.isoformat(timespec="seconds"),
        "machine": machine,
        "runs": args.runs,
        "wall_seconds": time.perf_counter() - _T0,
        "definitions": {
            "size_ratio": "variant size_bytes / fp32 original size_bytes",
            "latency_ratio": "variant median_ms / fp32 original median_ms, same interleaved run",
            "agreement": "share of validation samples whose top-1 class equals the fp32 original's",
            "cosine": "cosine similarity of the flattened first output vs the fp32 original",
            "accuracy": "top-1 accuracy against labels (labelled data only)",
        },
        "models": models,
    }
    markdown = render_markdown(result)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"quantize-{machine['hostname']}-{now.date().isoformat()}"
    json_path, md_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(markdown + "\n")
    print(markdown)
    progress(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
