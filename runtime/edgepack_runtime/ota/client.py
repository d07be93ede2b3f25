"""The OTA client: poll the server, carry out its directive, guard the switch with probation.

One cycle (:meth:`OtaClient.run_once`): finish whatever update a previous process left
half-done (:data:`~.machine.RESUME`), deliver queued events, check in, act on the
directive. Offline, the cycle ends at the first unanswered call: the current model
keeps serving and the cache is never touched. :meth:`OtaClient.run_forever` repeats
cycles at the poll interval (with jitter), backing off exponentially (capped) while
the server is unreachable.

Files under ``CACHE/ota/``: ``state.json`` (the state machine), ``events.jsonl`` /
``events.acked`` (the event queue), ``download.partial`` (a download in progress,
resumed with ``Range``), ``download.epk`` (a complete, sha256-checked download),
``bundles/<digest>.epk`` (the ``.epk`` of current and previous, kept as delta bases
and for server-directed rollbacks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .. import __version__
from .._fs import atomic_write, fsync_dir
from ..bundle import verify_bundle
from ..cache import Cache, _semver, file_sha256
from ..engines import available_engines
from ..errors import DownloadError, EdgepackError, UpdateError
from . import machine as m
from .events import EventQueue
from .http import HttpClient, Rejected, Unreachable
from .probation import InProcessMonitor, Policy, ProbationMonitor, judge

Fault = Callable[[str], None]

#: run_once outcomes after which the next cycle comes at the normal poll interval.
SETTLED = ("none", "refused", "committed", "directed_rollback", "rolled_back", "failed", "probation")
#: ... and those after which it backs off.
TRANSIENT = ("offline", "interrupted", "rejected")


@dataclass(frozen=True)
class OtaOptions:
    """How the client talks to the server and how patient it is.

    Attributes:
        server: Base URL, e.g. ``https://ota.example.com``.
        device_id: This device's id.
        token: Its device token.
        interval_s: Poll interval until the server sets ``poll_interval_s``.
        backoff_base_s / backoff_cap_s: Exponential backoff while unreachable.
        timeout_s: Per-call socket timeout.
        max_boots: Process starts tolerated in one half-done update (loop guard).
        max_attempts: Failed attempts tolerated per target digest.
        max_download_bytes: Largest bundle this device downloads.
        chunk_bytes / checkpoint_bytes: Read size; fsync + offset save interval.
        probation_tick_s: How often probation re-evaluates.
    """

    server: str
    device_id: str
    token: str
    interval_s: float = 60.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    timeout_s: float = 10.0
    max_boots: int = 3
    max_attempts: int = 3
    max_download_bytes: int = 4 * 1024**3
    chunk_bytes: int = 64 * 1024
    checkpoint_bytes: int = 256 * 1024
    probation_tick_s: float = 0.05


class _Failed(DownloadError):
    """A permanent failure of this attempt (not worth retrying with Range)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = {"code": code, "detail": detail}


