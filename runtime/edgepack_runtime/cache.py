"""The device's offline bundle cache: content-addressed store plus A/B slot pointers.

Layout under the cache root (default ``/var/lib/edgepack``)::

    store/<sha256 of the .epk>/   a verified, unpacked bundle (appears by one rename)
    slots/current                 JSON pointer {"digest", "name", "version"}
    slots/previous                the pointer current had before the last switch
    slots/known-good              JSON list of digests that passed self-test, newest last

Every change is a rename of a complete file or directory, so after power loss at any
instant the cache holds the old state or the new one. Leftovers of an interrupted
step (``*.partial`` directories, ``.*.tmp`` files) are ignored and swept on the next
open or install; they never block an install.

Install order (the step names are what ``fault`` hooks receive):
``verify`` → ``extract`` (``extract:member`` per file) → ``selftest`` →
``switch:previous`` (``switch:previous:rename``) → ``switch:current``
(``switch:current:rename``) → ``gc``; a ``:rename`` step is reached inside the
pointer's atomic write, after its temp file is written and before the rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ._fs import atomic_write, fsync_dir
from .bundle import BundleLimits, Manifest, PublicKey, extract_bundle, verify_bundle, verify_extracted
from .errors import EdgepackError, UpdateError, VerificationError

DEFAULT_ROOT = Path("/var/lib/edgepack")
Fault = Callable[[str], None]


def _no_fault(step: str) -> None:
    pass


@dataclass(frozen=True)
class CacheConfig:
    """Where the cache lives and what it trusts.

    Attributes:
        root: Cache directory.
        trusted_keys: Pinned publisher keys; only bundles they signed are installed.
        keep: How many known-good bundles to keep (current and previous always stay).
        limits: Size caps for untrusted bundles.
    """

    root: Path = DEFAULT_ROOT
    trusted_keys: Tuple[PublicKey, ...] = ()
    keep: int = 3
    limits: BundleLimits = field(default_factory=BundleLimits)


@dataclass(frozen=True)
class Slot:
    """What a slot pointer names."""

    digest: str
    name: str
    version: str

    def to_json(self) -> bytes:
        return json.dumps({"digest": self.digest, "name": self.name, "version": self.version}, sort_keys=True).encode()


SelfTest = Callable[[Path, Manifest], None]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Cache:
    """The bundle cache of one device."""

    def __init__(self, config: CacheConfig) -> None:
        if not config.trusted_keys:
            raise EdgepackError("No trusted public key is configured, so no bundle can be installed; pin the publisher's .pub file.")
        self.config = config
        self.root = Path(config.root)
        self.store = self.root / "store"
        self.slots = self.root / "slots"

    # ----------------------------------------------------------------- layout

    @contextlib.contextmanager
    def _locked(self, wait: bool = True):
        """Exclusive cache lock (yields False when ``wait`` is off and someone holds it).

        Installs, rollbacks and sweeps take it so a daemon starting during an install
        never deletes the installer's in-progress ``.partial`` directory. The kernel
        drops the lock when its holder dies, so a killed installer never blocks.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def ensure(self) -> None:
        """Create the directories (idempotent) and sweep leftovers of interrupted steps."""
        for directory in (self.root, self.store, self.slots):
            directory.mkdir(parents=True, exist_ok=True)
        with self._locked(wait=False) as held:
            if held:
                self._sweep()

    def _sweep(self) -> None:
        for leftover in list(self.store.glob(".*.partial")) + list(self.store.glob(".*.tmp")):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        for leftover in self.slots.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)

    def read_slot(self, which: str) -> Optional[Slot]:
        path = self.slots / which
        try:
            data = json.loads(path.read_bytes())
            return Slot(str(data["digest"]), str(data["name"]), str(data["version"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, OSError):
            return None  # a pointer that cannot be read is treated as empty, never fatal

    def _write_slot(self, which: str, slot: Optional[Slot], fault: Fault = _no_fault) -> None:
        path = self.slots / which
        if slot is None:
            path.unlink(missing_ok=True)
            fsync_dir(self.slots)
        else:
            atomic_write(path, slot.to_json(), before_replace=lambda: fault(f"switch:{which}:rename"))

    def known_good(self) -> List[str]:
        try:
            data = json.loads((self.slots / "known-good").read_bytes())
            return [str(d) for d in data] if isinstance(data, list) else []
        except (FileNotFoundError, ValueError, OSError):
            return []

    def entry(self, digest: str) -> Path:
        return self.store / digest

    # ---------------------------------------------------------------- install

    def install(self, bundle: Path, self_test: SelfTest, *, fault: Fault = _no_fault, allow_downgrade: bool = True) -> Slot:
        """Verify, unpack, self-test and switch to ``bundle``.

        Nothing is written before the whole bundle verified; a bundle that fails any
        step never becomes current and the current model keeps serving.

        Raises:
            BundleError / VerificationError: The bundle is malformed, unsigned or tampered with.
            UpdateError: The self-test failed, or a downgrade was refused.
        """
        self.ensure()
        with self._locked():
            return self._install(bundle, self_test, fault, allow_downgrade)

    def _install(self, bundle: Path, self_test: SelfTest, fault: Fault, allow_downgrade: bool) -> Slot:
        fault("verify")
        manifest = verify_bundle(bundle, self.config.trusted_keys, self.config.limits)
        digest = file_sha256(bundle)
        slot = Slot(digest, manifest.name, manifest.version)
        current = self.read_slot("current")
        if not allow_downgrade and current is not None and current.name == manifest.name and _semver(manifest.version) < _semver(current.version):
            raise UpdateError(f"Refusing to install {manifest.name} {manifest.version}: it is older than the current {current.version}. Use an explicit rollback instead.")
        fault("extract")
        target = self.entry(digest)
        pinned = {s.digest for s in (current, self.read_slot("previous")) if s}
        if target.is_dir() and digest not in pinned:
            # An entry no slot uses may be a leftover damaged by power loss (its
            # rename survived, its data did not): re-extract rather than trust it.
            try:
                verify_extracted(target, self.config.trusted_keys, self.config.limits)
            except EdgepackError:
                shutil.rmtree(target, ignore_errors=True)
        if not target.is_dir():
            extract_bundle(bundle, target, self.config.trusted_keys, self.config.limits, on_member=lambda name: fault("extract:member"))
        fault("selftest")
        try:
            self_test(target, verify_extracted(target, self.config.trusted_keys, self.config.limits))
        except EdgepackError as exc:
            raise UpdateError(f"{manifest.name} {manifest.version} failed its self-test and was not installed: {exc}") from exc
        if current is not None and current.digest == digest:
            self._remember_good(digest)  # a rerun after a kill at "gc" completes the bookkeeping
            return slot
        fault("switch:previous")
        self._write_slot("previous", current, fault)
        fault("switch:current")
        self._write_slot("current", slot, fault)
        fault("gc")
        self._remember_good(digest)
        self.gc()
        return slot

    def _remember_good(self, digest: str) -> None:
        good = self.known_good()
        if not good or good[-1] != digest:
            atomic_write(self.slots / "known-good", json.dumps([d for d in good if d != digest] + [digest]).encode())

    def gc(self) -> List[str]:
        """Delete store entries that are neither a slot nor among the newest ``keep`` known-good."""
        pinned = {s.digest for s in (self.read_slot("current"), self.read_slot("previous")) if s}
        good = self.known_good()
        keep = pinned | set(good[-self.config.keep:])
        removed = []
        for entry in self.store.iterdir():
            if entry.is_dir() and not entry.name.startswith(".") and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        if len(good) > len([d for d in good if d in keep]):
            atomic_write(self.slots / "known-good", json.dumps([d for d in good if d in keep]).encode())
        return removed

    # --------------------------------------------------------------- rollback

    def rollback(self) -> Slot:
        """Make ``previous`` current again (and the failed current the new previous).

        Raises:
            UpdateError: There is no previous bundle to go back to.
        """
        self.ensure()
        with self._locked():
            return self._rollback()

    def _rollback(self) -> Slot:
        current, previous = self.read_slot("current"), self.read_slot("previous")
        if previous is None or not self.entry(previous.digest).is_dir():
            raise UpdateError("There is no previous bundle to roll back to; install a known-good bundle instead.")
        self._write_slot("current", previous)
        self._write_slot("previous", current)
        return previous

    # ------------------------------------------------------------------- open

    def open(self, self_test: SelfTest) -> Tuple[Slot, Path, Manifest, List[str]]:
        """The bundle to serve: current if it verifies and passes self-test, else previous.

        Returns:
            (slot, directory, manifest, notes) — notes say when and why it fell back.

        Raises:
            UpdateError: No slot holds a bundle that verifies and passes its self-test.
        """
        self.ensure()
        notes: List[str] = []
        for which in ("current", "previous"):
            slot = self.read_slot(which)
            if slot is None:
                continue
            directory = self.entry(slot.digest)
            try:
                if not directory.is_dir():
                    raise VerificationError(f"its files are missing from {directory}")
                manifest = verify_extracted(directory, self.config.trusted_keys, self.config.limits)
                self_test(directory, manifest)
            except EdgepackError as exc:
                notes.append(f"{which} bundle {slot.name} {slot.version} is unusable: {exc}")
                continue
            if which == "previous":
                # Fall back on our own and make it stick, so the next start does not
                # retry the broken bundle first.
                broken = self.read_slot("current")
                self._write_slot("current", slot)
                self._write_slot("previous", broken)
                notes.append(f"fell back to previous bundle {slot.name} {slot.version}")
            return slot, directory, manifest, notes
        raise UpdateError("No verified model is installed" + (": " + "; ".join(notes) if notes else "") + ". Install a bundle with `edgepack-runtime install BUNDLE`.")

    def status(self) -> Dict[str, object]:
        """Slots, known-good list and store contents (no verification)."""
        def as_dict(slot: Optional[Slot]) -> Optional[Dict[str, str]]:
            return None if slot is None else {"digest": slot.digest, "name": slot.name, "version": slot.version}

        return {
            "root": str(self.root),
            "current": as_dict(self.read_slot("current")),
            "previous": as_dict(self.read_slot("previous")),
            "known_good": self.known_good(),
            "store": sorted(p.name for p in self.store.iterdir() if p.is_dir() and not p.name.startswith(".")) if self.store.is_dir() else [],
        }


def _semver(version: str) -> tuple:
    # One ordering for every component (see edgepack_runtime.semver): rc.2 < rc.10 < release.
    from .semver import precedence

    return precedence(version)