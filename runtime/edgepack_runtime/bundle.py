"""Verify and unpack signed edgepack bundles (``NAME-VERSION.epk``) on a device.

A bundle is a canonical ustar archive (see :mod:`edgepack_runtime._ustar`) whose
members are, in order, ``manifest.json``, ``manifest.sig`` and the payload files
sorted by name. ``manifest.json`` is canonical JSON listing every payload file with
its size and sha256; ``manifest.sig`` holds an Ed25519 signature over the exact bytes
of ``manifest.json``. So one signature check plus one hash per member proves that
every byte of the payload is what the publisher built, and the strict archive reader
proves that there are no other bytes.

Verification streams: members are hashed in 1 MiB chunks, so memory stays bounded
whatever the model size, and size limits are applied from headers before any data is
read. This module needs only the standard library.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Union

from .semver import is_valid as is_valid_version
from . import _ed25519, _ustar
from ._fs import fsync_dir
from .errors import BundleError, EdgepackError, VerificationError

__all__ = [
    "BundleLimits", "FORMAT_VERSION", "FileEntry", "MANIFEST_NAME", "Manifest", "PublicKey", "SIGNATURE_NAME",
    "canonical_json", "extract_bundle", "key_id_for", "load_public_key", "read_member", "validate_manifest",
    "verify_bundle", "verify_extracted",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
SIGNATURE_ALG = "ed25519"

_MAX_SIGNATURE_SIZE = 1024
_MAX_KEY_FILE_SIZE = 64 * 1024
_CHUNK = 1 << 20
# DER of an Ed25519 SubjectPublicKeyInfo is this fixed prefix plus the 32 key bytes
# (RFC 8410), so devices can read OpenSSL-style PEM without an ASN.1 parser.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")

_COMPRESSED_MAGIC = (
    (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"),
)

_REBUILD = "the bundle is corrupted or was tampered with; re-download or rebuild it."

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------- keys


def key_id_for(raw: bytes) -> str:
    """Return the key id of a raw 32-byte Ed25519 public key: 16 hex of its sha256."""
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key.

    Attributes:
        raw: The 32-byte public key.
        key_id: First 16 hex digits of sha256(raw); ``manifest.sig`` names its signer
            by it.
    """

    raw: bytes
    key_id: str

    def __post_init__(self) -> None:
        if len(self.raw) != 32 or self.key_id != key_id_for(self.raw):
            raise ValueError("PublicKey needs 32 raw bytes and their key id; use PublicKey.from_raw().")

    @classmethod
    def from_raw(cls, raw: bytes) -> PublicKey:
        """Build a key from its 32 raw bytes, computing the key id."""
        return cls(bytes(raw), key_id_for(raw))


def load_public_key(path_or_pem: str | bytes | os.PathLike[str]) -> PublicKey:
    """Load an Ed25519 public key in PEM SubjectPublicKeyInfo form.

    The format is the one ``openssl pkey -pubout`` writes ("-----BEGIN PUBLIC KEY-----").

    Args:
        path_or_pem: A path to a PEM file, or the PEM text itself (``str`` containing
            "-----BEGIN", or ``bytes``).

    Returns:
        The key.

    Raises:
        EdgepackError: The file is missing or unreadable, holds a private key, or is
            not a valid Ed25519 public key.
    """
    if isinstance(path_or_pem, bytes):
        text, source = path_or_pem.decode("ascii", "replace"), "The given PEM data"
    elif isinstance(path_or_pem, str) and "-----BEGIN" in path_or_pem:
        text, source = path_or_pem, "The given PEM text"
    else:
        source = f"Public key file {os.fspath(path_or_pem)}"
        try:
            with open(path_or_pem, "rb") as fh:
                data = fh.read(_MAX_KEY_FILE_SIZE + 1)
        except FileNotFoundError as exc:
            raise EdgepackError(f"{source} does not exist; pass the path of the publisher's .pub file.") from exc
        except OSError as exc:
            raise EdgepackError(f"{source} cannot be read: {exc.strerror or exc}; check its path and permissions.") from exc
        if len(data) > _MAX_KEY_FILE_SIZE:
            raise EdgepackError(f"{source} is far too large to be a public key; pass the publisher's .pub file.")
        text = data.decode("ascii", "replace")
    return _parse_public_pem(text, source)


