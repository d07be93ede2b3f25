"""``edgepack bench``: per-device benchmarks (host, emulated aarch64, a board over ssh).

    edgepack bench BUNDLE|PROJECT [--device ID] [--variant V] [--runs N --warmup N --threads T]
                   [--emulate | --ssh user@host] [--json] [--report DIR]
    edgepack bench setup-emulator
    edgepack bench compare A.json B.json
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from ._common import handle_errors, print_json


class _DefaultRunGroup(TyperGroup):
    """``edgepack bench X`` means ``edgepack bench run X`` unless X is a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(
    name="bench",
    cls=_DefaultRunGroup,
    help=("Benchmark a bundle on the host, under emulated aarch64 (--emulate) or on a board (--ssh). "
          "`edgepack bench BUNDLE [OPTIONS]` is short for `edgepack bench run BUNDLE [OPTIONS]`."),
    no_args_is_help=True,
)

DEVICES_ENVVAR = "EDGEPACK_DEVICES_DIR"
EMULATOR_ENVVAR = "EDGEPACK_EMULATOR_DIR"
RESULTS_ENVVAR = "EDGEPACK_BENCH_RESULTS"


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


def _default_results_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _log(message: str) -> None:
    """Progress goes to stderr so --json output stays clean."""
    typer.echo(message, err=True)


@bench_app.command("run")
@handle_errors
def run(
    target: Path = typer.Argument(..., help="A bundle (.epk) or a project (edgepack.yaml or its folder; built if needed)."),
    device: Optional[str] = typer.Option(None, "--device", help="Device profile id or .yaml path (peaks, threads). Default: none on the host, qemu-aarch64 with --emulate."),
    devices_dir: Optional[Path] = typer.Option(None, "--devices-dir", envvar=DEVICES_ENVVAR, help="Directory of device profiles.", show_default=False),
    variant: List[str] = typer.Option([], "--variant", help="Variant id or precision to bench (repeatable; default: all)."),
    runs: int = typer.Option(50, "--runs", min=1, help="Timed predictions per variant."),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed predictions per variant first."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Inference threads (default: the profile's recommendation, else 1)."),
    emulate: bool = typer.Option(False, "--emulate", help="Run under emulated aarch64 (qemu-user; see setup-emulator); the host runs as reference."),
    ssh: Optional[str] = typer.Option(None, "--ssh", help="user@host of a board with python3, numpy and onnxruntime; the host runs as reference."),
    ssh_option: List[str] = typer.Option([], "--ssh-option", help="Extra ssh/scp -o option (repeatable), e.g. Port=2222."),
    remote_python: str = typer.Option("python3", "--remote-python", help="Python on the board."),
    key: Optional[Path] = typer.Option(None, "--key", help="Publisher public key (default: keys/*.pub next to the bundle)."),
    data: Optional[str] = typer.Option(None, "--data", help="Validation data FILE.npz[:KEY] (default: the project's)."),
    samples: Optional[int] = typer.Option(None, "--samples", min=1, help="Use only the first N validation samples."),
    emulator_dir: Optional[Path] = typer.Option(None, "--emulator-dir", envvar=EMULATOR_ENVVAR, help="Emulator cache (default ~/.cache/edgepack/emulator).", show_default=False),
    report: Optional[Path] = typer.Option(None, "--report", help="Write bench.json, bench.md and PNG charts here."),
    results_dir: Optional[Path] = typer.Option(None, "--results-dir", envvar=RESULTS_ENVVAR, help="Append results here (default: benchmarks/results in the repository).", show_default=False),
    no_results: bool = typer.Option(False, "--no-results", help="Do not append to the results log."),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON on stdout."),
) -> None:
    """Benchmark BUNDLE (or the project's bundle) through the device runtime."""
    from ..bench.report import append_results, markdown_table, write_report
    from ..bench.runner import BenchOptions, resolve_input, run_bench
    from ..devices import get_profile

    log = _log
    profile = None
    if device is not None:
        profile = get_profile(device, devices_dir)
    elif emulate:
        profile = get_profile("qemu-aarch64", devices_dir)
    if emulate and profile is not None and not profile.emulated and profile.arch != "aarch64":
        from ..errors import ConfigError

        raise ConfigError(f"--emulate runs aarch64, but device {profile.id} is {profile.arch}; use an aarch64 profile or none.")
    spec = resolve_input(target, key, data, log)
    options = BenchOptions(variants=tuple(variant), runs=runs, warmup=warmup, threads=threads, samples=samples)
    ssh_opts = ["-o", "BatchMode=yes"]
    for opt in ssh_option:
        ssh_opts += ["-o", opt]
    result = run_bench(spec, device=profile, emulate=emulate, ssh=ssh, options=options, emulator_root=emulator_dir,
                       ssh_opts=ssh_opts, remote_python=remote_python, log=log)
    if report is not None:
        written = write_report(result, report)
        result["report_files"] = written
        log(f"report: {written['markdown']}, {written['json']}, {', '.join(written['charts'])}")
    if not no_results:
        path = append_results(result, results_dir or _default_results_dir())
        log(f"appended to {path}")
    if as_json:
        print_json(result)
    else:
        typer.echo(markdown_table(result))


