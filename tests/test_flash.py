"""``edgepack flash BUNDLE TARGET``: into a mounted SD card (a directory) and over ssh.

The command is driven through ``typer.testing.CliRunner`` on a small local Typer app
that only registers ``flash_cmd`` (the real ``edgepack.cli.app`` is not needed).

The ssh path cannot reach a real device here, so fake ``ssh`` and ``scp`` executables
are put first on PATH. They implement the real command-line interface (options,
``-p``/``-P`` port, ``user@host`` destination, the remote command joined with spaces
and run by the remote shell) but run everything LOCALLY: ``ssh`` runs the command
with ``sh -c`` on this machine, ``scp`` copies into the local path named after
``user@host:``. They log each invocation so tests can check the options used.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import typer
from typer.testing import CliRunner

import bundles
from edgepack.cli import flash_cmd
from edgepack.errors import InputError
from edgepack.flash import SshTarget, parse_ssh_url

RAW = np.array([[0, 255, 10, 20], [3, 1, 4, 1]], np.uint8)

FAKE_SSH = r'''#!{python}
"""FAKE ssh for tests: the real interface, but the "remote" command runs locally via sh -c."""
import json, os, subprocess, sys
args = sys.argv[1:]
options, port, i = [], "22", 0
while i < len(args):
    a = args[i]
    if a == "--":
        i += 1
        break
    if a in ("-o", "-p", "-i", "-l", "-F", "-J"):
        if a == "-o":
            options.append(args[i + 1])
        if a == "-p":
            port = args[i + 1]
        i += 2
        continue
    if a.startswith("-"):
        i += 1
        continue
    break
destination, command = args[i], " ".join(args[i + 1:])
with open(os.environ["FAKE_SSH_LOG"], "a") as log:
    log.write(json.dumps({{"tool": "ssh", "options": options, "port": port, "destination": destination, "command": command}}) + "\n")
host = destination.rpartition("@")[2]
if host.endswith(".unreachable"):
    sys.stderr.write(f"ssh: connect to host {{host}} port {{port}}: Connection timed out\n")
    sys.exit(255)
sys.exit(subprocess.run(["sh", "-c", command]).returncode)
'''

FAKE_SCP = r'''#!{python}
"""FAKE scp for tests: the real interface, but user@host:PATH is a path on this machine."""
import json, os, shutil, sys
args = sys.argv[1:]
options, port, i = [], "22", 0
while i < len(args):
    a = args[i]
    if a == "--":
        i += 1
        break
    if a in ("-o", "-P", "-i", "-F", "-J", "-l", "-c", "-S"):
        if a == "-o":
            options.append(args[i + 1])
        if a == "-P":
            port = args[i + 1]
        i += 2
        continue
    if a.startswith("-"):
        i += 1
        continue
    break
*sources, destination = args[i:]
with open(os.environ["FAKE_SSH_LOG"], "a") as log:
    log.write(json.dumps({{"tool": "scp", "options": options, "port": port, "sources": sources, "destination": destination}}) + "\n")
remote = destination.partition("@")[2]
path = remote.partition("]:")[2] if remote.startswith("[") else remote.partition(":")[2]
for source in sources:
    target = os.path.join(path, os.path.basename(source)) if path.endswith("/") or os.path.isdir(path) else path
    try:
        shutil.copyfile(source, target)
    except OSError as exc:
        sys.stderr.write(f"scp: {{target}}: {{exc.strerror}}\n")
        sys.exit(1)
'''


@pytest.fixture(scope="module")
def pub_and_bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flash")
    priv, pub = bundles.keys(tmp)
    m1, m2 = bundles.raw_classifier(scale=1.0), bundles.raw_classifier(scale=3.0)
    b1, b2 = bundles.make_bundle(tmp, priv, "1.0.0", m1), bundles.make_bundle(tmp, priv, "2.0.0", m2)
    failing = bundles.make_bundle(tmp, priv, "3.0.0", bundles.raw_classifier(seed=0), golden_model=bundles.raw_classifier(seed=9))
    expected = {}
    for version, model in (("1.0.0", m1), ("2.0.0", m2)):
        expected[version] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"raw": RAW})[0]
    (tmp / "other").mkdir()
    other_priv, other_pub = bundles.keys(tmp / "other")
    return {"pub": pub, "v1": b1, "v2": b2, "failing": failing, "expected": expected, "other_pub": other_pub,
            "foreign": bundles.make_bundle(tmp / "other", other_priv, "1.0.0", m1)}


@pytest.fixture
def flash_cli():
    app = typer.Typer()
    flash_cmd.register(app)

    @app.callback()
    def _root() -> None:  # keeps `flash` a subcommand, as in the real app
        pass

    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(app, ["flash", *map(str, args)], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


@pytest.fixture
def sd_card(tmp_path) -> Path:
    """A directory standing for a mounted SD card's root filesystem."""
    root = tmp_path / "sd"
    for d in ("etc", "usr/bin", "var/lib"):
        (root / d).mkdir(parents=True)
    (root / "etc" / "hostname").write_text("sensor-7\n")
    return root


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _device_start(cache: Path, cwd: Path) -> dict:
    """What the device does at boot: the runtime alone, keys from the cache, in a fresh process."""
    snippet = (
        "import json, numpy as np, edgepack_runtime\n"
        f"model = edgepack_runtime.open({str(cache)!r})\n"
        f"out = model.predict(np.asarray({RAW.tolist()!r}, np.uint8))\n"
        "print(json.dumps({'version': model.version, 'scores': out['scores'].tolist()}))\n"
    )
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert done.returncode == 0, done.stderr
    verified = subprocess.run([sys.executable, "-m", "edgepack_runtime.cli", "verify", "--cache", str(cache), "--json"],
                              capture_output=True, text=True, cwd=cwd, timeout=120)
    assert verified.returncode == 0, verified.stderr
    result = json.loads(done.stdout)
    assert json.loads(verified.stdout)["version"] == result["version"]
    return result


