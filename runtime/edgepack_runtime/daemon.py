"""``edgepack-runtime serve``: the local inference daemon (standard library + numpy).

One thread accepts on each listener (a Unix socket, default ``CACHE/edgepack.sock``,
mode 0660, and optionally HTTP on a loopback TCP port); every connection gets its own
thread and speaks HTTP/1.1 with keep-alive. The request path is hand-rolled on raw
sockets (one ``recv`` for a small request, one ``sendall`` per response, no
per-request logging, pre-built response pieces) because the stdlib
``BaseHTTPRequestHandler`` spends more time parsing headers than a small model
spends running.

Endpoints::

    POST /predict   JSON {"inputs": {NAME: array}} (or {NAME: array}; a single-input
                    model also takes {"raw": array}; an image input also takes a list of
                    [H, W, C] images of different sizes, run one by one, outputs concatenated
                    in order), or an application/x-npy body for single-input models.
                    Answers JSON {"outputs", "model", "id"}, or the first output as .npy
                    with ``Accept: application/x-npy``.
    POST /labels    JSON {"id": PREDICTION_ID, "label": VALUE} for logged predictions.
    GET  /healthz   200 while the process runs.
    GET  /readyz    200 when a verified model is loaded, else 503 and the reason.
    GET  /info      model, manifest summary, runtime and engine versions, reload state.
    GET  /metrics   Prometheus text format.

Bad input is a 400 ``{"error": {"field", "reason"}}`` and never reaches the model.
SIGTERM/SIGINT: stop accepting, let in-flight requests finish (bounded), exit 0.
SIGHUP: reload the model from the cache and swap it in atomically; a failed reload
keeps the old model serving and is reported in /info and /metrics.

Fleet updates (``--ota-server URL --device-id ID --token-file F [--ota-interval S]``):
the OTA client (:mod:`.ota.client`) runs in a background thread of this process. Every
/predict that reaches the model is recorded in its :class:`~.ota.probation.ProbationMonitor`
(latency of the model run, engine errors, non-finite outputs: one short lock, O(1)),
which is what probation judges and what check-ins report as ``health``. When the
client switches the cache (install, self-test, rollback) it asks the daemon to load
the model through the same path as SIGHUP (synchronously, so probation only ever
measures the new model), and the daemon answers with the model it now serves.

Monitoring (:mod:`.monitor`): every served bundle gets a :class:`~.monitor.Monitor` fed by
/predict (inputs against the bundle's reference bins, classes, confidence, latency,
engine errors, validation rejects); the OTA client sends ``{"window": summary}`` in each
check-in, with the labels posted to /labels (removed once a check-in carrying them was
answered). ``--shadow CANDIDATE.epk`` verifies the candidate against the pinned keys,
extracts it to ``CACHE/shadow/<digest>`` (never a cache slot), self-tests it, and runs it
on ``--shadow-sample`` of live requests in a background thread (bounded queue, dropped
when full); its agreement and latency are the summary's ``shadow``. /info shows the
current window (without resetting it).

Settings not on the command line come from the environment (read only in
:func:`main_from_args`): ``EDGEPACK_HTTP_ANY=1`` (allow a non-loopback --http host),
``EDGEPACK_MAX_BODY_MB`` (request body cap, default 8), ``EDGEPACK_MAX_CONNECTIONS``
(default 128), ``EDGEPACK_DRAIN_SECONDS`` (default 10), ``EDGEPACK_IDLE_SECONDS``
(keep-alive/read timeout, default 60), ``EDGEPACK_ACCESS_LOG=1`` (one stderr line per
request; off by default).
"""

from __future__ import annotations

import errno
import io
import ipaddress
import itertools
import json
import math
import os
import platform
import queue
import random
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from . import __version__
from .engines import ENGINES, available_engines
from .errors import EdgepackError
from .metrics import Metrics, input_edges
from .model import Model, RuntimeConfig, load
from .monitor import LabelQueue, Shadow, load_candidate, monitor_for
from .predlog import PredictionLog, UnknownPrediction
from .validate import ImageListFeed, InputValidationError, run_image_list

MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
MAX_LABEL_BYTES = 64 * 1024
ENDPOINTS = ("/predict", "/labels", "/healthz", "/readyz", "/info", "/metrics", "/stream")

_JSON = b"application/json"
_NPY = b"application/x-npy"
_PROM = b"text/plain; version=0.0.4; charset=utf-8"
_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 429: "Too Many Requests",
    500: "Internal Server Error", 503: "Service Unavailable",
}
_STATUS = {code: f"HTTP/1.1 {code} {text}\r\n".encode() for code, text in _REASONS.items()}
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False, check_circular=False).encode
_DECODE = json.JSONDecoder().decode
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date_cache: List[Any] = [0, b""]


def _log(message: str) -> None:
    print(f"edgepack-runtime: {message}", file=sys.stderr, flush=True)


