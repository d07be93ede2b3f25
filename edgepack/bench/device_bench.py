"""Device-side benchmark: needs only the Python standard library, numpy and edgepack_runtime.

The SAME file runs on the host, inside the emulated aarch64 sysroot and on a board
over ssh; the host-side runner copies it next to a copy of the runtime and starts it
once per mode. It never starts subprocesses itself (qemu-user cannot run a foreign
binary it would exec), so every mode is one process:

``install``  verify, unpack and self-test the bundle into the cache (on the device).
``latency``  load every requested variant through ``edgepack_runtime.open`` with fixed
             threads, warm each up, then time ``Model.predict`` on one sample, the
             variants interleaved (order rotated each round).
``cold``     one variant: process start → first prediction, then the whole validation
             set (outputs saved for numeric comparison, accuracy if labels) and the
             process's peak RSS.
``info``     the platform: machine, /proc/device-tree/model, CPU governor, versions.

Every mode prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

T_SCRIPT = time.time()


def _process_start_wall():
    """Wall time this process started (from /proc/self/stat), or None."""
    try:
        with open("/proc/self/stat") as fh:
            stat = fh.read()
        start_ticks = float(stat.rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 600:
            return T_SCRIPT - age
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read().replace(b"\x00", b"").decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def platform_info():
    info = {
        "machine": platform.machine(),
        "system": platform.system(),
        "release": platform.release(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "device_tree_model": _read("/proc/device-tree/model"),
        "cpu_governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "cpu_max_khz": _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"),
    }
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:
        info["numpy"] = None
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    try:
        import edgepack_runtime

        info["edgepack_runtime"] = edgepack_runtime.__version__
    except ImportError:
        info["edgepack_runtime"] = None
    return info


def _peak_rss_mb():
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):
        return None


def _load_data(path):
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        inputs = {k[len("input:"):]: data[k] for k in data.files if k.startswith("input:")}
        labels = data["labels"] if "labels" in data.files else None
        batch = int(data["batch"]) if "batch" in data.files else 64
    return inputs, labels, batch


def _slice(inputs, start, stop):
    if len(inputs) == 1:
        return next(iter(inputs.values()))[start:stop]
    return {k: v[start:stop] for k, v in inputs.items()}


def _open(cache, variant, threads):
    import edgepack_runtime

    model = edgepack_runtime.open(cache, threads=threads, prefer=[variant])
    if model.variant.get("id") != variant:
        raise SystemExit(json.dumps({"error": f"variant {variant} cannot run here (the runtime chose "
                                              f"{model.variant.get('id')}; is its engine installed?)"}))
    return model


def mode_install(args):
    import edgepack_runtime
    from edgepack_runtime.bundle import load_public_key
    from edgepack_runtime.cache import CacheConfig

    key = load_public_key(args.key)
    os.makedirs(os.path.join(args.cache, "keys"), exist_ok=True)
    with open(args.key, "rb") as src, open(os.path.join(args.cache, "keys", "publisher.pub"), "wb") as dst:
        dst.write(src.read())
    t0 = time.perf_counter()
    config = edgepack_runtime.RuntimeConfig(CacheConfig(root=__import__("pathlib").Path(args.cache), trusted_keys=(key,)),
                                            threads=args.threads)
    slot = edgepack_runtime.install(args.bundle, config)
    return {"installed": slot.digest, "install_ms": (time.perf_counter() - t0) * 1e3}


def mode_latency(args):
    inputs, _labels, _batch = _load_data(args.data)
    sample = _slice(inputs, 0, 1)
    variants = args.variants.split(",")
    models = {}
    skipped = {}
    for v in variants:
        try:
            models[v] = _open(args.cache, v, args.threads)
        except SystemExit as exc:
            skipped[v] = json.loads(str(exc))["error"]
    for v, model in models.items():
        for _ in range(args.warmup):
            model.predict(sample)
    times = {v: [] for v in models}
    order = list(models)
    clock = time.perf_counter_ns
    for i in range(args.runs):
        shift = i % max(1, len(order))
        for v in order[shift:] + order[:shift]:
            predict = models[v].predict
            t0 = clock()
            predict(sample)
            times[v].append((clock() - t0) / 1e6)
    return {"latency_ms": times, "skipped": skipped, "threads": args.threads,
            "engines": {v: m.variant.get("engine") for v, m in models.items()}}


def mode_cold(args):
    import numpy as np

    start = _process_start_wall()
    inputs, labels, batch = _load_data(args.data)
    model = _open(args.cache, args.variant, args.threads)
    model.predict(_slice(inputs, 0, 1))
    first = time.time()
    n = len(next(iter(inputs.values())))
    chunks = []
    for s in range(0, n, batch):
        chunks.append(model.predict(_slice(inputs, s, min(n, s + batch))))
    outputs = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
    np.savez(args.out, **outputs)
    result = {
        "variant": args.variant,
        "engine": model.variant.get("engine"),
        "first_prediction_wall": first,
        "cold_start_ms_proc": (first - start) * 1e3 if start is not None else None,
        "script_to_first_ms": (first - T_SCRIPT) * 1e3,
        "peak_rss_mb": _peak_rss_mb(),
        "samples": n,
        "outputs": sorted(outputs),
    }
    if labels is not None and outputs:
        first_out = outputs[model.output_names[0]]
        if first_out.ndim == 2 and first_out.shape[0] == len(labels):
            result["accuracy"] = float((first_out.argmax(1) == labels).mean())
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("info", "install", "latency", "cold"))
    parser.add_argument("--cache")
    parser.add_argument("--bundle")
    parser.add_argument("--key")
    parser.add_argument("--data")
    parser.add_argument("--variant")
    parser.add_argument("--variants")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    handlers = {"info": lambda a: platform_info(), "install": mode_install, "latency": mode_latency, "cold": mode_cold}
    try:
        result = handlers[args.mode](args)
    except SystemExit as exc:
        if isinstance(exc.code, str) and exc.code.startswith("{"):
            print(exc.code)
            return 3
        raise
    except Exception as exc:  # noqa: BLE001 - reported to the host as JSON
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 3
    if args.mode != "info":
        result["platform"] = platform_info()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
