"""``edgepack init``, ``build``, ``keys generate``, ``inspect`` and ``verify``."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Optional

import typer

from ._common import handle_errors, print_json, progress_display

PROJECT_FILE = "edgepack.yaml"

TEMPLATE = """\
# edgepack project file: `edgepack build` turns this and a trained model into ONE
# signed bundle NAME-VERSION.epk. Paths are relative to this file.
# Fractions are fractions: 0.01 means one percentage point.

name: my-model                 # lower-case letters, digits, '.', '_' or '-'
version: "0.1.0"               # semantic version; quote it
description: What the model does, in one line.

model:
  kind: onnx                   # onnx | pytorch | sklearn | tflite | keras
  path: model.onnx

# What the DEVICE feeds. Preprocessing is compiled into the model, so devices send raw
# input and training/serving features cannot drift apart. Declare exactly one of
# `image` (raw uint8 [N, H, W, C]) or `tabular` (raw float32 [N, columns], NaN = missing).
input:
  name: raw
  image:
    color: rgb                 # rgb | bgr | gray: channel order of the raw pixels
    model_color: rgb           # what the model was trained on
    min_size: [224, 224]       # accepted raw (height, width) range
    max_size: [4096, 4096]
    resize_shorter: 256        # or resize: [h, w]
    center_crop: [224, 224]
    scale: 0.00392156862745098 # 1/255
    mean: [0.485, 0.456, 0.406]
    std: [0.229, 0.224, 0.225]
    layout: NCHW               # layout of the model's input
  # tabular:
  #   raw_columns: [age, income, city]
  #   columns:
  #     - {name: age, scaling: standard, mean: 40.0, std: 12.0, impute: 40.0}
  #     - {name: city, kind: categorical, categories: [1, 2, 3]}
  fold_normalization: true     # fold (x*scale-mean)/std into the first layer (better int8)

output:                        # optional post-processing of the first output
  softmax: true
  # top_k: 5
  labels: [cat, dog]           # one name per class

data:                          # .npz files of RAW inputs (what devices feed)
  calibration: {path: calib.npz, key: raw}                  # for int8 quantization
  validation: {path: val.npz, key: raw, labels: labels}     # for the gates
  golden_vectors: 8            # validation samples shipped as a self-test

targets:                       # device profile ids (`edgepack devices list`)
  - device: rpi4
    variants: [fp32, int8]     # fp32 | int8 | fp16

quantization:
  per_channel: true
  calibration_method: minmax   # minmax | entropy | percentile

gates:                         # a failed gate writes no bundle (exit 1)
  max_accuracy_drop: 0.01      # every variant vs the fp32 model
  # min_accuracy: 0.9
  # min_agreement: 0.99
  # max_size_mb: 10
  # max_latency_ms: 50         # measured on the build host
  # min_output_cosine: 0.99    # every output the task (or first-output gate) does not cover

# task:                        # gate in task terms, after decoding (see README "Tasks")
#   kind: detection            # classification | detection | segmentation | ctc | embedding | regression | streaming
#   score_map: heat            # or boxes: + scores: for models that emit boxes
#   threshold: 0.5

signing:
  key: keys/signing.key        # create with `edgepack keys generate --name signing`;
                               # never commit it

