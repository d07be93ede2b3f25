"""Server settings: one frozen, typed object built ONLY here (CLI args + environment).

Everything else receives a :class:`ServerSettings`; nothing else reads the
environment. Environment variables are ``EDGEPACK_SERVER_<FIELD>`` (e.g.
``EDGEPACK_SERVER_PORT``); command-line values win over them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ServerError

__all__ = ["ENV_PREFIX", "ServerSettings", "hash_token", "load_settings"]

ENV_PREFIX = "EDGEPACK_SERVER_"
ADMIN_TOKEN_FILE = "admin.token"
DOWNLOAD_SECRET_FILE = "download.secret"


def hash_token(token: str) -> str:
    """sha256 hex of a bearer token (what is stored and compared)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ServerSettings:
    """Resolved server configuration.

    Attributes:
        data_dir: Root of the server's state.
        db_url: ``sqlite:///ABS/PATH`` (default ``DATA/edgepack.db``: one process) or
            ``postgresql://USER:PASSWORD@HOST:PORT/DB`` (any number of replicas).
        db_pool_size: Most PostgreSQL connections one server process opens.
        blob_dir: Content-addressed bundle and delta files.
        admin_token_sha256: sha256 hex of the admin bearer token (the token itself is
            never kept).
        trusted_key_files: Public keys (.pub) whose signatures uploads must carry.
        host, port: Listen address.
        max_upload_bytes: Largest accepted bundle upload.
        max_body_bytes: Largest accepted body for every other request.
        device_rate_limit: Requests per device per ``rate_window_s`` (0 disables).
        rate_window_s: Rate limit window in seconds.
        poll_interval_s: Check-in interval suggested to devices.
        tick_interval_s: How often soak-time advancement is evaluated.
        stale_after_s: A device not seen for this long shows as stale in the summary.
        monitor_window_s: Fleet monitoring uses each device's latest summary received within
            this many seconds (its check-in window).
        psi_alert: PSI above which an input/prediction distribution counts as shifted.
        p_value_alert: ...and the chi-square p-value must be below this (evidence).
        min_drift_samples: Fewest values (per feature, or predictions) before drift is judged.
        min_labels: Fewest ground-truth labels before live accuracy is judged.
        accuracy_drop_alert: Alert when a version's live accuracy is this much below another
            version's in the same group (beyond noise).
        shadow_agreement_alert: Alert when shadow agreement falls below this.
        model_max_age_s: Alert when a group runs a bundle older than this.
        alert_webhook_url: Optional URL alerts are POSTed to (JSON); empty disables.
        webhook_retries, webhook_backoff_s, webhook_timeout_s: Delivery attempts after the first,
            the first retry delay (doubling each time, capped at 60 s), per-request timeout.
        drift_retention_s: Drift evaluations older than this are pruned.
        drift_record_interval_s: Each (group, version) stores at most one set of evaluations
            per this many seconds (alerts and gates use every evaluation).
        download_base_url: Public URL prefix where a front proxy serves ``blob_dir`` (e.g.
            ``https://ota.example.com/blobs``). Set, directives carry absolute signed URLs under
            it and bundle bytes never pass through this process; empty, devices download
            through the API as before.
        download_secret: HMAC key of the signed download URLs. Every replica behind the proxy
            must use the same one (set ``EDGEPACK_SERVER_DOWNLOAD_SECRET``, or share the data
            directory's ``download.secret``), or URLs signed by one are refused by another.
        download_url_ttl_s: How long a signed download URL stays valid (a device checks in
            again for a fresh one).
    """

    data_dir: Path
    db_url: str
    blob_dir: Path
    admin_token_sha256: str
    trusted_key_files: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8400
    max_upload_bytes: int = 512 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    device_rate_limit: int = 120
    rate_window_s: float = 60.0
    poll_interval_s: int = 60
    tick_interval_s: float = 5.0
    stale_after_s: float = 600.0
    monitor_window_s: float = 300.0
    psi_alert: float = 0.2
    p_value_alert: float = 1e-3
    min_drift_samples: int = 200
    min_labels: int = 50
    accuracy_drop_alert: float = 0.05
    shadow_agreement_alert: float = 0.9
    model_max_age_s: float = 180 * 86400.0
    alert_webhook_url: str = ""
    webhook_retries: int = 5
    webhook_backoff_s: float = 1.0
    webhook_timeout_s: float = 5.0
    drift_retention_s: float = 7 * 86400.0
    drift_record_interval_s: float = 300.0
    db_pool_size: int = 16
    download_base_url: str = ""
    download_secret: str = field(default="", repr=False)
    download_url_ttl_s: float = 900.0

    def admin_token_ok(self, token: str) -> bool:
        """Constant-time check of a presented admin token."""
        return hmac.compare_digest(hash_token(token), self.admin_token_sha256)

    @property
    def sqlite_path(self) -> Path:
        """The database file for ``sqlite:///`` URLs."""
        if not self.db_url.startswith("sqlite:///"):
            raise ServerError("This server's database is not an SQLite file (its URL is not sqlite:///PATH).")
        return Path(self.db_url[len("sqlite:///"):])

    @classmethod
    def for_tests(cls, data_dir: Path, admin_token: str, **overrides: Any) -> ServerSettings:
        """Settings rooted at ``data_dir`` with a known admin token (no env lookup)."""
        data_dir = Path(data_dir)
        base = dict(data_dir=data_dir, db_url=f"sqlite:///{data_dir / 'edgepack.db'}", blob_dir=data_dir / "blobs",
                    admin_token_sha256=hash_token(admin_token))
        base.update(overrides)
        return cls(**base)


