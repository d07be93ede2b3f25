"""Terminal rendering of an optimize report (the JSON form is ``OptimizeReport.to_dict``)."""

from __future__ import annotations

from .pipeline import OptimizeReport


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.2f}%"


def _verdict_line(v: dict) -> str:
    """``accuracy drop 0.44 pt, 95% interval [-0.6, 1.6] pt (b=2, c=0, McNemar p=0.5) vs ≤ 1.00 pt: undecided, need ~1,188``."""
    low, high = v["interval"]
    conf = f"{v['confidence'] * 100:.0f}%"
    if v["gate"] == "accuracy_drop":
        text = (f"accuracy drop {v['estimate'] * 100:.2f} pt, {conf} interval [{low * 100:.1f}, {high * 100:.1f}] pt "
                f"(b={v['counts']['b']} fp32-only right, c={v['counts']['c']} candidate-only right, McNemar p={v['p_value']:.3g}; "
                f"{v['samples']} samples) vs ≤ {v['threshold'] * 100:.2f} pt")
    else:
        what = "agreement" if not v.get("output") else f"agreement of output {v['output']!r}"
        text = (f"{what} {v['estimate'] * 100:.2f}%, {conf} interval [{low * 100:.1f}, {high * 100:.1f}]% "
                f"({v['counts']['flipped']} of {v['samples']} flipped) vs ≥ {v['threshold'] * 100:.2f}%")
    verdict = v["verdict"]
    if verdict == "undecided":
        need = f"need ~{v['samples_needed']:,} samples" if v["samples_needed"] else "no sample count decides it"
        return f"{text}: [yellow]undecided, {need}[/yellow]"
    return f"{text}: {'[green]pass[/green]' if verdict == 'pass' else '[red]fail[/red]'}"


def render(report: OptimizeReport) -> None:
    """Print the comparison table, decisions and warnings with rich."""
    from rich.console import Console
    from rich.table import Table

    import sys

    # Piped output (CI logs, `| tee`) gets a wide table instead of rich's 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    data = report.to_dict()
    table = Table(title=f"edgepack optimize — {report.model}", title_justify="left")
    for column in ("variant", "size", "smaller", "median ms", "p95 ms", "speed", "accuracy", "agree", "max abs err", "cosine", "result"):
        table.add_column(column, justify="left" if column in ("variant", "result") else "right")
    orig = data["original"]
    ref_acc = next((c["numerics"]["reference_accuracy"] for c in data["candidates"] if c["numerics"]), None)
    lat = orig["latency"]
    table.add_row(
        "original fp32", _size(orig["size_bytes"]), "1.00×",
        f"{lat['median_ms']:.3f}" if lat else "–", f"{lat['p95_ms']:.3f}" if lat else "–", "1.00×",
        _pct(ref_acc), "–", "–", "–", "[green]chosen (kept)[/green]" if data.get("kept_original") else "reference",
    )
    for c in data["candidates"]:
        n = c["numerics"] or {}
        lat = c["latency"]
        speed = c["speedup"]
        speed_text = "–" if speed is None else (f"[red]{speed:.2f}×[/red]" if speed < 0.9 else f"{speed:.2f}×")
        status = {"chosen": "[green]chosen[/green]", "passed": "[green]passed[/green]"}.get(c["status"], f"[red]{c['status']}[/red]")
        table.add_row(
            "graph-optimized fp32" if c["mode"] == "none" else c["mode"],
            _size(c["size_bytes"]) if c["size_bytes"] else "–",
            f"{c['size_ratio']:.2f}×" if c["size_ratio"] else "–",
            f"{lat['median_ms']:.3f}" if lat else "–",
            f"{lat['p95_ms']:.3f}" if lat else "–",
            speed_text,
            _pct(n.get("accuracy")),
            _pct(n.get("agreement")),
            f"{n['max_abs_error']:.3g}" if n else "–",
            f"{n['cosine']:.5f}" if n else "–",
            status,
        )
    console.print(table)
    target = data.get("target")
    if target:
        console.print(f"Target {target['device']} ({target['class']}; this host is {target['host_class']}):")
        for c in data["candidates"]:
            t = c.get("target") or {}
            n = t.get("numerics") or {}
            name = "graph-optimized fp32" if c["mode"] == "none" else c["mode"]
            console.print(f"  {name:<28} accuracy {_pct(n.get('accuracy'))}  agree {_pct(n.get('agreement'))}  "
                          f"max abs err {n['max_abs_error']:.3g}  measured {t.get('how')}" if n else
                          f"  {name:<28} not measured under {target['class']}")
    for c in data["candidates"]:
        task = (c["numerics"] or {}).get("task")
        name = "graph-optimized fp32" if c["mode"] == "none" else c["mode"]
        if task:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in task["metrics"].items())
            console.print(f"  {name:<28} {task['kind']} on {task['samples']} samples: {shown}")
    ev = data["evaluation"]
    console.print(f"Measured on {ev['samples']} samples of {ev['kind']} data ({ev['source']}); gate: {data['gate']}; threads: {data['threads']}.")
    graph = data["graph"]
    if graph:
        removed = ", ".join(f"{op} −{n}" for op, n in sorted(graph["ops_removed"].items())) or "nothing removed"
        state = (f" [yellow](not applied: {graph['note']})[/yellow]" if not graph["applied"]
                 else f" [yellow]({graph['note']})[/yellow]" if graph["note"] else "")
        console.print(f"Graph: {graph['nodes_before']} → {graph['nodes_after']} nodes ({removed}){state}.")
    for c in data["candidates"]:
        for v in c.get("gate_verdicts") or []:
            console.print(f"  {c['mode']}: {_verdict_line(v)}")
        if c["reason"]:
            console.print(f"  {c['mode']}: {c['reason']}")
    if data.get("kept_original"):
        console.print(f"[yellow]Kept the original:[/yellow] {data['kept_original']}.")
    for warning in data["warnings"]:
        console.print(f"[bold yellow]WARNING:[/bold yellow] {warning}")
    if report.output:
        console.print(f"[green]Wrote {report.output}[/green] ({report.chosen}).")
