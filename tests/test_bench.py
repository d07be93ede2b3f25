"""``edgepack bench``: host runs through the device runtime, reports, compare, profiles, FLOPs, ssh, emulator."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench_app():
    """The real ``edgepack`` app if it registers ``bench``, else one that does (same command code)."""
    import typer

    from edgepack.cli import bench_cmd
    from edgepack.cli.app import app

    if any(getattr(g, "name", None) == "bench" for g in app.registered_groups):
        return app
    local = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @local.callback()
    def _root() -> None:
        """edgepack (bench only)."""

    bench_cmd.register(local)
    return local


@pytest.fixture(scope="module")
def bench():
    from typer.testing import CliRunner

    runner = CliRunner()
    app = _bench_app()

    def invoke(*args):
        result = runner.invoke(app, ["bench", *[str(a) for a in args]], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


@pytest.fixture(scope="module")
def digits_project(tmp_path_factory):
    from typer.testing import CliRunner

    from edgepack.cli.app import app

    work = tmp_path_factory.mktemp("digits-bench")
    for name in ("model.onnx", "calib.npz", "val.npz", "edgepack.yaml"):
        shutil.copy(ROOT / "examples" / "digits" / name, work / name)
    runner = CliRunner()
    assert runner.invoke(app, ["keys", "generate", "--dir", str(work / "keys"), "--name", "digits"]).exit_code == 0
    result = runner.invoke(app, ["build", str(work / "edgepack.yaml"), "--json"])
    assert result.exit_code == 0, result.stderr
    return work, work / "dist" / "digits-1.0.0.epk"


@pytest.fixture(scope="module")
def host_result(digits_project, bench, tmp_path_factory):
    work, bundle = digits_project
    out = tmp_path_factory.mktemp("bench-report")
    code, stdout, stderr = bench(bundle, "--runs", 20, "--warmup", 2, "--report", out / "report",
                                 "--results-dir", out / "results", "--json")
    assert code == 0, stderr
    return json.loads(stdout), out


def test_host_bench_of_digits_runs_through_the_runtime_and_writes_reports(host_result, digits_project):
    result, out = host_result
    [env] = result["environments"]
    assert env["target"] == "host" and env["emulated"] is False and env["timing_note"] is None
    assert env["platform"]["edgepack_runtime"] and env["install_ms"] > 0  # installed by the runtime itself
    assert set(env["variants"]) == {"onnx-fp32", "onnx-int8"}
    for rec in env["variants"].values():
        assert rec["status"] == "ok"
        lat = rec["latency_ms"]
        assert lat["runs"] == 20 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert rec["throughput_per_s"] > 0 and rec["cold_start_ms"] > 0 and rec["peak_rss_mb"] > 10
        assert rec["accuracy"] >= 0.98 and rec["agreement"] >= 0.98
        assert rec["size_bytes"] > 0 and rec["flops"] == 675072  # counted from the graph
        assert rec["peak_percent"] is None  # no device profile: no peak to compare with
    assert result["settings"] == {"variants": ["onnx-fp32", "onnx-int8"], "runs": 20, "warmup": 2, "threads": 1,
                                  "batch": 1, "interleaved": True}

    report = out / "report"
    md = (report / "bench.md").read_text()
    assert "| environment | variant | p50 ms |" in md and "onnx-int8" in md and "EMULATED" not in md
    assert json.loads((report / "bench.json").read_text())["bundle"]["name"] == "digits"
    for png in ("latency.png", "accuracy_vs_latency.png"):
        data = (report / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000
    [log] = list((out / "results").glob("bench-*.jsonl"))
    line = json.loads(log.read_text().splitlines()[-1])
    assert line["machine"]["hostname"] and line["created"][:10] in log.name


def test_bench_of_a_project_with_a_device_profile_computes_percent_of_peak(digits_project, bench, tmp_path):
    work, _ = digits_project
    profile = (ROOT / "devices" / "x86-gateway.yaml").read_text()
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "this-host.yaml").write_text(profile.replace("id: x86-gateway", "id: this-host"))
    code, stdout, stderr = bench(work / "edgepack.yaml", "--device", "this-host", "--devices-dir", devices,
                                 "--variant", "fp32", "--runs", 5, "--warmup", 1, "--threads", 1, "--no-results", "--json")
    assert code == 0, stderr
    [env] = json.loads(stdout)["environments"]
    assert env["device"] == "this-host" and list(env["variants"]) == ["onnx-fp32"]
    rec = env["variants"]["onnx-fp32"]
    assert rec["peak_reference"] == "fp32_gflops" and 0 < rec["peak_percent"] < 100


def test_compare_flags_a_regression_and_passes_an_identical_run(host_result, bench, tmp_path):
    _, out = host_result
    a = out / "report" / "bench.json"
    code, stdout, _ = bench("compare", a, a)
    assert code == 0 and "0 regressions" in stdout

    worse = json.loads(a.read_text())
    rec = worse["environments"][0]["variants"]["onnx-int8"]
    rec["latency_ms"] = {k: v * 3 if k != "runs" else v for k, v in rec["latency_ms"].items()}
    rec["accuracy"] -= 0.05
    b = tmp_path / "b.json"
    b.write_text(json.dumps(worse))
    code, stdout, _ = bench("compare", a, b)
    assert code == 1
    flagged = [ln for ln in stdout.splitlines() if "REGRESSION" in ln]
    assert any("onnx-int8 | p50 ms" in ln for ln in flagged) and any("onnx-int8 | accuracy" in ln for ln in flagged)
    assert not any("onnx-fp32" in ln for ln in flagged)
    code, stdout, _ = bench("compare", a, b, "--json")
    assert code == 1 and {r["metric"] for r in json.loads(stdout)["regressions"]} >= {"p50 ms", "accuracy"}


def test_unknown_device_and_bad_profile_field_give_one_clear_error(digits_project, bench, tmp_path):
    _, bundle = digits_project
    code, _, stderr = bench(bundle, "--device", "rpi9", "--no-results")
    assert code == 2
    assert "error: Unknown device 'rpi9'. Did you mean 'rpi5'?" in stderr and "Traceback" not in stderr

    bad = tmp_path / "rpi4.yaml"
    bad.write_text((ROOT / "devices" / "rpi4.yaml").read_text().replace("  cores: 4", "  coers: 4"))
    code, _, stderr = bench(bundle, "--device", bad, "--no-results")
    assert code == 2
    assert "cpu.coers: unknown field; did you mean 'cores'?" in stderr and "Traceback" not in stderr

    code, _, stderr = bench(bundle, "--device", "x86-gateway", "--emulate", "--no-results")
    assert code == 2 and "--emulate runs aarch64" in stderr
    code, _, stderr = bench(bundle, "--variant", "fp16", "--no-results")
    assert code == 2 and "no variant 'fp16'" in stderr


def _small_model(batch="N", height=8, width=8) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "wd"),
        numpy_helper.from_array(rng.standard_normal((10, 256)).astype(np.float32), "wf"),
        numpy_helper.from_array(np.zeros(10, np.float32), "bf"),
        numpy_helper.from_array(rng.standard_normal((10, 3)).astype(np.float32), "wm"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),               # 4x8x8 out, 1*3*3 each
        helper.make_node("Conv", ["c1", "wd"], ["c2"], pads=[1, 1, 1, 1], group=4),     # depthwise: 4x8x8, 3*3 each
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["g"], transB=1),                   # 256 -> 10
        helper.make_node("MatMul", ["g", "wm"], ["y"]),                                  # 10 -> 3
    ]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, height, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_flops_of_a_known_small_model_are_exact(tmp_path):
    from edgepack.bench.flops import count_flops

    expected = {"Conv": 2 * (4 * 8 * 8 * 9) * 2, "Gemm": 2 * 256 * 10, "MatMul": 2 * 10 * 3}
    count = count_flops(_small_model())
    assert count.by_op == expected and count.total == sum(expected.values()) == 14396 and count.uncounted == []
    onnx.save(_small_model(batch=1), tmp_path / "m.onnx")
    assert count_flops(tmp_path / "m.onnx").total == 14396  # per sample, whatever the batch dim says
    assert count_flops(_small_model().SerializeToString()).int8 == 0
    # Free image size: given by the manifest's shape, or measured by running one sample.
    free = _small_model(height="H", width="W")
    assert count_flops(free, input_shapes={"x": [1, 1, 8, 8]}).total == 14396
    assert count_flops(free, feed={"x": np.zeros((1, 1, 8, 8), np.float32)}).total == 14396


FAKE_SSH = """#!/bin/sh
# Fake ssh: skips options, logs the destination, runs the remote command locally.
while [ $# -gt 0 ]; do case "$1" in -o) shift 2;; -*) shift;; *) break;; esac; done
echo "ssh $1" >> "$FAKE_REMOTE_LOG"
shift
exec sh -c "$*"
"""
FAKE_SCP = """#!/bin/sh
# Fake scp: strips user@host: from either side and copies locally.
rec=""
while [ $# -gt 0 ]; do case "$1" in -o) shift 2;; -r) rec=-r; shift;; -*) shift;; *) break;; esac; done
echo "scp $1 $2" >> "$FAKE_REMOTE_LOG"
exec cp $rec "${1#*@*:}" "${2#*@*:}"
"""


def test_ssh_bench_copies_runs_and_brings_results_back_with_a_fake_ssh(digits_project, bench, tmp_path, monkeypatch):
    """A PATH-injected fake ``ssh``/``scp`` runs the "remote" commands on this machine."""
    _, bundle = digits_project
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("scp", FAKE_SCP)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755 | stat.S_IXUSR)
    log = tmp_path / "remote.log"
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_REMOTE_LOG", str(log))
    code, stdout, stderr = bench(bundle, "--ssh", "pi@board", "--remote-python", sys.executable, "--runs", 5,
                                 "--warmup", 1, "--samples", 100, "--no-results", "--json")
    assert code == 0, stderr
    host, board = json.loads(stdout)["environments"]
    assert host["target"] == "host" and board["target"] == "ssh" and board["label"] == "ssh pi@board"
    assert "device_tree_model" in board["platform"] and "cpu_governor" in board["platform"]
    for rec in board["variants"].values():
        assert rec["status"] == "ok" and rec["samples"] == 100
        assert rec["vs_host"]["within_tolerance"] and rec["vs_host"]["top1_agreement"] == 1.0
        assert rec["cold_start_source"].startswith("device")
    calls = log.read_text().splitlines()
    assert any(c.startswith("scp /") and " pi@board:/tmp/edgepack-bench-remote-" in c for c in calls)  # runtime + bundle out
    assert any(c.startswith("scp pi@board:") and "out-onnx-int8.npz" in c for c in calls)              # results back
    assert sum(c == "ssh pi@board" for c in calls) >= 4  # install, latency, 2 x cold (+ cleanup)
    assert not list(Path("/tmp").glob("edgepack-bench-remote-*"))  # cleaned up on the "board"


@pytest.mark.slow
def test_emulated_aarch64_bench_matches_the_host_and_labels_its_timings(digits_project, bench, tmp_path):
    """setup-emulator (cached in ~/.cache across runs), then bench --emulate digits."""
    import time

    from edgepack.bench.emulator import default_root

    _, bundle = digits_project
    root = Path(os.environ.get("EDGEPACK_EMULATOR_DIR") or default_root())
    if not (root / "sysroot" / ".edgepack-emulator.json").is_file() and os.geteuid() != 0 and shutil.which("sudo") is None:
        pytest.skip("setup-emulator needs root or sudo (debootstrap, apt-get) and the emulator is not set up yet")
    start = time.monotonic()
    code, stdout, stderr = bench("setup-emulator", "--dir", root, "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    assert info["guest"]["machine"] == "aarch64" and info["guest"]["onnxruntime"]
    print(f"setup-emulator: {time.monotonic() - start:.1f}s (cached: {info['cached']})")

    code, stdout, stderr = bench(bundle, "--emulate", "--emulator-dir", root, "--runs", 5, "--warmup", 1,
                                 "--samples", 150, "--report", tmp_path / "report", "--no-results", "--json")
    assert code == 0, stderr
    host, emu = json.loads(stdout)["environments"]
    assert emu["target"] == "emulated" and emu["emulated"] is True and emu["device"] == "qemu-aarch64"
    assert emu["platform"]["machine"] == "aarch64" and host["platform"]["machine"] != "aarch64"
    assert "NOT device timings" in emu["timing_note"]
    for vid, rec in emu["variants"].items():
        assert rec["status"] == "ok", rec
        assert rec["vs_host"]["within_tolerance"], (vid, rec["vs_host"])
        assert rec["vs_host"]["top1_agreement"] >= 0.99
        assert rec["accuracy"] >= 0.97 and rec["peak_percent"] is None
    md = (tmp_path / "report" / "bench.md").read_text()
    assert "(emulated)" in md and "EMULATED timings" in md and "NOT device timings" in md
    # qemu's default "max" CPU has dot product; host and guest outputs are compared across classes.
    assert emu["arith_class"] == "aarch64-dotprod" and "arithmetic class aarch64-dotprod" in md
    assert all(rec["vs_host"]["classes"] == [host["arith_class"], "aarch64-dotprod"] for rec in emu["variants"].values())
    assert (tmp_path / "report" / "latency.png").read_bytes()[:8] == PNG_MAGIC
