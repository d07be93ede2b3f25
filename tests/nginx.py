"""A real nginx in front of real API servers, configured from deploy/nginx/edgepack.conf.

:func:`running_nginx` rewrites only what a test machine needs (user, listen port,
upstream servers, blob directory, pid/log/temp paths inside ``workdir``) in the example
production config, so the file operators copy is the file the tests exercise. Each
rewrite must match, so a renamed directive in the example fails loudly here instead of
silently testing something else.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from net import ROOT, free_port

TEMPLATE = ROOT / "deploy" / "nginx" / "edgepack.conf"
_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def nginx_binary() -> str:
    """Path of nginx; skips the test without it unless ``EDGEPACK_REQUIRE_NGINX=1`` (then fails)."""
    found = shutil.which("nginx") or next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)
    if found:
        return found
    if os.environ.get("EDGEPACK_REQUIRE_NGINX") == "1":
        pytest.fail("nginx is not installed but EDGEPACK_REQUIRE_NGINX=1: install it (apt-get install nginx) "
                    "or unset the variable to skip the nginx tests.")
    pytest.skip("nginx is not installed (set EDGEPACK_REQUIRE_NGINX=1 to make this a failure)")


def _set(conf: str, directive: str, value: str, count: int = 1) -> str:
    """Replace the argument(s) of every ``directive ...;`` line; exactly ``count`` must exist."""
    pattern = re.compile(rf"^(\s*){re.escape(directive)}\s[^;]*;", re.MULTILINE)
    found = len(pattern.findall(conf))
    if found != count:
        raise AssertionError(f"{TEMPLATE} has {found} '{directive}' directives, the test rewrite expects {count}; "
                             "update tests/nginx.py together with the example config.")
    return pattern.sub(lambda m: f"{m.group(1)}{directive} {value};", conf)


def render_config(workdir: Path, blob_dir: Path, upstream_ports: list[int], port: int, template: str | None = None) -> str:
    """The example config with test paths and ports (see the module docstring)."""
    if not upstream_ports:
        raise ValueError("running nginx needs at least one upstream API port")
    conf = TEMPLATE.read_text(encoding="utf-8") if template is None else template
    workdir = Path(workdir).resolve()
    conf = _set(conf, "user", "root")  # pytest's tmp dirs belong to root: the workers must read them
    conf = _set(conf, "worker_processes", "1")
    conf = _set(conf, "pid", str(workdir / "nginx.pid"))
    conf = _set(conf, "error_log", f"{workdir / 'error.log'} info")
    conf = _set(conf, "access_log", str(workdir / "access.log"))
    conf = _set(conf, "listen", f"127.0.0.1:{port}")
    conf = _set(conf, "alias", str(Path(blob_dir).resolve()) + "/")
    servers = re.compile(r"^(\s*)server\s+[^\s;{]+:\d+[^;]*;\n", re.MULTILINE)
    matches = list(servers.finditer(conf))
    if not matches:
        raise AssertionError(f"{TEMPLATE} has no upstream 'server host:port' lines; update tests/nginx.py.")
    indent = matches[0].group(1)
    replacement = "".join(f"{indent}server 127.0.0.1:{p} max_fails=0;\n" for p in upstream_ports)
    conf = conf[:matches[0].start()] + replacement + servers.sub("", conf[matches[0].end():])
    temp = workdir / "temp"
    paths = "".join(f"    {name}_temp_path {temp / name};\n" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf, n = re.subn(r"^http\s*\{\n", lambda m: m.group(0) + paths, conf, count=1, flags=re.MULTILINE)
    if n != 1:
        raise AssertionError(f"{TEMPLATE} has no 'http {{' block; update tests/nginx.py.")
    return conf


@contextlib.contextmanager
def running_nginx(workdir: Path, blob_dir: Path, upstream_ports: list[int], port: int | None = None) -> Iterator[str]:
    """A real nginx on a free 127.0.0.1 port, proxying to ``upstream_ports``; yields its base URL.

    Args:
        workdir: Holds the rendered ``nginx.conf``, pid, ``error.log``, ``access.log`` and temp files.
        blob_dir: The server's blob directory, served under ``/blobs/``.
        upstream_ports: API replicas on 127.0.0.1 (``running_server`` ports).
        port: Listen port; default a free one. Pass one chosen with ``free_port()`` when the
            servers must know nginx's URL before it starts (``EDGEPACK_SERVER_DOWNLOAD_BASE_URL``).

    Yields:
        ``http://127.0.0.1:PORT`` (no trailing slash); blobs are at ``{base}/blobs``.

    Waits (10 s at most) until nginx answers, and always stops it.
    """
    binary = nginx_binary()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "temp" / name).mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(render_config(workdir, blob_dir, upstream_ports, port), encoding="utf-8")
    stderr = workdir / "nginx.stderr"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen([binary, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf),
                                 "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=err)
    base = f"http://127.0.0.1:{port}"

    def logs() -> str:
        parts = [p.read_text(errors="replace") for p in (stderr, workdir / "error.log") if p.exists()]
        return "\n".join(parts)[-4000:]

    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited at start (status {proc.returncode}):\n{logs()}")
            try:
                # Any HTTP answer (even a 403 for an unsigned blob) means nginx is serving.
                urllib.request.urlopen(f"{base}/blobs/", timeout=0.5).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx did not answer on {base} within 10 s:\n{logs()}")
            time.sleep(0.05)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # fast shutdown of master and workers
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