def _one_line_error(code, out, err, expected_code=2) -> str:
    assert code == expected_code, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------- SD card


def test_flashed_sd_card_boots_the_model_offline(flash_cli, sd_card, pub_and_bundles, tmp_path):
    w = pub_and_bundles
    code, out, err = flash_cli(w["v1"], sd_card, "--key", w["pub"], "--json")
    assert code == 0, err
    result = json.loads(out)
    cache = sd_card / "var" / "lib" / "edgepack"
    assert result["transport"] == "directory" and result["version"] == "1.0.0" and result["cache"] == str(cache)
    assert (cache / "keys" / "test.pub").read_bytes() == w["pub"].read_bytes()  # pinned: verifies offline

    started = _device_start(cache, tmp_path)
    assert started["version"] == "1.0.0"
    np.testing.assert_allclose(np.asarray(started["scores"]), w["expected"]["1.0.0"], rtol=0, atol=1e-5)


def test_reflashing_a_card_switches_slots_and_keeps_the_old_model_for_rollback(flash_cli, sd_card, pub_and_bundles, tmp_path):
    w = pub_and_bundles
    assert flash_cli(w["v1"], sd_card, "--key", w["pub"])[0] == 0
    code, out, err = flash_cli(w["v2"], sd_card, "--key", w["pub"])
    assert code == 0, err
    assert "2.0.0" in out and "next start" in out
    status = json.loads((sd_card / "var/lib/edgepack/slots/current").read_text()), \
        json.loads((sd_card / "var/lib/edgepack/slots/previous").read_text())
    assert [s["version"] for s in status] == ["2.0.0", "1.0.0"]
    assert flash_cli(w["v2"], sd_card, "--key", w["pub"])[0] == 0  # idempotent
    older = flash_cli(w["v1"], sd_card, "--key", w["pub"])
    assert "older" in _one_line_error(*older)


@pytest.mark.parametrize("case", ["tampered", "unpinned-signer"])
def test_tampered_or_foreign_bundle_writes_nothing_to_the_card(flash_cli, sd_card, pub_and_bundles, tmp_path, case):
    w = pub_and_bundles
    if case == "tampered":
        bundle = tmp_path / "tampered.epk"
        data = bytearray(w["v1"].read_bytes())
        model_at = data.find(b"MatMul")  # inside the ONNX model member
        assert model_at > 0
        data[model_at] ^= 0x20
        bundle.write_bytes(bytes(data))
    else:
        bundle = w["foreign"]  # signed, but by a key that is not the one given
    before = _tree(sd_card)
    code, out, err = flash_cli(bundle, sd_card, "--key", w["pub"])
    _one_line_error(code, out, err, expected_code=1)
    assert _tree(sd_card) == before


def test_bundle_failing_its_self_test_leaves_the_card_as_it_was(flash_cli, sd_card, pub_and_bundles):
    w = pub_and_bundles
    before = _tree(sd_card)
    line = _one_line_error(*flash_cli(w["failing"], sd_card, "--key", w["pub"]))
    assert "self-test" in line
    assert _tree(sd_card) == before