def _check_db_url(url: str) -> None:
    """Refuse an unknown database URL early, without echoing its password."""
    from .storage import POSTGRES_SCHEMES, redact_url

    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return
    if url.startswith(POSTGRES_SCHEMES) and len(url.split("://", 1)[1]) > 0:
        return
    raise ServerError(f"Database URL {redact_url(url)!r} is not supported; use sqlite:///PATH or "
                      f"postgresql://USER:PASSWORD@HOST:PORT/DATABASE ({ENV_PREFIX}DB_URL or --db-url).")


def _int(name: str, value: Any, minimum: int = 0) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ServerError(f"Setting {name}={value!r} is not a whole number; fix {ENV_PREFIX}{name.upper()} or the option.") from None
    if number < minimum:
        raise ServerError(f"Setting {name}={number} must be at least {minimum}.")
    return number


def _float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ServerError(f"Setting {name}={value!r} is not a number; fix {ENV_PREFIX}{name.upper()} or the option.") from None
    if not number > 0:
        raise ServerError(f"Setting {name}={number} must be positive.")
    return number


def _read_token_file(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ServerError(f"Cannot read the admin token file {path}: {exc.strerror or exc}; check the path.") from exc
    if len(token) < 16:
        raise ServerError(f"The admin token in {path} is shorter than 16 characters; use a long random token.")
    return token


def _admin_token(data_dir: Path, token_file: Path | None, env: Mapping[str, str], create: bool) -> tuple[str, Path | None]:
    if token_file is not None:
        return _read_token_file(token_file), None
    if env.get(ENV_PREFIX + "ADMIN_TOKEN"):
        token = env[ENV_PREFIX + "ADMIN_TOKEN"]
        if len(token) < 16:
            raise ServerError(f"{ENV_PREFIX}ADMIN_TOKEN is shorter than 16 characters; use a long random token.")
        return token, None
    default = data_dir / ADMIN_TOKEN_FILE
    if default.exists() or not create:
        return (_read_token_file(default), None) if default.exists() else ("", None)
    token = secrets.token_urlsafe(32)
    fd = os.open(default, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return token, default


def _download_secret(data_dir: Path, env: Mapping[str, str]) -> str:
    secret = env.get(ENV_PREFIX + "DOWNLOAD_SECRET", "")
    if secret:
        if len(secret) < 32:
            raise ServerError(f"{ENV_PREFIX}DOWNLOAD_SECRET is shorter than 32 characters; use a long random secret "
                              "(the same on every replica).")
        return secret
    path = data_dir / DOWNLOAD_SECRET_FILE
    if not path.exists():
        # Written whole to a temp file, then linked into place: replicas starting together on a
        # shared data directory all end up reading the one secret that won, never a partial one.
        tmp = data_dir / f".{DOWNLOAD_SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(secrets.token_urlsafe(48) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        except OSError as exc:
            raise ServerError(f"Cannot create the download secret {path}: {exc.strerror or exc}; make the data "
                              f"directory writable or set {ENV_PREFIX}DOWNLOAD_SECRET.") from exc
        finally:
            tmp.unlink(missing_ok=True)
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ServerError(f"Cannot read the download secret {path}: {exc.strerror or exc}; check its permissions.") from exc
    if len(secret) < 32:
        raise ServerError(f"The download secret in {path} is shorter than 32 characters; delete the file to have a "
                          f"new one generated, or set {ENV_PREFIX}DOWNLOAD_SECRET.")
    return secret


def _base_url(value: Any) -> str:
    url = str(value or "").strip().rstrip("/")
    if not url:
        return ""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        parts = parts._replace(scheme="")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ServerError(f"{ENV_PREFIX}DOWNLOAD_BASE_URL={value!r} is not an http(s) URL prefix; use e.g. "
                          "https://ota.example.com/blobs (no query string).")
    return url


def load_settings(
    *,
    data_dir: Path | None = None,
    host: str | None = None,
    port: int | None = None,
    trusted_keys: list[Path] | None = None,
    admin_token_file: Path | None = None,
    db_url: str | None = None,
    env: Mapping[str, str] | None = None,
    create_admin_token: bool = True,
    require_trusted_keys: bool = False,
) -> tuple[ServerSettings, Path | None]:
    """Build settings from command-line values, falling back to ``EDGEPACK_SERVER_*``.

    Returns:
        (settings, path of a newly generated admin token file or None). Without any
        admin token configured, one is generated into ``DATA/admin.token`` (mode 0600).
        Likewise the download URL secret, without ``EDGEPACK_SERVER_DOWNLOAD_SECRET``, is read
        from (or first generated into) ``DATA/download.secret`` (mode 0600).

    Raises:
        ServerError: A value is malformed, the data directory cannot be created, or
            ``require_trusted_keys`` is set and no trusted key is configured.
    """
    env = os.environ if env is None else env

    def pick(cli: Any, key: str, default: Any) -> Any:
        return cli if cli is not None else env.get(ENV_PREFIX + key, default)

    data = Path(pick(data_dir, "DATA", "edgepack-server-data")).expanduser().resolve()
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ServerError(f"Cannot create the data directory {data}: {exc.strerror or exc}; choose a writable path.") from exc
    keys_env = env.get(ENV_PREFIX + "TRUSTED_KEYS", "")
    keys = list(trusted_keys or []) or [Path(p) for p in keys_env.split(os.pathsep) if p]
    if require_trusted_keys and not keys:
        raise ServerError("No trusted public keys: pass --trusted-key PUB (the .pub of the key your bundles are signed "
                          f"with) or set {ENV_PREFIX}TRUSTED_KEYS, so uploads can be verified.")
    token_file = admin_token_file or (Path(env[ENV_PREFIX + "ADMIN_TOKEN_FILE"]) if env.get(ENV_PREFIX + "ADMIN_TOKEN_FILE") else None)
    token, created = _admin_token(data, token_file, env, create_admin_token)
    settings = ServerSettings(
        data_dir=data,
        db_url=pick(db_url, "DB_URL", f"sqlite:///{data / 'edgepack.db'}"),
        blob_dir=Path(env.get(ENV_PREFIX + "BLOB_DIR", data / "blobs")),
        admin_token_sha256=hash_token(token) if token else "",
        trusted_key_files=tuple(Path(k).expanduser().resolve() for k in keys),
        host=str(pick(host, "HOST", "127.0.0.1")),
        port=_int("port", pick(port, "PORT", 8400)),
        max_upload_bytes=_int("max_upload_bytes", env.get(ENV_PREFIX + "MAX_UPLOAD_BYTES", 512 * 1024 * 1024), 1),
        max_body_bytes=_int("max_body_bytes", env.get(ENV_PREFIX + "MAX_BODY_BYTES", 1024 * 1024), 1024),
        device_rate_limit=_int("device_rate_limit", env.get(ENV_PREFIX + "DEVICE_RATE_LIMIT", 120)),
        rate_window_s=_float("rate_window_s", env.get(ENV_PREFIX + "RATE_WINDOW_S", 60)),
        poll_interval_s=_int("poll_interval_s", env.get(ENV_PREFIX + "POLL_INTERVAL_S", 60), 1),
        tick_interval_s=_float("tick_interval_s", env.get(ENV_PREFIX + "TICK_INTERVAL_S", 5)),
        stale_after_s=_float("stale_after_s", env.get(ENV_PREFIX + "STALE_AFTER_S", 600)),
        monitor_window_s=_float("monitor_window_s", env.get(ENV_PREFIX + "MONITOR_WINDOW_S", 300)),
        psi_alert=_float("psi_alert", env.get(ENV_PREFIX + "PSI_ALERT", 0.2)),
        p_value_alert=_float("p_value_alert", env.get(ENV_PREFIX + "P_VALUE_ALERT", 1e-3)),
        min_drift_samples=_int("min_drift_samples", env.get(ENV_PREFIX + "MIN_DRIFT_SAMPLES", 200), 1),
        min_labels=_int("min_labels", env.get(ENV_PREFIX + "MIN_LABELS", 50), 1),
        accuracy_drop_alert=_float("accuracy_drop_alert", env.get(ENV_PREFIX + "ACCURACY_DROP_ALERT", 0.05)),
        shadow_agreement_alert=_float("shadow_agreement_alert", env.get(ENV_PREFIX + "SHADOW_AGREEMENT_ALERT", 0.9)),
        model_max_age_s=_float("model_max_age_s", env.get(ENV_PREFIX + "MODEL_MAX_AGE_S", 180 * 86400)),
        alert_webhook_url=str(env.get(ENV_PREFIX + "ALERT_WEBHOOK_URL", "")),
        webhook_retries=_int("webhook_retries", env.get(ENV_PREFIX + "WEBHOOK_RETRIES", 5)),
        webhook_backoff_s=_float("webhook_backoff_s", env.get(ENV_PREFIX + "WEBHOOK_BACKOFF_S", 1)),
        webhook_timeout_s=_float("webhook_timeout_s", env.get(ENV_PREFIX + "WEBHOOK_TIMEOUT_S", 5)),
        drift_retention_s=_float("drift_retention_s", env.get(ENV_PREFIX + "DRIFT_RETENTION_S", 7 * 86400)),
        drift_record_interval_s=_float("drift_record_interval_s", env.get(ENV_PREFIX + "DRIFT_RECORD_INTERVAL_S", 300)),
        db_pool_size=_int("db_pool_size", env.get(ENV_PREFIX + "DB_POOL_SIZE", 16), 2),
        download_base_url=_base_url(env.get(ENV_PREFIX + "DOWNLOAD_BASE_URL", "")),
        download_secret=_download_secret(data, env),
        download_url_ttl_s=_float("download_url_ttl_s", env.get(ENV_PREFIX + "DOWNLOAD_URL_TTL_S", 900)),
    )
    _check_db_url(settings.db_url)
    return settings, created
