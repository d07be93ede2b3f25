"""The deployment recipes in deploy/ really install and start a working server.

Container builds are not available here, so the Dockerfile's instructions are executed
outside a container: absolute image paths are mapped into a temporary directory, a fresh
virtualenv stands in for the image's Python, and the CMD must bring up a server that
answers /healthz. The systemd units' command lines are run with ``--help`` against the
installed CLI (and checked with ``systemd-analyze verify`` when it is installed).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SYSTEMD = ROOT / "deploy" / "systemd"
EDGEPACK = Path(sys.executable).parent / "edgepack"

# Commands that only make sense in a real image (they need root and change the host's
# /etc/passwd); everything else in a RUN is executed.
_IMAGE_ONLY = {"useradd", "adduser", "groupadd", "addgroup", "chown"}


# ------------------------------------------------------------------ Dockerfile


@dataclass
class Image:
    """What the Dockerfile does, as data."""

    base: str = ""
    env: dict[str, str] = field(default_factory=dict)
    steps: list[tuple[str, object, str]] = field(default_factory=list)  # (kind, payload, workdir)
    user: str = "root"
    expose: list[int] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    workdir: str = "/"


def _logical_lines(text: str) -> list[str]:
    """Instructions with comment lines dropped and backslash continuations joined (as Docker does)."""
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.strip().startswith("#") or (not raw.strip() and current):
            continue  # Docker drops comment and empty lines, also inside a continuation
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            lines.append(current.strip())
        current = ""
    assert not current.strip(), f"{DOCKERFILE} ends inside a line continuation: {current!r}"
    return lines


def _exec_or_shell(args: str) -> list[str]:
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"bad exec form: {args}"
        return value
    return ["/bin/sh", "-c", args]


def parse_dockerfile(text: str) -> Image:
    image = Image()
    for line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            image.base = args
        elif keyword == "ENV":
            words = shlex.split(args)
            if words and "=" not in words[0]:  # legacy form: ENV KEY VALUE...
                image.env[words[0]] = args[len(words[0]):].strip()
            else:
                for word in words:
                    key, sep, value = word.partition("=")
                    assert sep, f"ENV item {word!r} is not KEY=VALUE"
                    image.env[key] = value
        elif keyword == "WORKDIR":
            image.workdir = os.path.normpath(os.path.join(image.workdir, args))
            image.steps.append(("workdir", image.workdir, image.workdir))
        elif keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]  # --chown=: see _IMAGE_ONLY
            assert len(words) >= 2, f"{keyword} needs a source and a destination: {line}"
            image.steps.append(("copy", (words[:-1], words[-1]), image.workdir))
        elif keyword == "RUN":
            image.steps.append(("run", _exec_or_shell(args), image.workdir))
        elif keyword == "USER":
            image.user = args
        elif keyword == "EXPOSE":
            image.expose += [int(p.split("/")[0]) for p in args.split()]
        elif keyword == "CMD":
            image.cmd = _exec_or_shell(args)
        elif keyword == "ENTRYPOINT":
            image.entrypoint = _exec_or_shell(args)
        elif keyword in ("LABEL", "ARG", "STOPSIGNAL", "HEALTHCHECK", "VOLUME", "SHELL", "ONBUILD", "MAINTAINER"):
            pytest.fail(f"{DOCKERFILE} uses {keyword}, which this test does not emulate; teach the test or keep the Dockerfile plain.")
        else:
            pytest.fail(f"unknown Dockerfile instruction {keyword!r} in: {line}")
    return image


class Rootfs:
    """Maps the image's absolute paths into a directory on this machine."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prefixes: set[str] = set()

    def path(self, image_path: str) -> Path:
        self.prefixes.add(image_path.rstrip("/") or "/")
        return self.root / image_path.lstrip("/")

    def rewrite(self, text: str) -> str:
        """Replace image paths the Dockerfile created (WORKDIR, COPY, ENV) in a command line."""
        for prefix in sorted(self.prefixes - {"/"}, key=len, reverse=True):
            text = re.sub(r"(?<![\w./-])" + re.escape(prefix) + r"(?=$|[/\s'\":;])", str(self.path(prefix)), text)
        return text