def test_target_without_etc_is_refused_as_not_a_root_filesystem(flash_cli, tmp_path, pub_and_bundles):
    w = pub_and_bundles
    boot = tmp_path / "boot"  # e.g. the FAT boot partition, mounted by mistake
    boot.mkdir()
    (boot / "config.txt").write_text("arm_64bit=1\n")
    line = _one_line_error(*flash_cli(w["v1"], boot, "--key", w["pub"]))
    assert "no etc/" in line and "--force" in line
    assert sorted(p.name for p in boot.iterdir()) == ["config.txt"]
    code, out, err = flash_cli(w["v1"], boot, "--key", w["pub"], "--force")
    assert code == 0, err
    assert (boot / "var/lib/edgepack/slots/current").is_file()


def test_missing_target_directory_is_a_clear_error(flash_cli, tmp_path, pub_and_bundles):
    line = _one_line_error(*flash_cli(pub_and_bundles["v1"], tmp_path / "not-mounted", "--key", pub_and_bundles["pub"]))
    assert "does not exist" in line and "mount point" in line


def test_absolute_symlink_on_the_card_is_followed_inside_the_card_not_on_this_computer(flash_cli, sd_card, pub_and_bundles):
    w = pub_and_bundles
    (sd_card / "var" / "lib").rmdir()
    (sd_card / "var").rmdir()
    (sd_card / "data" / "var" / "lib").mkdir(parents=True)
    (sd_card / "var").symlink_to("/data/var")  # dangling here; points into the card on the device
    code, out, err = flash_cli(w["v1"], sd_card, "--key", w["pub"], "--json")
    assert code == 0, err
    assert json.loads(out)["cache"] == str(sd_card / "data/var/lib/edgepack")
    assert (sd_card / "data/var/lib/edgepack/slots/current").is_file()


def test_a_different_key_already_pinned_under_the_same_name_is_not_replaced(flash_cli, sd_card, pub_and_bundles):
    w = pub_and_bundles
    keys = sd_card / "var/lib/edgepack/keys"
    keys.mkdir(parents=True)
    (keys / "test.pub").write_bytes(w["other_pub"].read_bytes())
    before = _tree(sd_card)
    line = _one_line_error(*flash_cli(w["v1"], sd_card, "--key", w["pub"]))
    assert "already pins a different key" in line
    assert _tree(sd_card) == before


# ----------------------------------------------------------------------- ssh


@pytest.mark.parametrize("url,reason", [
    ("ssh://device.local", "user name is missing"),
    ("ssh://@device.local", "user name is missing"),
    ("ssh://pi@", "host is missing"),
    ("ssh://pi:secret@device.local", "password"),
    ("ssh://pi@device.local:0", "port"),
    ("ssh://pi@device.local:65536", "port"),
    ("ssh://pi@device.local:22x", "port"),
    ("ssh://pi@device.local:", "port"),
    ("ssh://pi@device.local/var/lib", "path"),
    ("ssh://pi@device.local?x=1", "query"),
    ("ssh://-oProxyCommand=touch@device.local", "user name"),
    ("ssh://pi@-oProxyCommand=x", "host"),
    ("ssh://pi@dev ice", "host"),
    ("ssh://pi@[::g]", "IPv6"),
    ("sftp://pi@device.local", "ssh://"),
    ("ssh:pi@device.local", "ssh://"),
])
def test_bad_ssh_url_is_a_clear_error_before_any_connection(flash_cli, fake_ssh, pub_and_bundles, url, reason):
    line = _one_line_error(*flash_cli(pub_and_bundles["v1"], url, "--key", pub_and_bundles["pub"]))
    assert reason in line and "ssh://user@host[:port]" in line, line
    assert not fake_ssh["log"].exists()  # refused before running ssh


def test_scp_style_target_hints_at_the_ssh_url_form(flash_cli, fake_ssh, pub_and_bundles):
    line = _one_line_error(*flash_cli(pub_and_bundles["v1"], "pi@device.local:/var/lib", "--key", pub_and_bundles["pub"]))
    assert "ssh://user@host[:port]" in line
    assert not fake_ssh["log"].exists()