def _stderr(message: str) -> None:
    print(f"ota: {message}", file=sys.stderr, flush=True)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class OtaClient:
    """The device side of the OTA protocol (``docs/ota-protocol.md``)."""

    def __init__(self, config: Any, options: OtaOptions, *, monitor: Optional[ProbationMonitor] = None,
                 health: Optional[Callable[[], Dict[str, Any]]] = None, fault: Optional[Fault] = None,
                 sleep: Optional[Callable[[float], None]] = None, clock: Callable[[], float] = time.monotonic,
                 rng: Optional[random.Random] = None, log: Callable[[str], None] = _stderr,
                 http: Optional[HttpClient] = None, loader: Optional[Callable[[], Any]] = None,
                 summaries: Optional[Callable[[], Dict[str, Any]]] = None,
                 summaries_ack: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        self.config = config
        self.options = options
        self.cache = Cache(config.cache)
        self.dir = Path(config.cache.root) / "ota"
        self.fault: Fault = fault or (lambda step: None)
        self.machine = m.Machine(self.dir / "state.json", self.fault)
        self.events = EventQueue(self.dir)
        self.http = http or HttpClient(options.server, options.token, options.timeout_s)
        self.monitor = monitor if monitor is not None else InProcessMonitor()
        self._health = health
        self._loader = loader
        self._summaries = summaries          # -> the check-in "summaries" (monitor.py windows; never raw data)
        self._summaries_ack = summaries_ack  # called once the server answered the check-in that carried them
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self.clock = clock
        self.rng = rng or random.Random()
        self.log = log
        self.model: Any = None
        self.interval_s = options.interval_s
        self.delays: List[float] = []  # every wait run_forever chose (diagnostics, tests)
        self._started = False
        self._probation_t0: Optional[float] = None
        self._last_save = 0.0
        self._outcome = "none"

    # ------------------------------------------------------------------ paths

    @property
    def partial(self) -> Path:
        return self.dir / "download.partial"

    @property
    def downloaded(self) -> Path:
        return self.dir / "download.epk"

    def kept(self, digest: str) -> Path:
        return self.dir / "bundles" / f"{digest}.epk"

    def _device(self, suffix: str) -> str:
        return f"/v1/devices/{self.options.device_id}/{suffix}"

    # --------------------------------------------------------------- serving

    def load_model(self) -> None:
        """(Re)load the model to serve; none when no verified bundle is installed.

        With a ``loader`` (the inference daemon's), the process that serves does the
        loading and returns the model it now serves (or None): that is the model
        probation judges, and a load that fails leaves the old one, which the
        self-test step then sees as "not the target" and rolls back.
        """
        from ..model import load

        if self._loader is not None:
            try:
                self.model = self._loader()
            except Exception as exc:  # noqa: BLE001 - a failed reload must not stop the update machine
                self.log(f"the serving process could not load the model: {type(exc).__name__}: {exc}")
                self.model = None
            if isinstance(self.monitor, InProcessMonitor):
                self.monitor.attach(self.model)
            return
        try:
            self.model = load(self.config)
        except EdgepackError as exc:
            self.log(f"no model to serve: {exc}")
            self.model = None
        if isinstance(self.monitor, InProcessMonitor):
            self.monitor.attach(self.model)

    def predict(self, raw: Any) -> Dict[str, Any]:
        """Serve one request through the probation monitor."""
        if isinstance(self.monitor, InProcessMonitor):
            return self.monitor.predict(raw)
        start = time.perf_counter()
        out = self.model.predict(raw)
        self.monitor.record(time.perf_counter() - start)
        return out

    def health(self) -> Dict[str, Any]:
        if self._health is not None:
            return self._health()
        return self.monitor.health(serving=self.model is not None)

    # ----------------------------------------------------------------- events

    def _event(self, kind: str, reason: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        d = self.machine.data
        target = d.get("target") or {}
        return {"type": kind, "rollout_id": (d.get("directive") or {}).get("rollout_id"), "digest": target.get("digest"),
                "version": target.get("version"), "reason": reason, "at": round(time.time(), 3)}

    def _fire(self, event: str, events: Optional[List[Dict[str, Any]]] = None, persist: bool = True, **changes: Any) -> str:
        """One transition: seq numbers for its events, state + outbox in one write, then the queue."""
        events = list(events or [])
        for ev, seq in zip(events, self.machine.allocate(len(events))):
            ev["seq"] = seq
        nxt = self.machine.fire(event, outbox=events, persist=persist, **changes)
        if events:
            self.events.append(events)
        return nxt

    def deliver(self) -> bool:
        """Send queued events in seq order; True when the server took them (or none were queued)."""
        pending = self.events.pending()
        if not pending:
            return True
        try:
            self.http.call_json("POST", self._device("events"), {"events": pending})
        except Unreachable as exc:
            self.log(str(exc))
            return False
        except Rejected as exc:
            if exc.status == 409 and len(pending) > 1:
                return self._deliver_one_by_one(pending)
            if exc.status not in (409, 422):
                self.log(str(exc))
                return False
            self.log(f"events up to seq {pending[-1]['seq']} dropped: {exc}")  # replayed, or never acceptable
        self.events.ack(int(pending[-1]["seq"]))
        return True

    def _deliver_one_by_one(self, pending: List[Dict[str, Any]]) -> bool:
        # A 409 for a batch may mean only its first events were already accepted (their
        # answer was lost): send singly so the new ones are not dropped with them.
        for event in pending:
            try:
                self.http.call_json("POST", self._device("events"), {"events": [event]})
            except Unreachable:
                return False
            except Rejected as exc:
                if exc.status not in (409, 422):
                    return False
            self.events.ack(int(event["seq"]))
        return True

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Once per process: finish or undo what a previous process left (RESUME map)."""
        if self._started:
            return
        self._started = True
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache.ensure()
        # A power cut between atomic_write's temp file and its rename leaves the temp behind;
        # this process is the only writer of the state file and has not written yet.
        for leftover in self.dir.glob(f".{self.machine.path.name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        d = self.machine.data
        if d.get("outbox"):
            self.events.append(d["outbox"])  # the crash may have come between state write and append
        state = self.machine.state
        if state != m.IDLE:
            self.log(f"resuming from state {state}: {m.RESUME[state]}")
        if state == m.CHECKING:
            self._fire("none")
        elif state in m.GUARDED:
            boots = int(d.get("boots") or 0) + 1
            if boots > self.options.max_boots:
                self._give_up(boots)
            else:
                self.machine.update(boots=boots)
        elif state in (m.SELF_TESTING, m.PROBATION):
            reason = {"code": "crash_loop", "detail": f"the device restarted while the new model was in {state.replace('_', '-')}."}
            kind = "self_test_failed" if state == m.SELF_TESTING else "probation_failed"
            self._bump_attempts(final=True)
            self._fire("crashed", [self._event(kind, reason)], reason=reason, rollback_from=(d.get("target") or {}).get("digest"),
                       rollback_to=d.get("previous_digest"))
        self.load_model()

    def _give_up(self, boots: int) -> None:
        d = self.machine.data
        target = (d.get("target") or {}).get("digest")
        current = self.cache.read_slot("current")
        reason = {"code": "crash_loop", "detail": f"the update was interrupted {boots - 1} times in state {self.machine.state}; abandoned."}
        self._bump_attempts(final=True)
        if self.machine.state == m.INSTALLING and current is not None and current.digest == target:
            self._fire("gave_up_switched", [self._event("install_failed", reason)], reason=reason, rollback_from=target,
                       rollback_to=d.get("previous_digest"))
        else:
            self._cleanup_download()
            self._fire("gave_up", [self._event("install_failed", reason)])

    def _bump_attempts(self, final: bool = False) -> None:
        d = self.machine.data
        digest = (d.get("target") or {}).get("digest")
        if digest:
            attempts = dict(d.get("attempts") or {})
            attempts[digest] = self.options.max_attempts if final else int(attempts.get(digest, 0)) + 1
            d["attempts"] = attempts  # saved with the next transition

    # ------------------------------------------------------------------ cycle

    def run_once(self, wait: bool = True) -> str:
        """One cycle; returns its outcome (see SETTLED / TRANSIENT).

        ``wait`` off: probation is evaluated once and the cycle returns ``"probation"``
        while undecided (the caller feeds traffic and calls again).
        """
        self.start()
        self._outcome = "none"
        paused = self._drive(wait)
        if paused is not None:
            self.deliver()
            return paused
        resumed = self._outcome if self._outcome != "none" else None
        if not self.deliver():
            return resumed or "offline"
        try:
            directive = self.check_in()
        except Unreachable as exc:
            self.log(str(exc))
            return resumed or "offline"
        except Rejected as exc:
            self.log(str(exc))
            return resumed or "rejected"
        self._act(directive)
        paused = self._drive(wait)
        self.deliver()
        if paused:
            return paused
        return resumed if resumed and self._outcome in ("none", "refused") else self._outcome

    def run_forever(self, cycles: Optional[int] = None) -> None:
        """Cycle until :meth:`stop` (or ``cycles`` cycles), at the poll interval with jitter,
        backing off exponentially (capped) while the server is unreachable."""
        failures = 0
        done = 0
        while not self._stop.is_set():
            try:
                outcome = self.run_once(wait=True)
            except EdgepackError as exc:  # never let one bad cycle stop the device's updates
                self.log(f"cycle failed: {exc}")
                outcome = "rejected"
            done += 1
            if cycles is not None and done >= cycles:
                return
            if outcome in TRANSIENT:
                failures += 1
                delay = min(self.options.backoff_cap_s, self.options.backoff_base_s * 2 ** (failures - 1))
                delay *= self.rng.uniform(0.5, 1.0)
            else:
                failures = 0
                delay = self.interval_s * self.rng.uniform(0.9, 1.1)
            self.delays.append(delay)
            self._sleep(delay)

    def stop(self) -> None:
        self._stop.set()

    def check_in(self) -> Dict[str, Any]:
        def slot(which: str) -> Optional[Dict[str, str]]:
            s = self.cache.read_slot(which)
            return None if s is None else {"name": s.name, "version": s.version, "digest": s.digest}

        body = {"seq": self.machine.next_seq(), "state": self.machine.state, "current": slot("current"),
                "previous": slot("previous"), "health": self.health(), "runtime_version": __version__,
                "engines": available_engines(), "summaries": self._summary_body()}
        _, directive = self.http.call_json("POST", self._device("checkin"), body)
        if not isinstance(directive, dict):
            raise Unreachable("POST checkin: the server's directive is not a JSON object; will retry.")
        if self._summaries_ack is not None and body["summaries"]:
            try:
                self._summaries_ack(body["summaries"])
            except Exception as exc:  # noqa: BLE001 - bookkeeping of summaries never stops an update
                self.log(f"summaries: acknowledgement failed: {type(exc).__name__}: {exc}")
        poll = directive.get("poll_interval_s")
        if isinstance(poll, (int, float)) and poll > 0:
            self.interval_s = float(poll)
        return directive

    def _summary_body(self) -> Dict[str, Any]:
        if self._summaries is None:
            return {}
        try:
            summaries = self._summaries()
        except Exception as exc:  # noqa: BLE001 - a broken summary must never stop a check-in
            self.log(f"summaries: {type(exc).__name__}: {exc}")
            return {}
        return summaries if isinstance(summaries, dict) else {}

    # -------------------------------------------------------------- directive

    def _act(self, directive: Dict[str, Any]) -> None:
        self._fire("poll", persist=False)
        action = directive.get("action") or "none"
        bundle = directive.get("bundle") or {}
        current, previous = self.cache.read_slot("current"), self.cache.read_slot("previous")

        def refuse(why: str, events: Optional[List[Dict[str, Any]]] = None) -> None:
            self.log(f"directive refused: {why}")
            self._outcome = "refused"
            self._fire("refused", events, persist=bool(events))

        if action == "none":
            self._fire("none", persist=False)
            return
        try:
            target = {"digest": str(bundle["digest"]), "name": str(bundle["name"]), "version": str(bundle["version"]),
                      "size": int(bundle["size"]), "url": str(bundle["url"])}
        except (KeyError, TypeError, ValueError):
            return refuse(f"action {action!r} without a complete bundle object")
        if action not in ("update", "rollback"):
            return refuse(f"unknown action {action!r}")
        if current is not None and current.digest == target["digest"]:
            self._fire("none", persist=False)  # already there
            return
        if action == "update" and current is not None and target["name"] == current.name:
            try:
                older = _semver(target["version"]) < _semver(current.version)
            except ValueError:
                older = True
            if older:
                return refuse(f"{target['name']} {target['version']} is older than the current {current.version}; "
                              "only an action 'rollback' may go back")
        if int((self.machine.data.get("attempts") or {}).get(target["digest"], 0)) >= self.options.max_attempts:
            return refuse(f"{target['name']} {target['version']} already failed {self.options.max_attempts} times here")
        self.machine.data["directive"] = directive
        self.machine.data["target"] = target
        if not 0 < target["size"] <= self.options.max_download_bytes:
            reason = {"code": "download", "detail": f"bundle size {target['size']} is outside this device's cap "
                                                    f"of {self.options.max_download_bytes} bytes."}
            self._bump_attempts()  # reported, and after max_attempts no longer re-reported every poll
            return refuse(reason["detail"], [self._event("install_failed", reason)])
        common = {"directive": directive, "target": target, "previous_digest": current.digest if current else None,
                  "boots": 0, "offset": 0, "source": None}
        if action == "rollback" and previous is not None and previous.digest == target["digest"] and self.cache.entry(previous.digest).is_dir():
            self._fire("rollback_previous", rollback_from=current.digest if current else None, rollback_to=target["digest"],
                       reason=None, **common)
        else:
            self._fire("update", **common)

    # ------------------------------------------------------------------ drive

    def _drive(self, wait: bool) -> Optional[str]:
        handlers = {m.DOWNLOADING: self._download, m.VERIFYING: self._verify, m.INSTALLING: self._install,
                    m.SELF_TESTING: self._self_test, m.PROBATION: lambda: self._probation(wait),
                    m.COMMITTED: self._committed, m.ROLLING_BACK: self._rollback, m.ROLLED_BACK: self._rolled_back,
                    m.CHECKING: lambda: self._fire("none", persist=False) and None}
        for _ in range(1000):
            state = self.machine.state
            if state == m.IDLE:
                return None
            paused = handlers[state]()
            if paused:
                return paused
        raise UpdateError("The OTA state machine did not settle; this is a bug.")

    # -------------------------------------------------------------- download

    def _staged(self, digest: str) -> Optional[Path]:
        for path in (self.kept(digest), self.downloaded):
            if path.is_file() and file_sha256(path) == digest:
                return path
        return None

    def _cleanup_download(self) -> None:
        for path in (self.partial, self.downloaded, self.dir / "delta.partial"):
            path.unlink(missing_ok=True)

    def _download(self) -> Optional[str]:
        d = self.machine.data
        target = d["target"]
        if self._staged(target["digest"]) is not None:
            self._fire("downloaded", source=d.get("source") or "local")
            return None
        try:
            if d.get("source") in (None, "delta") and self._delta_usable():
                try:
                    self._apply_delta()
                    self._fire("downloaded", [self._event("downloaded")], source="delta")
                    return None
                except Exception as exc:  # noqa: BLE001 - ANY delta failure falls back to the full bundle
                    self.log(f"delta failed ({type(exc).__name__}: {exc}); downloading the full bundle")
                    (self.dir / "delta.partial").unlink(missing_ok=True)
                    self.machine.update(source="full")
            self._fetch_bundle(target)
            if file_sha256(self.partial) != target["digest"]:
                raise _Failed("verify", f"the downloaded bundle's sha256 does not match the directive's {target['digest'][:12]}….")
            os.replace(self.partial, self.downloaded)
            fsync_dir(self.dir)
        except Unreachable as exc:
            self.log(f"download interrupted at byte {d.get('offset')}: {exc}")
            self._fire("interrupted")
            self._outcome = "interrupted"
            return "interrupted"
        except (_Failed, Rejected, DownloadError) as exc:
            reason = exc.reason if isinstance(exc, _Failed) else {"code": "download", "detail": str(exc)}
            self._cleanup_download()
            self._bump_attempts()
            self._outcome = "failed"
            self._fire("download_failed", [self._event("install_failed", reason)])
            return None
        self._fire("downloaded", [self._event("downloaded")], source=d.get("source") or "full")
        return None

    def _fetch_bundle(self, target: Dict[str, Any]) -> None:
        try:
            self._fetch(target["url"], self.partial, target["size"], persist=True)
        except Rejected as exc:
            # Absolute (signed) download URLs expire, e.g. while a download waits to resume: keep
            # the partial file and its offset, check in once for a fresh URL, and resume with it.
            if exc.status not in (401, 403, 410) or not str(target["url"]).startswith(("http://", "https://")):
                raise
            url = self._fresh_url(target["digest"])
            if url is None:
                raise
            self.log(f"download URL refused ({exc.status}); resuming with a fresh one")
            self._fetch(url, self.partial, target["size"], persist=True)

    def _fresh_url(self, digest: str) -> Optional[str]:
        """The bundle URL of a new check-in's directive, if it still names ``digest`` (saved as the target's)."""
        directive = self.check_in()
        bundle = directive.get("bundle") if isinstance(directive.get("bundle"), dict) else {}
        if bundle.get("digest") != digest or not isinstance(bundle.get("url"), str):
            return None
        self.machine.update(directive=directive, target={**self.machine.data["target"], "url": bundle["url"]})
        return bundle["url"]

    def _delta_usable(self) -> bool:
        d = self.machine.data
        delta = (d.get("directive") or {}).get("delta")
        current = self.cache.read_slot("current")
        if not isinstance(delta, dict) or current is None or delta.get("from_digest") != current.digest:
            return False
        try:
            if int(delta["size"]) > d["target"]["size"] / 2:
                return False  # the server should not offer it; a full download is cheaper anyway
        except (KeyError, TypeError, ValueError):
            return False
        if not self.kept(current.digest).is_file():
            return False  # installed without OTA (e.g. from a USB stick): no base to patch
        try:
            import zstandard  # noqa: F401 - optional
        except ImportError:
            return False
        return True

    def _apply_delta(self) -> None:
        import zstandard

        d = self.machine.data
        delta, target = d["directive"]["delta"], d["target"]
        path = self.dir / "delta.partial"
        path.unlink(missing_ok=True)
        self._fetch(str(delta["url"]), path, int(delta["size"]), persist=False)
        patch = path.read_bytes()
        if _sha256_bytes(patch) != delta["digest"]:
            raise _Failed("verify", "the delta's sha256 does not match the directive")
        old = self.kept(delta["from_digest"]).read_bytes()
        if _sha256_bytes(old) != delta["from_digest"]:
            raise _Failed("verify", "the local base bundle for the delta is damaged")
        size = int(target["size"])
        window = min(1 << 31, max(1 << 27, 1 << (max(size, len(old)).bit_length() + 1)))
        dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        new = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=window).decompress(patch, max_output_size=size)
        if len(new) != size or _sha256_bytes(new) != target["digest"]:
            raise _Failed("verify", "the patched bundle's sha256 does not match the directive")
        atomic_write(self.downloaded, new)
        path.unlink(missing_ok=True)

    def _fetch(self, url: str, dest: Path, size: int, persist: bool) -> None:
        """Download ``url`` into ``dest`` (at most ``size`` bytes), resuming with Range.

        Raises:
            Unreachable: The connection failed or dropped (offset saved: resume later).
            _Failed: The server sent more than ``size`` bytes or answered nonsense.
            Rejected: 4xx.
        """
        offset = int(self.machine.data.get("offset") or 0) if persist else 0
        have = dest.stat().st_size if dest.exists() else 0
        offset = min(offset, have)  # only bytes fsynced before the offset was saved are trusted
        if offset > size:
            offset = 0
        with open(dest, "r+b" if dest.exists() else "w+b") as fh:
            fh.truncate(offset)
            if offset == size:
                return
            written = offset
            last_checkpoint = offset
            try:
                status, headers, chunks = self.http.stream(url, offset, self.options.chunk_bytes)
                if status == 416:
                    fh.truncate(0)
                    written = 0
                    raise Unreachable(f"GET {url}: range {offset}- not satisfiable; restarting from byte 0.")
                if status == 206:
                    start = headers.get("content-range", "").replace("bytes ", "").split("-")[0]
                    if start.strip() != str(offset):
                        raise _Failed("download", f"the server answered Range {offset}- with {headers.get('content-range')!r}.")
                elif status == 200:
                    written = 0
                    fh.truncate(0)
                else:
                    raise _Failed("download", f"GET {url} answered {status}.")
                fh.seek(written)
                for data in chunks:
                    if written + len(data) > size:
                        raise _Failed("download", f"the server sent more than the directive's size of {size} bytes; refused.")
                    fh.write(data)
                    written += len(data)
                    self.fault("download:chunk")
                    if persist and written - last_checkpoint >= self.options.checkpoint_bytes:
                        fh.flush()
                        os.fsync(fh.fileno())
                        last_checkpoint = written
                        self.machine.update(offset=written)
                if written != size:
                    raise Unreachable(f"GET {url}: the body ended at byte {written} of {size}; will resume.")
                fh.flush()
                os.fsync(fh.fileno())
            except Unreachable:
                fh.flush()
                os.fsync(fh.fileno())
                if persist:
                    self.machine.update(offset=written)
                raise

    # --------------------------------------------------------- verify/install

    def _verify(self) -> Optional[str]:
        d = self.machine.data
        target = d["target"]
        path = self._staged(target["digest"])
        if path is None:
            self._fire("missing", offset=0)
            return None
        current = self.cache.read_slot("current")
        try:
            manifest = verify_bundle(path, self.config.cache.trusted_keys, self.config.cache.limits)
            if (manifest.name, manifest.version) != (target["name"], target["version"]):
                raise UpdateError(f"the bundle is {manifest.name} {manifest.version}, the directive said "
                                  f"{target['name']} {target['version']}.")
            if (d["directive"].get("action") != "rollback" and current is not None and manifest.name == current.name
                    and _semver(manifest.version) < _semver(current.version)):
                raise UpdateError(f"{manifest.name} {manifest.version} is older than the current {current.version}.")
        except (EdgepackError, ValueError) as exc:
            self._cleanup_download()
            self._bump_attempts()
            self._outcome = "failed"
            self._fire("verify_failed", [self._event("install_failed", {"code": "verify", "detail": str(exc)})])
            return None
        baseline = self.monitor.snapshot().p95_ms
        self._fire("verified", probation={"baseline_p95_ms": baseline})
        return None

    def _install(self) -> Optional[str]:
        from ..model import install

        d = self.machine.data
        target = d["target"]
        path = self._staged(target["digest"])
        if path is None:
            current = self.cache.read_slot("current")
            if current is not None and current.digest == target["digest"]:
                path = None  # switched, and the staged file was already moved: nothing to redo
            else:
                self._outcome = "failed"
                self._bump_attempts()
                self._fire("install_failed", [self._event("install_failed", {"code": "verify", "detail": "the staged bundle vanished."})])
                return None
        if path is not None:
            try:
                install(path, self.config, fault=self.fault, allow_downgrade=True)
            except UpdateError as exc:
                self._cleanup_download()
                self._bump_attempts(final=True)
                self._outcome = "failed"
                self._fire("install_failed", [self._event("self_test_failed", {"code": "self_test", "detail": str(exc)})])
                return None
            except EdgepackError as exc:
                self._cleanup_download()
                self._bump_attempts()
                self._outcome = "failed"
                self._fire("install_failed", [self._event("install_failed", {"code": "verify", "detail": str(exc)})])
                return None
            if path != self.kept(target["digest"]):
                self.kept(target["digest"]).parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, self.kept(target["digest"]))
                fsync_dir(self.kept(target["digest"]).parent)
        self._fire("installed", [self._event("installed")])
        return None

    def _self_test(self) -> Optional[str]:
        d = self.machine.data
        target = d["target"]
        self.load_model()  # verifies and self-tests current exactly as a fresh start would
        if self.model is None or self.model.slot.digest != target["digest"]:
            reason = {"code": "self_test", "detail": f"{target['name']} {target['version']} did not pass its self-test after the switch."}
            self._bump_attempts(final=True)
            self._fire("self_test_failed", [self._event("self_test_failed", reason)], reason=reason,
                       rollback_from=target["digest"], rollback_to=d.get("previous_digest"))
            return None
        self.monitor.reset()
        self._probation_t0 = self.clock()
        if (d.get("directive") or {}).get("action") == "rollback":
            self._outcome = "committed"
            self._fire("self_test_passed_no_probation", [self._event("committed")])
        else:
            probation = dict(d.get("probation") or {})
            probation.update(started_at=time.time(), requests=0, errors=0, nonfinite=0)
            self._fire("self_test_passed", probation=probation)
        return None

    # -------------------------------------------------------------- probation

    def _probation(self, wait: bool) -> Optional[str]:
        d = self.machine.data
        policy = Policy.from_json((d.get("directive") or {}).get("probation"))
        baseline = (d.get("probation") or {}).get("baseline_p95_ms")
        if self._probation_t0 is None:
            self._probation_t0 = self.clock()
        while True:
            snap = self.monitor.snapshot()
            verdict, reason = judge(snap, policy, self.clock() - self._probation_t0, baseline)
            counters = dict(d.get("probation") or {}, requests=snap.requests, errors=snap.errors,
                            nonfinite=snap.nonfinite, p95_ms=snap.p95_ms)
            if verdict == "passed":
                self._outcome = "committed"
                self._fire("probation_passed", [self._event("committed")], probation=counters)
                return None
            if verdict == "failed":
                self._bump_attempts(final=True)
                self._fire("probation_failed", [self._event("probation_failed", reason)], probation=counters, reason=reason,
                           rollback_from=d["target"]["digest"], rollback_to=d.get("previous_digest"))
                return None
            if self.clock() - self._last_save >= 1.0:
                self._last_save = self.clock()
                self.machine.update(probation=counters)
            if not wait:
                return "probation"
            self._sleep(self.options.probation_tick_s)
            if self._stop.is_set():
                return "probation"

    # -------------------------------------------------------- commit/rollback

    def _committed(self) -> Optional[str]:
        self._outcome = "committed"
        self._cleanup_download()
        self._gc_kept()
        self._fire("done")
        return None

    def _rollback(self) -> Optional[str]:
        d = self.machine.data
        leave, back_to = d.get("rollback_from"), d.get("rollback_to")
        current = self.cache.read_slot("current")
        events: List[Dict[str, Any]] = []
        reason = d.get("reason")
        if current is not None and leave and current.digest == leave and back_to:
            try:
                slot = self.cache.rollback()
                self.log(f"rolled back to {slot.name} {slot.version}")
                events.append(self._event("rolled_back", reason))
            except UpdateError as exc:
                self.log(f"cannot roll back: {exc}")
        elif current is not None and back_to and current.digest == back_to:
            events.append(self._event("rolled_back", reason))  # finished before a restart, or open() fell back itself
        self._fire("rolled_back", events)
        return None

    def _rolled_back(self) -> Optional[str]:
        # A failure's rollback (it has a reason) versus a server-directed one (it has none).
        self._outcome = "rolled_back" if self.machine.data.get("reason") else "directed_rollback"
        self.load_model()
        self._cleanup_download()
        self._gc_kept()
        self._fire("done")
        return None

    def _gc_kept(self) -> None:
        keep = {s.digest for s in (self.cache.read_slot("current"), self.cache.read_slot("previous")) if s}
        folder = self.dir / "bundles"
        if folder.is_dir():
            for path in folder.glob("*.epk"):
                if path.stem not in keep:
                    path.unlink(missing_ok=True)


# ---------------------------------------------------------------------- CLI


def main_from_args(args: Any, config: Any, fault: Optional[Fault] = None) -> int:
    """``edgepack-runtime ota``: exit 0 settled, 1 the update failed or was rolled back, 75 offline."""
    import signal

    try:
        token = Path(args.token_file).read_text().strip()
    except OSError as exc:
        raise UpdateError(f"Cannot read the device token from {args.token_file}: {exc.strerror or exc}.") from exc
    options = OtaOptions(server=args.server, device_id=args.device_id, token=token, interval_s=args.interval)
    client = OtaClient(config, options, fault=fault)
    if not args.once:
        signal.signal(signal.SIGTERM, lambda *_: client.stop())
        client.run_forever()
        return 0
    outcome = client.run_once(wait=True)
    current = client.cache.read_slot("current")
    print(json.dumps({"outcome": outcome, "state": client.machine.state,
                      "current": None if current is None else {"name": current.name, "version": current.version, "digest": current.digest}},
                     sort_keys=True), flush=True)
    if outcome in TRANSIENT:
        return 75
    return 1 if outcome in ("failed", "rolled_back") else 0
