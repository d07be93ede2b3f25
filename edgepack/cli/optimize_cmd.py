"""``edgepack optimize``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ._common import handle_errors, print_json, progress_display


class QuantizeMode(str, Enum):
    none = "none"
    dynamic = "dynamic"
    static = "static"
    fp16 = "fp16"
    auto = "auto"


class Undecided(str, Enum):
    refuse = "refuse"
    accept = "accept"


class CalibrationMethod(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


def register(app: typer.Typer) -> None:
    app.command("optimize")(optimize)


def _measure_config():
    from .bundle_cmds import _measure_config as build_measure_config

    return build_measure_config()


@handle_errors
def optimize(
    model: Path = typer.Argument(..., help="The ONNX model to optimize.", show_default=False),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the result (only if it passes the gate)."),
    quantize: QuantizeMode = typer.Option(QuantizeMode.none, "--quantize", "-q", help="Quantization mode; auto tries each and keeps the best that passes the gate."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Calibration data: .npy, .npz (keyed by input name) or a folder of images."),
    validation: Optional[Path] = typer.Option(None, "--validation", help="Validation data (.npz with optional 'labels') for the accuracy gate."),
    per_channel: bool = typer.Option(False, "--per-channel", help="Per-channel weight scales (usually more accurate for CNNs)."),
    calibration_method: CalibrationMethod = typer.Option(CalibrationMethod.minmax, "--calibration-method", help="How activation ranges are calibrated."),
    max_accuracy_drop: Optional[float] = typer.Option(None, "--max-accuracy-drop", help="Largest allowed top-1 accuracy drop as a fraction (0.01 = one point). Needs labelled validation data."),
    min_agreement: Optional[float] = typer.Option(None, "--min-agreement", help="Smallest allowed top-1 agreement with the original, as a fraction (e.g. 0.99)."),
    undecided: Undecided = typer.Option(Undecided.refuse, "--undecided", help="What an accuracy/agreement gate does when the validation set is too small to decide it at 95% confidence: refuse (naming the samples needed) or accept with a warning."),
    threads: int = typer.Option(1, "--threads", min=1, help="Inference threads for every measurement."),
    target: Optional[str] = typer.Option(None, "--target", help="Device profile id (e.g. rpi4): gate every candidate under that device's integer arithmetic (natively, under qemu, or by the VNNI reference), not only on this host."),
    task: Optional[Path] = typer.Option(None, "--task", help="YAML file with a 'task:' declaration (and optional task 'gates:'); an edgepack.yaml works: gate in task terms (box recall, decoded strings, mask IoU...)."),
    runs: int = typer.Option(50, "--runs", min=1, help="Timed runs per model (interleaved)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Optimize an ONNX model's graph and quantize it, keeping the result only if it passes the accuracy gate.

    Exit codes: 0 written, 1 gate failed or undecided (nothing written), 2 bad input.
    """
    from ..errors import ConfigError, GateError
    from ..optimize import Gate, OptimizeConfig
    from ..optimize import optimize as run

    if max_accuracy_drop is not None and min_agreement is not None:
        raise ConfigError("Give either --max-accuracy-drop or --min-agreement, not both.")
    gate = None
    if max_accuracy_drop is not None or min_agreement is not None:
        gate = Gate(max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement, undecided=undecided.value)
    task_spec, task_gates = (None, None)
    if task is not None:
        from ..tasks import load_task_file

        task_spec, task_gates = load_task_file(task)
    config = OptimizeConfig(
        model=model,
        output=output,
        quantize=quantize.value,
        calibration=calibration,
        validation=validation,
        per_channel=per_channel,
        calibration_method=calibration_method.value,
        gate=gate,
        threads=threads,
        latency_runs=runs,
        target=target,
        measure=_measure_config() if target else None,
        task=task_spec,
        task_gates=task_gates,
        undecided=undecided.value,
    )
    try:
        with progress_display(not as_json) as progress:
            report = run(config, progress)
    except GateError as exc:
        partial = getattr(exc, "report", None)
        if partial is not None:
            if as_json:
                print_json(partial.to_dict())
            else:
                from ..optimize.report import render

                render(partial)
        raise
    if as_json:
        print_json(report.to_dict())
    else:
        from ..optimize.report import render

        render(report)
