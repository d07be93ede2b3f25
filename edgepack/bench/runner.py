"""Host side of ``edgepack bench``: stage the device script, run it on a target, collect metrics.

A *target* is where the device script runs: ``host`` (this machine's Python),
``emulated`` (the aarch64 sysroot under qemu-user) or ``ssh`` (a board). All three run
``device_bench.py`` next to a fresh copy of ``edgepack_runtime``, install the bundle
into a temporary cache with the runtime itself, and time ``Model.predict`` — one code
path. Emulated and ssh runs also run the host as the reference their outputs are
compared with.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, EdgepackError, InputError

__all__ = ["BenchError", "BenchInput", "BenchOptions", "machine_id", "resolve_input", "run_bench"]

SCHEMA = "edgepack-bench/1"
DEVICE_SCRIPT = Path(__file__).with_name("device_bench.py")
EMULATED_NOTE = ("EMULATED: timings come from qemu-user translating aarch64 code on the host; they are NOT "
                 "device timings. Use this run for op coverage and numeric agreement on aarch64 only.")

Log = Callable[[str], None]


class BenchError(EdgepackError):
    """A benchmark could not be run."""


@dataclass
class BenchInput:
    """What to benchmark: a verified bundle, its publisher key and validation data."""

    bundle: Path
    key: Path
    manifest: dict
    inputs: dict  # input name -> array of raw samples
    labels: np.ndarray | None
    data_source: str


@dataclass
class BenchOptions:
    variants: tuple[str, ...] = ()
    runs: int = 50
    warmup: int = 5
    threads: int | None = None
    samples: int | None = None  # validation samples used (None: all)
    timeout: float = 1800.0


# ----------------------------------------------------------------------------- inputs


def _find_key(bundle: Path, key: Path | None) -> Path:
    from edgepack_runtime.bundle import load_public_key, verify_bundle

    candidates = [key] if key else []
    if not candidates:
        for folder in (bundle.parent, bundle.parent.parent / "keys", bundle.parent / "keys"):
            candidates += sorted(folder.glob("*.pub")) if folder.is_dir() else []
    if not candidates:
        raise InputError(f"No public key found for {bundle}; pass --key PUB (the publisher's .pub file).")
    errors = []
    for cand in candidates:
        try:
            verify_bundle(bundle, load_public_key(cand))
            return cand
        except EdgepackError as exc:
            errors.append(f"{cand.name}: {exc}")
    raise InputError(f"{bundle} does not verify with {', '.join(str(c) for c in candidates)}: {errors[-1]}")


def _load_npz(path: Path, key: str, labels: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise DataError(f"Validation data {path} does not exist; pass --data FILE.npz[:KEY].")
    with np.load(path, allow_pickle=False) as data:
        if key not in data.files:
            raise DataError(f"{path} has no array '{key}' (it has {', '.join(data.files)}); pass --data {path}:KEY.")
        lab = data[labels] if labels and labels in data.files else (data["labels"] if labels is None and "labels" in data.files else None)
        return data[key], lab


def resolve_input(target: Path, key: Path | None = None, data: str | None = None, log: Log = lambda _m: None) -> BenchInput:
    """Find the bundle, key and validation data for BUNDLE (.epk) or a project (edgepack.yaml or its folder).

    A project whose bundle is not built yet is built first.
    """
    from edgepack_runtime.bundle import load_public_key, verify_bundle

    target = Path(target)
    project = None
    if target.is_dir():
        target = target / "edgepack.yaml"
    if not target.exists():
        raise InputError(f"{target} does not exist; pass a bundle (.epk) or a project file (edgepack.yaml).")
    if target.suffix in (".yaml", ".yml"):
        from ..project import load_project

        project = load_project(target)
        bundle = project.output_dir / f"{project.name}-{project.version}.epk"
        if not bundle.is_file():
            log(f"building {bundle.name}")
            from ..build import build

            result = build(target)
            bundle = Path(result.bundle)
        key = key or project.signing_key.with_suffix(".pub")
    elif target.suffix == ".epk":
        bundle = target
    else:
        raise InputError(f"{target} is neither a bundle (.epk) nor a project file (edgepack.yaml); "
                         "bench a built bundle or the project that builds it.")
    key = _find_key(bundle, key)
    manifest = dict(verify_bundle(bundle, load_public_key(key)))
    inputs_meta = (manifest.get("io") or {}).get("inputs") or []
    if not inputs_meta:
        raise InputError(f"{bundle.name} declares no inputs in its manifest; cannot feed it.")
    first = inputs_meta[0]["name"]

    # Validation data: --data, else the project's, else the build report's, else the golden vectors.
    labels = None
    if data:
        path, _, arr = data.partition(":")
        raw, labels = _load_npz(Path(path), arr or "raw", None)
        inputs, source = {first: raw}, path
    else:
        ref = None
        if project is not None:
            ref = project.validation
        else:
            report = bundle.with_name(bundle.name[:-4] + ".build.json")
            try:
                info = json.loads(report.read_text())
                from ..project import load_project

                ref = load_project(info["project"]).validation
            except (OSError, ValueError, KeyError, EdgepackError):
                ref = None
        if ref is not None and Path(ref.path).is_file():
            raw, labels = _load_npz(Path(ref.path), ref.key, ref.labels or "")
            inputs, source = {first: raw}, str(ref.path)
        else:
            import io

            from edgepack_runtime.bundle import read_member

            golden = manifest.get("golden") or {}
            blob = read_member(bundle, golden.get("file", "golden/vectors.npz"))
            with np.load(io.BytesIO(blob), allow_pickle=False) as g:
                inputs = {m["name"]: g[k] for m in inputs_meta for k in g.files if k in (m["name"], f"input:{m['name']}", f"inputs/{m['name']}")}
                if not inputs:
                    raise DataError(f"No validation data for {bundle.name}; pass --data FILE.npz[:KEY].")
            source = "golden vectors in the bundle (no labels)"
    return BenchInput(bundle=bundle.resolve(), key=Path(key).resolve(), manifest=manifest, inputs=inputs,
                      labels=labels, data_source=source)


def select_variants(manifest: dict, wanted: tuple[str, ...]) -> list[str]:
    """Variant ids to bench: all, or those named by id (onnx-int8) or precision (int8)."""
    variants = manifest.get("variants") or []
    ids = [v["id"] for v in variants]
    if not wanted:
        return ids
    chosen: list[str] = []
    for w in wanted:
        for part in w.split(","):
            part = part.strip()
            match = [v["id"] for v in variants if part in (v["id"], v.get("precision"))]
            if not match:
                offered = ", ".join(f"{v['id']} ({v.get('precision')})" for v in variants)
                raise ConfigError(f"The bundle has no variant '{part}'; it offers {offered}.")
            chosen += [m for m in match if m not in chosen]
    return chosen


def machine_id() -> dict:
    mid = None
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            mid = Path(path).read_text().strip()[:12] or None
            break
        except OSError:
            continue
    return {"hostname": socket.gethostname(), "machine_id": mid, "machine": platform.machine(),
            "system": f"{platform.system()} {platform.release()}"}


# ----------------------------------------------------------------------------- launchers


@dataclass
class Launcher:
    """How to start the device script somewhere; paths in ``args`` are remote paths."""

    target: str  # host | emulated | ssh
    label: str
    emulated: bool = False
    prefix: list = field(default_factory=list)
    env: dict | None = None
    remote_dir: str | None = None  # set for ssh
    ssh: str | None = None
    ssh_opts: list = field(default_factory=list)
    python: str = "python3"

    def run(self, work: Path, args: list[str], timeout: float) -> tuple[dict, float]:
        """Run ``device_bench.py ARGS`` in ``work``; returns (result, spawn wall time)."""
        if self.ssh:
            remote = (f"cd {shlex.quote(self.remote_dir)} && PYTHONPATH={shlex.quote(self.remote_dir + '/runtime')} "
                      f"PYTHONDONTWRITEBYTECODE=1 {self.python} device_bench.py " + " ".join(shlex.quote(a) for a in args))
            cmd = ["ssh", *self.ssh_opts, self.ssh, remote]
            env = None
            cwd = None
        else:
            cmd = [*self.prefix, str(work / "device_bench.py"), *args]
            env = self.env
            cwd = str(work)
        spawn = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"The benchmark on {self.label} did not finish within {timeout:.0f}s.") from None
        lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
        if not lines:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise BenchError(f"The benchmark on {self.label} failed (exit {proc.returncode}) in mode '{args[0]}':\n{tail}")
        result = json.loads(lines[-1])
        if "error" in result:
            raise BenchError(f"The benchmark on {self.label} failed in mode '{args[0]}': {result['error']}")
        return result, spawn

    def path(self, work: Path, name: str) -> str:
        return f"{self.remote_dir}/{name}" if self.ssh else str(work / name)


def host_launcher() -> Launcher:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return Launcher("host", f"host {platform.machine()}", prefix=[sys.executable, "-s", "-B"], env=env)


def emulated_launcher(root: Path | None = None) -> Launcher:
    from .emulator import Emulator

    emu = Emulator.open(root)
    return Launcher("emulated", "qemu-user aarch64", emulated=True, prefix=emu.command([]), env=None)


def ssh_launcher(dest: str, ssh_opts: list | None = None, python: str = "python3") -> Launcher:
    if shutil.which("ssh") is None or shutil.which("scp") is None:
        raise BenchError("ssh and scp are needed for --ssh; install openssh-client.")
    return Launcher("ssh", f"ssh {dest}", ssh=dest, ssh_opts=list(ssh_opts or ["-o", "BatchMode=yes"]), python=python)


# ----------------------------------------------------------------------------- running


def _stage(work: Path, spec: BenchInput, samples: int | None) -> None:
    from .emulator import copy_runtime

    (work / "runtime").mkdir(parents=True)
    copy_runtime(work / "runtime")
    shutil.copy(DEVICE_SCRIPT, work / "device_bench.py")
    shutil.copy(spec.bundle, work / "bundle.epk")
    shutil.copy(spec.key, work / "publisher.pub")
    arrays = {f"input:{k}": (v[:samples] if samples else v) for k, v in spec.inputs.items()}
    if spec.labels is not None:
        arrays["labels"] = spec.labels[:samples] if samples else spec.labels
    shape = ((spec.manifest.get("io") or {}).get("inputs") or [{}])[0].get("shape") or [None]
    arrays["batch"] = np.array(64 if shape[0] in (None, -1) else 1)
    np.savez(work / "data.npz", **arrays)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _run_target(launcher: Launcher, spec: BenchInput, variants: list[str], opts: BenchOptions, threads: int,
                log: Log) -> tuple[dict, dict]:
    """Run every mode on one target; returns (environment record, outputs per variant)."""
    work = Path(tempfile.mkdtemp(prefix=f"edgepack-bench-{launcher.target}-"))
    try:
        _stage(work, spec, opts.samples)
        if launcher.ssh:
            launcher.remote_dir = f"/tmp/{work.name.replace('edgepack-bench-', 'edgepack-bench-remote-')}"
            log(f"copying runtime, bundle and data to {launcher.ssh}:{launcher.remote_dir}")
            _check(["scp", "-r", "-q", *launcher.ssh_opts, str(work), f"{launcher.ssh}:{launcher.remote_dir}"], "copy to the board")
        else:
            launcher.env = dict(launcher.env or os.environ)
            for k in list(launcher.env):
                if k.startswith(("PYTHONHOME", "VIRTUAL_ENV")):
                    launcher.env.pop(k)
            extra = [str(work / "runtime")]
            if launcher.emulated:
                from .emulator import GUEST_SITE

                extra.append(GUEST_SITE)
            launcher.env["PYTHONPATH"] = ":".join(extra)
            launcher.env["PYTHONNOUSERSITE"] = "1"
        p = lambda name: launcher.path(work, name)
        common = ["--cache", p("cache"), "--data", p("data.npz"), "--threads", str(threads)]
        log(f"[{launcher.label}] installing the bundle with the device runtime")
        installed, _ = launcher.run(work, ["install", "--bundle", p("bundle.epk"), "--key", p("publisher.pub"), *common], opts.timeout)
        log(f"[{launcher.label}] latency: {len(variants)} variant(s) interleaved, {opts.warmup} warm-up + {opts.runs} runs, {threads} thread(s)")
        lat, _ = launcher.run(work, ["latency", "--variants", ",".join(variants), "--runs", str(opts.runs),
                                     "--warmup", str(opts.warmup), *common], opts.timeout)
        if launcher.emulated:
            # Under qemu-user, /sys and most of /proc are the host's: do not report them as the guest's.
            lat["platform"].update(cpu_governor=None, cpu_max_khz=None, device_tree_model=None,
                                   note="qemu-user guest; /sys and /proc (except cpuinfo) are the host's")
        env = {"target": launcher.target, "label": launcher.label, "emulated": launcher.emulated,
               "timing_note": EMULATED_NOTE if launcher.emulated else None, "platform": lat["platform"],
               "threads": threads, "install_ms": installed.get("install_ms"), "variants": {}}
        outputs: dict = {}
        for v in variants:
            if v in lat["skipped"]:
                env["variants"][v] = {"status": "skipped", "reason": lat["skipped"][v]}
                continue
            log(f"[{launcher.label}] cold start + validation: {v}")
            out_name = f"out-{v}.npz"
            cold, spawn = launcher.run(work, ["cold", "--variant", v, "--out", p(out_name), *common], opts.timeout)
            if launcher.ssh:
                _check(["scp", "-q", *launcher.ssh_opts, f"{launcher.ssh}:{launcher.remote_dir}/{out_name}", str(work / out_name)],
                       "copy results back")
                cold_ms, cold_src = cold.get("cold_start_ms_proc"), "device /proc/self/stat start time to first prediction"
            else:
                cold_ms, cold_src = (cold["first_prediction_wall"] - spawn) * 1e3, "host spawn to first prediction (wall clock)"
            with np.load(work / out_name) as data:
                outputs[v] = {k: data[k] for k in data.files}
            times = lat["latency_ms"][v]
            p50 = _percentile(times, 50)
            env["variants"][v] = {
                "status": "ok",
                "engine": cold.get("engine"),
                "latency_ms": {"p50": p50, "p90": _percentile(times, 90), "p99": _percentile(times, 99),
                               "mean": float(np.mean(times)), "min": float(np.min(times)), "runs": len(times)},
                "throughput_per_s": 1000.0 / p50 if p50 > 0 else None,
                "cold_start_ms": cold_ms,
                "cold_start_source": cold_src,
                "peak_rss_mb": cold.get("peak_rss_mb"),
                "accuracy": cold.get("accuracy"),
                "samples": cold.get("samples"),
            }
        if launcher.ssh:
            subprocess.run(["ssh", *launcher.ssh_opts, launcher.ssh, f"rm -rf {shlex.quote(launcher.remote_dir)}"],
                           capture_output=True, timeout=60)
        return env, outputs
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise BenchError(f"Could not {what} ({' '.join(cmd[:2])} exit {proc.returncode}): {proc.stderr.strip()[-300:]}")


def _reference_variant(manifest: dict, variants: list[str]) -> str | None:
    by_precision = {v["id"]: v.get("precision") for v in manifest.get("variants") or []}
    for v in variants:
        if by_precision.get(v) == "fp32":
            return v
    return None


def _first_output(outputs: dict, manifest: dict) -> str | None:
    names = [o["name"] for o in (manifest.get("io") or {}).get("outputs") or []]
    for n in names:
        if n in outputs:
            return n
    return next(iter(outputs), None)


def _agreement(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.ndim == 2 and a.shape == b.shape and a.shape[1] > 1:
        return float((a.argmax(1) == b.argmax(1)).mean())
    return None


def _tolerance(manifest: dict, variant: str, output: str, ref: np.ndarray, classes: tuple[str, str] | None = None) -> float:
    """Allowed difference between the host's and another environment's outputs of one variant.

    Same arithmetic class: the golden-vector tolerance. Different classes (int8 on x86
    without VNNI against Arm, say): each class's outputs are within its measured max
    error of fp32 on the validation data, so by the triangle inequality they are within
    the sum of the two of each other; a class the build did not measure gets twice the
    largest error measured under any class.
    """
    tol = (((manifest.get("golden") or {}).get("tolerances") or {}).get(variant) or {}).get(output)
    base = 1e-4 * float(np.max(np.abs(ref))) if ref.size else 1e-4
    tol = max(float(tol) if tol is not None else 0.0, base, 1e-6)
    if classes is None or classes[0] == classes[1]:
        return tol
    measured = ((((manifest.get("gates") or {}).get("results") or {}).get(variant) or {}).get("classes") or {})
    errors = {c: r.get("max_abs_error") for c, r in measured.items() if isinstance(r.get("max_abs_error"), (int, float))}
    if not errors:
        return tol
    if all(c in errors for c in classes):
        return max(tol, errors[classes[0]] + errors[classes[1]])
    return max(tol, 2 * max(errors.values()))


def _env_class(env: dict) -> str | None:
    from edgepack_runtime.arith import classify, host_class

    if env.get("target") == "host":
        return host_class()
    machine = (env.get("platform") or {}).get("machine")
    if not machine:
        return None
    # The emulator runs qemu's default "max" CPU (dot product included).
    return "aarch64-dotprod" if env.get("emulated") and machine == "aarch64" else classify(machine, [])


def _add_numerics(env: dict, outputs: dict, manifest: dict, host_outputs: dict | None) -> None:
    from edgepack_runtime.arith import host_class

    ref_v = _reference_variant(manifest, list(outputs))
    here = _env_class(env)
    env["arith_class"] = here
    classes = (host_class(), here) if here else None
    for v in outputs:
        # What the bundle certified for this environment's class, and how the build measured it.
        variant = next((x for x in manifest.get("variants") or [] if x.get("id") == v), {})
        cert = (variant.get("classes") or {}).get(here) if here else None
        env["variants"][v]["certified_for_class"] = None if variant.get("classes") is None else bool(cert) or variant.get("precision") == "fp32"
        env["variants"][v]["build_measured"] = (cert or {}).get("how")
    for v, outs in outputs.items():
        rec = env["variants"][v]
        name = _first_output(outs, manifest)
        if ref_v and name and ref_v in outputs:
            rec["agreement"] = _agreement(outs[name], outputs[ref_v][name])
            rec["agreement_reference"] = f"{ref_v} in the same environment"
        if host_outputs is not None and v in host_outputs:
            worst, within, agree = 0.0, True, []
            for k, arr in outs.items():
                h = host_outputs[v].get(k)
                if h is None or h.shape != arr.shape:
                    within = False
                    continue
                diff = float(np.max(np.abs(arr.astype(np.float64) - h.astype(np.float64)))) if arr.size else 0.0
                tol = _tolerance(manifest, v, k, h, classes)
                worst = max(worst, diff)
                within = within and diff <= tol
                ag = _agreement(arr, h)
                if ag is not None:
                    agree.append(ag)
            rec["vs_host"] = {"max_abs_diff": worst, "tolerance": _tolerance(manifest, v, name, host_outputs[v][name], classes) if name in host_outputs[v] else None,
                              "within_tolerance": within, "top1_agreement": min(agree) if agree else None,
                              "classes": list(classes) if classes else None}


def _add_static(env: dict, spec: BenchInput, flops: dict, peak: dict | None, emulated: bool) -> None:
    files = spec.manifest.get("files") or {}
    for v, rec in env["variants"].items():
        variant = next((x for x in spec.manifest.get("variants") or [] if x["id"] == v), {})
        rec["precision"] = variant.get("precision")
        rec["size_bytes"] = (files.get(variant.get("file")) or {}).get("size")
        fl = flops.get(v) or {}
        rec["flops"] = fl.get("total")
        if rec.get("status") != "ok" or not fl.get("total"):
            continue
        p50 = rec["latency_ms"]["p50"]
        rec["gflops_achieved"] = fl["total"] / (p50 / 1e3) / 1e9
        rec["peak_percent"] = None
        if peak and not emulated:
            is_int8 = rec["precision"] == "int8" and fl.get("int8")
            top = peak.get("int8_gops") if is_int8 else peak.get("fp32_gflops")
            if top:
                rec["peak_percent"] = 100.0 * rec["gflops_achieved"] / top
                rec["peak_reference"] = "int8_gops" if is_int8 else "fp32_gflops"


def _input_shapes(manifest: dict) -> dict:
    """Concrete per-sample input shapes from the manifest (batch 1, free sizes at their maximum)."""
    shapes = {}
    for meta in (manifest.get("io") or {}).get("inputs") or []:
        shape = list(meta.get("shape") or [])
        if not shape:
            continue
        free = list((meta.get("size_range") or {}).get("max") or [])
        out = [1]
        for dim in shape[1:]:
            out.append(dim if isinstance(dim, int) and dim > 0 else (free.pop(0) if free else 1))
        shapes[meta["name"]] = out
    return shapes


def count_bundle_flops(spec: BenchInput, variants: list[str]) -> dict:
    from edgepack_runtime.bundle import read_member

    from .flops import count_flops

    out = {}
    feed = {k: np.ascontiguousarray(a[:1]) for k, a in spec.inputs.items()}
    for v in variants:
        variant = next((x for x in spec.manifest.get("variants") or [] if x["id"] == v), None)
        if not variant or not str(variant.get("file", "")).endswith(".onnx"):
            continue
        try:
            blob = read_member(spec.bundle, variant["file"], max_size=1 << 31)
            out[v] = count_flops(blob, _input_shapes(spec.manifest), feed=feed).to_dict()
            out[v]["per"] = "the benchmarked sample (validation sample 0, batch 1)"
        except Exception as exc:  # noqa: BLE001 - FLOPs are informative, never fatal
            out[v] = {"total": None, "error": str(exc)[:200]}
    return out


def run_bench(spec: BenchInput, *, device=None, emulate: bool = False, ssh: str | None = None,
              options: BenchOptions | None = None, emulator_root: Path | None = None,
              ssh_opts: list | None = None, remote_python: str = "python3", log: Log = lambda _m: None) -> dict:
    """Bench ``spec`` on the host, or on the emulator / a board with the host as reference.

    Args:
        device: A DeviceProfile (peaks, recommended threads) or None.
    """
    from ..devices import profile_to_dict

    opts = options or BenchOptions()
    if emulate and ssh:
        raise ConfigError("--emulate and --ssh are exclusive: bench the emulator or a board, not both at once.")
    if opts.runs < 1 or opts.warmup < 0:
        raise ConfigError("--runs must be at least 1 and --warmup at least 0.")
    variants = select_variants(spec.manifest, opts.variants)
    threads = opts.threads or (device.recommended.threads if device else 1)
    if threads < 1:
        raise ConfigError("--threads must be at least 1.")
    flops = count_bundle_flops(spec, variants)
    launchers = [host_launcher()]
    if emulate:
        launchers.append(emulated_launcher(emulator_root))
    elif ssh:
        launchers.append(ssh_launcher(ssh, ssh_opts, remote_python))
    envs = []
    host_outputs = None
    for launcher in launchers:
        is_host = launcher.target == "host"
        env, outputs = _run_target(launcher, spec, variants, opts, threads, log)
        if device is not None and (not is_host or len(launchers) == 1):
            env["device"] = device.id
            peak = profile_to_dict(device)["peak"]
            arch_ok = env["platform"].get("machine") == device.arch
            if not arch_ok:
                env["device_note"] = (f"profile {device.id} is {device.arch} but this ran on {env['platform'].get('machine')}; "
                                      "% of peak is not computed")
                peak = None
        else:
            env["device"] = None
            peak = None
        _add_numerics(env, outputs, spec.manifest, None if is_host else host_outputs)
        _add_static(env, spec, flops, peak, launcher.emulated or (device is not None and device.emulated))
        if is_host:
            host_outputs = outputs
        envs.append(env)
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_id(),
        "bundle": {"name": spec.manifest.get("name"), "version": spec.manifest.get("version"),
                   "path": str(spec.bundle), "sha256": _sha256(spec.bundle)},
        "data": {"source": spec.data_source, "labels": spec.labels is not None, "samples": _samples(spec, opts)},
        "settings": {"variants": variants, "runs": opts.runs, "warmup": opts.warmup, "threads": threads,
                     "batch": 1, "interleaved": True},
        "device_profile": profile_to_dict(device) if device is not None else None,
        "flops": flops,
        "environments": envs,
    }


def _samples(spec: BenchInput, opts: BenchOptions) -> int:
    n = len(next(iter(spec.inputs.values())))
    return min(n, opts.samples) if opts.samples else n


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
