"""Build time with per-target evaluation against host-only evaluation, in one run.

    python benchmarks/bench_build_targets.py [--out benchmarks/results] [--skip-mobilenet]

For each model (the digits and photos examples, and MobileNetV2 with random weights from
examples/heavy fed raw uint8 frames) the project targets rpi4 (aarch64-neon), rpi5
(aarch64-dotprod) and x86-gateway (x86-avx2) with fp32 and int8, and is built twice,
alternating: once as ``edgepack build`` does (every int8 variant measured under every
target's class, under qemu-user where the host differs) and once host-only, the way builds
were measured before per-target evaluation (every target mapped to the host's class). The
ratio per-target / host-only is the cost of target-true accuracy on this host; a third build
reuses the stored emulated measurements of identical bytes and data (the edit loop, CI
reruns). The absolute seconds depend on the machine (shared, noisy) and are context only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, progress  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [{"device": d, "variants": ["fp32", "int8"]} for d in ("rpi4", "rpi5", "x86-gateway")]


def _example(directory: Path, name: str) -> Path:
    src = ROOT / "examples" / name
    for item in src.iterdir():
        if item.is_file() and item.suffix in (".onnx", ".npz", ".yaml", ".txt"):
            shutil.copy(item, directory / item.name)
    config = yaml.safe_load((directory / "edgepack.yaml").read_text())
    config["targets"] = TARGETS
    (directory / "edgepack.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory / "edgepack.yaml"


def _mobilenet(directory: Path) -> Path:
    sys.path.insert(0, str(ROOT / "examples" / "heavy"))
    import onnx
    from make_mobilenetv2 import build_mobilenetv2

    onnx.save(build_mobilenetv2(seed=0), str(directory / "model.onnx"))
    rng = np.random.default_rng(0)
    for name, count in (("calib", 32), ("val", 32)):
        # Smooth random frames as raw uint8 RGB (meaningless content; the gate is agreement).
        base = rng.integers(0, 256, size=(count, 8, 8, 3)).astype(np.float32)
        frames = np.repeat(np.repeat(base, 28, axis=1), 28, axis=2)
        np.savez(directory / f"{name}.npz", raw=frames.clip(0, 255).astype(np.uint8))
    config = {
        "name": "mobilenetv2", "version": "1.0.0", "description": "MobileNetV2 (random weights), raw uint8 RGB in.",
        "model": {"kind": "onnx", "path": "model.onnx"},
        "input": {"name": "image", "image": {"color": "rgb", "model_color": "rgb", "min_size": [224, 224], "max_size": [224, 224],
                                             "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                             "layout": "NCHW"}},
        "output": {"softmax": True},
        "data": {"calibration": {"path": "calib.npz", "key": "raw"}, "validation": {"path": "val.npz", "key": "raw"},
                 "golden_vectors": 2},
        "targets": TARGETS,
        "quantization": {"per_channel": True, "calibration_method": "minmax"},
        "gates": {"min_agreement": 0.0},  # random weights: the timing is the point, not the verdict
        "signing": {"key": "keys/m.key"}, "output_dir": "dist",
    }
    (directory / "edgepack.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory / "edgepack.yaml"


def _keys(project: Path) -> None:
    from edgepack.bundle.keys import generate_keypair

    config = yaml.safe_load(project.read_text())
    key = Path(config["signing"]["key"])
    (project.parent / key.parent).mkdir(parents=True, exist_ok=True)
    generate_keypair(project.parent / key.parent, key.stem)


def _build(project: Path, host_only: bool, cache: Path | None = None) -> tuple[float, dict]:
    from edgepack.arith import MeasureConfig, host_class
    from edgepack.build import build, pipeline

    original = pipeline._target_classes
    if host_only:
        pipeline._target_classes = lambda p: {t.device: host_class() for t in p.targets}
    try:
        t0 = time.perf_counter()
        result = build(project, measure_config=MeasureConfig(cache_dir=cache))
        return time.perf_counter() - t0, result.report
    finally:
        pipeline._target_classes = original


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-mobilenet", action="store_true")
    args = parser.parse_args(argv)
    from edgepack.arith import host_class

    rows = []
    makers = {"digits": lambda d: _example(d, "digits"), "photos": lambda d: _example(d, "photos")}
    if not args.skip_mobilenet:
        makers["mobilenetv2"] = _mobilenet
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        for name, make in makers.items():
            directory = Path(tmp) / name
            directory.mkdir()
            project = make(directory)
            _keys(project)
            times = {"per_target": [], "host_only": [], "per_target_reused": []}
            how = {}
            store = Path(tmp) / f"{name}-store"
            _build(project, False, store)  # fills the store of emulated measurements for the "reused" rows
            for r in range(args.rounds):
                modes = ("host_only", "per_target", "per_target_reused")
                for mode in (modes if r % 2 == 0 else modes[::-1]):
                    progress(f"{name}: build {mode} (round {r + 1})")
                    seconds, report = _build(project, mode == "host_only", store if mode == "per_target_reused" else None)
                    times[mode].append(seconds)
                    if mode == "per_target":
                        how = {d: {v: t["variants"][v]["status"] for v in t["variants"]} for d, t in report["targets"].items()}
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"model": name, "per_target_s": med["per_target"], "host_only_s": med["host_only"],
                         "per_target_reused_s": med["per_target_reused"],
                         "ratio": med["per_target"] / med["host_only"],
                         "ratio_reused": med["per_target_reused"] / med["host_only"], "runs": times, "verdicts": how})
    stamp = time.strftime("%Y-%m-%dT%H%MZ", time.gmtime())
    doc = {"benchmark": "build time, per-target evaluation vs host-only", "when": stamp, "cpu": cpu_model(),
           "host_class": host_class(), "targets": [t["device"] for t in TARGETS], "rows": rows}
    lines = [f"# Build time: per-target evaluation vs host-only ({stamp})", "",
             f"Host: {cpu_model()} ({host_class()}), 2 shared cores; targets rpi4, rpi5, x86-gateway with fp32 + int8; "
             f"median of {args.rounds} alternating builds each.", "",
             "| model | host-only s | per-target s | ratio | per-target, measurements reused s | ratio | int8 verdicts per target |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        verdicts = ", ".join(f"{d}: {v.get('int8')}" for d, v in r["verdicts"].items())
        lines.append(f"| {r['model']} | {r['host_only_s']:.1f} | {r['per_target_s']:.1f} | {r['ratio']:.2f}x "
                     f"| {r['per_target_reused_s']:.1f} | {r['ratio_reused']:.2f}x | {verdicts} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"build-targets-vm-{stamp}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / f"build-targets-vm-{stamp}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
