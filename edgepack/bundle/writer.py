"""Write signed bundles (``NAME-VERSION.epk``) deterministically.

The same manifest, members, key and timestamp always give a byte-identical file:
members are sorted, every header field is fixed except the mtime (taken from
``SOURCE_DATE_EPOCH`` or 0), and Ed25519 signatures are deterministic. The archive
format and the manifest rules are the device runtime's (:mod:`edgepack_runtime.bundle`),
so whatever this writes, a device accepts.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from edgepack_runtime import _ustar
from edgepack_runtime.bundle import (
    MANIFEST_NAME,
    SIGNATURE_ALG,
    SIGNATURE_NAME,
    BundleLimits,
    canonical_json,
    validate_manifest,
)

from .._atomic import atomic_writer
from ..errors import ConfigError, InputError, OutputError
from .keys import load_private_key, public_key_of

__all__ = ["DEFAULT_MTIME", "bundle_filename", "source_date_epoch_from_env", "write_bundle"]

DEFAULT_MTIME = 0
_CHUNK = 1 << 20

MemberSource = Union[bytes, bytearray, memoryview, "os.PathLike[str]"]


def source_date_epoch_from_env(environ: Mapping[str, str] | None = None) -> int:
    """Return the member mtime: ``SOURCE_DATE_EPOCH`` if set, else :data:`DEFAULT_MTIME`.

    Args:
        environ: Environment to read; defaults to ``os.environ``.

    Raises:
        ConfigError: ``SOURCE_DATE_EPOCH`` is set but is not a whole number of seconds
            that fits a tar header.
    """
    value = (os.environ if environ is None else environ).get("SOURCE_DATE_EPOCH")
    if value is None:
        return DEFAULT_MTIME
    if not (value.isascii() and value.isdigit()) or int(value) > _ustar.MAX_MTIME:
        raise ConfigError(
            f"SOURCE_DATE_EPOCH={value!r} is not a valid timestamp: set it to whole seconds since 1970 (e.g. the "
            "output of 'git log -1 --format=%ct') or unset it."
        )
    return int(value)


def bundle_filename(name: str, version: str) -> str:
    """Return the conventional file name of a bundle, ``NAME-VERSION.epk``."""
    return f"{name}-{version}.epk"


@dataclass(frozen=True)
class _Source:
    name: str
    size: int
    sha256: str
    data: bytes | None
    path: Path | None


def _file_chunks(name: str, path: Path, size: int) -> Iterator[bytes]:
    # The one place where reading a member's source file can fail; reads exactly
    # ``size`` bytes so a file that grows or shrinks meanwhile is caught, not copied.
    try:
        with open(path, "rb") as fh:
            remaining = size
            while remaining:
                chunk = fh.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                yield chunk
            changed = bool(remaining) or bool(fh.read(1))
    except OSError as exc:
        raise InputError(f"Cannot read {path} for bundle member {name!r}: {exc.strerror or exc}; check the file.") from exc
    if changed:
        raise InputError(
            f"{path} (bundle member {name!r}) changed size while the bundle was being written; make sure nothing "
            "writes to it and try again."
        )


def _source_chunks(source: _Source) -> Iterator[bytes]:
    if source.data is not None:
        view = memoryview(source.data)
        for start in range(0, len(view), _CHUNK):
            yield bytes(view[start:start + _CHUNK])
        return
    assert source.path is not None
    digest = hashlib.sha256()
    for chunk in _file_chunks(source.name, source.path, source.size):
        digest.update(chunk)
        yield chunk
    if digest.hexdigest() != source.sha256:
        raise InputError(
            f"{source.path} (bundle member {source.name!r}) changed while the bundle was being written; make sure "
            "nothing writes to it and try again."
        )


def _check_name(name: Any) -> None:
    problem = _ustar.name_problem(name)
    if problem:
        raise InputError(
            f"Bundle member name {name!r} {problem}: use a relative POSIX path of printable ASCII, at most "
            f"{_ustar.NAME_MAX} bytes, without '..', '.', empty segments or backslashes."
        )
    if name in (MANIFEST_NAME, SIGNATURE_NAME):
        raise InputError(f"Bundle member name {name!r} is reserved for the bundle's own metadata; rename the file.")


def _collect(members: Mapping[str, MemberSource]) -> list[_Source]:
    sources = []
    for name in sorted(members):
        _check_name(name)
        value = members[name]
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            sources.append(_Source(name, len(data), hashlib.sha256(data).hexdigest(), data, None))
        elif isinstance(value, os.PathLike):
            path = Path(value)
            try:
                size = path.stat().st_size
                regular = path.is_file()
            except OSError as exc:
                raise InputError(f"Cannot read {path} for bundle member {name!r}: {exc.strerror or exc}; check the path.") from exc
            if not regular:
                raise InputError(f"{path} (bundle member {name!r}) is not a regular file; pass a file.")
            digest = hashlib.sha256()
            for chunk in _file_chunks(name, path, size):
                digest.update(chunk)
            sources.append(_Source(name, size, digest.hexdigest(), None, path))
        else:
            raise TypeError(f"bundle member {name!r} must be bytes or a Path, not {type(value).__name__}")
        if sources[-1].size > _ustar.MAX_SIZE:
            raise InputError(f"Bundle member {name!r} is {sources[-1].size} bytes; bundle members must be under 8 GiB.")
    names = {source.name for source in sources}
    for source in sources:
        parts = source.name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                raise InputError(
                    f"Bundle member {source.name!r} needs {'/'.join(parts[:i])!r} to be a directory, but that is also a "
                    "member file; rename one of them."
                )
    return sources


def _signed_manifest(manifest: Mapping[str, Any], sources: list[_Source], private_key_path: Any) -> tuple[bytes, bytes]:
    doc = dict(manifest)
    doc["files"] = {source.name: {"sha256": source.sha256, "size": source.size} for source in sources}
    problems = validate_manifest(doc)
    if problems:
        raise ConfigError(f"The bundle manifest is invalid: {'; '.join(problems)}. Fix the bundle's name, version or variants.")
    try:
        manifest_raw = canonical_json(doc)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"The bundle manifest cannot be written as JSON ({exc}); use only strings, numbers, lists and objects.") from exc
    limit = BundleLimits().max_manifest_size
    if len(manifest_raw) > limit:
        raise ConfigError(f"The bundle manifest is {len(manifest_raw)} bytes; devices accept at most {limit}. Remove entries from it.")
    key = load_private_key(private_key_path)
    signature = {
        "alg": SIGNATURE_ALG,
        "key_id": public_key_of(key).key_id,
        "sig": base64.b64encode(key.sign(manifest_raw)).decode("ascii"),
    }
    return manifest_raw, canonical_json(signature)


def write_bundle(
    out_path: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    members: Mapping[str, MemberSource],
    private_key_path: str | os.PathLike[str],
    source_date_epoch: int | None = None,
) -> Path:
    """Sign and write a bundle atomically.

    Args:
        out_path: The ``.epk`` file to write, or an existing directory to write
            ``NAME-VERSION.epk`` into.
        manifest: ``format_version``, ``name``, ``version``, ``variants`` and any extra
            keys; ``files`` is filled in from ``members`` (the argument is not changed).
        members: Member name (relative POSIX path) -> content as bytes or a file Path.
            Files are streamed, never loaded whole.
        private_key_path: The Ed25519 ``.key`` file to sign with.
        source_date_epoch: mtime of every member; None reads ``SOURCE_DATE_EPOCH``
            from the environment (or uses 0).

    Returns:
        The path written.

    Raises:
        InputError: A member name is unsafe or reserved, a member file is unreadable or
            changed while being written, or the private key is unusable.
        ConfigError: The manifest is invalid, or ``SOURCE_DATE_EPOCH`` is malformed.
        OutputError: The bundle cannot be written.
    """
    if source_date_epoch is None:
        mtime = source_date_epoch_from_env()
    elif isinstance(source_date_epoch, bool) or not isinstance(source_date_epoch, int) or not 0 <= source_date_epoch <= _ustar.MAX_MTIME:
        raise ConfigError(f"source_date_epoch={source_date_epoch!r} is not a valid timestamp: pass whole seconds since 1970.")
    else:
        mtime = source_date_epoch
    sources = _collect(members)
    manifest_raw, signature_raw = _signed_manifest(manifest, sources, private_key_path)
    out = Path(out_path)
    if out.is_dir():
        out = out / bundle_filename(manifest["name"], manifest["version"])
    try:
        with atomic_writer(out) as fh:
            _ustar.write_member(fh, MANIFEST_NAME, len(manifest_raw), mtime, [manifest_raw])
            _ustar.write_member(fh, SIGNATURE_NAME, len(signature_raw), mtime, [signature_raw])
            for source in sources:
                _ustar.write_member(fh, source.name, source.size, mtime, _source_chunks(source))
            _ustar.write_end(fh)
    except OSError as exc:
        raise OutputError(f"Cannot write bundle {out}: {exc.strerror or exc}. Choose a writable path with free space.") from exc
    return out