def _copy(sources: list[str], dest: str, workdir: str, fs: Rootfs) -> None:
    target = fs.path(dest if dest.startswith("/") else os.path.join(workdir, dest))
    as_dir = dest.endswith("/") or len(sources) > 1
    for source in sources:
        src = ROOT / source
        assert src.exists(), f"COPY source {source} does not exist in the build context {ROOT}"
        if src.is_dir():  # Docker copies a directory's contents, not the directory itself
            shutil.copytree(src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
                "__pycache__", "*.egg-info", "build"))
        else:
            dst = target / src.name if as_dir else target
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def _without_image_only(script: str) -> tuple[str, list[str]]:
    """Drop user/ownership commands from a ``a && b && c`` script; return it and the users it creates."""
    kept, users = [], []
    for part in script.split("&&"):
        words = shlex.split(part)
        if words and words[0] in _IMAGE_ONLY:
            if words[0] in ("useradd", "adduser"):
                users.append(words[-1])
            continue
        kept.append(part.strip())
    return " && ".join(kept) or "true", users


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_dockerfile_commands_install_and_start_a_working_server(tmp_path, cli):
    image = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    assert image.base.startswith("python:"), f"the test stands in a venv for the base image, but FROM is {image.base!r}"
    assert image.user not in ("root", "0"), "the server must not run as root in the container: add USER"

    # The container is only reachable through its published port when the server listens on
    # every interface, and on the port the image EXPOSEs.
    command = " ".join(image.entrypoint + image.cmd)
    host = re.search(r"--host\s+(\S+)", command)
    assert (host.group(1) if host else image.env.get("EDGEPACK_SERVER_HOST")) == "0.0.0.0", \
        "the server in the image must listen on 0.0.0.0 (EDGEPACK_SERVER_HOST or --host)"
    port = re.search(r"--port\s+(\d+)", command)
    listen_port = int(port.group(1)) if port else int(image.env.get("EDGEPACK_SERVER_PORT", 8400))
    assert listen_port in image.expose, f"the server listens on {listen_port} but the image EXPOSEs {image.expose}"

    fs = Rootfs(tmp_path / "rootfs")
    for value in image.env.values():
        if value.startswith("/"):
            fs.path(value)
    # The image's python: a fresh venv first on PATH, so `pip`/`python`/`edgepack` resolve to it.
    venv = tmp_path / "image-python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    base_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    base_env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")

    created_users: list[str] = []
    for kind, payload, workdir in image.steps:
        if kind == "workdir":
            fs.path(payload).mkdir(parents=True, exist_ok=True)
        elif kind == "copy":
            _copy(*payload, workdir, fs)
        else:
            argv = list(payload)
            if argv[:2] == ["/bin/sh", "-c"]:
                script, users = _without_image_only(argv[2])
                created_users += users
                # --no-cache-dir keeps the image small; here pip's cache keeps the test fast.
                script = re.sub(r"\s--no-cache-dir\b", "", script)
                argv = ["bash", "-c", fs.rewrite(script)]
            env = dict(base_env, **{k: fs.rewrite(v) for k, v in image.env.items()})
            run = subprocess.run(argv, check=False, cwd=fs.path(workdir), env=env, capture_output=True, text=True, timeout=240)
            assert run.returncode == 0, f"RUN {payload} failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert image.user in created_users, f"USER {image.user} is never created by a RUN (useradd), so the container cannot start"
    assert (venv / "bin" / "edgepack").exists(), "the RUN steps did not install the edgepack command"

    # `docker run -e ...`: what the operator supplies (a publisher key; here also a free port
    # and a throw-away SQLite database).
    code, _, err = cli("keys", "generate", "--dir", tmp_path / "keys", "--name", "publisher")
    assert code == 0, err
    listen_port = _free_port()
    db = tmp_path / "db" / "edgepack.db"
    db.parent.mkdir()
    env = dict(base_env, **{k: fs.rewrite(v) for k, v in image.env.items()})
    env.update(EDGEPACK_SERVER_PORT=str(listen_port), EDGEPACK_SERVER_TRUSTED_KEYS=str(tmp_path / "keys" / "publisher.pub"),
               EDGEPACK_SERVER_DB_URL=f"sqlite:///{db}")
    argv = [fs.rewrite(a) for a in image.entrypoint + image.cmd]
    argv = [re.sub(r"--port\s+\d+", f"--port {listen_port}", a) for a in argv]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=fs.path(image.workdir), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{listen_port}/healthz", timeout=2) as resp:
                    health = json.loads(resp.read())
                break
            except OSError:
                time.sleep(0.3)
        assert health is not None, f"CMD {argv} did not answer /healthz (exit {proc.poll()}):\n{log.read_text()[-4000:]}"
    finally:
        _stop(proc)

    from edgepack.server.storage.migrations import MIGRATIONS

    assert health == {"ok": True, "schema_version": MIGRATIONS[-1].version}
    output = log.read_text()
    # CMD migrates before serving: the first thing it says is what `edgepack server migrate` applied.
    assert output.lstrip().startswith("Applied migrations"), f"CMD did not run `edgepack server migrate` first:\n{output[:2000]}"
    assert db.exists(), "the server ignored EDGEPACK_SERVER_DB_URL"
    data_dir = fs.path(image.env["EDGEPACK_SERVER_DATA"])
    assert (data_dir / "admin.token").exists(), f"the server did not use EDGEPACK_SERVER_DATA={image.env['EDGEPACK_SERVER_DATA']}"