@bench_app.command("setup-emulator")
@handle_errors
def setup_emulator_cmd(
    emulator_dir: Optional[Path] = typer.Option(None, "--dir", envvar=EMULATOR_ENVVAR, help="Cache directory (default ~/.cache/edgepack/emulator).", show_default=False),
    suite: Optional[str] = typer.Option(None, "--suite", help="Debian release of the guest (default: the host's, else bookworm)."),
    mirror: str = typer.Option("http://deb.debian.org/debian", "--mirror", help="Debian mirror."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the stamp says it is done (downloads stay cached)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was set up as JSON."),
) -> None:
    """Prepare the aarch64 sysroot (Debian + python3 + numpy/onnxruntime wheels) for --emulate, once."""
    from ..bench.emulator import EmulatorConfig, default_root, setup_emulator

    kwargs = {"root": Path(emulator_dir).expanduser() if emulator_dir else default_root(), "mirror": mirror}
    if suite:
        kwargs["suite"] = suite
    info = setup_emulator(EmulatorConfig(**kwargs), log=_log, force=force)
    if as_json:
        print_json(info)
    else:
        state = "already set up" if info.get("cached") else "set up"
        guest = info.get("guest", {})
        typer.echo(f"Emulator {state} in {info['sysroot']} ({info['elapsed_s']:.1f}s): Python {guest.get('python')}, "
                   f"numpy {guest.get('numpy')}, onnxruntime {guest.get('onnxruntime')} on {guest.get('machine')}.")


@bench_app.command("compare")
@handle_errors
def compare_cmd(
    baseline: Path = typer.Argument(..., help="Baseline result (bench.json or a results .jsonl: its last run)."),
    new: Path = typer.Argument(..., help="New result to check against the baseline."),
    threshold: float = typer.Option(0.10, "--threshold", min=0.0, help="Timing regression when more than this fraction slower (p90/p99: twice)."),
    accuracy_drop: float = typer.Option(0.005, "--accuracy-drop", min=0.0, help="Accuracy regression when it drops by more than this."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Show what changed from BASELINE to NEW; exit 1 when something regressed."""
    from ..bench.report import compare, compare_markdown, load_result

    diff = compare(load_result(baseline), load_result(new), threshold=threshold, accuracy_drop=accuracy_drop)
    if as_json:
        print_json(diff)
    else:
        typer.echo(compare_markdown(diff))
    if diff["compared"] == 0:
        typer.echo("error: the two results share no (environment, variant) to compare.", err=True)
        raise typer.Exit(2)
    if diff["regressions"]:
        raise typer.Exit(1)
