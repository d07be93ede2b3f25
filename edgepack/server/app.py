"""HTTP layer: ``create_app(settings, storage)`` wires routes to the use-case modules.

Routes are thin: authenticate, validate (pydantic), call :mod:`.catalog`,
:mod:`.fleet` or :mod:`.orchestration`, and render. Every error body is
``{"error": {"code", "message"}}`` (docs/ota-protocol.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError, ResponseValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgepack_runtime.bundle import load_public_key

from ..errors import EdgepackError, ServerError
from . import schemas as s
from .blobs import BlobStore, iter_file_range, parse_range
from .catalog import Catalog
from .alerts import Alerter, alert_out
from .fleet import Fleet
from .fleetmon import FleetMonitor
from .http_errors import ApiError, error_body
from .orchestration import Orchestrator
from .ratelimit import RateLimiter
from .settings import ServerSettings
from .signing import verify_uri
from .storage import BundleRecord, DeviceRecord, Storage, StorageConflict, StorageUnavailable, TokenOwner
from .summary import build_summary

__all__ = ["create_app"]

log = logging.getLogger("edgepack.server")

UPLOAD_PATH = "/v1/admin/bundles"
_CHECKIN_PATH = re.compile(r"/v1/devices/([^/]+)/checkin")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_ERRORS = {code: {"model": s.ErrorResponse} for code in (400, 401, 404, 409, 413, 422, 429, 503)}
_BUSY = (503, "busy", "Another server replica changed the same records at the same moment and this request was "
         "rolled back (nothing changed); retry it.", {"Retry-After": "1"})
_NO_DATABASE = (503, "database_unavailable", "The server cannot reach its database right now (nothing changed); "
                "retry later.", {"Retry-After": "5"})


# ------------------------------------------------------------------ body caps


def _error_response(status: int, code: str, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


class BodyLimitMiddleware:
    """413 for bodies over the cap: the upload route gets ``max_upload`` (checked again
    while streaming), every other route ``max_body`` (buffered here, counted, replayed)."""

    def __init__(self, app: Any, max_body: int, max_upload: int, fast_checkin: Optional[Callable] = None) -> None:
        self.app, self.max_body, self.max_upload = app, max_body, max_upload
        self.fast_checkin = fast_checkin

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH
        limit = self.max_upload if upload else self.max_body
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _error_response(413, "body_too_large", f"The request body is {int(length)} bytes; the limit here is "
                                  f"{limit} bytes.")(scope, receive, send)
            return
        if upload:
            await self.app(scope, receive, send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > limit:
                await _error_response(413, "body_too_large", f"The request body exceeds the limit of {limit} bytes.")(
                    scope, receive, send)
                return
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False
        if self.fast_checkin is not None and scope["method"] == "POST" and await self.fast_checkin(scope, body, send):
            return

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ------------------------------------------------------------------ responses


def _ranged_file(path: Any, range_header: Optional[str], etag: str) -> Response:
    size = path.stat().st_size
    try:
        wanted = parse_range(range_header, size)
    except ValueError:
        return _error_response(416, "range_not_satisfiable", f"The requested range is outside the {size}-byte file.",
                               {"Content-Range": f"bytes */{size}"})
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{etag}"'}
    if wanted is None:
        start, end, status = 0, size - 1, 200
    else:
        (start, end), status = wanted, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(max(0, end - start + 1))

    return StreamingResponse(iter_file_range(path, start, end), status_code=status, headers=headers, media_type="application/octet-stream")


def _bundle_out(b: BundleRecord) -> dict[str, Any]:
    return {"id": b.id, "name": b.name, "version": b.version, "digest": b.digest, "size": b.size, "stage": b.stage,
            "key_id": b.key_id, "created_at": b.created_at}


def _device_out(d: DeviceRecord) -> dict[str, Any]:
    return {k: v for k, v in d.__dict__.items() if k != "token_sha256"}


_DASHBOARD = Path(__file__).resolve().parent / "static" / "dashboard.html"


# ------------------------------------------------------------------------ app


def create_app(settings: ServerSettings, storage: Storage, *, clock: Callable[[], float] = time.time,
               run_ticker: bool = True) -> FastAPI:
    """Build the server app. Applies pending migrations; loads the trusted keys.

    Args:
        settings: From :func:`edgepack.server.settings.load_settings`.
        storage: An opened :class:`~edgepack.server.storage.Storage`.
        clock: Time source (tests pass a fake one).
        run_ticker: Start the periodic soak-time evaluation while the app runs.

    Raises:
        ServerError: A trusted key cannot be loaded.
    """
    storage.migrate()
    keys = []
    for path in settings.trusted_key_files:
        try:
            keys.append(load_public_key(path))
        except EdgepackError as exc:
            raise ServerError(f"Trusted key {path} cannot be used: {exc}") from exc
    blobs = BlobStore(settings.blob_dir)
    if blobs.swept:
        log.warning("removed %d temp file(s) left in %s by uploads whose server was killed", blobs.swept, blobs.root / "tmp")
    orchestrator = Orchestrator(storage, clock)
    catalog = Catalog(storage, blobs, keys, clock)
    alerter = Alerter(settings, storage, clock)
    monitor = FleetMonitor(settings, storage, orchestrator, alerter, clock)
    fleet = Fleet(settings, storage, blobs, orchestrator, clock, monitor)
    limiter = RateLimiter(settings.device_rate_limit, settings.rate_window_s, clock)

    def rate_limit(device_id: str) -> None:
        retry = limiter.check(device_id)
        if retry is not None:
            raise ApiError(429, "rate_limited", f"Too many requests from device {device_id}; retry in {retry:.0f}s.",
                           {"Retry-After": str(max(1, int(retry + 0.999)))})

    directive_out = TypeAdapter(s.DirectiveResponse)

    # SQLite calls are microseconds behind one lock: cheaper on the event loop than two thread hops.
    # PostgreSQL calls wait on the network and on other replicas' row locks: worker threads.
    async def blocking(fn: Callable, *args: Any) -> Any:
        return fn(*args) if storage.inline_safe else await run_in_threadpool(fn, *args)

    def checkin_now(device_id: str, token: str, req: s.CheckinRequest) -> Optional[dict]:
        """The check-in, or None (before any side effect) when the token does not authenticate
        (checked against the device's row inside the check-in's own transaction)."""
        return fleet.checkin(device_id, req, token=token, admit=rate_limit)

    async def no_receive() -> dict:  # pragma: no cover - responses never read the request
        return {"type": "http.disconnect"}

    async def fast_checkin(scope: dict, body: bytes, send: Callable) -> bool:
        """``POST /v1/devices/{id}/checkin`` without FastAPI's per-request machinery (dependency
        solving, middleware layers), which costs more CPU than the check-in itself.

        Only for a plain well-formed request: one ``Authorization: Bearer`` and one
        ``Content-Type: application/json`` header, a JSON body that validates as
        :class:`~.schemas.CheckinRequest` and a token that authenticates. Anything else returns
        False *before any side effect* (no rate-limit hit, no write) and the FastAPI route below
        handles the request, so every answer (400/401/404/422/...) is exactly the route's. Past
        that point it does what the route does: the rate limit (429), ``fleet.checkin`` (its
        ApiErrors rendered like the exception handler), and the body validated and serialized
        through the same response model.
        """
        match = _CHECKIN_PATH.fullmatch(scope["path"])
        if match is None or scope.get("root_path") or not body:
            return False
        auth = ctype = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if auth is not None:
                    return False
                auth = value
            elif name == b"content-type":
                if ctype is not None:
                    return False
                ctype = value
        if auth is None or ctype is None or ctype.lower() != b"application/json":
            return False
        scheme, _, token = auth.decode("latin-1").partition(" ")
        token = token.strip()
        if not token or scheme.lower() != "bearer":
            return False
        try:
            req = s.CheckinRequest.model_validate(json.loads(body))  # what the route does with the body
        except ValueError:  # JSON / validation errors are ValueErrors: let the route answer
            return False
        try:
            out = await blocking(checkin_now, match.group(1), token, req)
        except ApiError as exc:
            await _error_response(exc.status, exc.code, exc.message, exc.headers)(scope, no_receive, send)
            return True
        except StorageConflict:
            await _error_response(*_BUSY)(scope, no_receive, send)
            return True
        except StorageUnavailable as exc:
            log.error("%s", exc)
            await _error_response(*_NO_DATABASE)(scope, no_receive, send)
            return True
        if out is None:
            return False
        try:
            payload = directive_out.dump_json(directive_out.validate_python(out, from_attributes=True), by_alias=True)
        except ValidationError as exc:
            raise ResponseValidationError(errors=exc.errors(), body=out) from exc
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(payload)).encode()), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})
        return True

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        stop = threading.Event()
        thread = None
        if run_ticker:
            def loop() -> None:
                while not stop.wait(settings.tick_interval_s):
                    try:
                        orchestrator.tick()
                    except Exception:  # noqa: BLE001 - keep ticking; the next tick retries
                        log.exception("rollout tick failed")
                    try:
                        monitor.tick()
                    except Exception:  # noqa: BLE001 - keep ticking; the next tick retries
                        log.exception("monitoring tick failed")
            thread = threading.Thread(target=loop, name="edgepack-rollout-tick", daemon=True)
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread is not None:
                thread.join(timeout=5)
            alerter.close()

    app = FastAPI(title="edgepack OTA server", version="1", lifespan=lifespan,
                  description="Signed model bundles and staged rollouts; see docs/ota-protocol.md.")
    app.add_middleware(BodyLimitMiddleware, max_body=settings.max_body_bytes, max_upload=settings.max_upload_bytes,
                       fast_checkin=fast_checkin)
    app.state.storage, app.state.orchestrator, app.state.fleet, app.state.catalog = storage, orchestrator, fleet, catalog
    app.state.monitor, app.state.alerter = monitor, alerter

    # --------------------------------------------------------------- errors

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StorageConflict)
    async def _conflict(_request: Request, exc: StorageConflict) -> JSONResponse:
        return _error_response(*_BUSY)

    @app.exception_handler(StorageUnavailable)
    async def _no_database(_request: Request, exc: StorageUnavailable) -> JSONResponse:
        log.error("%s", exc)
        return _error_response(*_NO_DATABASE)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error_response(400, "malformed_json", "The request body is not valid JSON; send one JSON object.")
        parts = []
        for e in errors[:5]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            parts.append(f"{loc}: {e.get('msg')}")
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        return _error_response(422, "invalid_request", "The request is invalid: " + "; ".join(parts) + more + ".")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(500, "internal_error", f"The server failed ({type(exc).__name__}); see its log.")

    # ----------------------------------------------------------------- auth

    bearer = HTTPBearer(auto_error=False)

    def admin(creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> None:
        if creds is None or not settings.admin_token_sha256 or not settings.admin_token_ok(creds.credentials):
            raise ApiError(401, "unauthorized", "Send the admin token as 'Authorization: Bearer <token>'.",
                           {"WWW-Authenticate": "Bearer"})

    # Device auth and check-ins run on the event loop, not in the thread pool: each is a few short
    # SQLite statements behind the storage's one lock (a worker thread would only add two thread
    # hops per request and GIL hand-offs). Everything slow (uploads, downloads, admin) stays in threads.
    def device_now(device_id: str, creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> TokenOwner:
        found = fleet.authenticate(device_id, creds.credentials if creds else None)
        rate_limit(found.id)
        return found

    async def device_inline(device_id: str, creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> TokenOwner:
        return device_now(device_id, creds)

    device = device_inline if storage.inline_safe else device_now  # FastAPI runs a plain def in a worker thread

    # ----------------------------------------------------------- device API

    dev = {"tags": ["device"], "responses": _ERRORS}

    # Well-formed check-ins are answered by fast_checkin (in BodyLimitMiddleware); this route
    # answers the rest and documents the API.
    @app.post("/v1/devices/{device_id}/checkin", response_model=s.DirectiveResponse, **dev)
    async def checkin(req: s.CheckinRequest, d: TokenOwner = Depends(device)) -> dict:
        return await blocking(fleet.checkin, d.id, req)

    @app.post("/v1/devices/{device_id}/events", response_model=s.EventsResponse, **dev)
    def events(req: s.EventsRequest, d: TokenOwner = Depends(device)) -> dict:
        return fleet.ingest_events(d.id, req)

    @app.get("/v1/devices/{device_id}/bundles/{digest}", response_class=Response, **dev)
    def download_bundle(digest: str, request: Request, d: TokenOwner = Depends(device)) -> Response:
        if not _DIGEST_RE.fullmatch(digest):
            raise ApiError(404, "unknown_bundle", "No such bundle.")
        return _ranged_file(fleet.bundle_path(d.id, digest), request.headers.get("range"), digest)

    @app.get("/v1/devices/{device_id}/deltas/{from_digest}/{to_digest}", response_class=Response, **dev)
    def download_delta(from_digest: str, to_digest: str, request: Request, d: TokenOwner = Depends(device)) -> Response:
        if not (_DIGEST_RE.fullmatch(from_digest) and _DIGEST_RE.fullmatch(to_digest)):
            raise ApiError(404, "unknown_delta", "No such delta.")
        path = fleet.delta_path(d.id, from_digest, to_digest)
        return _ranged_file(path, request.headers.get("range"), f"{from_digest[:16]}-{to_digest[:16]}")

    # ------------------------------------------------------------ admin API

    adm = {"tags": ["admin"], "responses": _ERRORS, "dependencies": [Depends(admin)]}

    @app.post(UPLOAD_PATH, status_code=201, response_model=s.BundleOut, **adm, openapi_extra={
        "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload_bundle(request: Request) -> Response:
        cap = settings.max_upload_bytes
        with blobs.temp_file() as (fh, path):
            digest, size = hashlib.sha256(), 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise ApiError(413, "body_too_large", f"The upload exceeds the limit of {cap} bytes.")
                digest.update(chunk)
                fh.write(chunk)
            if size == 0:
                raise ApiError(422, "bundle_rejected", "The request body is empty; send the .epk bytes as "
                               "application/octet-stream.")
            fh.flush()
            record, created = await run_in_threadpool(catalog.register_upload, path, digest.hexdigest(), size)
        return JSONResponse(_bundle_out(record), status_code=201 if created else 200)

    @app.get("/v1/admin/bundles", response_model=list[s.BundleOut], **adm)
    def list_bundles() -> list:
        return [_bundle_out(b) for b in storage.list_bundles()]

    def _bundle_detail(b: BundleRecord) -> dict:
        history = [{"from_stage": h.from_stage, "to_stage": h.to_stage, "at": h.at} for h in storage.stage_history(b.id)]
        return {**_bundle_out(b), "manifest": b.manifest, "stage_history": history}

    @app.get("/v1/admin/bundles/{bundle_id}", response_model=s.BundleDetail, **adm)
    def get_bundle(bundle_id: str) -> dict:
        return _bundle_detail(catalog.get(bundle_id))

    @app.post("/v1/admin/bundles/{bundle_id}/stage", response_model=s.BundleDetail, **adm)
    def stage_bundle(bundle_id: str, req: s.StageRequest) -> dict:
        return _bundle_detail(catalog.set_stage(bundle_id, req.stage))

    @app.post("/v1/admin/devices", status_code=201, response_model=s.DeviceCreated, **adm)
    def provision(req: s.DeviceCreate) -> dict:
        record, token = fleet.provision(req)
        return {"id": record.id, "token": token}

    @app.get("/v1/admin/devices", response_model=list[s.DeviceOut], **adm)
    def list_devices(group: Optional[str] = None) -> list:
        return [_device_out(d) for d in storage.list_devices(group)]

    @app.get("/v1/admin/devices/{device_id}", response_model=s.DeviceOut, **adm)
    def get_device(device_id: str) -> dict:
        return _device_out(fleet.get(device_id))

    @app.patch("/v1/admin/devices/{device_id}", response_model=s.DeviceOut, **adm)
    def update_device(device_id: str, req: s.DeviceUpdate) -> dict:
        return _device_out(fleet.update(device_id, req))

    @app.post("/v1/admin/rollouts", status_code=201, response_model=s.RolloutOut, **adm)
    def create_rollout(req: s.RolloutCreate) -> dict:
        return orchestrator.view(orchestrator.create(req))

    @app.get("/v1/admin/rollouts", response_model=list[s.RolloutOut], **adm)
    def list_rollouts(group: Optional[str] = None) -> list:
        return [orchestrator.view(r, with_members=False) for r in storage.list_rollouts(group=group)]

    @app.get("/v1/admin/rollouts/{rollout_id}", response_model=s.RolloutOut, **adm)
    def get_rollout(rollout_id: str) -> dict:
        return orchestrator.view(orchestrator.get(rollout_id))

    def _action(name: str):
        def act(rollout_id: str) -> dict:
            return orchestrator.view(orchestrator.act(rollout_id, name))
        act.__name__ = f"{name}_rollout"
        return act

    for action in ("pause", "resume", "abort", "rollback"):
        app.post(f"/v1/admin/rollouts/{{rollout_id}}/{action}", response_model=s.RolloutOut,
                 summary=f"{action.capitalize()} a rollout", **adm)(_action(action))

    @app.get("/v1/admin/events", **adm)
    def list_events(device_id: Optional[str] = None, rollout_id: Optional[str] = None, limit: int = 100) -> list:
        return [e.__dict__ for e in storage.list_events(device_id, rollout_id, max(1, min(limit, 1000)))]

    @app.get("/v1/admin/alerts", **adm)
    def list_alerts(status: Optional[str] = None, group: Optional[str] = None, limit: int = 200) -> list:
        return [alert_out(a) for a in storage.list_alerts(status, group, max(1, min(limit, 1000)))]

    @app.get("/v1/admin/drift", **adm)
    def drift(group: Optional[str] = None, version: Optional[str] = None, history: int = 200) -> dict:
        return monitor.drift_view(group, version, max(0, min(history, 10_000)))

    @app.get("/v1/admin/summary", **adm)
    def summary() -> dict:
        return build_summary(settings, storage, orchestrator, clock, monitor)

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        # Read per request: a static, self-contained page (no external assets); it fetches /v1/admin/summary.
        return HTMLResponse(_DASHBOARD.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    # nginx's auth_request for the blob directory (deploy/nginx/edgepack.conf): HMAC and clock
    # only, no database, no rate limit, so every replica answers it cheaply for every download.
    @app.get("/v1/internal/download-auth", status_code=204, response_class=Response, include_in_schema=False)
    async def download_auth(request: Request) -> Response:
        try:
            verify_uri(request.headers.get("x-original-uri", ""), settings.download_secret, clock(),
                       settings.download_url_ttl_s)
        except ValueError:  # SignatureError, or no secret configured
            return Response(status_code=403)
        return Response(status_code=204)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        return {"ok": True, "schema_version": storage.schema_version()}

    return app