output_dir: dist
"""


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("build")(build)
    app.command("inspect")(inspect)
    app.command("verify")(verify)
    keys = typer.Typer(name="keys", help="Create bundle signing keys.", no_args_is_help=True)
    keys.command("generate")(keys_generate)
    app.add_typer(keys, name="keys")


# --------------------------------------------------------------------------- init


@handle_errors
def init(
    directory: Path = typer.Argument(Path("."), help="Directory to write edgepack.yaml into (created if missing)."),
) -> None:
    """Write a commented edgepack.yaml template (never overwrites)."""
    from .._atomic import atomic_write_bytes
    from ..errors import OutputError

    target = directory / PROJECT_FILE
    if target.exists():
        raise OutputError(f"{target} already exists; refusing to overwrite it. Edit it, or init another directory.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create {directory}: {exc.strerror or exc}.") from exc
    atomic_write_bytes(target, TEMPLATE.encode("utf-8"))
    typer.echo(f"Wrote {target}. Next: edit it, run `edgepack keys generate`, then `edgepack build {target}`.")


# --------------------------------------------------------------------------- build


def _pct(value) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


# The task metrics a line of the build summary shows, per task kind (the report has them all).
_TASK_HEADLINE = {
    "classification": ("agreement", "accuracy"),
    "detection": ("box_recall", "box_precision", "map50"),
    "segmentation": ("mask_iou", "min_mask_iou"),
    "ctc": ("string_agreement", "cer"),
    "embedding": ("min_cosine", "mean_cosine"),
    "regression": ("max_abs_error", "max_rel_error"),
    "streaming": ("decision_agreement",),
}


def _task_text(task: dict | None) -> str:
    """``"  task detection: box_recall 0.9947 ..."`` for a measured task, else empty."""
    if not task or not task.get("metrics"):
        return ""
    metrics = task["metrics"]
    keys = [k for k in _TASK_HEADLINE.get(task.get("kind"), ()) if k in metrics] or \
        [k for k, v in metrics.items() if isinstance(v, float)]
    shown = " ".join(f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}" for k in keys)
    return f"  {task.get('kind')}: {shown}"


def _target_table(report: dict) -> None:
    """Target x variant: what each device gets, measured under its own arithmetic class."""
    targets = report.get("targets") or {}
    if not targets:
        return
    typer.echo(f"  per target (this host is {report.get('host_class')}):")
    for device, t in targets.items():
        for variant, verdict in t["variants"].items():
            shipped = verdict.get("shipped")
            rec = report["variants"].get(shipped or "", {}).get("classes", {}).get(t["class"]) if shipped else None
            if rec is None:
                # The declared variant itself (re-quantized candidates come after it in the report).
                rec = next((r.get("classes", {}).get(t["class"]) for r in report["variants"].values()
                            if r["precision"] == variant), None) or {}
            status = {"certified": "PASS", "replaced": "REQUANT", "refused": "REFUSED"}[verdict["status"]]
            err = rec.get("max_abs_error")
            typer.echo(f"    {status:<7} {device:<12} {t['class']:<16} {variant:<12} -> {shipped or '-':<22} "
                       f"acc {_pct(rec.get('accuracy'))}  agree {_pct(rec.get('agreement'))}  "
                       f"max err {'-' if err is None else f'{err:.3g}'}  measured {rec.get('how') or 'not measured'}"
                       f"{_task_text(rec.get('task'))}")
            if verdict["status"] != "certified":
                for line in textwrap.wrap(verdict["reason"], 110):
                    typer.echo(f"            {line}")


def _verdict_text(v: dict) -> str:
    low, high = v["interval"]
    conf = f"{v['confidence'] * 100:.0f}%"
    if v["gate"] == "accuracy_drop":
        text = (f"accuracy drop {v['estimate'] * 100:.2f} pt, {conf} interval [{low * 100:.1f}, {high * 100:.1f}] pt "
                f"(b={v['counts']['b']}, c={v['counts']['c']}, McNemar p={v['p_value']:.3g}) vs <= {v['threshold'] * 100:.2f} pt")
    else:
        what = "agreement" if not v.get("output") else f"agreement of output {v['output']!r}"
        text = (f"{what} {v['estimate'] * 100:.2f}%, {conf} interval [{low * 100:.1f}, {high * 100:.1f}]% "
                f"({v['counts']['flipped']} of {v['samples']} flipped) vs >= {v['threshold'] * 100:.2f}%")
    if v["verdict"] == "undecided":
        return text + (f": undecided, need ~{v['samples_needed']:,} samples" if v["samples_needed"] else ": undecided")
    return f"{text}: {v['verdict']}"


def _summarize(report: dict) -> None:
    typer.echo(f"{report['name']} {report['version']}  (validation: {report['validation']['samples']} samples)")
    _target_table(report)
    typer.echo(f"  on this host ({report.get('host_class')}):")
    for vid, v in report["variants"].items():
        n = v.get("numerics") or {}
        acc = n.get("accuracy")
        agree = n.get("agreement")
        lat = (v.get("latency_ms") or {}).get("median")
        status = "PASS" if not v["gate_failures"] else "FAIL"
        typer.echo(
            f"  {status} {vid:<12} {v['size_bytes']:>12,} B  "
            f"acc {'-' if acc is None else f'{acc * 100:.2f}%'}  "
            f"agree {'-' if agree is None else f'{agree * 100:.2f}%'}  "
            f"max err {n.get('max_abs_error', 0) or 0:.3g}  "
            f"latency {'-' if lat is None else f'{lat:.3f} ms'}  devices {', '.join(v['devices']) or '-'}"
            f"{_task_text(n.get('task'))}"
        )
        if v.get("slower_than_fp32_on_host"):
            typer.echo(f"       SLOWER than fp32 on this {report.get('host_class')} host: check it on the device before relying on it")
        for verdict in v.get("gate_verdicts") or []:
            typer.echo(f"       {_verdict_text(verdict)}")
        for failure in v["gate_failures"]:
            typer.echo(f"       {failure}")
    if report.get("baseline"):
        b = report["baseline"]
        typer.echo(f"  baseline {b['name']} {b['version']}: accuracy {b['accuracy'] * 100:.2f}% -> {'passed' if b.get('passed') else 'REFUSED'}")
    verdict_reasons = {v["reason"] for t in (report.get("targets") or {}).values() for v in t["variants"].values()}
    for warning in report.get("warnings") or []:
        if warning not in verdict_reasons:  # already printed under its target
            typer.echo(f"  warning: {warning}")


def _measure_config():
    """How builds measure other arithmetic classes; the environment is read here, in the CLI.

    ``EDGEPACK_EMULATOR_DIR`` points at the aarch64 sysroot (as for ``bench``);
    ``EDGEPACK_HOST_CLASS`` overrides host detection (a build run under qemu-user sees the
    real host's /proc/cpuinfo, not the emulated CPU's); ``EDGEPACK_MEASURE_CACHE`` moves the
    store of reusable emulated measurements, or ``off`` disables reuse.
    """
    import os

    from ..arith import CLASSES, MeasureConfig
    from ..errors import ConfigError

    klass = os.environ.get("EDGEPACK_HOST_CLASS", "")
    if klass and klass not in CLASSES:
        raise ConfigError(f"EDGEPACK_HOST_CLASS={klass!r} is not an arithmetic class; use one of {', '.join(CLASSES)} or unset it.")
    from ..arith.cache import default_cache_dir

    root = os.environ.get("EDGEPACK_EMULATOR_DIR")
    cache = os.environ.get("EDGEPACK_MEASURE_CACHE")  # "off" re-measures everything
    return MeasureConfig(host_class=klass, emulator_root=Path(root) if root else None, threads=1,
                         cache_dir=None if cache == "off" else Path(cache) if cache else default_cache_dir())


@handle_errors
def build(
    project: Path = typer.Argument(Path(PROJECT_FILE), help="The project file."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="The bundle in production: refuse the build if the new fp32 accuracy is lower on the same validation data."),
    as_json: bool = typer.Option(False, "--json", help="Print the build report as JSON on stdout."),
) -> None:
    """Build, measure, gate and sign NAME-VERSION.epk from a project file.

    Exit codes: 0 written, 1 a gate failed (nothing written), 2 bad input.
    """
    from ..build import build as run
    from ..errors import GateError

    try:
        with progress_display(not as_json) as progress:
            result = run(project, baseline=baseline, progress=progress, measure_config=_measure_config())
    except GateError as exc:
        report = getattr(exc, "report", None)
        if report is not None:
            if as_json:
                print_json(report)
            else:
                _summarize(report)
        raise
    if as_json:
        print_json(result.report)
        return
    _summarize(result.report)
    typer.echo(f"Wrote {result.bundle}")
    typer.echo(f"Build report (with host latencies): {result.report_path}")


# --------------------------------------------------------------------------- keys


@handle_errors
def keys_generate(
    directory: Path = typer.Option(Path("keys"), "--dir", help="Directory for NAME.key and NAME.pub (created if missing)."),
    name: str = typer.Option("signing", "--name", help="Base name of the key files."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair (devices trusting the old .pub will reject new bundles)."),
) -> None:
    """Create an Ed25519 signing key pair: NAME.key (private, 0600) and NAME.pub (give to devices)."""
    from ..bundle import generate_keypair
    from ..errors import OutputError

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create {directory}: {exc.strerror or exc}.") from exc
    private, public = generate_keypair(directory, name, force=force)
    typer.echo(f"Wrote {private} (private: keep it secret, never commit it)")
    typer.echo(f"Wrote {public} (public: devices verify bundles with it)")


# --------------------------------------------------------------------------- inspect


def _read_manifest(bundle: Path) -> dict:
    import json

    from ..bundle import read_member

    return json.loads(read_member(bundle, "manifest.json"))


@handle_errors
def inspect(
    bundle: Path = typer.Argument(..., help="The .epk bundle.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show what a bundle contains (NOT verified: use `edgepack verify` before trusting it)."""
    manifest = _read_manifest(bundle)
    if as_json:
        print_json(manifest)
        return
    typer.echo(f"{manifest.get('name')} {manifest.get('version')}  (format {manifest.get('format_version')}; unverified — run `edgepack verify`)")
    if manifest.get("description"):
        typer.echo(f"  {manifest['description']}")
    io = manifest.get("io") or {}
    for spec in io.get("inputs", []):
        role = spec.get("role")
        role = "" if role in (None, "raw") else f"  ({role}" + (f" from {spec['state_output']}" if spec.get("state_output") else "") + ")"
        typer.echo(f"  input  {spec.get('name')} {spec.get('dtype')} {spec.get('shape')} range {spec.get('value_range')}{role}")
    for spec in io.get("outputs", []):
        labels = spec.get("labels")
        typer.echo(f"  output {spec.get('name')} {spec.get('dtype')} {spec.get('shape')}" + (f" labels {', '.join(labels)}" if labels else ""))
    files = manifest.get("files", {})
    results = (manifest.get("gates") or {}).get("results") or {}
    typer.echo("  variants:")
    for v in manifest.get("variants", []):
        size = (files.get(v.get("file")) or {}).get("size")
        r = results.get(v.get("id")) or {}
        acc = r.get("accuracy")
        typer.echo(
            f"    {str(v.get('id')):<20} {str(v.get('precision')):<5} {v.get('engine')}  "
            f"{'?' if not isinstance(size, int) else f'{size:,}'} B  "
            f"acc {'-' if acc is None else f'{acc * 100:.2f}%'}  devices {', '.join(v.get('devices') or []) or '-'}"
        )
    targets = manifest.get("targets") or {}
    if targets:
        typer.echo("  per target (measured under each device's arithmetic class):")
        by_id = {v.get("id"): v for v in manifest.get("variants", [])}
        for device, t in targets.items():
            klass = t.get("class")
            for vid in t.get("variants") or []:
                rec = ((by_id.get(vid) or {}).get("classes") or {}).get(klass) or {}
                err = rec.get("max_abs_error")
                typer.echo(f"    {device:<12} {str(klass):<16} {vid:<22} acc {_pct(rec.get('accuracy'))}  "
                           f"agree {_pct(rec.get('agreement'))}  max err {'-' if err is None else f'{err:.3g}'}  "
                           f"measured {rec.get('how') or 'host'}{_task_text(rec.get('task'))}")
        for reason in (manifest.get("gates") or {}).get("refused") or []:
            for line in textwrap.wrap(f"refused: {reason}", 110):
                typer.echo(f"      {line}")
    gates = manifest.get("gates") or {}
    thresholds = {k: v for k, v in (gates.get("thresholds") or {}).items() if v is not None}
    typer.echo(f"  gates: {', '.join(f'{k}={v}' for k, v in thresholds.items()) or 'none'} -> {'passed' if gates.get('passed') else 'unknown'}")
    if gates.get("baseline"):
        b = gates["baseline"]
        typer.echo(f"  baseline: {b.get('name')} {b.get('version')} accuracy {b.get('accuracy')}")
    lineage = manifest.get("lineage") or {}
    src = lineage.get("source_model") or {}
    typer.echo(f"  lineage: model {src.get('file')} sha256 {str(src.get('sha256'))[:16]}…, git {lineage.get('git_commit') or 'none'}")
    tools = lineage.get("tools") or {}
    if tools:
        typer.echo("           " + ", ".join(f"{k} {v}" for k, v in sorted(tools.items())))
    for role in ("calibration", "validation"):
        d = lineage.get(role) or {}
        if d:
            typer.echo(f"           {role}: {d.get('file')} ({d.get('description')}) sha256 {str(d.get('sha256'))[:16]}…")