def _date() -> bytes:
    """The Date header line, formatted once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        t = time.gmtime(now)
        _date_cache[1] = (f"Date: {_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon]} {t.tm_year} "
                          f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT\r\n").encode()
        _date_cache[0] = now
    return _date_cache[1]


def _response(code: int, body: bytes, close: bool, ctype: bytes = _JSON, extra: bytes = b"") -> bytes:
    return b"%sContent-Type: %s\r\nContent-Length: %d\r\n%s%s%s\r\n%s" % (
        _STATUS[code], ctype, len(body), _date(), extra, b"Connection: close\r\n" if close else b"", body)


def _error_body(field: Optional[str], reason: str) -> bytes:
    return json.dumps({"error": {"field": field, "reason": reason}}).encode()


def _header_value(value: Any) -> bytes:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in str(value)).encode()


def _finite(value: Any) -> Any:
    """JSON-safe copy of nested lists: NaN and infinities become null."""
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value


def _outputs_json(keys: List[str], outputs: List[Any]) -> bytes:
    """``{"name": nested lists, ...}`` as JSON bytes; ``keys`` are the JSON-quoted names.

    Numeric arrays take a fast path: Python's repr of a nested list of ints or floats
    is valid JSON unless a value is NaN or infinite, which is the only way an "n" can
    appear in it; anything else goes through the json module (NaN/inf become null).
    """
    parts = []
    for key, out in zip(keys, outputs):
        if isinstance(out, np.ndarray) and out.dtype.kind in "fiu":
            text = repr(out.tolist())
            if "n" not in text:
                parts.append(key + text)
                continue
        try:
            parts.append(key + _ENCODE(out.tolist() if isinstance(out, np.ndarray) else out))
        except (ValueError, TypeError):
            parts.append(key + _ENCODE(_finite(out)))
    return ("{" + ",".join(parts) + "}").encode()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def parse_npy(body: bytes) -> np.ndarray:
    """A .npy body as an array, checked against its own header before any allocation.

    Raises:
        InputValidationError: Not a .npy file, an object (pickle) array, or a data
            length that disagrees with the header.
    """
    fmt = np.lib.format
    stream = io.BytesIO(body)
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy format version {version} is not supported (use 1.0 or 2.0)")
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, EOFError...
        raise InputValidationError("body", f"is not a readable .npy array ({str(exc)[:200]})") from None
    if dtype.hasobject:
        raise InputValidationError("body", "is an object (pickled) .npy array; only plain numeric arrays are accepted")
    count = 1
    for dim in shape:
        count *= dim
    offset = stream.tell()
    if len(body) - offset != count * dtype.itemsize:
        raise InputValidationError("body", f"holds {len(body) - offset} bytes of array data, but its .npy header promises {count * dtype.itemsize} ({list(shape)} {dtype})")
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)


# ------------------------------------------------------------------ options


@dataclass(frozen=True)
class DaemonOptions:
    """How the daemon listens and what it keeps.

    Attributes:
        socket_path: Unix socket to listen on.
        http: Optional (host, port) for HTTP over TCP (port 0: any free port).
        http_any: Allow a non-loopback HTTP host (the API has no authentication).
        log_dir: Prediction log directory (None: no log, /labels answers 400).
        log_sample: Share of predictions written to the log.
        log_max_bytes: Prediction log size cap.
        max_body: Largest request body accepted.
        max_connections: Open connections beyond this get 503 (overload).
        drain_seconds: How long SIGTERM waits for in-flight requests.
        idle_seconds: Keep-alive idle and per-read timeout.
        access_log: One stderr line per request.
        ota: OTA client options (None: no fleet updates from this process).
    """

    socket_path: Path
    http: Optional[Tuple[str, int]] = None
    http_any: bool = False
    log_dir: Optional[Path] = None
    log_sample: float = 0.0
    log_max_bytes: int = 64 * 1024**2
    max_body: int = 8 * 1024**2
    max_connections: int = 128
    drain_seconds: float = 10.0
    idle_seconds: float = 60.0
    access_log: bool = False
    ota: Optional[Any] = None
    shadow: Optional[Path] = None
    shadow_sample: float = 0.25
    #: Streams (/stream sessions of a stateful model) open at once, and their idle expiry.
    max_streams: int = 64
    stream_idle_seconds: float = 300.0


def parse_http(value: str, allow_any: bool = False) -> Tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) → (host, port); loopback only unless ``allow_any``.

    Raises:
        EdgepackError: Malformed, or a non-loopback host without ``allow_any``.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise EdgepackError(f"--http wants HOST:PORT such as 127.0.0.1:8080 (got {value!r}).")
    host = host.strip("[]") or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise EdgepackError(f"--http needs an IP address such as 127.0.0.1 (got {host!r}).") from None
    if not loopback and not allow_any:
        raise EdgepackError(f"Refusing to serve HTTP on {host}: the inference API has no authentication, so it listens on loopback only. "
                            "Use 127.0.0.1:PORT, or set EDGEPACK_HTTP_ANY=1 to expose it on purpose (behind a firewall).")
    return host, int(port_text)


def _env_float(env: Mapping[str, str], name: str, default: float, low: float) -> float:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise EdgepackError(f"{name} must be a number (got {text!r}).") from None
    if not value >= low:
        raise EdgepackError(f"{name} must be at least {low} (got {text!r}).")
    return value


def options_from_args(args: Any, env: Mapping[str, str]) -> DaemonOptions:
    """DaemonOptions from the ``serve`` arguments plus the environment.

    Raises:
        EdgepackError: A setting is out of range.
    """
    http_any = bool(getattr(args, "http_any", False)) or env.get("EDGEPACK_HTTP_ANY", "") not in ("", "0", "false", "no")
    sample = float(getattr(args, "log_sample", 0.0) or 0.0)
    if not 0.0 <= sample <= 1.0:
        raise EdgepackError(f"--log-sample must be between 0 and 1 (got {sample}).")
    max_mb = float(getattr(args, "log_max_mb", 64.0) or 0.0)
    if not max_mb > 0:
        raise EdgepackError(f"--log-max-mb must be positive (got {max_mb}).")
    log_dir = getattr(args, "log_dir", None)
    cache = Path(getattr(args, "cache"))
    ota = ota_options_from_args(args)
    return DaemonOptions(
        socket_path=Path(args.socket) if getattr(args, "socket", None) else cache / "edgepack.sock",
        http=parse_http(args.http, http_any) if getattr(args, "http", None) else None,
        http_any=http_any,
        log_dir=Path(log_dir) if log_dir else None,
        log_sample=sample,
        log_max_bytes=int(max_mb * 1024 * 1024),
        max_body=int(_env_float(env, "EDGEPACK_MAX_BODY_MB", 8.0, 0.001) * 1024 * 1024),
        max_connections=int(_env_float(env, "EDGEPACK_MAX_CONNECTIONS", 128, 1)),
        drain_seconds=_env_float(env, "EDGEPACK_DRAIN_SECONDS", 10.0, 0.0),
        idle_seconds=_env_float(env, "EDGEPACK_IDLE_SECONDS", 60.0, 0.1),
        access_log=env.get("EDGEPACK_ACCESS_LOG", "") not in ("", "0", "false", "no"),
        ota=ota,
        shadow=Path(args.shadow) if getattr(args, "shadow", None) else None,
        shadow_sample=_shadow_sample(getattr(args, "shadow_sample", 0.25)),
        max_streams=int(_env_float(env, "EDGEPACK_MAX_STREAMS", 64, 1)),
        stream_idle_seconds=_env_float(env, "EDGEPACK_STREAM_IDLE_SECONDS", 300.0, 0.1),
    )


def _shadow_sample(value: Any) -> float:
    sample = float(0.25 if value is None else value)
    if not 0.0 < sample <= 1.0:
        raise EdgepackError(f"--shadow-sample must be in (0, 1] (got {sample}).")
    return sample


def ota_options_from_args(args: Any) -> Optional[Any]:
    """OtaOptions from ``--ota-server/--device-id/--token-file/--ota-interval`` (None without --ota-server).

    Raises:
        EdgepackError: A companion option is missing, the token file is unreadable or
            empty, or the interval is not positive.
    """
    server = getattr(args, "ota_server", None)
    device_id = getattr(args, "device_id", None)
    token_file = getattr(args, "token_file", None)
    if not server:
        if device_id or token_file:
            raise EdgepackError("--device-id and --token-file only make sense with --ota-server URL.")
        return None
    if not device_id or not token_file:
        raise EdgepackError("--ota-server needs --device-id ID and --token-file FILE (the token shown at provisioning).")
    interval = float(getattr(args, "ota_interval", 60.0) or 0.0)
    if not interval > 0:
        raise EdgepackError(f"--ota-interval must be positive (got {interval}).")
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise EdgepackError(f"Cannot read the device token from {token_file}: {exc.strerror or exc}.") from exc
    if not token:
        raise EdgepackError(f"The device token file {token_file} is empty.")
    from .ota.client import OtaOptions

    return OtaOptions(server=server, device_id=device_id, token=token, interval_s=interval)


# ------------------------------------------------------------- model state


class ModelState:
    """A loaded model plus everything the request path pre-computes for it. Immutable."""

    def __init__(self, model: Model, loaded_at: float) -> None:
        self.model = model
        self.loaded_at = loaded_at
        self.name = model.name
        self.version = model.version
        self.variant = model.variant.get("id")
        self.engine = model.variant.get("engine")
        specs = list(model.inputs)
        self.input_names: List[str] = [s["name"] for s in specs] or list(model.session.input_names)
        self.single_input: Optional[str] = self.input_names[0] if len(self.input_names) == 1 else None
        self.inputs_is_a_name = "inputs" in self.input_names
        self.output_names: List[str] = list(model.output_names)
        self.output_keys = [json.dumps(name) + ":" for name in self.output_names]
        self.validate = model.validate
        session = model.session
        if self.engine == "onnxruntime":
            self.run = session.run  # onnxruntime sessions are safe to run from many threads
        else:
            lock = threading.Lock()

            def run(feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
                with lock:
                    return session.run(feed)

            self.run = run
        self.ident = {"name": self.name, "version": self.version, "variant": self.variant}
        self.json_tail = (',"model":' + json.dumps(self.ident, separators=(",", ":")) + ',"id":"').encode()
        self.npy_headers = b"X-Model-Name: %s\r\nX-Model-Version: %s\r\nX-Model-Variant: %s\r\n" % (
            _header_value(self.name), _header_value(self.version), _header_value(self.variant))
        self.stat_inputs: List[Tuple[str, Optional[Tuple[float, ...]]]] = []
        for spec in specs:
            try:
                if np.dtype(spec.get("dtype")).kind in "iufb":
                    self.stat_inputs.append((spec["name"], input_edges(spec)))
            except TypeError:
                continue
        io_spec = model.manifest.get("io") or {}
        self._labels = {s.get("name"): s.get("labels") for s in (io_spec.get("outputs") or []) if isinstance(s, dict)}
        self._class_index: Any = "unset"
        self.window: Optional[Any] = None  # the monitor.Monitor of this bundle (set by the daemon)
        self.info = model.info()
        self.info["variants"] = [v.get("id") for v in model.manifest.get("variants", [])]
        self.info["key_id"] = model.manifest.key_id
        self.info["loaded_at"] = _iso(loaded_at)

    def class_output_index(self, outputs: List[Any]) -> Optional[int]:
        """Index of the first float output shaped [N, C] (decided on the first prediction)."""
        if self._class_index == "unset":
            self._class_index = next((i for i, o in enumerate(outputs) if isinstance(o, np.ndarray) and o.dtype.kind == "f" and o.ndim == 2), None)
        return self._class_index

    def class_labels(self, index: int, width: int) -> List[str]:
        labels = self._labels.get(self.output_names[index])
        if isinstance(labels, list) and len(labels) == width:
            return [str(label) for label in labels]
        return [str(i) for i in range(width)]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# ---------------------------------------------------------------- plumbing


class _Conn:
    __slots__ = ("sock", "kind", "busy", "closing")

    def __init__(self, sock: socket.socket, kind: str) -> None:
        self.sock = sock
        self.kind = kind
        self.busy = False
        self.closing = False

    def wake(self) -> None:
        """Unblock a connection thread waiting for its next request (it then closes)."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


