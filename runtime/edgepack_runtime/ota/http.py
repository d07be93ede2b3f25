"""Standard-library HTTP for the OTA client: JSON calls and Range downloads.

Every failure is translated to an edgepack error in :func:`_translate` (one place):

* :class:`Unreachable` (a ``DownloadError``): no answer, a dropped connection, a
  timeout, or a 5xx/429 — transient, the caller backs off and retries. ``sent`` says
  whether the request may have reached the server.
* :class:`Rejected` (an ``UpdateError``): the server answered 4xx; ``status`` and the
  protocol's ``error.code`` are kept.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from typing import Any, Dict, Iterator, Optional, Tuple
from urllib.parse import urlsplit

from ..errors import DownloadError, UpdateError

USER_AGENT = "edgepack-runtime-ota/1"


class Unreachable(DownloadError):
    def __init__(self, message: str, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class Rejected(UpdateError):
    def __init__(self, message: str, status: int, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _translate(exc: BaseException, what: str, sent: bool) -> DownloadError:
    if isinstance(exc, (Unreachable, Rejected)):
        return exc
    if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
        return Unreachable(f"{what}: the server is unreachable ({exc}); will retry.", sent=False)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return Unreachable(f"{what}: timed out; will retry.", sent=sent)
    if isinstance(exc, (http.client.HTTPException, OSError, ssl.SSLError)):
        return Unreachable(f"{what}: connection failed ({type(exc).__name__}: {exc}); will retry.", sent=sent)
    raise exc


def _status_error(status: int, body: bytes, what: str) -> BaseException:
    code, message = "", body[:200].decode("utf-8", "replace")
    try:
        err = json.loads(body).get("error") or {}
        code, message = str(err.get("code", "")), str(err.get("message", message))
    except (ValueError, AttributeError):
        pass
    if status >= 500 or status == 429:
        return Unreachable(f"{what}: server error {status} {code} {message}".strip() + "; will retry.")
    return Rejected(f"{what}: the server refused with {status} {code}: {message}", status, code)


class HttpClient:
    """One server, one bearer token. A new connection per call (check-ins are rare).

    Absolute URLs on another origin (signed download URLs on a CDN or front proxy) are
    fetched too, but without the token: only the configured server ever sees it.
    """

    def __init__(self, base_url: str, token: str, timeout: float = 10.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpdateError(f"Server URL {base_url!r} is not an http(s) URL; pass e.g. https://ota.example.com.")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _target(self, url: str) -> Tuple[str, str, int, str]:
        """(scheme, host, port, request target) for a server-relative or absolute URL."""
        if url.startswith(("http://", "https://")):
            parts = urlsplit(url)
            if not parts.hostname:
                raise Rejected(f"Refusing to fetch {url}: the URL has no host.", 0, "bad_url")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            return parts.scheme, parts.hostname, port, (parts.path or "/") + (("?" + parts.query) if parts.query else "")
        return self.scheme, self.host, self.port, self.prefix + "/" + url.lstrip("/")

    def _connect(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=ssl.create_default_context())
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _headers(self, extra: Optional[Dict[str, str]] = None, token: bool = True) -> Dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    def _send(self, method: str, url: str, body: Optional[bytes], extra: Optional[Dict[str, str]], what: str):
        try:
            scheme, host, port, target = self._target(url)
        except ValueError as exc:  # e.g. a non-numeric port
            raise Rejected(f"Refusing to fetch {url}: {exc}.", 0, "bad_url") from exc
        # Same origin = same scheme, host and port: the token must never reach a CDN or any
        # other host named in a directive, even one that shares the server's host name.
        headers = self._headers(extra, token=(scheme, host, port) == (self.scheme, self.host, self.port))
        conn = self._connect(scheme, host, port)
        try:
            conn.connect()
        except BaseException as exc:
            conn.close()
            raise _translate(exc, what, sent=False) from exc
        try:
            conn.request(method, target, body=body, headers=headers)
            return conn, conn.getresponse()
        except BaseException as exc:
            conn.close()
            raise _translate(exc, what, sent=True) from exc

    def call_json(self, method: str, url: str, obj: Any = None) -> Tuple[int, Any]:
        """Send JSON, return (status, decoded body) for 2xx.

        Raises:
            Unreachable: Transport failure or 5xx.
            Rejected: 4xx (``status``/``code`` kept, e.g. 409 for an event replay).
        """
        what = f"{method} {url}"
        body = None if obj is None else json.dumps(obj).encode()
        conn, resp = self._send(method, url, body, {"Content-Type": "application/json"} if body is not None else None, what)
        try:
            data = resp.read()
        except BaseException as exc:
            raise _translate(exc, what, sent=True) from exc
        finally:
            conn.close()
        if resp.status >= 400:
            raise _status_error(resp.status, data, what)
        try:
            return resp.status, (json.loads(data) if data.strip() else None)
        except ValueError as exc:
            raise Unreachable(f"{what}: the server answered with invalid JSON; will retry.") from exc

    def stream(self, url: str, offset: int = 0, chunk: int = 64 * 1024) -> Tuple[int, Dict[str, str], Iterator[bytes]]:
        """GET ``url`` from byte ``offset`` (``Range: bytes=N-`` when N > 0).

        Returns:
            (status, lower-cased headers, chunk iterator). The iterator raises
            :class:`Unreachable` if the connection drops mid-body and closes it when done.
        """
        what = f"GET {url}"
        extra = {"Accept": "application/octet-stream"}
        if offset > 0:
            extra["Range"] = f"bytes={offset}-"
        conn, resp = self._send("GET", url, None, extra, what)
        if resp.status >= 400 and resp.status != 416:
            try:
                data = resp.read(4096)
            except BaseException:  # noqa: BLE001 - the status is what matters
                data = b""
            conn.close()
            raise _status_error(resp.status, data, what)
        headers = {k.lower(): v for k, v in resp.getheaders()}

        def chunks() -> Iterator[bytes]:
            try:
                while True:
                    try:
                        data = resp.read(chunk)  # exactly `chunk` bytes unless the body ends
                    except BaseException as exc:
                        raise _translate(exc, what, sent=True) from exc
                    if not data:
                        if resp.length:  # Content-Length promised more than arrived
                            raise Unreachable(f"{what}: the connection closed {resp.length} bytes early; will resume.")
                        return
                    yield data
            finally:
                conn.close()

        return resp.status, headers, chunks()
