"""Alerts: de-duplicated records in storage, a log line, and an optional webhook.

An alert is identified by (kind, group, version, feature). While one is ``open`` the
same condition only bumps its ``count`` and ``last_at`` (no new log line, no new
webhook); when the condition clears it is ``resolved``, and a later recurrence opens a
new alert. Thresholds come from :class:`~.settings.ServerSettings`.

The open alert of a key is looked up in storage on every call (no in-process cache), so
several server replicas sharing one database de-duplicate against each other: whichever
replica fires second bumps the first one's alert. The lookup and the write run in one
transaction; the fleet monitor additionally calls :meth:`Alerter.fire` / :meth:`Alerter.clear`
only while it holds the cross-replica ``fleet-monitor`` lock, so two replicas never race on
the same key. The webhook is sent by the replica that opened or resolved the alert.

Webhook delivery (``alert_webhook_url``): one background thread drains a bounded queue
and POSTs ``{"event": "opened" | "resolved", "alert": {...}}`` as JSON; a failed
attempt (network error or non-2xx) is retried ``webhook_retries`` times with
exponential backoff (``webhook_backoff_s`` x 2^n, capped at 60 s). When the queue is
full, new notifications are dropped (and counted) rather than blocking the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import secrets
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, Optional

from .settings import ServerSettings
from .storage import AlertRecord, Storage

__all__ = ["Alerter", "WebhookSender", "alert_out"]

log = logging.getLogger("edgepack.server.alerts")

OPEN, RESOLVED = "open", "resolved"
QUEUE_SIZE = 1000
MAX_BACKOFF_S = 60.0


def alert_out(a: AlertRecord) -> dict[str, Any]:
    return dataclasses.asdict(a)


class WebhookSender:
    """POST JSON bodies to one URL from a background thread, with retries and exponential backoff."""

    def __init__(self, url: str, retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 5.0,
                 queue_size: int = QUEUE_SIZE) -> None:
        self.url, self.retries, self.backoff_s, self.timeout_s = url, retries, backoff_s, timeout_s
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self.delivered = self.failed = self.dropped = self.attempts = 0
        self._thread = threading.Thread(target=self._run, name="edgepack-alert-webhook", daemon=True)
        self._thread.start()

    def send(self, body: dict[str, Any]) -> bool:
        try:
            self._queue.put_nowait(body)
            return True
        except queue.Full:
            self.dropped += 1
            log.warning("alert webhook queue is full (%d); dropped a notification", self._queue.maxsize)
            return False

    def _post(self, data: bytes) -> None:
        request = urllib.request.Request(self.url, data=data, method="POST",
                                         headers={"Content-Type": "application/json", "User-Agent": "edgepack-server"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            if not 200 <= response.status < 300:
                raise urllib.error.HTTPError(self.url, response.status, "not 2xx", response.headers, None)

    def _deliver(self, body: dict[str, Any]) -> bool:
        data = json.dumps(body, sort_keys=True, default=str).encode("utf-8")
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                return False
            self.attempts += 1
            try:
                self._post(data)
                return True
            except (OSError, ValueError) as exc:  # URLError/HTTPError are OSErrors
                if attempt == self.retries:
                    log.warning("alert webhook %s failed after %d attempts: %s", self.url, attempt + 1, exc)
                    return False
                delay = min(MAX_BACKOFF_S, self.backoff_s * 2 ** attempt)
                log.info("alert webhook %s failed (%s); retrying in %.1fs", self.url, exc, delay)
                if self._stop.wait(delay):
                    return False
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                body = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if self._deliver(body):
                self.delivered += 1
            else:
                self.failed += 1
            self._queue.task_done()

    def idle(self) -> bool:
        return self._queue.unfinished_tasks == 0

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)


class Alerter:
    """Opens, bumps and resolves alerts; notifies the log and the webhook of openings and resolutions."""

    def __init__(self, settings: ServerSettings, storage: Storage, clock: Callable[[], float],
                 webhook: Optional[WebhookSender] = None) -> None:
        self.settings, self.storage, self.clock = settings, storage, clock
        if webhook is None and settings.alert_webhook_url:
            webhook = WebhookSender(settings.alert_webhook_url, settings.webhook_retries, settings.webhook_backoff_s,
                                    settings.webhook_timeout_s)
        self.webhook = webhook
        # Serializes this process's own calls (taken inside the transaction, always in that order);
        # other replicas are handled by the storage transaction and the monitor's lock.
        self._lock = threading.Lock()
        self._held = threading.local()  # webhooks waiting for the caller's transaction (after_commit)

    @contextlib.contextmanager
    def after_commit(self) -> Iterator[None]:
        """Hold back the webhooks of alerts opened or resolved inside this block until it completes.

        Wrap it around the caller's transaction: if that transaction rolls back (the block raises),
        the alerts were never stored, so nobody is told about them.
        """
        self._held.queue = held = []
        try:
            yield
        finally:
            self._held.queue = None
        for payload in held:  # reached only when the block completed
            self.webhook.send(payload)

    def _notify(self, payload: dict) -> None:
        if self.webhook is None:
            return
        held = getattr(self._held, "queue", None)
        if held is not None:
            held.append(payload)
        else:
            self.webhook.send(payload)

    def fire(self, kind: str, group: str, version: str, feature: str, message: str, *, digest: Optional[str] = None,
             value: Optional[float] = None, threshold: Optional[float] = None, detail: Optional[dict] = None,
             now: Optional[float] = None) -> Optional[AlertRecord]:
        """Open (or bump) the alert; returns it when it was newly opened, else None."""
        now = self.clock() if now is None else now
        key = (kind, group, version or "", feature or "")
        with self.storage.transaction(), self._lock:
            found = self.storage.open_alert(*key)
            if found is not None:
                self.storage.save_alert(dataclasses.replace(found, last_at=now, count=found.count + 1, value=value,
                                                            message=message, detail=detail))
                return None
            alert = AlertRecord(id=f"a_{secrets.token_hex(8)}", kind=kind, group=group, version=key[2], feature=key[3],
                                digest=digest, status=OPEN, message=message, value=value, threshold=threshold,
                                first_at=now, last_at=now, count=1, detail=detail)
            self.storage.save_alert(alert)
        log.warning("ALERT %s group=%s version=%s%s: %s", kind, group, key[2], f" feature={key[3]}" if key[3] else "",
                    message)
        self._notify({"event": "opened", "alert": alert_out(alert)})
        return alert

    def clear(self, kind: str, group: str, version: str, feature: str = "", now: Optional[float] = None) -> Optional[AlertRecord]:
        """Resolve the open alert with this key, if any."""
        key = (kind, group, version or "", feature or "")
        with self.storage.transaction(), self._lock:
            found = self.storage.open_alert(*key)
            if found is None:
                return None
            found = dataclasses.replace(found, status=RESOLVED, last_at=self.clock() if now is None else now)
            self.storage.save_alert(found)
        log.info("alert resolved: %s group=%s version=%s feature=%s", kind, group, key[2], key[3])
        self._notify({"event": "resolved", "alert": alert_out(found)})
        return found

    def open_alerts(self, limit: int = 1000) -> list[AlertRecord]:
        """The open alerts of every replica, most recently updated first."""
        return self.storage.list_alerts(status=OPEN, limit=limit)

    def close(self) -> None:
        if self.webhook is not None:
            self.webhook.close()