# --------------------------------------------------------------------------- verify


@handle_errors
def verify(
    bundle: Path = typer.Argument(..., help="The .epk bundle.", show_default=False),
    key: Path = typer.Option(..., "--key", help="The publisher's public key (.pub)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Verify a bundle: signature, every member's hash, then golden vectors on this host.

    Exit codes: 0 verified, 1 verification failed, 2 bad input.
    """
    from ..bundle import load_public_key
    from ..bundle.check import check_bundle
    from ..errors import BundleError, VerificationError

    public = load_public_key(key)
    if not bundle.is_file():
        raise BundleError(f"Bundle {bundle} does not exist or is not a file; check the path.")
    checked = check_bundle(bundle, public)
    manifest, golden, problems = checked.manifest, checked.golden, checked.problems
    result = {
        "bundle": str(bundle),
        "name": manifest.name,
        "version": manifest.version,
        "key_id": manifest.key_id,
        "signature": "ok",
        "members": {name: "ok" for name in sorted(manifest.files)},
        "golden": {vid: ("skipped (its engine is not installed here)" if value is None else value if isinstance(value, str)
                         else ("ok" if not value else value))
                   for vid, value in golden.items()},
        "verified": not problems,
    }
    if as_json:
        print_json(result)
    else:
        typer.echo(f"{manifest.name} {manifest.version}: signature OK (key {manifest.key_id}), {len(manifest.files)} member hashes OK")
        for vid, value in result["golden"].items():
            typer.echo(f"  golden vectors {vid}: {value if isinstance(value, str) else 'FAILED'}")
    if problems:
        raise VerificationError("Golden vectors failed on this host: " + "; ".join(problems)
                                + ". The variant computes different results here than at build time.")
    if not golden:
        typer.echo("  (the bundle has no golden vectors)", err=True)
