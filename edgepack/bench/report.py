"""Bench reports: JSON, a Markdown table, PNG charts; the results log; ``compare``.

Emulated environments are labelled everywhere their timings appear: a ``*`` on the
timing cells and a note under the table, hatched bars marked "(emulated)" in the charts.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..errors import InputError, OutputError

__all__ = ["append_results", "compare", "compare_markdown", "load_result", "markdown_table", "write_report"]


def _fmt(value, spec: str = ".3g", none: str = "n/a") -> str:
    if value is None:
        return none
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _rows(result: dict):
    for env in result.get("environments", []):
        for vid, rec in env.get("variants", {}).items():
            yield env, vid, rec


def _env_name(env: dict) -> str:
    name = env.get("label") or env.get("target")
    if env.get("device"):
        name += f" [{env['device']}]"
    if env.get("emulated"):
        name += " (emulated)"
    return name


def markdown_table(result: dict) -> str:
    bundle = result.get("bundle", {})
    settings = result.get("settings", {})
    lines = [
        f"### edgepack bench: {bundle.get('name')} {bundle.get('version')}",
        "",
        f"{result.get('created')} on {result.get('machine', {}).get('hostname')}; batch 1, "
        f"{settings.get('warmup')} warm-up + {settings.get('runs')} runs per variant, interleaved, "
        f"{settings.get('threads')} thread(s); accuracy on {result.get('data', {}).get('samples')} samples "
        f"({result.get('data', {}).get('source')}).",
        "",
        "| environment | variant | p50 ms | p90 ms | p99 ms | inf/s | cold start ms | peak RSS MB | size KB | MFLOPs | % peak | accuracy | agreement | vs host |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    emulated_seen = False
    for env, vid, rec in _rows(result):
        mark = "*" if env.get("emulated") else ""
        emulated_seen = emulated_seen or bool(mark)
        if rec.get("status") != "ok":
            lines.append(f"| {_env_name(env)} | {vid} | skipped: {rec.get('reason', '')} |" + " |" * 11)
            continue
        lat = rec["latency_ms"]
        vs = rec.get("vs_host")
        vs_text = "—" if vs is None else (
            (f"OK (max {vs['max_abs_diff']:.2g} within the {_fmt(vs.get('tolerance'), '.2g')} tolerance" if vs["within_tolerance"]
             else f"MISMATCH (max {vs['max_abs_diff']:.2g} exceeds the {_fmt(vs.get('tolerance'), '.2g')} tolerance")
            + (f", top-1 {vs['top1_agreement']:.1%}" if vs.get("top1_agreement") is not None else "") + ")")
        size = rec.get("size_bytes")
        lines.append(
            f"| {_env_name(env)} | {vid} | {lat['p50']:.3f}{mark} | {lat['p90']:.3f}{mark} | {lat['p99']:.3f}{mark} "
            f"| {_fmt(rec.get('throughput_per_s'), '.0f')}{mark} | {_fmt(rec.get('cold_start_ms'), '.0f')}{mark} "
            f"| {_fmt(rec.get('peak_rss_mb'), '.1f')}{mark} | {_fmt(size / 1024 if size else None, '.1f')} "
            f"| {_fmt(rec['flops'] / 1e6 if rec.get('flops') else None, '.3f')} "
            f"| {_fmt(rec.get('peak_percent'), '.2f')} "
            f"| {_fmt(rec.get('accuracy'), '.4f')} | {_fmt(rec.get('agreement'), '.4f')} | {vs_text} |")
    lines.append("")
    if emulated_seen:
        lines.append("\\* EMULATED timings (qemu-user on the host) are NOT device timings; "
                     "the emulated rows show op coverage and numeric agreement on aarch64 only. "
                     "Peak RSS there includes the emulator.")
    lines.append("MFLOPs: 2 × multiply-accumulates of Conv/Gemm/MatMul per sample, counted from the graph; "
                 "% peak uses the device profile's fp32_gflops (int8_gops for int8), n/a without a real-device profile.")
    for env in result.get("environments", []):
        plat = env.get("platform", {})
        extra = []
        if plat.get("device_tree_model"):
            extra.append(f"model {plat['device_tree_model']}")
        if plat.get("cpu_governor"):
            extra.append(f"governor {plat['cpu_governor']}")
        if env.get("device_note"):
            extra.append(env["device_note"])
        if env.get("arith_class"):
            certified = [vid for vid, rec in (env.get("variants") or {}).items() if rec.get("certified_for_class")]
            uncertified = [vid for vid, rec in (env.get("variants") or {}).items() if rec.get("certified_for_class") is False]
            extra.append(f"arithmetic class {env['arith_class']}"
                         + (f", certified here: {', '.join(certified)}" if certified else "")
                         + (f", NOT certified here (a device of this class would not serve them): {', '.join(uncertified)}"
                            if uncertified else ""))
        lines.append(f"- {_env_name(env)}: {plat.get('machine')}, Python {plat.get('python')}, "
                     f"onnxruntime {plat.get('onnxruntime')}, numpy {plat.get('numpy')}"
                     + (f"; {'; '.join(extra)}" if extra else ""))
    return "\n".join(lines) + "\n"


def _charts(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(env, vid, rec) for env, vid, rec in _rows(result) if rec.get("status") == "ok"]
    envs = list(dict.fromkeys(_env_name(e) for e, _, _ in rows))
    variants = list(dict.fromkeys(v for _, v, _ in rows))
    written = []

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(variants) * max(1, len(envs))), 4))
    width = 0.8 / max(1, len(envs))
    for i, name in enumerate(envs):
        xs, ys, lo, hi = [], [], [], []
        emulated = name.endswith("(emulated)")
        for j, v in enumerate(variants):
            rec = next((r for e, vid, r in rows if vid == v and _env_name(e) == name), None)
            if rec is None:
                continue
            lat = rec["latency_ms"]
            xs.append(j + i * width)
            ys.append(lat["p50"])
            lo.append(0)
            hi.append(max(0.0, lat["p90"] - lat["p50"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], label=name, hatch="//" if emulated else None, capsize=3)
    ax.set_xticks([j + width * (len(envs) - 1) / 2 for j in range(len(variants))])
    ax.set_xticklabels(variants)
    ax.set_ylabel("latency p50 ms (bar to p90), batch 1")
    ax.set_yscale("log")
    ax.set_title(f"{result['bundle']['name']}: latency per variant × device")
    ax.legend(fontsize="small")
    if any(e.get("emulated") for e, _, _ in rows):
        fig.text(0.01, 0.01, "Emulated timings are NOT device timings.", fontsize=7)
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for env, vid, rec in rows:
        acc = rec.get("accuracy") if rec.get("accuracy") is not None else rec.get("agreement")
        if acc is None:
            continue
        marker = "x" if env.get("emulated") else "o"
        ax.scatter([rec["latency_ms"]["p50"]], [acc], marker=marker, s=50, label=f"{vid} @ {_env_name(env)}")
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("latency p50 ms (log)")
    ax.set_ylabel("accuracy (agreement if no labels)")
    ax.set_title(f"{result['bundle']['name']}: accuracy vs latency")
    if any(e.get("emulated") for e, _, _ in rows):
        fig.text(0.01, 0.01, "x = emulated: its latency is NOT a device timing.", fontsize=7)
    fig.tight_layout()
    path = out / "accuracy_vs_latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def write_report(result: dict, out: Path) -> dict:
    """Write ``bench.json``, ``bench.md`` and the PNG charts into ``out``; returns the paths."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=float) + "\n")
        (out / "bench.md").write_text(markdown_table(result))
    except OSError as exc:
        raise OutputError(f"Cannot write the report to {out}: {exc}") from None
    try:
        charts = _charts(result, out)
    except ImportError:
        raise InputError("matplotlib is needed for the PNG charts; pip install matplotlib (or pass --no-charts).") from None
    return {"json": str(out / "bench.json"), "markdown": str(out / "bench.md"), "charts": [str(p) for p in charts]}


