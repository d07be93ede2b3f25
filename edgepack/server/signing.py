"""Short-lived signed download URLs: HMAC-SHA256 over (path, device id, expiry).

A front proxy (nginx, see deploy/nginx/edgepack.conf) serves the blob directory
itself and asks ``GET /v1/internal/download-auth`` whether a request may pass; that
check is :func:`verify_uri` and needs nothing but the shared secret and a clock, so
any API replica answers it without touching the database.

A signed URL is ``{base}/{blob path}?device=<id>&expires=<unix s>&sig=<mac>``. The MAC
covers the URL's *path* exactly as the device sends it (so it must not be rewritten
between the device and the proxy), the device id and the expiry; ``sig`` is the
unpadded URL-safe base64 of the HMAC-SHA256.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from urllib.parse import parse_qs, quote, urlsplit

__all__ = ["SignatureError", "sign_url", "signature", "verify_uri"]

_PARAMS = ("device", "expires", "sig")
_EXPIRES_RE = re.compile(r"[0-9]{1,12}")
# A few seconds of slack on the "too far in the future" cap: signer and verifier may be
# different replicas whose clocks differ slightly.
_SKEW_S = 30


class SignatureError(ValueError):
    """A download URL is malformed, tampered with, expired or signed for too long."""


def _key(secret: str | bytes) -> bytes:
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("The download signing secret is empty; configure EDGEPACK_SERVER_DOWNLOAD_SECRET.")
    return key


def signature(secret: str | bytes, path: str, device_id: str, expires: int) -> str:
    """The MAC of one download grant.

    Args:
        secret: The shared HMAC key (every replica must use the same one).
        path: The URL path as the device will request it, e.g. ``/blobs/sha256/ab/ab…``.
        device_id: The device the URL is for.
        expires: Unix time (whole seconds) after which the URL is refused.

    Returns:
        Unpadded URL-safe base64 of HMAC-SHA256 over the three fields.
    """
    # JSON keeps the fields unambiguous whatever characters a device id holds.
    message = json.dumps(["edgepack-download-v1", path, device_id, int(expires)], separators=(",", ":")).encode("utf-8")
    mac = hmac.new(_key(secret), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def sign_url(base_url: str, blob_path: str, device_id: str, expires: int, secret: str | bytes) -> str:
    """An absolute URL for ``blob_path`` under ``base_url``, valid for ``device_id`` until ``expires``.

    Args:
        base_url: Where the blob directory is served, e.g. ``https://cdn.example.com/blobs``.
        blob_path: Path inside the blob directory, e.g. ``sha256/ab/ab…``.
        device_id: The device the URL is for.
        expires: Unix time (whole seconds) after which the URL is refused.
        secret: The shared HMAC key.

    Returns:
        ``{base_url}/{blob_path}?device=…&expires=…&sig=…``.
    """
    url = base_url.rstrip("/") + "/" + blob_path.lstrip("/")
    sig = signature(secret, urlsplit(url).path, device_id, int(expires))
    return f"{url}?device={quote(device_id, safe='')}&expires={int(expires)}&sig={sig}"


def verify_uri(uri: str, secret: str | bytes, now: float, max_lifetime_s: float | None = None) -> str:
    """Check a request URI (path and query, as nginx's ``$request_uri``) against its signature.

    Args:
        uri: e.g. ``/blobs/sha256/ab/ab…?device=d1&expires=1700000000&sig=…``.
        secret: The shared HMAC key.
        now: Current unix time.
        max_lifetime_s: Refuse URLs expiring further than this (plus clock skew) in the
            future; None disables the cap.

    Returns:
        The device id the URL was signed for.

    Raises:
        SignatureError: Malformed, tampered with, expired, or expiring too far ahead.
    """
    parts = urlsplit(uri or "")
    if not parts.path.startswith("/") or parts.scheme or parts.netloc:
        raise SignatureError("The download URI is not an absolute path; nginx must send $request_uri.")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise SignatureError("The download URL's query string is malformed; ask the server for a new URL.") from None
    if sorted(query) != sorted(_PARAMS) or any(len(v) != 1 for v in query.values()):
        raise SignatureError("The download URL must carry exactly one device, expires and sig; ask the server for a new URL.")
    device_id, expires_text, sig = (query[k][0] for k in _PARAMS)
    if not device_id or not _EXPIRES_RE.fullmatch(expires_text):
        raise SignatureError("The download URL's device or expiry is malformed; ask the server for a new URL.")
    expected = signature(secret, parts.path, device_id, int(expires_text))
    # Compare as bytes: compare_digest refuses non-ASCII str, and a forged sig may be anything.
    if not hmac.compare_digest(expected.encode("ascii"), sig.encode("utf-8", "replace")):
        raise SignatureError("The download URL's signature does not match; ask the server for a new URL.")
    expires = int(expires_text)
    if now > expires:
        raise SignatureError(f"The download URL expired {now - expires:.0f} s ago; check in again for a fresh one.")
    if max_lifetime_s is not None and expires - now > max_lifetime_s + _SKEW_S:
        raise SignatureError("The download URL expires further ahead than this server allows; check in again.")
    return device_id