class _Closed(Exception):
    """The peer went away mid-request."""


class _Listener:
    def __init__(self, daemon: "Daemon", sock: socket.socket, kind: str, label: str, unix_path: Optional[Path] = None) -> None:
        self.daemon = daemon
        self.sock = sock
        self.kind = kind
        self.label = label
        self.unix_path = unix_path
        self.inode = os.stat(unix_path).st_ino if unix_path else None
        self._stop = False
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self.thread = threading.Thread(target=self._loop, name=f"edgepack-accept-{kind}", daemon=True)

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(self._r, selectors.EVENT_READ)
        try:
            while not self._stop:
                for key, _ in sel.select():
                    if key.fd == self._r or self._stop:
                        return
                    try:
                        conn, _ = self.sock.accept()
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        continue
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            self.daemon.metrics.error("overload")
                            time.sleep(0.05)
                            continue
                        _log(f"accept on {self.label} failed: {exc}")
                        return
                    self.daemon._accept(conn, self.kind)
        finally:
            sel.close()

    def stop(self) -> None:
        self._stop = True
        try:
            os.write(self._w, b"x")
        except OSError:
            pass
        if self.thread.ident is not None:
            self.thread.join(5)
        self.sock.close()
        for fd in (self._r, self._w):
            os.close(fd)
        if self.unix_path is not None:
            try:
                if os.stat(self.unix_path).st_ino == self.inode:
                    os.unlink(self.unix_path)
            except OSError:
                pass


def bind_unix(path: Path, backlog: int = 128) -> socket.socket:
    """A listening Unix socket at ``path`` (mode 0660), replacing a stale socket file.

    Raises:
        EdgepackError: The path is too long, is not a socket, or a live daemon owns it.
    """
    encoded = os.fsencode(str(path))
    if len(encoded) > 100:
        raise EdgepackError(f"Socket path {path} is {len(encoded)} bytes long; Unix sockets allow about 100. Pass a shorter --socket.")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise EdgepackError(f"{path} exists and is not a socket; refusing to replace it. Remove it or pass another --socket.")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: a stale socket from a crashed daemon
        except OSError as exc:
            raise EdgepackError(f"Cannot tell whether {path} is in use ({exc.strerror or exc}); remove it or pass another --socket.") from exc
        else:
            raise EdgepackError(f"Another daemon is already listening on {path}; stop it first or pass another --socket.")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)  # never world-accessible, not even between bind and chmod
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def bind_tcp(host: str, port: int, backlog: int = 128) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


# ------------------------------------------------------------------ daemon