def append_results(result: dict, results_dir: Path) -> Path:
    """Append the result as one JSON line to ``results_dir/bench-<host>-<date>.jsonl``."""
    results_dir = Path(results_dir)
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", result.get("machine", {}).get("hostname") or "unknown")
    day = (result.get("created") or time.strftime("%Y-%m-%d"))[:10]
    path = results_dir / f"bench-{host}-{day}.jsonl"
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(result, sort_keys=True, default=float) + "\n")
    except OSError as exc:
        raise OutputError(f"Cannot append to {path}: {exc}") from None
    return path


def load_result(path: Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"Cannot read bench result {path}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        try:
            data = json.loads(lines[-1]) if lines else None  # a results .jsonl: its last run
        except ValueError:
            data = None
    if not isinstance(data, dict) or "environments" not in data:
        raise InputError(f"{path} is not an edgepack bench result (bench.json or a results .jsonl).")
    return data


# Higher is worse for these (relative threshold); accuracy uses an absolute drop.
_METRICS = (("p50 ms", ("latency_ms", "p50")), ("p90 ms", ("latency_ms", "p90")), ("p99 ms", ("latency_ms", "p99")),
            ("cold start ms", ("cold_start_ms",)), ("peak RSS MB", ("peak_rss_mb",)), ("size bytes", ("size_bytes",)))


def _get(rec: dict, keys: tuple):
    for k in keys:
        if not isinstance(rec, dict):
            return None
        rec = rec.get(k)
    return rec


def compare(a: dict, b: dict, threshold: float = 0.10, accuracy_drop: float = 0.005, tail_threshold: float | None = None) -> dict:
    """Compare run B against baseline A, per (environment, variant).

    A timing is a regression when B is more than ``threshold`` (fraction) slower
    (``tail_threshold`` for p90/p99, default twice ``threshold``); accuracy when it drops
    by more than ``accuracy_drop``; size when it grows at all.
    """
    tail = tail_threshold if tail_threshold is not None else 2 * threshold
    base = {(e.get("target"), e.get("device"), v): (e, r) for e, v, r in _rows(a)}
    rows, regressions = [], []
    for env, vid, rec in _rows(b):
        key = (env.get("target"), env.get("device"), vid)
        if key not in base or rec.get("status") != "ok" or base[key][1].get("status") != "ok":
            continue
        old = base[key][1]
        for name, keys in _METRICS:
            x, y = _get(old, keys), _get(rec, keys)
            if x is None or y is None:
                continue
            limit = 0.0 if name == "size bytes" else (tail if name in ("p90 ms", "p99 ms") else threshold)
            change = (y - x) / x if x else 0.0
            bad = y > x * (1 + limit) if x else False
            row = {"environment": _env_name(env), "variant": vid, "metric": name, "baseline": x, "new": y,
                   "change": change, "regression": bad, "emulated": bool(env.get("emulated"))}
            rows.append(row)
            if bad:
                regressions.append(row)
        for name in ("accuracy", "agreement"):
            x, y = old.get(name), rec.get(name)
            if x is None or y is None:
                continue
            bad = (x - y) > accuracy_drop
            row = {"environment": _env_name(env), "variant": vid, "metric": name, "baseline": x, "new": y,
                   "change": y - x, "regression": bad, "emulated": bool(env.get("emulated"))}
            rows.append(row)
            if bad:
                regressions.append(row)
        vs = rec.get("vs_host")
        if vs is not None and not vs.get("within_tolerance", True):
            row = {"environment": _env_name(env), "variant": vid, "metric": "outputs vs host", "baseline": None,
                   "new": vs.get("max_abs_diff"), "change": None, "regression": True, "emulated": bool(env.get("emulated"))}
            rows.append(row)
            regressions.append(row)
    return {"baseline": a.get("created"), "new": b.get("created"), "threshold": threshold,
            "accuracy_drop": accuracy_drop, "rows": rows, "regressions": regressions, "compared": len(rows)}


def compare_markdown(diff: dict) -> str:
    lines = ["| environment | variant | metric | baseline | new | change | |", "|---|---|---|---:|---:|---:|---|"]
    for r in diff["rows"]:
        change = r["change"]
        if change is None:
            ctext = "—"
        elif r["metric"] in ("accuracy", "agreement"):
            ctext = f"{change:+.4f}"
        else:
            ctext = f"{change:+.1%}"
        flag = "REGRESSION" if r["regression"] else ""
        if r["emulated"] and r["metric"].endswith("ms"):
            flag += " (emulated timing)"
        lines.append(f"| {r['environment']} | {r['variant']} | {r['metric']} | {_fmt(r['baseline'], '.4g')} | "
                     f"{_fmt(r['new'], '.4g')} | {ctext} | {flag.strip()} |")
    n = len(diff["regressions"])
    lines.append("")
    lines.append(f"{n} regression{'s' if n != 1 else ''} in {diff['compared']} comparisons "
                 f"(timings: > {diff['threshold']:.0%} slower; accuracy: drop > {diff['accuracy_drop']}).")
    return "\n".join(lines) + "\n"