def _parse_public_pem(text: str, source: str) -> PublicKey:
    if "PRIVATE KEY-----" in text:
        raise EdgepackError(
            f"{source} is a private key: pass the matching public key (.pub) instead, and keep private keys off devices."
        )
    match = re.search(r"-----BEGIN PUBLIC KEY-----(.*?)-----END PUBLIC KEY-----", text, re.S)
    if not match:
        raise EdgepackError(
            f"{source} is not a PEM public key (it has no '-----BEGIN PUBLIC KEY-----' block); pass the .pub file "
            "written by edgepack or by 'openssl pkey -pubout'."
        )
    try:
        der = base64.b64decode("".join(match.group(1).split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EdgepackError(f"{source} has a damaged PEM body (invalid base64); copy the .pub file again.") from exc
    if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
        raise EdgepackError(f"{source} is not an Ed25519 public key; edgepack bundles are signed with Ed25519 keys only.")
    raw = der[len(_SPKI_PREFIX):]
    if _ed25519.decode_point(raw) is None:
        raise EdgepackError(f"{source} does not hold a valid Ed25519 point; copy the .pub file again.")
    return PublicKey.from_raw(raw)


# ----------------------------------------------------------------------- manifest


def canonical_json(obj: Any) -> bytes:
    """Serialize ``obj`` as canonical JSON: sorted keys, no spaces, ASCII only.

    Raises:
        ValueError: ``obj`` holds NaN or infinity.
        TypeError: ``obj`` holds something JSON cannot represent.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _bounded_int(text: str) -> int:
    # The manifest is parsed before its signature is checked, and str -> int is
    # quadratic in the digit count on Pythons without the 4300-digit guard.
    if len(text.lstrip("-")) > 64:
        raise ValueError("integer with more than 64 digits")
    return int(text)


def _parse_canonical_json(data: bytes, member: str) -> Any:
    try:
        obj = json.loads(
            data.decode("ascii"), object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant,
            parse_int=_bounded_int,
        )
        canonical = canonical_json(obj)
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise BundleError(f"Bundle member {member!r} is not valid JSON ({exc}): {_REBUILD}") from exc
    if canonical != data:
        raise BundleError(f"Bundle member {member!r} is not in canonical JSON form: {_REBUILD}")
    return obj


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def validate_manifest(obj: Any) -> list[str]:
    """List what is structurally wrong with a manifest (pure; reads no files).

    Unknown top-level keys are allowed so newer writers can add information.

    Args:
        obj: The parsed ``manifest.json``.

    Returns:
        One short phrase per problem; empty if the manifest is well-formed.
    """
    if not isinstance(obj, dict):
        return ["the manifest must be a JSON object"]
    problems: list[str] = []
    version = obj.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        problems.append(f"'format_version' must be {FORMAT_VERSION} (got {version!r}); a newer runtime may read it")
    name = obj.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        problems.append(f"'name' must match [a-z0-9][a-z0-9._-]{{0,63}} (got {name!r})")
    semver = obj.get("version")
    if not is_valid_version(semver):
        problems.append(f"'version' must be MAJOR.MINOR.PATCH with an optional -prerelease (got {semver!r})")
    files = obj.get("files")
    if not isinstance(files, dict):
        problems.append("'files' must be an object mapping member names to {sha256, size}")
        files = {}
    for member, entry in files.items():
        problem = _ustar.name_problem(member)
        if problem:
            problems.append(f"file name {member!r} {problem}")
        elif member in (MANIFEST_NAME, SIGNATURE_NAME):
            problems.append(f"file name {member!r} is reserved")
        if not isinstance(entry, dict):
            problems.append(f"'files' entry {member!r} must be an object with sha256 and size")
            continue
        digest, size = entry.get("sha256"), entry.get("size")
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            problems.append(f"'files' entry {member!r} needs 'sha256' as 64 lowercase hex digits")
        if not _is_int(size) or size < 0:
            problems.append(f"'files' entry {member!r} needs 'size' as a non-negative integer")
    problems.extend(_variant_problems(obj.get("variants"), files))
    return problems


def _variant_problems(variants: Any, files: Mapping[str, Any]) -> list[str]:
    if not isinstance(variants, list):
        return ["'variants' must be a list of objects"]
    problems: list[str] = []
    seen: set[str] = set()
    for i, variant in enumerate(variants):
        if not isinstance(variant, dict):
            problems.append(f"variant {i} must be an object")
            continue
        for key in ("id", "engine", "precision"):
            if not _nonempty_str(variant.get(key)):
                problems.append(f"variant {i} needs {key!r} as a non-empty string")
        vid = variant.get("id")
        if isinstance(vid, str):
            if vid in seen:
                problems.append(f"variant id {vid!r} appears twice")
            seen.add(vid)
        file = variant.get("file")
        if not isinstance(file, str) or file not in files:
            problems.append(f"variant {i} needs 'file' naming an entry of 'files' (got {file!r})")
    return problems


class FileEntry(NamedTuple):
    """What the manifest promises about one payload file."""

    sha256: str
    size: int


class Manifest(Mapping[str, Any]):
    """A verified manifest: read-only access to the parsed ``manifest.json``.

    Item access returns deep copies, so callers cannot change what was verified.

    Attributes:
        raw: The exact signed bytes of ``manifest.json``.
        key_id: Id of the trusted key that signed it.
    """

    def __init__(self, data: Mapping[str, Any], raw: bytes, key_id: str) -> None:
        self._data = copy.deepcopy(dict(data))
        self.raw = raw
        self.key_id = key_id

    def __getitem__(self, key: str) -> Any:
        return copy.deepcopy(self._data[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Manifest(name={self.name!r}, version={self.version!r}, key_id={self.key_id!r})"

    @property
    def name(self) -> str:
        """Bundle name, e.g. ``"kws"``."""
        return self._data["name"]

    @property
    def version(self) -> str:
        """Bundle version, semver."""
        return self._data["version"]

    @property
    def files(self) -> dict[str, FileEntry]:
        """Payload member name -> promised sha256 and size."""
        return {name: FileEntry(e["sha256"], e["size"]) for name, e in self._data["files"].items()}

    @property
    def variants(self) -> list[dict[str, Any]]:
        """Model variants (each with id, file, engine, precision, maybe more)."""
        return copy.deepcopy(self._data["variants"])


# ------------------------------------------------------------------ verification


@dataclass(frozen=True)
class BundleLimits:
    """Upper bounds a device applies before trusting a bundle's headers.

    Attributes:
        max_members: Most archive members (including manifest.json and manifest.sig).
        max_member_size: Largest single member, in bytes.
        max_total_size: Largest sum of member sizes, in bytes.
        max_manifest_size: Largest ``manifest.json``, in bytes.
    """

    max_members: int = 1000
    max_member_size: int = 2 * 1024**3
    max_total_size: int = 4 * 1024**3
    max_manifest_size: int = 4 * 1024**2


class _Verified(NamedTuple):
    manifest: Manifest
    members: list[_ustar.Member]
    digests: dict[str, str]


@contextlib.contextmanager
def _open_bundle(path: PathLike) -> Iterator[BinaryIO]:
    # One open file for every pass, so a bundle swapped on disk mid-way cannot be the
    # one that gets unpacked; unbuffered, so the extraction pass re-reads the disk
    # rather than a buffer from the verification pass. OS errors become one clear
    # BundleError here.
    shown = os.fspath(path)
    try:
        fh = open(path, "rb", buffering=0)
    except FileNotFoundError as exc:
        raise BundleError(f"Bundle {shown} does not exist; check the path.") from exc
    except OSError as exc:
        raise BundleError(f"Cannot open bundle {shown}: {exc.strerror or exc}; check the path and permissions.") from exc
    with fh:
        try:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise BundleError(f"{shown} is not a regular file, so it is not an edgepack bundle; pass the .epk file.")
            yield fh
        except OSError as exc:
            raise BundleError(f"Cannot read bundle {shown}: {exc.strerror or exc}; check the file and try again.") from exc


def _sniff(fh: BinaryIO, shown: str) -> None:
    # Say "not a bundle" only for files that cannot be a damaged bundle: a single
    # flipped byte never turns a bundle's first header into one of these.
    fh.seek(0)
    head = fh.read(_ustar.BLOCK)
    if not head:
        raise BundleError(f"{shown} is empty, not an edgepack bundle; re-download or rebuild it.")
    for magic, kind in _COMPRESSED_MAGIC:
        if head.startswith(magic):
            raise BundleError(
                f"{shown} is a {kind}-compressed file, not an edgepack bundle: pass the .epk file itself "
                "(bundles are never compressed)."
            )
    if head[257:263] != b"ustar\0" and not head.startswith(MANIFEST_NAME.encode() + b"\0"):
        raise BundleError(f"{shown} is not an edgepack bundle (not a ustar archive that starts with manifest.json); check the path.")


def _walk(fh: BinaryIO, shown: str, limits: BundleLimits) -> list[_ustar.Member]:
    _sniff(fh, shown)
    members = list(_ustar.iter_members(
        fh, max_members=limits.max_members, max_member_size=limits.max_member_size,
        max_total_size=limits.max_total_size,
    ))
    if not members or members[0].name != MANIFEST_NAME:
        first = repr(members[0].name) if members else "nothing"
        raise BundleError(
            f"{shown} is not an edgepack bundle: its first member is {first}, not {MANIFEST_NAME!r}; rebuild it with edgepack."
        )
    if len(members) < 2 or members[1].name != SIGNATURE_NAME:
        raise BundleError(
            f"Bundle member {SIGNATURE_NAME!r} is missing (it must follow {MANIFEST_NAME!r}): the bundle is unsigned "
            "or damaged; rebuild it with edgepack."
        )
    for prev, cur in zip(members[2:], members[3:]):
        if cur.name <= prev.name:
            raise BundleError(
                f"Bundle member {cur.name!r} comes after {prev.name!r}, out of the canonical order: the archive was "
                "not written by edgepack; rebuild it with edgepack."
            )
    return members


def _read_whole(fh: BinaryIO, member: _ustar.Member) -> bytes:
    return b"".join(_ustar.read_data(fh, member, _CHUNK))


def _sha256_member(fh: BinaryIO, member: _ustar.Member) -> str:
    digest = hashlib.sha256()
    for chunk in _ustar.read_data(fh, member, _CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _parse_signature(data: bytes) -> tuple[str, bytes]:
    obj = _parse_canonical_json(data, SIGNATURE_NAME)
    if not isinstance(obj, dict) or set(obj) != {"alg", "key_id", "sig"}:
        raise BundleError(f"Bundle member {SIGNATURE_NAME!r} must hold exactly 'alg', 'key_id' and 'sig': {_REBUILD}")
    if obj["alg"] != SIGNATURE_ALG:
        raise BundleError(
            f"Bundle member {SIGNATURE_NAME!r} uses signature algorithm {obj['alg']!r}; this runtime verifies only "
            f"{SIGNATURE_ALG!r}. Rebuild the bundle with edgepack."
        )
    key_id, encoded = obj["key_id"], obj["sig"]
    if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
        raise BundleError(f"Bundle member {SIGNATURE_NAME!r} has a malformed key id {key_id!r}: {_REBUILD}")
    try:
        signature = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
    except (binascii.Error, ValueError):
        signature = b""
    # Only the canonical spelling counts: base64 ignores some low bits of the last
    # character, and a changed byte of the bundle must never still verify.
    if len(signature) != 64 or base64.b64encode(signature).decode("ascii") != encoded:
        raise BundleError(f"Bundle member {SIGNATURE_NAME!r} holds a malformed signature: {_REBUILD}")
    return key_id, signature


def _check_signature(manifest_raw: bytes, key_id: str, signature: bytes, keys: list[PublicKey]) -> PublicKey:
    candidates = [key for key in keys if key.key_id == key_id]
    if not candidates:
        trusted = ", ".join(sorted({key.key_id for key in keys}))
        raise VerificationError(
            f"The bundle was signed by key id {key_id} (per {SIGNATURE_NAME!r}), which is not among the trusted keys "
            f"({trusted}): if you trust its publisher, pass that key's public key."
        )
    for key in candidates:
        if _ed25519.verify(key.raw, manifest_raw, signature):
            return key
    raise VerificationError(
        f"The signature in {SIGNATURE_NAME!r} does not match {MANIFEST_NAME!r} under trusted key {key_id}: {_REBUILD}"
    )


def _check_member_list(files: Mapping[str, Any], payload: list[_ustar.Member]) -> None:
    for member in payload:
        entry = files.get(member.name)
        if entry is None:
            raise VerificationError(
                f"Bundle member {member.name!r} is not listed in {MANIFEST_NAME!r}, so the signature does not cover it: "
                f"{_REBUILD}"
            )
        if member.size != entry["size"]:
            raise VerificationError(
                f"Bundle member {member.name!r} is {member.size} bytes but {MANIFEST_NAME!r} says {entry['size']}: "
                f"{_REBUILD}"
            )
    missing = sorted(set(files) - {member.name for member in payload})
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise VerificationError(
            f"Bundle member {missing[0]!r}{more} is listed in {MANIFEST_NAME!r} but missing from the archive: {_REBUILD}"
        )


def _as_key_list(trusted_keys: PublicKey | Iterable[PublicKey]) -> list[PublicKey]:
    keys = [trusted_keys] if isinstance(trusted_keys, PublicKey) else list(trusted_keys)
    for key in keys:
        if not isinstance(key, PublicKey):
            raise TypeError(f"trusted_keys must hold PublicKey objects (see load_public_key), not {type(key).__name__}")
    if not keys:
        raise EdgepackError("No trusted public keys were given, so no bundle can verify; pass the publisher's .pub file.")
    return keys


def _verify_open(fh: BinaryIO, shown: str, keys: list[PublicKey], limits: BundleLimits) -> _Verified:
    # Order matters: cheap structural checks first, then the signature over the
    # manifest, and only then hashing of (possibly large) signed members.
    members = _walk(fh, shown, limits)
    manifest_member, signature_member = members[0], members[1]
    if manifest_member.size > limits.max_manifest_size:
        raise BundleError(
            f"Bundle member {MANIFEST_NAME!r} is {manifest_member.size} bytes, over the limit of "
            f"{limits.max_manifest_size}: refusing it. Raise BundleLimits.max_manifest_size if you trust this bundle."
        )
    manifest_raw = _read_whole(fh, manifest_member)
    obj = _parse_canonical_json(manifest_raw, MANIFEST_NAME)
    problems = validate_manifest(obj)
    if problems:
        # A hostile manifest can have thousands of problems; a few make the point.
        shown_problems = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        raise BundleError(f"Bundle member {MANIFEST_NAME!r} is invalid: {shown_problems}. Rebuild the bundle with edgepack.")
    if signature_member.size > _MAX_SIGNATURE_SIZE:
        raise BundleError(f"Bundle member {SIGNATURE_NAME!r} is {signature_member.size} bytes, far too large: {_REBUILD}")
    signature_raw = _read_whole(fh, signature_member)
    key_id, signature = _parse_signature(signature_raw)
    key = _check_signature(manifest_raw, key_id, signature, keys)
    files = obj["files"]
    _check_member_list(files, members[2:])
    digests = {
        MANIFEST_NAME: hashlib.sha256(manifest_raw).hexdigest(),
        SIGNATURE_NAME: hashlib.sha256(signature_raw).hexdigest(),
    }
    for member in members[2:]:
        digest = _sha256_member(fh, member)
        if digest != files[member.name]["sha256"]:
            raise VerificationError(
                f"Bundle member {member.name!r} does not match the sha256 in its manifest: {_REBUILD}"
            )
        digests[member.name] = digest
    return _Verified(Manifest(obj, manifest_raw, key.key_id), members, digests)


def verify_bundle(
    path: PathLike,
    trusted_keys: PublicKey | Iterable[PublicKey],
    limits: BundleLimits = BundleLimits(),
) -> Manifest:
    """Verify a bundle completely without unpacking it.

    Checks, in order: the archive structure (canonical headers, zero padding, end of
    archive, limits), ``manifest.json`` (size, canonical JSON, :func:`validate_manifest`),
    the signature in ``manifest.sig`` by one of ``trusted_keys``, and then every
    member's size and sha256 against the manifest. Memory stays bounded: members are
    hashed in 1 MiB chunks.

    Args:
        path: The ``.epk`` file.
        trusted_keys: Keys whose signatures are accepted (see :func:`load_public_key`).
        limits: Size and count limits applied before reading data.

    Returns:
        The verified manifest.

    Raises:
        BundleError: The bundle is missing, malformed, unsafe or over a limit.
        VerificationError: The signature is missing, unknown or wrong, or a member
            does not match the manifest. Messages name the member involved.
        EdgepackError: ``trusted_keys`` is empty.
    """
    keys = _as_key_list(trusted_keys)
    with _open_bundle(path) as fh:
        return _verify_open(fh, os.fspath(path), keys, limits).manifest


def read_member(
    path: PathLike,
    name: str,
    limits: BundleLimits = BundleLimits(),
    max_size: int = 4 * 1024**2,
) -> bytes:
    """Read one small member after checking the archive structure.

    This does NOT check the signature or hashes: use it to show what a bundle claims
    to be (e.g. its manifest) before deciding to verify it, and call
    :func:`verify_bundle` before trusting the bytes.

    Args:
        path: The ``.epk`` file.
        name: Member name, e.g. ``"manifest.json"``.
        limits: Size and count limits for the archive walk.
        max_size: Refuse members larger than this many bytes.

    Returns:
        The member's data.

    Raises:
        BundleError: The archive is malformed, has no such member, or the member is
            larger than ``max_size``.
    """
    with _open_bundle(path) as fh:
        for member in _walk(fh, os.fspath(path), limits):
            if member.name == name:
                if member.size > max_size:
                    raise BundleError(
                        f"Bundle member {name!r} is {member.size} bytes, more than the {max_size} allowed here; "
                        "extract the bundle to read it."
                    )
                return _read_whole(fh, member)
    raise BundleError(f"Bundle {os.fspath(path)} has no member {name!r}; check the name.")


# -------------------------------------------------------------------- extraction


def extract_bundle(
    path: PathLike,
    dest_dir: PathLike,
    trusted_keys: PublicKey | Iterable[PublicKey],
    limits: BundleLimits = BundleLimits(),
    *,
    on_member: Callable[[str], None] | None = None,
) -> Manifest:
    """Verify a bundle, then unpack all of its members into a new directory.

    Nothing is written before the whole bundle verified. Members are unpacked into a
    temporary directory next to ``dest_dir``, re-hashed while written (a file changed
    between the two passes is caught), fsynced, and the directory is then renamed to
    ``dest_dir`` in one step; on any failure the temporary directory is removed, so
    ``dest_dir`` either holds the complete verified bundle or does not exist. Symlinks
    are never followed or created.

    Args:
        path: The ``.epk`` file.
        dest_dir: Directory to create; it must not exist, its parent must.
        trusted_keys: Keys whose signatures are accepted.
        limits: Size and count limits applied before reading data.
        on_member: Called with each member name after it is written (progress, and
            the hook power-loss tests use to stop the process mid-extraction).

    Returns:
        The verified manifest.

    Raises:
        BundleError: The bundle is malformed or unsafe, ``dest_dir`` already exists, or
            writing failed.
        VerificationError: The signature or a hash did not match, or the bundle
            changed on disk during extraction.
    """
    keys = _as_key_list(trusted_keys)
    dest = Path(dest_dir)
    parent = dest.parent
    if os.path.lexists(dest):
        raise BundleError(f"Cannot extract into {dest}: it already exists; remove it or choose a new directory.")
    if not parent.is_dir():
        raise BundleError(f"Cannot extract into {dest}: directory {parent} does not exist; create it first.")
    with _open_bundle(path) as fh:
        verified = _verify_open(fh, os.fspath(path), keys, limits)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=parent))
        except OSError as exc:
            raise BundleError(f"Cannot extract into {dest}: {exc.strerror or exc}; choose a writable directory.") from exc
        try:
            _unpack(fh, verified, tmp, on_member)
            if os.path.lexists(dest):
                raise BundleError(f"Cannot extract into {dest}: it appeared while extracting; remove it and try again.")
            os.rename(tmp, dest)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BundleError(f"Cannot extract into {dest}: {exc.strerror or exc}; free space or fix permissions and try again.") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    fsync_dir(parent)
    return verified.manifest


def _unpack(fh: BinaryIO, verified: _Verified, root: Path, on_member: Callable[[str], None] | None = None) -> None:
    created = [root]
    for member in verified.members:
        directory = root
        for part in member.name.split("/")[:-1]:
            directory = directory / part
            try:
                os.mkdir(directory, 0o755)
                created.append(directory)
            except FileExistsError:
                # Only directories we made can be here; anything else is a race.
                if not stat.S_ISDIR(os.lstat(directory).st_mode):
                    raise BundleError(f"Cannot extract bundle member {member.name!r}: {directory} is not a directory.") from None
        _unpack_member(fh, member, directory / member.name.rsplit("/", 1)[-1], verified.digests[member.name])
        if on_member is not None:
            on_member(member.name)
    for directory in reversed(created):
        os.chmod(directory, 0o755)  # mkdtemp made the root 0700
        fsync_dir(directory)


def _unpack_member(fh: BinaryIO, member: _ustar.Member, target: Path, expected: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(target, flags, 0o644)
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
        for chunk in _ustar.read_data(fh, member, _CHUNK):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(target, 0o644)
    if digest.hexdigest() != expected:
        raise VerificationError(
            f"Bundle member {member.name!r} changed on disk between verification and extraction: nothing was "
            "extracted; make sure nothing writes to the bundle and try again."
        )


# ------------------------------------------------------------- unpacked bundles


def verify_extracted(directory: PathLike, trusted_keys: PublicKey | Iterable[PublicKey], limits: BundleLimits = BundleLimits()) -> Manifest:
    """Re-verify a bundle unpacked by :func:`extract_bundle` (e.g. at every start).

    Checks the signature over the stored ``manifest.json`` and every listed file's
    size and sha256, so a model corrupted on disk since installation is caught.

    Raises:
        BundleError: The manifest or signature file is missing or malformed.
        VerificationError: The signature or a file's hash does not match; the message
            names the file.
    """
    keys = _as_key_list(trusted_keys)
    root = Path(directory)
    try:
        manifest_raw = (root / MANIFEST_NAME).read_bytes()[: limits.max_manifest_size + 1]
        signature_raw = (root / SIGNATURE_NAME).read_bytes()[: _MAX_SIGNATURE_SIZE + 1]
    except OSError as exc:
        raise BundleError(f"The installed bundle in {root} lacks {MANIFEST_NAME} or {SIGNATURE_NAME} ({exc.strerror}); reinstall it.") from exc
    if len(manifest_raw) > limits.max_manifest_size or len(signature_raw) > _MAX_SIGNATURE_SIZE:
        raise BundleError(f"The installed bundle in {root} has an oversized manifest or signature; reinstall it.")
    obj = _parse_canonical_json(manifest_raw, MANIFEST_NAME)
    problems = validate_manifest(obj)
    if problems:
        raise BundleError(f"The installed manifest in {root} is invalid: {'; '.join(problems[:5])}. Reinstall the bundle.")
    key_id, signature = _parse_signature(signature_raw)
    key = _check_signature(manifest_raw, key_id, signature, keys)
    for name, entry in obj["files"].items():
        target = root / name
        digest = hashlib.sha256()
        size = 0
        try:
            with open(target, "rb") as fh:
                for chunk in iter(lambda: fh.read(_CHUNK), b""):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise VerificationError(f"Installed bundle file {name!r} cannot be read ({exc.strerror}); the install is damaged — roll back or reinstall.") from exc
        if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
            raise VerificationError(f"Installed bundle file {name!r} does not match its manifest: it was corrupted on disk; roll back or reinstall.")
    return Manifest(obj, manifest_raw, key.key_id)