@pytest.mark.parametrize("url,expected", [
    ("ssh://pi@raspberrypi.local", SshTarget("pi", "raspberrypi.local", 22)),
    ("ssh://root@10.0.0.7:2222", SshTarget("root", "10.0.0.7", 2222)),
    ("ssh://edge_user@[fe80::1]:22/", SshTarget("edge_user", "fe80::1", 22)),
])
def test_good_ssh_urls_parse(url, expected):
    assert parse_ssh_url(url) == expected


def test_bad_ssh_url_raises_an_input_error_from_the_library():
    with pytest.raises(InputError, match=r"port"):
        parse_ssh_url("ssh://pi@host:99999")


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    """Fake ssh/scp first on PATH (see module docstring), and a device-side edgepack-runtime."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("scp", FAKE_SCP)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
    # The device's runtime: this interpreter's edgepack_runtime, whatever PATH holds.
    (bin_dir / "edgepack-runtime").write_text(f'#!/bin/sh\nexec {sys.executable} -m edgepack_runtime.cli "$@"\n')
    for exe in bin_dir.iterdir():
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    remote_tmp = tmp_path / "device-tmp"
    remote_tmp.mkdir()
    log = tmp_path / "ssh-log.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    monkeypatch.setenv("TMPDIR", str(remote_tmp))  # the device's $TMPDIR, read by the remote mktemp
    return {"log": log, "remote_tmp": remote_tmp, "cache": tmp_path / "device" / "var" / "lib" / "edgepack"}


def _remote_leftovers(fake_ssh) -> list:
    return sorted(p.name for p in fake_ssh["remote_tmp"].glob("edgepack-flash.*"))


def _calls(fake_ssh) -> list:
    return [json.loads(line) for line in fake_ssh["log"].read_text().splitlines()]


def test_flash_over_ssh_installs_through_the_devices_own_runtime(flash_cli, fake_ssh, pub_and_bundles, tmp_path):
    w = pub_and_bundles
    cache = fake_ssh["cache"]
    code, out, err = flash_cli(w["v2"], "ssh://pi@sensor-7.local:2222", "--key", w["pub"], "--cache-path", cache, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result == {"target": "ssh://pi@sensor-7.local:2222", "transport": "ssh", "cache": str(cache), "name": "toy",
                      "version": "2.0.0", "digest": result["digest"], "keys_pinned": ["test.pub"]}
    calls = _calls(fake_ssh)
    assert [c["tool"] for c in calls] == ["ssh", "scp", "ssh"]
    for c in calls:
        assert "BatchMode=yes" in c["options"] and any(o.startswith("ConnectTimeout=") for o in c["options"])
        assert c["port"] == "2222"
    assert calls[0]["destination"] == calls[2]["destination"] == "pi@sensor-7.local"
    assert calls[1]["destination"].startswith(f"pi@sensor-7.local:{fake_ssh['remote_tmp']}/edgepack-flash.")
    assert "edgepack-runtime install" in calls[2]["command"]
    assert _remote_leftovers(fake_ssh) == []  # the device's temp copy was removed

    started = _device_start(cache, tmp_path)
    assert started["version"] == "2.0.0" and result["digest"]
    np.testing.assert_allclose(np.asarray(started["scores"]), w["expected"]["2.0.0"], rtol=0, atol=1e-5)


def test_flash_over_ssh_of_a_bundle_failing_self_test_leaves_the_device_as_it_was(flash_cli, fake_ssh, pub_and_bundles):
    w = pub_and_bundles
    cache = fake_ssh["cache"]
    line = _one_line_error(*flash_cli(w["failing"], "ssh://pi@sensor-7.local", "--key", w["pub"], "--cache-path", cache))
    assert "refused the bundle" in line and "self-test" in line
    assert not (cache / "keys").exists() and not (cache / "slots" / "current").exists()
    assert _remote_leftovers(fake_ssh) == []


def test_flash_over_ssh_refuses_a_tampered_bundle_before_connecting(flash_cli, fake_ssh, pub_and_bundles):
    w = pub_and_bundles
    _one_line_error(*flash_cli(w["foreign"], "ssh://pi@sensor-7.local", "--key", w["pub"]), expected_code=1)
    assert not fake_ssh["log"].exists()


def test_unreachable_device_over_ssh_is_a_clear_error(flash_cli, fake_ssh, pub_and_bundles):
    w = pub_and_bundles
    line = _one_line_error(*flash_cli(w["v1"], "ssh://pi@sensor-9.unreachable", "--key", w["pub"]))
    assert "Cannot reach ssh://pi@sensor-9.unreachable" in line and "Connection timed out" in line and "BatchMode" in line
