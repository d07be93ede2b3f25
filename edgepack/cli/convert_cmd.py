"""``edgepack convert``: an ONNX, Keras or SavedModel model to TFLite, validated against the source."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ._common import handle_errors, print_json, progress_display


class Target(str, Enum):
    tflite = "tflite"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)


def _arrays(dataset, limit: int | None = None) -> dict:
    return dataset.batch(0, len(dataset) if limit is None else min(limit, len(dataset)))


@handle_errors
def convert(
    model: Path = typer.Argument(..., help="The model: .onnx (through onnx2tf), .keras/.h5 or a SavedModel directory (TensorFlow's converter).", show_default=False),
    to: Target = typer.Option(Target.tflite, "--to", help="Target format."),
    quantize: Precision = typer.Option(Precision.fp32, "--quantize", "-q", help="fp32, fp16 (float16 weights) or int8 (full-integer, calibrated on --calibration)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Calibration data (.npy, .npz keyed by input name, or images); required for int8."),
    validation: Optional[Path] = typer.Option(None, "--validation", help="Validation data (.npz with optional 'labels'); the converted model is refused if it diverges."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write the .tflite (default: MODEL-PRECISION.tflite next to the model)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Convert a model to TFLite, run it with LiteRT against the source model on the validation data,
    and write it only if every output agrees within tolerance.

    Exit codes: 0 written, 1 diverged beyond tolerance (nothing written), 2 bad input.
    """
    from .._atomic import atomic_write_bytes
    from ..convert import tflite as conv
    from ..data import open_dataset
    from ..errors import ConfigError

    precision = quantize.value
    is_onnx = model.suffix.lower() == ".onnx"
    if not model.exists():
        raise ConfigError(f"Model {model} does not exist; check the path.")
    if is_onnx:
        conv.require_tflite()
        from ..modelio import graph_inputs, load_model

        onnx_model = load_model(model)
        inputs = graph_inputs(onnx_model)
        reference = onnx_model
    else:
        conv.require_tflite(onnx2tf=False)
        reference = conv.TensorFlowSession(model)
        from ..modelio import TensorSpec  # noqa: F401 - shapes come from TensorFlow below

        inputs = None
    cal_ds = val_ds = None
    if inputs is not None:
        if calibration is not None:
            cal_ds = open_dataset(calibration, inputs, "calibration")
        if validation is not None:
            val_ds = open_dataset(validation, inputs, "validation")
    if precision == "int8" and calibration is None:
        raise ConfigError("--quantize int8 needs --calibration data (full-integer quantization is calibrated on it).")
    if validation is None and calibration is None:
        raise ConfigError("Give --validation data (or at least --calibration data): every conversion is validated "
                          "against the source model before it is written.")
    with progress_display(not as_json) as progress:
        if is_onnx:
            calib = _arrays(cal_ds if cal_ds is not None else val_ds, conv.MAX_CALIBRATION_SAMPLES)
            result = conv.convert_onnx_to_tflite(onnx_model, (precision,), calib, progress)
            val_ds = val_ds if val_ds is not None else cal_ds
            feed, labels = _arrays(val_ds), val_ds.labels
        else:
            import numpy as np

            def load(path):
                data = np.load(path)
                if hasattr(data, "files"):
                    names = [i.name for i in reference.get_inputs()]
                    arrays = {n: data[n] for n in names if n in data.files}
                    if not arrays:
                        arrays = {names[0]: data["raw" if "raw" in data.files else data.files[0]]}
                    return arrays, (data["labels"] if "labels" in data.files else None)
                return {reference.get_inputs()[0].name: data}, None

            calib, _ = load(calibration) if calibration is not None else (None, None)
            result = conv.convert_tensorflow_to_tflite(model, (precision,), calib)
            feed, labels = load(validation if validation is not None else calibration)
        data = result.models[precision]
        progress("Validating against the source model")
        report = conv.validate_tflite(reference, data, feed, labels, precision)
    out = output or model.with_name(f"{model.stem}-{precision}.tflite")
    atomic_write_bytes(out, data)
    doc = {"output": str(out), "size_bytes": len(data), "notes": result.notes, "validation": report.to_dict()}
    if as_json:
        print_json(doc)
        return
    typer.echo(f"Wrote {out} ({len(data):,} B, {precision})")
    for o in report.outputs:
        typer.echo(f"  {'PASS' if o.passed else 'FAIL'} {o.describe()}")
    if report.accuracy is not None:
        typer.echo(f"  accuracy {report.accuracy * 100:.2f}% (source {report.reference_accuracy * 100:.2f}%) on {report.samples} samples")
    for note in result.notes:
        typer.echo(f"  note: {note}")