class Daemon:
    """The inference daemon: listeners, connection threads, model state, signals."""

    def __init__(self, config: RuntimeConfig, options: DaemonOptions) -> None:
        self.config = config
        self.options = options
        self.metrics = Metrics(ENDPOINTS + ("other",))
        self.state: Optional[ModelState] = None
        self.reason = "starting"
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload: Optional[Dict[str, Any]] = None
        self.predlog: Optional[PredictionLog] = None
        self.started = time.time()
        self._listeners: List[_Listener] = []
        self._conns: set = set()
        self._conns_lock = threading.Lock()
        self._stopping = False
        self._want_stop = 0
        self._want_reload = False
        self._reload_thread: Optional[threading.Thread] = None
        self._id_prefix = os.urandom(6).hex() + "-"
        self._ids = itertools.count(1)
        self._routes: Dict[bytes, Tuple[str, bytes, Callable[[Dict[bytes, bytes], bytes, bool], Tuple[int, bytes]]]] = {
            b"/predict": ("/predict", b"POST", self._predict),
            b"/labels": ("/labels", b"POST", self._labels),
            b"/healthz": ("/healthz", b"GET", self._healthz),
            b"/readyz": ("/readyz", b"GET", self._readyz),
            b"/info": ("/info", b"GET", self._info),
            b"/metrics": ("/metrics", b"GET", self._metrics),
            # A 4th element handles DELETE on the same path (ending a stream).
            b"/stream": ("/stream", b"POST", self._stream, self._stream_end),
        }
        from .stream import Streams

        self.streams = Streams(options.max_streams, options.stream_idle_seconds)
        self._wake_r = self._wake_w = -1
        self.addresses: Dict[str, str] = {}
        self._load_lock = threading.Lock()  # SIGHUP's worker and the OTA thread never load at once
        self.monitor: Optional[Any] = None  # ProbationMonitor, fed by /predict when OTA is on
        self.ota: Optional[Any] = None      # the OtaClient
        self._ota_thread: Optional[threading.Thread] = None
        if options.ota is not None:
            from .ota.probation import ProbationMonitor

            self.monitor = ProbationMonitor()
        self.labels = LabelQueue()  # ground truth for the next check-in (monitor.py)
        self.shadow: Optional[Shadow] = None
        self._predicted: Dict[str, Tuple[Any, str]] = {}  # logged prediction id -> (predicted class, digest), bounded
        self._predicted_lock = threading.Lock()

    # ------------------------------------------------------------ model

    def load_model(self) -> None:
        """(Re)load from the cache; on failure keep whatever is serving and record why."""
        with self._load_lock:
            self._load_model()

    def _load_model(self) -> None:
        began = time.time()
        try:
            state = ModelState(load(self.config), began)
        except Exception as exc:  # noqa: BLE001 - a broken cache must never take the daemon down
            message = str(exc) if isinstance(exc, EdgepackError) else f"{type(exc).__name__}: {exc}"
            self.reloads["failure"] += 1
            self.last_reload = {"ok": False, "at": _iso(began), "error": message,
                                "serving": None if self.state is None else self.state.ident}
            if self.state is None:
                self.reason = message
                _log(f"no model to serve: {message}")
            else:
                _log(f"reload failed; still serving {self.state.name} {self.state.version}: {message}")
            return
        previous = self.state
        if previous is not None and previous.window is not None and previous.model.slot.digest == state.model.slot.digest:
            state.window = previous.window  # a reload of the same bundle continues its window
        else:
            try:
                state.window = monitor_for(state.model)
            except Exception as exc:  # noqa: BLE001 - monitoring must never stop a model from serving
                _log(f"monitoring is off for this model: {type(exc).__name__}: {exc}")
            if state.window is not None:
                state.window.labels, state.window.shadow = self.labels, self.shadow
        self.metrics.flush()
        self.state = state  # one reference assignment: requests see the old or the new model, whole
        if self.monitor is not None and (previous is None or previous.model.slot.digest != state.model.slot.digest):
            self.monitor.reset()  # health and probation describe the model being served, not its predecessor
        self.reason = None
        self.reloads["success"] += 1
        self.last_reload = {"ok": True, "at": _iso(began), "error": None, "serving": state.ident,
                            "seconds": round(time.time() - began, 4)}
        notes = f" ({'; '.join(state.model.notes)})" if state.model.notes else ""
        was = f" (was {previous.version})" if previous is not None else ""
        _log(f"serving {state.name} {state.version} variant {state.variant}{was}{notes}")

    def _reload_worker(self) -> None:
        while True:
            self._want_reload = False
            self.load_model()
            if not self._want_reload or self._stopping:
                return

    def request_reload(self) -> None:
        if self._reload_thread is not None and self._reload_thread.is_alive():
            self._want_reload = True  # picked up by the running worker when it finishes
            return
        self._reload_thread = threading.Thread(target=self._reload_worker, name="edgepack-reload", daemon=True)
        self._reload_thread.start()

    # -------------------------------------------------------- connections

    def _accept(self, sock: socket.socket, kind: str) -> None:
        try:
            sock.setblocking(True)
            if kind == "tcp":
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                timeout = _timeval(self.options.idle_seconds)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
            except (OSError, struct.error):
                sock.settimeout(self.options.idle_seconds)
        except OSError:
            sock.close()
            return
        conn = _Conn(sock, kind)
        with self._conns_lock:
            refuse = self._stopping or len(self._conns) >= self.options.max_connections
            if not refuse:
                self._conns.add(conn)
        if not refuse:
            try:
                threading.Thread(target=self._serve, args=(conn,), name="edgepack-conn", daemon=True).start()
                return
            except RuntimeError:
                with self._conns_lock:
                    self._conns.discard(conn)
        self.metrics.error("overload")
        self.metrics.request("other", 503, 0.0)
        try:
            sock.sendall(_response(503, _error_body(None, "the daemon is at its connection limit or shutting down; retry shortly"), True, extra=b"Retry-After: 1\r\n"))
        except OSError:
            pass
        sock.close()

    def _serve(self, conn: _Conn) -> None:
        """One connection: parse requests, answer them, until close, error or shutdown."""
        sock = conn.sock
        recv = sock.recv
        sendall = sock.sendall
        routes = self._routes
        metrics = self.metrics
        perf = time.perf_counter
        max_body = self.options.max_body
        access_log = self.options.access_log
        buf = b""
        try:
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    conn.busy = bool(buf)
                    if not buf and conn.closing:
                        return
                    while end < 0:
                        if len(buf) > MAX_HEAD:
                            self._fail(sock, 400, "headers", f"are larger than {MAX_HEAD} bytes")
                            return
                        chunk = recv(65536)
                        if not chunk:
                            return
                        conn.busy = True
                        start = max(0, len(buf) - 3)
                        buf += chunk
                        end = buf.find(b"\r\n\r\n", start)
                t0 = perf()
                if end > MAX_HEAD:
                    self._fail(sock, 400, "headers", f"are larger than {MAX_HEAD} bytes")
                    return
                head = buf[:end]
                buf = buf[end + 4:]
                lines = head.split(b"\r\n")
                parts = lines[0].split(b" ")
                if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or len(lines) > MAX_HEADERS:
                    self._fail(sock, 400, "request", "is not an HTTP/1.x request line with at most 100 headers")
                    return
                method, target, version = parts
                headers: Dict[bytes, bytes] = {}
                bad = None
                for line in lines[1:]:
                    name, sep, value = line.partition(b":")
                    if not sep or not name or name[-1:] in (b" ", b"\t"):
                        bad = "header lines must be NAME: VALUE"
                        break
                    name = name.lower()
                    if name in headers and name in (b"content-length", b"transfer-encoding"):
                        bad = f"header {name.decode('latin-1')} appears twice"
                        break
                    headers[name] = value.strip()
                if bad is not None:
                    self._fail(sock, 400, "headers", bad)
                    return
                connection = headers.get(b"connection")
                if version == b"HTTP/1.1":
                    close = connection is not None and b"close" in connection.lower()
                else:
                    close = connection is None or b"keep-alive" not in connection.lower()
                # ---- body: Content-Length only, capped, never more than it says
                length = headers.get(b"content-length")
                if b"transfer-encoding" in headers:
                    self._fail(sock, 400, "Transfer-Encoding", "is not supported; send the body with a Content-Length")
                    return
                if length is None:
                    if method == b"POST":
                        self._fail(sock, 400, "Content-Length", "is required")
                        return
                    body = b""
                else:
                    if not length.isdigit() or len(length) > 15:
                        self._fail(sock, 400, "Content-Length", "must be a decimal byte count")
                        return
                    n = int(length)
                    if n > max_body:
                        self._fail(sock, 400, "body", f"is {n} bytes, above the {max_body}-byte cap")
                        return
                    if n and headers.get(b"expect", b"").lower() == b"100-continue":
                        sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    if len(buf) >= n:
                        body = buf[:n]
                        buf = buf[n:]
                    else:
                        body = self._read_body(sock, buf, n)
                        buf = b""
                # ---- dispatch
                close = close or conn.closing
                qmark = target.find(b"?")
                route = routes.get(target if qmark < 0 else target[:qmark])
                if method == b"DELETE" and route is not None and len(route) > 3:
                    route = (route[0], b"DELETE", route[3])
                if route is None:
                    endpoint, code = "other", 404
                    metrics.error("not_found")
                    response = _response(404, _error_body("path", f"{target[:200].decode('latin-1')} is not an endpoint; try /predict, /healthz, /readyz, /info, /metrics"), close)
                elif method != route[1] and not (method == b"HEAD" and route[1] == b"GET"):
                    endpoint, code = route[0], 405
                    metrics.error("method")
                    response = _response(405, _error_body("method", f"{method[:20].decode('latin-1')} is not allowed on {route[0]}; use {route[1].decode()}"), close, extra=b"Allow: %s\r\n" % route[1])
                else:
                    endpoint = route[0]
                    try:
                        code, response = route[2](headers, body, close)
                    except Exception as exc:  # noqa: BLE001 - one bad request must never kill the connection thread silently
                        code = 500
                        metrics.error("internal")
                        response = _response(500, _error_body(None, f"internal error: {type(exc).__name__}: {str(exc)[:300]}"), close)
                    if method == b"HEAD":
                        response = response[: response.find(b"\r\n\r\n") + 4]
                sendall(response)
                elapsed = perf() - t0
                metrics.request(endpoint, code, elapsed)
                if access_log:
                    _log(f"{conn.kind} {method.decode('latin-1')} {target[:200].decode('latin-1')} {code} {elapsed * 1e6:.0f}us")
                if close:
                    return
        except (_Closed, OSError):
            return
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            try:
                sock.close()
            except OSError:
                pass

    @staticmethod
    def _read_body(sock: socket.socket, have: bytes, n: int) -> bytearray:
        body = bytearray(n)
        view = memoryview(body)
        view[: len(have)] = have
        pos = len(have)
        while pos < n:
            got = sock.recv_into(view[pos:], min(n - pos, 1 << 20))
            if not got:
                raise _Closed()
            pos += got
        return body

    def _fail(self, sock: socket.socket, code: int, field: str, reason: str) -> None:
        """Answer a request that cannot be parsed or read; the connection then closes.

        The close lingers: what the client is still sending is read and dropped (up to
        a bound, briefly), so the kernel does not reset the connection before the
        client has read the answer.
        """
        self.metrics.error("protocol")
        self.metrics.request("other", code, 0.0)
        try:
            sock.sendall(_response(code, _error_body(field, reason), True))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(0.5)
            left = 4 * 1024**2
            deadline = time.monotonic() + 2.0
            while left > 0 and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    # --------------------------------------------------------- endpoints

    def _unavailable(self, close: bool) -> Tuple[int, bytes]:
        self.metrics.error("unavailable")
        return 503, _response(503, _error_body(None, f"no verified model is loaded: {self.reason}"), close, extra=b"Retry-After: 5\r\n")

    def _bad(self, exc: InputValidationError, close: bool) -> Tuple[int, bytes]:
        self.metrics.error("validation")
        return 400, _response(400, _error_body(exc.field, exc.reason), close)

    def _json_feed(self, obj: Any, state: ModelState) -> Mapping[str, Any]:
        if not isinstance(obj, dict):
            raise InputValidationError("body", 'must be a JSON object such as {"inputs": {"NAME": [[...]]}}')
        if "inputs" in obj and not state.inputs_is_a_name:
            for key in obj:
                if key != "inputs":
                    raise InputValidationError(key, 'is not a request field; send {"inputs": {NAME: array}}')
            inputs = obj["inputs"]
            if isinstance(inputs, dict):
                return inputs
            if isinstance(inputs, list) and state.single_input is not None:
                return {state.single_input: inputs}
            raise InputValidationError("inputs", "must be an object mapping input names to arrays")
        if state.single_input is not None and len(obj) == 1 and "raw" in obj:
            return {state.single_input: obj["raw"]}
        return obj

    def _predict(self, headers: Dict[bytes, bytes], body: bytes, close: bool) -> Tuple[int, bytes]:
        state = self.state
        if state is None:
            return self._unavailable(close)
        ctype = headers.get(b"content-type", b"")
        try:
            if ctype.startswith(_JSON):
                try:
                    obj = _DECODE(body.decode())
                except (ValueError, RecursionError) as exc:
                    raise InputValidationError("body", f"is not valid JSON ({str(exc)[:200]})") from None
                feed = self._json_feed(obj, state)
            elif ctype.startswith(_NPY):
                if state.single_input is None:
                    raise InputValidationError("Content-Type", f"application/x-npy carries one array, but this model has {len(state.input_names)} inputs ({', '.join(state.input_names)}); send JSON")
                feed = {state.single_input: parse_npy(body)}
            else:
                raise InputValidationError("Content-Type", f"must be application/json or application/x-npy (got {ctype[:100].decode('latin-1') or 'none'})")
            checked = state.validate(feed)
        except InputValidationError as exc:
            if state.window is not None:
                state.window.record_reject(exc.field)
            return self._bad(exc, close)
        except RecursionError:
            if state.window is not None:
                state.window.record_reject("body")
            return self._bad(InputValidationError("body", "is nested too deeply"), close)
        monitor = self.monitor
        t0 = time.perf_counter()
        parts = None  # a list of images of different sizes: [(feed, outputs)] of its one-image runs
        try:
            if type(checked) is not ImageListFeed:
                outputs = state.run(checked)
            else:
                outputs, parts = run_image_list(state.run, checked, state.output_names)
        except InputValidationError as exc:  # the images' outputs differ in shape beyond the batch axis
            return self._bad(exc, close)
        except Exception as exc:  # noqa: BLE001 - engine failures are answered, not fatal
            if monitor is not None:
                monitor.record(time.perf_counter() - t0, error=True)
            if state.window is not None:
                state.window.record_error("engine")
            self.metrics.error("engine")
            return 500, _response(500, _error_body(None, f"the model failed on this input: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"), close)
        if monitor is not None:
            elapsed = time.perf_counter() - t0
            nonfinite = False
            for out in outputs:
                if isinstance(out, np.ndarray) and out.dtype.kind in "fc" and not np.isfinite(out).all():
                    nonfinite = True
                    break
            monitor.record(elapsed, nonfinite=nonfinite)
        window = state.window
        runs = ((checked, outputs),) if parts is None else parts  # statistics see every model run
        if window is not None:
            latency = (time.perf_counter() - t0 if monitor is None else elapsed) / len(runs)
            for run_feed, run_outputs in runs:
                named = dict(zip(state.output_names, run_outputs))
                window.record(run_feed, named, latency)
                if window.shadow is not None:
                    window.shadow.offer(run_feed, named)
        pid = self._id_prefix + "%x" % next(self._ids)
        for run_feed, run_outputs in runs:
            nbytes = 0
            for array in run_feed.values():
                nbytes += array.nbytes
            self.metrics.prediction(state, run_feed, run_outputs, nbytes)
        log = self.predlog
        if log is not None and log.sample > 0.0 and (log.sample >= 1.0 or random.random() < log.sample):
            loggable = {n: o for n, o in zip(state.output_names, outputs) if isinstance(o, np.ndarray) and not o.dtype.hasobject}
            logged = checked if parts is None else {f"{n}[{i}]": a for n, images in checked.items() for i, a in enumerate(images)}
            if log.log(pid, state.ident, logged, loggable):
                self._remember_prediction(pid, state, outputs)
        accept = headers.get(b"accept")
        if accept is not None and _NPY in accept and isinstance(outputs[0], np.ndarray) and not outputs[0].dtype.hasobject:
            extra = state.npy_headers + b"X-Prediction-Id: " + pid.encode() + b"\r\n"
            return 200, _response(200, _npy_bytes(outputs[0]), close, _NPY, extra)
        return 200, _response(200, b'{"outputs":' + _outputs_json(state.output_keys, outputs) + state.json_tail + pid.encode() + b'"}', close)

    def _stream_request(self, headers: Dict[bytes, bytes], body: bytes, state: ModelState) -> Tuple[str, Any]:
        """(stream id, the chunk: an array or a dict by input name) of a /stream request."""
        from .stream import layout

        if layout(state.model.manifest) is None:
            raise InputValidationError("path", f"{state.name} {state.version} declares no state; use /predict")
        ctype = headers.get(b"content-type", b"")
        sid: Any = headers.get(b"x-stream-id", b"").decode("latin-1") or None
        if ctype.startswith(_JSON):
            try:
                obj = _DECODE(body.decode()) if body else {}
            except (ValueError, RecursionError) as exc:
                raise InputValidationError("body", f"is not valid JSON ({str(exc)[:200]})") from None
            if not isinstance(obj, dict):
                raise InputValidationError("body", 'must be a JSON object such as {"stream": "ID", "inputs": {"NAME": [[...]]}}')
            for key in obj:
                if key not in ("stream", "inputs"):
                    raise InputValidationError(key, 'is not a request field; send {"stream": ID, "inputs": {NAME: array}}')
            sid = obj.get("stream", sid)
            chunk: Any = obj.get("inputs")
        elif ctype.startswith(_NPY):
            chunk = parse_npy(body)
        elif not body:
            chunk = None
        else:
            raise InputValidationError("Content-Type", "must be application/json or application/x-npy")
        if not isinstance(sid, str) or not 1 <= len(sid) <= 128:
            raise InputValidationError("stream", "must be a stream id string of 1 to 128 characters (JSON \"stream\" or X-Stream-Id)")
        return sid, chunk

    def _stream(self, headers: Dict[bytes, bytes], body: bytes, close: bool) -> Tuple[int, bytes]:
        """POST /stream: one chunk of stream ID; the state stays on the device between calls."""
        from .stream import Stream, StreamLimitError, layout

        state = self.state
        if state is None:
            return self._unavailable(close)
        try:
            sid, chunk = self._stream_request(headers, body, state)
            if chunk is None:
                raise InputValidationError("inputs", "is missing; send the chunk as {\"inputs\": {NAME: array}} or an .npy body")
            model = state.model

            def make() -> Stream:
                return Stream(model.inputs, state.output_names, state.run, layout(model.manifest))

            t0 = time.perf_counter()
            outputs, stream = self.streams.feed(sid, model.slot.digest, make, chunk)
        except InputValidationError as exc:
            return self._bad(exc, close)
        except StreamLimitError as exc:
            self.metrics.error("streams")
            return 429, _response(429, _error_body("stream", str(exc)), close, extra=b"Retry-After: 5\r\n")
        if self.monitor is not None:  # probation health counts stream traffic like /predict
            nonfinite = any(isinstance(o, np.ndarray) and o.dtype.kind in "fc" and not np.isfinite(o).all()
                            for o in outputs.values())
            self.monitor.record(time.perf_counter() - t0, nonfinite=nonfinite)
        hidden = set(stream.state_outputs)  # the state stays here; the caller gets the decisions
        keys = [k for k, n in zip(state.output_keys, state.output_names) if n not in hidden]
        values = [outputs[n] for n in state.output_names if n not in hidden]
        tail = (',"stream":' + json.dumps(sid) + ',"step":%d,"model":' % stream.steps
                + json.dumps(state.ident, separators=(",", ":")) + "}").encode()
        return 200, _response(200, b'{"outputs":' + _outputs_json(keys, values) + tail, close)

    def _stream_end(self, headers: Dict[bytes, bytes], body: bytes, close: bool) -> Tuple[int, bytes]:
        """DELETE /stream: forget stream ID's state (X-Stream-Id header or {"stream": ID})."""
        state = self.state
        if state is None:
            return self._unavailable(close)
        try:
            sid, _chunk = self._stream_request(headers, body, state)
        except InputValidationError as exc:
            return self._bad(exc, close)
        if not self.streams.end(sid):
            return 404, _response(404, _error_body("stream", f"stream {sid[:128]!r} is not open (ended, expired or never started)"), close)
        return 200, _response(200, json.dumps({"stream": sid, "ended": True}).encode(), close)

    def _labels(self, headers: Dict[bytes, bytes], body: bytes, close: bool) -> Tuple[int, bytes]:
        try:
            if not headers.get(b"content-type", b"").startswith(_JSON):
                raise InputValidationError("Content-Type", "must be application/json")
            try:
                obj = json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise InputValidationError("body", f"is not valid JSON ({str(exc)[:200]})") from None
            if not isinstance(obj, dict):
                raise InputValidationError("body", 'must be a JSON object {"id": ..., "label": ...}')
            for key in obj:
                if key not in ("id", "label"):
                    raise InputValidationError(key, 'is not a label field; send {"id": ..., "label": ...}')
            pid = obj.get("id")
            if not isinstance(pid, str) or not pid:
                raise InputValidationError("id", "must be the prediction id string returned by /predict")
            if "label" not in obj:
                raise InputValidationError("label", "is missing")
            try:
                encoded = json.dumps(obj["label"], allow_nan=False)
            except ValueError:
                raise InputValidationError("label", "must be plain JSON (no NaN or infinity)") from None
            if len(encoded) > MAX_LABEL_BYTES:
                raise InputValidationError("label", f"is larger than {MAX_LABEL_BYTES} bytes")
            if self.predlog is None:
                raise InputValidationError("id", "cannot be labelled: the prediction log is off (start the daemon with --log-dir and --log-sample)")
            try:
                self.predlog.label(pid, obj["label"])
            except UnknownPrediction:
                raise InputValidationError("id", "is not in the prediction log (it was not sampled, or has rotated out)") from None
            with self._predicted_lock:
                predicted, digest = self._predicted.get(pid, (None, None))
            self.labels.add(pid, obj["label"], predicted, digest)  # travels with the next check-in
        except InputValidationError as exc:
            return self._bad(exc, close)
        except queue.Full:
            self.metrics.error("overload")
            return 503, _response(503, _error_body(None, "the prediction log writer is behind; retry shortly"), close, extra=b"Retry-After: 1\r\n")
        return 200, _response(200, json.dumps({"id": pid, "stored": True}).encode(), close)

    def _healthz(self, headers: Dict[bytes, bytes], body: bytes, close: bool) -> Tuple[int, bytes]:
        return 200, _response(200, b'{"status":"ok"}', close)

    def _readyz(self, headers: Dict[bytes, bytes], body: bytes, close: bool) -> Tuple[int, bytes]:
        state = self.state
        if state is None:
            return 503, _response(503, json.dumps({"ready": False, "reason": self.reason}).encode(), close)
        return 200, _response(200, json.dumps({"ready": True, "model": state.ident}).encode(), close)

    def info(self) -> Dict[str, Any]:
        state = self.state
        engine = state.engine if state else None
        return {
            "ready": state is not None,
            "reason": None if state else self.reason,
            "model": state.info if state else None,
            "runtime": {
                "version": __version__,
                "python": platform.python_version(),
                "numpy": np.__version__,
                "engine": engine,
                "engine_version": _engine_version(engine),
                "engines": available_engines(),
                "pid": os.getpid(),
                "started": _iso(self.started),
                "uptime_seconds": round(time.time() - self.started, 3),
            },
            "reload": {"success": self.reloads["success"], "failure": self.reloads["failure"], "last": self.last_reload},
            "listen": dict(self.addresses),
            "predlog": self.predlog.stats() if self.predlog else None,
            "ota": self.ota_info(),
            "monitor": state.window.summary(reset=False) if state is not None and state.window is not None else None,
            "streams": {"open": len(self.streams), "max": self.streams.max_streams, "idle_seconds": self.streams.idle_seconds},
        }

    def ota_info(self) -> Optional[Dict[str, Any]]:
        client = self.ota
        if client is None:
            return None
        return {"server": client.options.server, "device_id": client.options.device_id, "state": client.machine.state,
                "interval_s": client.interval_s, "health": self.ota_health()}

    # -------------------------------------------------------------- OTA

    def ota_health(self) -> Dict[str, Any]:
        """The check-in ``health`` object: what /predict recorded since the served model was loaded."""
        health = self.monitor.health(serving=self.state is not None)
        health["uptime_s"] = round(time.time() - self.started, 1)
        return health

    def ota_summaries(self) -> Dict[str, Any]:
        """The check-in ``summaries``: ``{"window": Monitor.summary()}`` (starts a new window); never raw data."""
        state = self.state
        if state is None or state.window is None:
            return {}
        return {"window": state.window.summary(reset=True)}

    def ota_summaries_ack(self, summaries: Dict[str, Any]) -> None:
        """The server answered the check-in that carried ``summaries``: its labels are delivered."""
        window = summaries.get("window") if isinstance(summaries, dict) else None
        if isinstance(window, dict) and window.get("labels"):
            self.labels.ack(window["labels"])

    def _remember_prediction(self, pid: str, state: ModelState, outputs: List[Any]) -> None:
        """Predicted class of a logged prediction, for the label that may follow (bounded map)."""
        index = state.class_output_index(outputs)
        predicted: Any = None
        if index is not None and outputs[index].shape[1]:
            classes = np.argmax(outputs[index], axis=1).tolist()  # class indices (the manifest's labels name them)
            predicted = classes[0] if len(classes) == 1 else classes
        remembered = self._predicted
        with self._predicted_lock:
            remembered[pid] = (predicted, state.model.slot.digest)
            if len(remembered) > 20000:
                for old in list(remembered)[:10000]:
                    del remembered[old]

    def start_shadow(self) -> None:
        """``--shadow BUNDLE``: load the candidate beside the served model (see monitor.load_candidate)."""
        try:
            candidate = load_candidate(self.config, self.options.shadow)
        except Exception as exc:  # noqa: BLE001 - a broken candidate never stops serving
            _log(f"shadow: {self.options.shadow} is not run: {exc}")
            return
        self.shadow = Shadow(candidate.predict, candidate.slot.digest, str(candidate.variant.get("id")), self.options.shadow_sample)
        state = self.state
        if state is not None and state.window is not None:
            state.window.shadow = self.shadow
        _log(f"shadow: running {candidate.name} {candidate.version} ({candidate.variant.get('id')}) on "
             f"{self.options.shadow_sample:.0%} of requests; answers are not served")

    def _ota_load(self) -> Any:
        """The OTA client's loader: load what the cache now says (same path as SIGHUP), return what is served.

        Skips the load when the cache's current slot is what is already being served
        (the client's start-up load right after the daemon's own)."""
        from .cache import Cache

        state = self.state
        current = Cache(self.config.cache).read_slot("current")
        if state is None or current is None or state.model.slot.digest != current.digest:
            self.load_model()
            state = self.state
        return None if state is None else state.model

    def start_ota(self) -> None:
        from .ota.client import OtaClient

        self.ota = OtaClient(self.config, self.options.ota, monitor=self.monitor, health=self.ota_health,
                             loader=self._ota_load, log=lambda message: _log(f"ota: {message}"),
                             summaries=self.ota_summaries, summaries_ack=self.ota_summaries_ack)
        self._ota_thread = threading.Thread(target=self._ota_loop, name="edgepack-ota", daemon=True)
        self._ota_thread.start()

    def _ota_loop(self) -> None:
        client = self.ota
        while not client._stop.is_set():
            try:
                client.run_forever()
            except Exception as exc:  # noqa: BLE001 - the daemon keeps serving whatever the update thread hits
                _log(f"ota: update cycle crashed ({type(exc).__name__}: {exc}); retrying in 5 s")
                client._stop.wait(5.0)

    def _info(self, headers: Dict[bytes, bytes], body: bytes, close: bool) -> Tuple[int, bytes]:
        return 200, _response(200, json.dumps(self.info(), default=str).encode(), close)

    def _metrics(self, headers: Dict[bytes, bytes], body: bytes, close: bool) -> Tuple[int, bytes]:
        return 200, _response(200, self.metrics.render(self._extra_metrics()).encode(), close, _PROM)

    def _extra_metrics(self) -> List[Tuple[str, str, str, List[Tuple[List[Tuple[str, Any]], float]]]]:
        state = self.state
        engine = state.engine if state else None
        with self._conns_lock:
            open_conns = len(self._conns)
        families = [
            ("edgepack_ready", "gauge", "1 when a verified model is loaded and /predict answers.", [([], 1 if state else 0)]),
            ("edgepack_model_info", "gauge", "The model being served (value 1).",
             [([("name", state.name), ("version", state.version), ("variant", state.variant), ("engine", engine), ("digest", state.model.slot.digest)], 1)] if state else []),
            ("edgepack_runtime_info", "gauge", "Runtime, Python and engine versions (value 1).",
             [([("version", __version__), ("python", platform.python_version()), ("engine", engine or ""), ("engine_version", _engine_version(engine) or "")], 1)]),
            ("edgepack_reloads_total", "counter", "Model loads at start and on SIGHUP, by result.",
             [([("result", k)], v) for k, v in sorted(self.reloads.items())]),
            ("edgepack_last_reload_success", "gauge", "1 if the last model load or reload succeeded, else 0.",
             [([], 1 if (self.last_reload or {}).get("ok") else 0)]),
            ("edgepack_open_connections", "gauge", "Client connections currently open.", [([], open_conns)]),
            ("edgepack_start_time_seconds", "gauge", "Unix time the daemon started.", [([], self.started)]),
        ]
        log = self.predlog
        if log is not None:
            s = log.stats()
            families += [
                ("edgepack_predlog_records_total", "counter", "Predictions written to the prediction log.", [([], s["records"])]),
                ("edgepack_predlog_labels_total", "counter", "Labels written to the prediction log.", [([], s["labels"])]),
                ("edgepack_predlog_dropped_total", "counter", "Sampled predictions dropped because the log writer was behind.", [([], s["dropped"])]),
                ("edgepack_predlog_write_errors_total", "counter", "Prediction log records that could not be written.", [([], s["write_errors"])]),
                ("edgepack_predlog_bytes", "gauge", "Bytes on disk in the prediction log.", [([], s["bytes"])]),
            ]
        return families

    # ---------------------------------------------------------- lifecycle

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only flags and a pipe write here: no locks, so a signal can land anywhere.
        if signum == signal.SIGHUP:
            self._want_reload = True
        else:
            self._want_stop += 1

    def listen(self) -> None:
        """Bind every listener (Unix socket first)."""
        try:
            sock = bind_unix(self.options.socket_path)
        except OSError as exc:
            raise EdgepackError(f"Cannot listen on {self.options.socket_path}: {exc.strerror or exc}; check the directory and permissions.") from exc
        self._listeners.append(_Listener(self, sock, "unix", f"unix:{self.options.socket_path}", self.options.socket_path))
        self.addresses["socket"] = str(self.options.socket_path)
        if self.options.http is not None:
            host, port = self.options.http
            try:
                tcp = bind_tcp(host, port)
            except OSError as exc:
                self._listeners[0].stop()
                raise EdgepackError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}; is another process using the port?") from exc
            bound = tcp.getsockname()
            shown = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
            self._listeners.append(_Listener(self, tcp, "tcp", f"http://{shown}"))
            self.addresses["http"] = shown

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code (0 after a clean drain)."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # The kernel may deliver a signal to any thread; the wakeup fd makes sure the
        # main thread leaves select() at once and runs the Python-level handler.
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        if self.options.log_dir is not None:
            self.predlog = PredictionLog(self.options.log_dir, self.options.log_max_bytes, self.options.log_sample)
        self.load_model()
        if self.options.shadow is not None:
            self.start_shadow()
        self.listen()
        for listener in self._listeners:
            listener.thread.start()
        where = " and ".join(listener.label for listener in self._listeners)
        _log(f"{__version__} listening on {where}" + ("" if self.state else " (not ready: no verified model)"))
        if self.options.ota is not None:
            self.start_ota()
            _log(f"ota: polling {self.options.ota.server} as device {self.options.ota.device_id}")
        try:
            while not self._want_stop:
                try:
                    select.select([self._wake_r], [], [], 5.0)
                    os.read(self._wake_r, 512)
                except (BlockingIOError, InterruptedError):
                    pass
                if self._want_reload and not self._want_stop:
                    self.request_reload()
        finally:
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stop accepting, let busy connections finish (up to drain_seconds), close the rest."""
        with self._conns_lock:
            self._stopping = True
            conns = list(self._conns)
        if self.ota is not None:
            self.ota.stop()  # a cycle in progress ends at its next step; an update left half-done resumes at the next start
        for listener in self._listeners:
            listener.stop()
        for conn in conns:
            conn.closing = True
            if not conn.busy:
                conn.wake()
        deadline = time.monotonic() + self.options.drain_seconds
        while True:
            with self._conns_lock:
                conns = list(self._conns)
            if not conns:
                break
            if time.monotonic() >= deadline or self._want_stop > 1:
                _log(f"closing {len(conns)} connection(s) still busy after the drain period")
                for conn in conns:
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                break
            for conn in conns:
                conn.closing = True
                if not conn.busy:
                    conn.wake()
            time.sleep(0.005)
        if self.predlog is not None:
            self.predlog.close()
        if self._ota_thread is not None:
            self._ota_thread.join(2.0)
        _log("stopped")


def _engine_version(engine: Optional[str]) -> Optional[str]:
    if engine is None or engine not in ENGINES:
        return None
    for module in ENGINES[engine].modules:
        loaded = sys.modules.get(module) or sys.modules.get(module.split(".")[0])
        if loaded is not None and getattr(loaded, "__version__", None):
            return str(loaded.__version__)
    return None


def main_from_args(args: Any, config: RuntimeConfig) -> int:
    """``edgepack-runtime serve``: options from ``args`` and the environment, then serve.

    Raises:
        EdgepackError: Bad options or a listener cannot be bound (exit code 2).
    """
    options = options_from_args(args, os.environ)
    return Daemon(config, options).run()