# ------------------------------------------------------------------ systemd


def _unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values (systemd allows a key several times)."""
    values: dict[str, list[str]] = {}
    section = ""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


def _exec_argv(line: str, instance: str) -> list[str]:
    line = line.lstrip("-@:+!")  # systemd's exec prefixes (ignore failure, privileges, ...)
    return shlex.split(line.replace("%i", instance).replace("%I", instance))


UNITS = sorted(SYSTEMD.glob("*.service"))


def test_systemd_units_exist():
    names = {u.name for u in UNITS}
    assert {"edgepack-server.service", "edgepack-server@.service"} <= names, names


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_commands_are_real_edgepack_server_commands(unit):
    values = _unit(unit)
    instance = "8401" if unit.name.endswith("@.service") else ""
    starts = values.get("Service.ExecStart", [])
    pres = values.get("Service.ExecStartPre", [])
    assert len(starts) == 1, f"{unit.name}: want exactly one ExecStart, got {starts}"
    commands = [_exec_argv(c, instance) for c in pres + starts]
    assert _exec_argv(starts[0], instance)[1:3] == ["server", "run"], f"{unit.name}: ExecStart must run `edgepack server run`"
    assert any(c[1:3] == ["server", "migrate"] for c in commands[:-1]), f"{unit.name}: no ExecStartPre runs `edgepack server migrate`"
    for argv in commands:
        assert argv[0].startswith("/") and Path(argv[0]).name == "edgepack", f"{unit.name}: systemd needs an absolute path to edgepack: {argv}"
        # Unknown subcommands or options fail even with --help (click parses before helping).
        run = subprocess.run([str(EDGEPACK), *argv[1:], "--help"], check=False, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "Usage" in run.stdout, f"{unit.name}: {' '.join(argv)} is not a valid edgepack command:\n{run.stdout}{run.stderr}"

    assert values.get("Service.EnvironmentFile") == ["/etc/edgepack/server.env"], f"{unit.name}: EnvironmentFile"
    assert values.get("Service.User", ["root"])[0] not in ("root", "0"), f"{unit.name}: the server must not run as root"
    assert values.get("Service.Restart") == ["on-failure"], f"{unit.name}: Restart=on-failure"
    assert values.get("Service.ProtectSystem") == ["strict"], f"{unit.name}: ProtectSystem=strict"
    # Under ProtectSystem=strict everything is read-only except ReadWritePaths: the server's data
    # directory (default ./edgepack-server-data, relative to WorkingDirectory) must be inside one,
    # or the first write of the database fails at start.
    workdir = values["Service.WorkingDirectory"][0]
    writable = [w for v in values.get("Service.ReadWritePaths", []) for w in v.split()]
    assert any(workdir == w or workdir.startswith(w.rstrip("/") + "/") for w in writable), \
        f"{unit.name}: WorkingDirectory {workdir} is not under ReadWritePaths {writable}"


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_units_pass_systemd_analyze_verify(unit, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that the ExecStart binary exists: point it at the edgepack installed here.
    text = unit.read_text(encoding="utf-8")
    text = re.sub(r"(Exec\w+=[-@:+!]*)/\S*/edgepack(?=\s)", rf"\g<1>{EDGEPACK}", text)
    copy = tmp_path / unit.name
    copy.write_text(text, encoding="utf-8")
    target = tmp_path / unit.name.replace("@.", "@8401.")
    run = subprocess.run(["systemd-analyze", "verify", str(target)], check=False, capture_output=True, text=True, timeout=60)
    # Unknown keys and unparsable values are only warnings (exit 0): any line about our unit fails.
    ours = [line for line in (run.stdout + run.stderr).splitlines() if unit.name.split("@")[0] in line]
    assert run.returncode == 0 and not ours, f"systemd-analyze verify {unit.name}:\n{run.stdout}{run.stderr}"
