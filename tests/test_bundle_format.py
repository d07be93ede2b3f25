"""Signed bundle format: writer, strict reader, verification and safe extraction.

Most tests are attacks or accidents a device must survive; each test name says which.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgepack.bundle import (
    BundleLimits,
    PublicKey,
    extract_bundle,
    generate_keypair,
    load_private_key,
    load_public_key,
    read_member,
    validate_manifest,
    verify_bundle,
    write_bundle,
)
from edgepack.errors import BundleError, ConfigError, EdgepackError, InputError, OutputError, VerificationError
from edgepack_runtime import _ustar
from edgepack_runtime import bundle as runtime_bundle
from edgepack_runtime.bundle import canonical_json, key_id_for

MANIFEST = {
    "format_version": 1,
    "name": "kws",
    "version": "1.2.0-rc.1",
    "variants": [{"id": "fp32", "file": "models/a.bin", "engine": "onnxruntime", "precision": "fp32"}],
    "extra": {"note": "unknown top-level keys are allowed"},
}
PAYLOAD = {"models/a.bin": bytes(range(256)) * 2 + b"model" * 17, "labels.txt": b"yes\nno\n"}


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    generate_keypair(directory, "signer")
    generate_keypair(directory, "other")
    return directory


@pytest.fixture(scope="module")
def signer(keydir: Path) -> tuple[Path, PublicKey]:
    return keydir / "signer.key", load_public_key(keydir / "signer.pub")


@pytest.fixture(scope="module")
def other_key(keydir: Path) -> PublicKey:
    return load_public_key(keydir / "other.pub")


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory, signer: tuple[Path, PublicKey]) -> bytes:
    out = tmp_path_factory.mktemp("bundle") / "kws.epk"
    write_bundle(out, MANIFEST, PAYLOAD, signer[0], source_date_epoch=0)
    return out.read_bytes()


def _write(tmp_path: Path, data: bytes, name: str = "b.epk") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _layout(data: bytes) -> list[_ustar.Member]:
    limits = BundleLimits()
    return list(_ustar.iter_members(
        io.BytesIO(data), max_members=limits.max_members, max_member_size=limits.max_member_size,
        max_total_size=limits.max_total_size,
    ))


def _forged_header(name: bytes, size: int = 0, typeflag: bytes = b"0", size_field: bytes | None = None) -> bytes:
    # A header with a correct checksum but contents our writer would never produce.
    hdr = bytearray(_ustar.header("x", 0, 0))
    hdr[0:100] = name.ljust(100, b"\0")
    hdr[124:136] = size_field if size_field is not None else b"%011o\0" % size
    hdr[156:157] = typeflag
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def _sign(manifest: dict, key_path: Path, key_id: str | None = None) -> tuple[bytes, bytes]:
    key = load_private_key(key_path)
    raw = canonical_json(manifest)
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = {"alg": "ed25519", "key_id": key_id or key_id_for(public), "sig": base64.b64encode(key.sign(raw)).decode()}
    return raw, canonical_json(sig)


def _archive(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    for name, data in members:
        _ustar.write_member(out, name, len(data), 0, [data])
    _ustar.write_end(out)
    return out.getvalue()


def _crafted(key_path: Path, payload: list[tuple[str, bytes]], files: dict | None = None, **manifest_changes) -> bytes:
    """A bundle signed by ``key_path`` whose manifest ``files`` may disagree with the archive."""
    manifest = dict(MANIFEST, **manifest_changes)
    if files is None:
        files = {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in payload}
    manifest["files"] = files
    raw, sig = _sign(manifest, key_path)
    return _archive([("manifest.json", raw), ("manifest.sig", sig), *payload])


def _payload_list() -> list[tuple[str, bytes]]:
    return sorted(PAYLOAD.items())


# ----------------------------------------------------------------- happy paths


def test_round_trip_write_verify_extract(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # several 1 MiB chunks, odd tail
    members = {**PAYLOAD, "models/big.bin": big}
    out = write_bundle(tmp_path, MANIFEST, members, signer[0])
    assert out == tmp_path / "kws-1.2.0-rc.1.epk"
    manifest = verify_bundle(out, [signer[1]])
    assert (manifest.name, manifest.version, manifest.key_id) == ("kws", "1.2.0-rc.1", signer[1].key_id)
    assert manifest.files["models/big.bin"].size == big.stat().st_size
    assert manifest.variants[0]["file"] == "models/a.bin"
    assert manifest["extra"] == MANIFEST["extra"]
    dest = tmp_path / "unpacked"
    assert extract_bundle(out, dest, signer[1]).raw == manifest.raw
    assert (dest / "models" / "big.bin").read_bytes() == big.read_bytes()
    for name, data in PAYLOAD.items():
        assert (dest / name).read_bytes() == data
        assert stat.S_IMODE((dest / name).stat().st_mode) == 0o644
    assert (dest / "manifest.json").read_bytes() == manifest.raw
    assert read_member(out, "manifest.sig") == (dest / "manifest.sig").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["big.bin", "kws-1.2.0-rc.1.epk", "unpacked"])


def test_writer_does_not_mutate_callers_manifest_and_manifest_is_read_only(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    original = json.loads(json.dumps(MANIFEST))
    out = write_bundle(tmp_path / "x.epk", original, PAYLOAD, signer[0])
    assert original == MANIFEST and "files" not in original
    manifest = verify_bundle(out, [signer[1]])
    manifest.variants[0]["file"] = "evil"
    manifest["variants"].clear()
    assert manifest.variants[0]["file"] == "models/a.bin"


def test_any_tar_can_list_a_bundle(small_bundle: bytes, tmp_path: Path) -> None:
    path = _write(tmp_path, small_bundle)
    with tarfile.open(path) as archive:
        assert archive.getnames() == ["manifest.json", "manifest.sig", "labels.txt", "models/a.bin"]
        assert all(m.isreg() and m.mode == 0o644 and m.uid == 0 and m.uname == "" for m in archive.getmembers())
    if shutil.which("tar"):
        listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True).stdout
        assert listing.split() == ["manifest.json", "manifest.sig", "labels.txt", "models/a.bin"]


def test_same_inputs_give_byte_identical_bundles(tmp_path: Path, signer: tuple[Path, PublicKey], small_bundle: bytes) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(PAYLOAD["models/a.bin"])
    members = {"labels.txt": PAYLOAD["labels.txt"], "models/a.bin": src}  # Path or bytes: same bundle
    first = write_bundle(tmp_path / "1.epk", MANIFEST, members, signer[0], source_date_epoch=0).read_bytes()
    second = write_bundle(tmp_path / "2.epk", MANIFEST, dict(reversed(list(PAYLOAD.items()))), signer[0], 0).read_bytes()
    assert first == second == small_bundle


def test_source_date_epoch_changes_only_mtime_and_checksum_bytes(
    tmp_path: Path, signer: tuple[Path, PublicKey], small_bundle: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    stamped = write_bundle(tmp_path / "s.epk", MANIFEST, PAYLOAD, signer[0]).read_bytes()
    assert len(stamped) == len(small_bundle) and stamped != small_bundle
    headers = [m.header_offset for m in _layout(stamped)]
    changed = {i for i, (a, b) in enumerate(zip(stamped, small_bundle)) if a != b}
    assert changed and all(any(h + 136 <= i < h + 156 for h in headers) for i in changed)
    assert all(b"%011o\0" % 1700000000 == stamped[h + 136:h + 148] for h in headers)
    assert write_bundle(tmp_path / "t.epk", MANIFEST, PAYLOAD, signer[0]).read_bytes() == stamped
    verify_bundle(tmp_path / "s.epk", [signer[1]])


@pytest.mark.parametrize("value", ["", "abc", "-1", "1.5", " 1", "99999999999999"])
def test_malformed_source_date_epoch_is_refused(tmp_path: Path, signer: tuple[Path, PublicKey], monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    with pytest.raises(ConfigError, match="SOURCE_DATE_EPOCH"):
        write_bundle(tmp_path / "x.epk", MANIFEST, PAYLOAD, signer[0])
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------ every byte is protected


def _expected_words(layout: list[_ustar.Member], end: int, pos: int) -> list[str]:
    for m in layout:
        if m.header_offset <= pos < m.offset:
            if pos - m.header_offset < 100:  # the name itself may be the damaged byte
                return [f"member {m.index} ", f"header at byte {m.header_offset}"]
            return [f"'{m.name}'", "header"]
        if m.offset <= pos < m.offset + m.size:
            if m.name in ("manifest.json", "manifest.sig"):
                return [f"'{m.name}'"]
            return [f"'{m.name}'", "sha256"]
        if m.offset + m.size <= pos < m.offset + _ustar._round_up(m.size):
            return [f"'{m.name}'", "padding"]
    assert pos >= end
    return ["end of archive"]


def test_flipping_any_byte_anywhere_fails_and_names_the_member(
    tmp_path: Path, small_bundle: bytes, signer: tuple[Path, PublicKey]
) -> None:
    layout = _layout(small_bundle)
    end = layout[-1].offset + _ustar._round_up(layout[-1].size)
    assert len(small_bundle) == end + 1024
    path = _write(tmp_path, small_bundle, "flipped.epk")
    fd = os.open(path, os.O_WRONLY)  # flip in place: rewriting the file each time is slow
    try:
        for pos in range(len(small_bundle)):
            # A one-bit flip everywhere; in headers also a whole-byte flip, which turns
            # octal digits and names into non-ASCII instead of other valid characters.
            in_header = any(m.header_offset <= pos < m.offset for m in layout)
            for mask in (0x01, 0xFF) if in_header else (0x01,):
                os.pwrite(fd, bytes([small_bundle[pos] ^ mask]), pos)
                with pytest.raises((BundleError, VerificationError)) as caught:
                    verify_bundle(path, [signer[1]])
                message = str(caught.value)
                for word in _expected_words(layout, end, pos):
                    assert word in message, f"byte {pos} ^ {mask:#x}: {word!r} not in {message!r}"
            os.pwrite(fd, small_bundle[pos:pos + 1], pos)
    finally:
        os.close(fd)
    assert verify_bundle(path, [signer[1]]).name == "kws"


# --------------------------------------------------------------- signatures


def test_bundle_from_an_untrusted_key_is_refused_naming_its_key_id(small_bundle: bytes, tmp_path: Path, signer: tuple[Path, PublicKey], other_key: PublicKey) -> None:
    with pytest.raises(VerificationError) as caught:
        verify_bundle(_write(tmp_path, small_bundle), [other_key])
    assert signer[1].key_id in str(caught.value) and "pass that key's public key" in str(caught.value)
    assert other_key.key_id in str(caught.value)


def test_attacker_key_claiming_a_trusted_key_id_is_refused(tmp_path: Path, keydir: Path, signer: tuple[Path, PublicKey]) -> None:
    manifest = dict(MANIFEST, files={n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in _payload_list()})
    raw, sig = _sign(manifest, keydir / "other.key", key_id=signer[1].key_id)
    path = _write(tmp_path, _archive([("manifest.json", raw), ("manifest.sig", sig), *_payload_list()]))
    with pytest.raises(VerificationError, match="signature in 'manifest.sig' does not match 'manifest.json'"):
        verify_bundle(path, [signer[1]])


def test_non_canonical_base64_signature_spelling_is_refused(small_bundle: bytes, tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    # base64 ignores the low bits of the last character before '=='; such a twin
    # decodes to the same signature but is a changed byte, so it must not verify.
    layout = _layout(small_bundle)
    sig_member = layout[1]
    sig = json.loads(small_bundle[sig_member.offset:sig_member.offset + sig_member.size])
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = sig["sig"][-3]
    twin = sig["sig"][:-3] + alphabet[alphabet.index(last) ^ 1] + "=="
    assert base64.b64decode(twin) == base64.b64decode(sig["sig"])
    data = small_bundle.replace(sig["sig"].encode(), twin.encode())
    header = _ustar.header("manifest.sig", sig_member.size, 0)
    assert data[sig_member.header_offset:sig_member.offset] == header
    with pytest.raises(BundleError, match="malformed signature"):
        verify_bundle(_write(tmp_path, data), [signer[1]])


def test_signed_but_non_canonical_manifest_json_is_refused(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    manifest = dict(MANIFEST, files={n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in _payload_list()})
    key = load_private_key(signer[0])
    raw = json.dumps(manifest, indent=1).encode()
    sig = canonical_json({"alg": "ed25519", "key_id": signer[1].key_id, "sig": base64.b64encode(key.sign(raw)).decode()})
    path = _write(tmp_path, _archive([("manifest.json", raw), ("manifest.sig", sig), *_payload_list()]))
    with pytest.raises(BundleError, match="'manifest.json' is not in canonical JSON form"):
        verify_bundle(path, [signer[1]])


@pytest.mark.parametrize("body,word", [
    (b'{"a":1,"a":2}', "duplicate key"),
    (b'{"a":NaN}', "NaN is not allowed"),
    (b'{"a":' + b"9" * 100_000 + b"}", "more than 64 digits"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
])
def test_hostile_unsigned_manifest_json_is_refused_cheaply(tmp_path: Path, signer: tuple[Path, PublicKey], body: bytes, word: str) -> None:
    # manifest.json is parsed before its signature is checked, so parsing must be safe.
    _, sig = _sign(dict(MANIFEST, files={}), signer[0])
    with pytest.raises(BundleError, match=f"'manifest.json' is not valid JSON.*{word}|{word}"):
        verify_bundle(_write(tmp_path, _archive([("manifest.json", body), ("manifest.sig", sig)])), [signer[1]])


def test_no_trusted_keys_is_an_error_not_a_pass(small_bundle: bytes, tmp_path: Path) -> None:
    with pytest.raises(EdgepackError, match="No trusted public keys"):
        verify_bundle(_write(tmp_path, small_bundle), [])


# ------------------------------------------------------- manifest vs archive


def test_member_missing_from_manifest_is_refused(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    payload = _payload_list()
    files = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in payload}
    data = _crafted(signer[0], [*payload, ("zz-smuggled.sh", b"rm -rf /\n")], files=files)
    with pytest.raises(VerificationError, match="'zz-smuggled.sh' is not listed in 'manifest.json'"):
        verify_bundle(_write(tmp_path, data), [signer[1]])


def test_manifest_entry_missing_from_archive_is_refused(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    payload = _payload_list()
    files = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in payload}
    data = _crafted(signer[0], [p for p in payload if p[0] != "labels.txt"], files=files)
    with pytest.raises(VerificationError, match="'labels.txt' is listed in 'manifest.json' but missing from the archive"):
        verify_bundle(_write(tmp_path, data), [signer[1]])


def test_member_size_differing_from_manifest_is_refused(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    payload = _payload_list()
    files = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d) + 1} for n, d in payload}
    with pytest.raises(VerificationError, match="'labels.txt' is 7 bytes but 'manifest.json' says 8"):
        verify_bundle(_write(tmp_path, _crafted(signer[0], payload, files=files)), [signer[1]])


def test_duplicate_member_names_are_refused(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    payload = _payload_list()
    data = _crafted(signer[0], [*payload, ("models/a.bin", b"shadow")])
    with pytest.raises(BundleError, match="'models/a.bin' appears twice"):
        verify_bundle(_write(tmp_path, data), [signer[1]])


def test_members_out_of_canonical_order_are_refused(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    data = _crafted(signer[0], list(reversed(_payload_list())))
    with pytest.raises(BundleError, match="'labels.txt' comes after 'models/a.bin'"):
        verify_bundle(_write(tmp_path, data), [signer[1]])


def test_file_and_directory_of_the_same_path_are_refused(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    with pytest.raises(BundleError, match="clashes"):
        verify_bundle(_write(tmp_path, _crafted(signer[0], [("models", b"x"), ("models/a.bin", b"y")])), [signer[1]])
    with pytest.raises(InputError, match="also a member file"):
        write_bundle(tmp_path / "x.epk", MANIFEST, {"models": b"x", "models/a.bin": b"y"}, signer[0])


def test_manifest_sig_must_follow_manifest_json(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    raw, _ = _sign(dict(MANIFEST, files={}), signer[0])
    with pytest.raises(BundleError, match="'manifest.sig' is missing"):
        verify_bundle(_write(tmp_path, _archive([("manifest.json", raw)])), [signer[1]])
    with pytest.raises(BundleError, match="first member is 'labels.txt'"):
        verify_bundle(_write(tmp_path, _archive([("labels.txt", b"x")])), [signer[1]])


# ----------------------------------------------------------- archive damage


@pytest.mark.parametrize("keep", [100, 512, 700, 1536, -1024, -600, -512, -1])
def test_truncated_archive_is_refused(small_bundle: bytes, tmp_path: Path, signer: tuple[Path, PublicKey], keep: int) -> None:
    with pytest.raises(BundleError, match="truncated|incomplete"):
        verify_bundle(_write(tmp_path, small_bundle[:keep]), [signer[1]])


@pytest.mark.parametrize("garbage", [b"\0", b"\0" * 512, b"\0" * 10240, b"x", b"#!/bin/sh\n" * 60])
def test_trailing_garbage_after_end_of_archive_is_refused(small_bundle: bytes, tmp_path: Path, signer: tuple[Path, PublicKey], garbage: bytes) -> None:
    with pytest.raises(BundleError, match="trailing data after the end of archive"):
        verify_bundle(_write(tmp_path, small_bundle + garbage), [signer[1]])


def test_gzip_compressed_bundle_is_refused_as_not_a_bundle(small_bundle: bytes, tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    with pytest.raises(BundleError, match="gzip-compressed file, not an edgepack bundle"):
        verify_bundle(_write(tmp_path, gzip.compress(small_bundle, mtime=0)), [signer[1]])


@pytest.mark.parametrize("data", [b"", b"hello world\n" * 100, b"\0" * 4096])
def test_files_that_are_not_bundles_are_refused(tmp_path: Path, signer: tuple[Path, PublicKey], data: bytes) -> None:
    with pytest.raises(BundleError, match="not an edgepack bundle|empty"):
        verify_bundle(_write(tmp_path, data), [signer[1]])


def test_missing_bundle_and_directory_are_clear_errors(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        verify_bundle(tmp_path / "nope.epk", [signer[1]])
    with pytest.raises(BundleError, match="Cannot open bundle|not a regular file"):
        verify_bundle(tmp_path, [signer[1]])


# --------------------------------------------------- unsafe names and types


TRAVERSAL_NAMES = ["../x", "/etc/passwd", "a/../../b", "a\\..\\b", "./a", "a//b", "a/", "a/./b", "new\nline", "x" * 101]


@pytest.mark.parametrize("name", TRAVERSAL_NAMES)
def test_writer_refuses_path_traversal_and_unsafe_names(tmp_path: Path, signer: tuple[Path, PublicKey], name: str) -> None:
    with pytest.raises(InputError, match="Bundle member name"):
        write_bundle(tmp_path / "x.epk", MANIFEST, {**PAYLOAD, name: b"pwned"}, signer[0])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["manifest.json", "manifest.sig"])
def test_writer_refuses_reserved_member_names(tmp_path: Path, signer: tuple[Path, PublicKey], name: str) -> None:
    with pytest.raises(InputError, match="reserved"):
        write_bundle(tmp_path / "x.epk", MANIFEST, {**PAYLOAD, name: b"{}"}, signer[0])


@pytest.mark.parametrize("name", [n for n in TRAVERSAL_NAMES if len(n) <= 100] + ["caf\xc3\xa9", "nul\0x"])
def test_reader_refuses_path_traversal_names_with_valid_checksums(tmp_path: Path, signer: tuple[Path, PublicKey], name: str) -> None:
    good = _crafted(signer[0], [], files={})
    end = len(good) - 1024
    evil = _forged_header(name.encode("latin-1"), 5) + b"pwned".ljust(512, b"\0")
    dest = tmp_path / "out"
    with pytest.raises(BundleError, match="unsafe|not in canonical"):
        extract_bundle(_write(tmp_path, good[:end] + evil + bytes(1024)), dest, [signer[1]])
    assert not dest.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b.epk"]


def _with_tarfile_member(good: bytes, member: tarfile.TarInfo) -> bytes:
    # tarfile's own header for the member, after a genuine manifest and signature.
    return good[:-1024] + member.tobuf(format=tarfile.USTAR_FORMAT) + bytes(1024)


def _info(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize("info,kind", [
    (_info("models/a.bin", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
    (_info("models/a.bin", tarfile.LNKTYPE, "/etc/shadow"), "hard link"),
    (_info("dev/sda", tarfile.BLKTYPE), "block device"),
    (_info("dev/tty", tarfile.CHRTYPE), "character device"),
    (_info("fifo", tarfile.FIFOTYPE), "FIFO"),
    (_info("models", tarfile.DIRTYPE), "directory"),
])
def test_links_devices_and_directories_made_by_tarfile_are_refused(tmp_path: Path, signer: tuple[Path, PublicKey], info: tarfile.TarInfo, kind: str) -> None:
    dest = tmp_path / "out"
    data = _with_tarfile_member(_crafted(signer[0], [], files={}), info)
    with pytest.raises(BundleError, match=f"describes a {kind}.*only contain regular files"):
        extract_bundle(_write(tmp_path, data), dest, [signer[1]])
    assert not dest.exists()


@pytest.mark.parametrize("typeflag,kind", [(b"S", "GNU sparse file"), (b"x", "pax extended header"), (b"L", "GNU long name"), (b"\0", "old-style")])
def test_sparse_pax_and_gnu_extension_members_are_refused(tmp_path: Path, signer: tuple[Path, PublicKey], typeflag: bytes, kind: str) -> None:
    good = _crafted(signer[0], [], files={})
    evil = _forged_header(b"models/a.bin", 3, typeflag) + b"abc".ljust(512, b"\0")
    with pytest.raises(BundleError, match=kind):
        verify_bundle(_write(tmp_path, good[:-1024] + evil + bytes(1024)), [signer[1]])


def test_non_canonical_header_fields_are_refused(tmp_path: Path, signer: tuple[Path, PublicKey], small_bundle: bytes) -> None:
    # Fields that any tar accepts (other mode, owner) but our writer never produces.
    for field, value in ((slice(100, 108), b"0000755\0"), (slice(108, 116), b"0001750\0"), (slice(265, 270), b"root\0")):
        data = bytearray(small_bundle)
        data[field] = value
        data[148:156] = b" " * 8
        data[148:156] = b"%06o\0 " % sum(data[:512])
        with pytest.raises(BundleError, match="'manifest.json'.*not in canonical edgepack form"):
            verify_bundle(_write(tmp_path, bytes(data)), [signer[1]])


# ------------------------------------------------------------------ limits


def test_oversized_member_is_refused_from_its_header_before_reading_data(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    good = _crafted(signer[0], [], files={})
    # The data is not even there: only the header can have triggered the refusal.
    data = good[:-1024] + _forged_header(b"models/a.bin", 10_000)
    with pytest.raises(BundleError, match="'models/a.bin' declares 10000 bytes, over the limit of 1000"):
        verify_bundle(_write(tmp_path, data), [signer[1]], BundleLimits(max_member_size=1000))


def test_member_over_limit_in_a_real_bundle_is_refused(small_bundle: bytes, tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    path = _write(tmp_path, small_bundle)
    sizes = {m.name: m.size for m in _layout(small_bundle)}
    assert sizes["models/a.bin"] == 597 and max(sizes.values()) == 597
    with pytest.raises(BundleError, match="'models/a.bin' declares 597 bytes, over the limit of 596"):
        verify_bundle(path, [signer[1]], BundleLimits(max_member_size=596))
    with pytest.raises(BundleError, match="'models/a.bin' brings the bundle's total size past the limit"):
        verify_bundle(path, [signer[1]], BundleLimits(max_total_size=sum(sizes.values()) - 1))
    verify_bundle(path, [signer[1]], BundleLimits(max_member_size=597, max_total_size=sum(sizes.values())))
    with pytest.raises(BundleError, match="'manifest.json' is .* over the limit"):
        verify_bundle(path, [signer[1]], BundleLimits(max_manifest_size=100))


def test_too_many_members_is_refused(small_bundle: bytes, tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    with pytest.raises(BundleError, match="more than 3 members"):
        verify_bundle(_write(tmp_path, small_bundle), [signer[1]], BundleLimits(max_members=3))
    verify_bundle(_write(tmp_path, small_bundle), [signer[1]], BundleLimits(max_members=4))


HUGE = BundleLimits(max_member_size=10**12, max_total_size=10**12)


@pytest.mark.parametrize("size_field,limits,expected", [
    # GNU base-256 size field claiming 100 GB: over the default limit.
    (b"\x80" + (100 * 10**9).to_bytes(11, "big"), BundleLimits(), "'models/bomb.bin' declares 100000000000 bytes, over"),
    # Same with limits raised: still refused, as a non-canonical header.
    (b"\x80" + (100 * 10**9).to_bytes(11, "big"), HUGE, "'models/bomb.bin'.*not in canonical edgepack form"),
    # Largest canonical size (8 GiB - 1) with limits raised: the data is not there.
    (b"77777777777\0", HUGE, "'models/bomb.bin' declares 8589934591 bytes but the file ends .* truncated"),
])
def test_decompression_bomb_style_huge_declared_size_is_refused_without_allocating(
    tmp_path: Path, signer: tuple[Path, PublicKey], size_field: bytes, limits: BundleLimits, expected: str
) -> None:
    good = _crafted(signer[0], [], files={})
    path = _write(tmp_path, good[:-1024] + _forged_header(b"models/bomb.bin", size_field=size_field) + bytes(1024))
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=expected):
            extract_bundle(path, tmp_path / "out", [signer[1]], limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------- extraction


def test_extract_writes_nothing_when_verification_fails(small_bundle: bytes, tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    data = bytearray(small_bundle)
    data[_layout(small_bundle)[-1].offset + 5] ^= 1
    path = _write(tmp_path, bytes(data))
    with pytest.raises(VerificationError, match="'models/a.bin' does not match the sha256"):
        extract_bundle(path, tmp_path / "out", [signer[1]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.epk"]


def test_extract_removes_everything_if_the_bundle_changes_between_passes(
    small_bundle: bytes, tmp_path: Path, signer: tuple[Path, PublicKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, small_bundle)
    verify_open = runtime_bundle._verify_open

    def verify_then_tamper(*args, **kwargs):
        verified = verify_open(*args, **kwargs)
        with open(path, "r+b") as fh:  # same inode: the open bundle sees the change
            fh.seek(verified.members[-1].offset)
            fh.write(b"EVIL")
        return verified

    monkeypatch.setattr(runtime_bundle, "_verify_open", verify_then_tamper)
    with pytest.raises(VerificationError, match="'models/a.bin' changed on disk between verification and extraction"):
        extract_bundle(path, tmp_path / "out", [signer[1]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.epk"]


def test_extract_refuses_an_existing_destination_and_leaves_it_alone(small_bundle: bytes, tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    path = _write(tmp_path, small_bundle)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="already exists"):
        extract_bundle(path, dest, [signer[1]])
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(BundleError, match="already exists"):
        extract_bundle(path, tmp_path / "link", [signer[1]])
    assert not (tmp_path / "elsewhere").exists()
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_read_member_is_bounded(small_bundle: bytes, tmp_path: Path) -> None:
    path = _write(tmp_path, small_bundle)
    assert json.loads(read_member(path, "manifest.json"))["name"] == "kws"
    with pytest.raises(BundleError, match="more than the 100 allowed"):
        read_member(path, "models/a.bin", max_size=100)
    with pytest.raises(BundleError, match="no member 'nope'"):
        read_member(path, "nope")


# --------------------------------------------------------------- manifests


def _files() -> dict:
    return {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in PAYLOAD.items()}


def test_valid_manifest_has_no_problems_and_allows_unknown_keys() -> None:
    assert validate_manifest(dict(MANIFEST, files=_files(), future_field=[1, 2])) == []


@pytest.mark.parametrize("change,word", [
    ({"format_version": 2}, "format_version"),
    ({"format_version": True}, "format_version"),
    ({"name": "Kws"}, "'name'"),
    ({"name": "-kws"}, "'name'"),
    ({"name": "k" * 65}, "'name'"),
    ({"version": "1.0"}, "'version'"),
    ({"version": "01.0.0"}, "'version'"),
    ({"version": "1.0.0+build"}, "'version'"),
    ({"version": "1.0.0-"}, "'version'"),
    ({"files": []}, "'files'"),
    ({"files": {"a": {"sha256": "AB" * 32, "size": 1}}}, "sha256"),
    ({"files": {"a": {"sha256": "ab" * 32, "size": -1}}}, "size"),
    ({"files": {"../a": {"sha256": "ab" * 32, "size": 1}}}, "'..'"),
    ({"files": {"manifest.sig": {"sha256": "ab" * 32, "size": 1}}}, "reserved"),
    ({"variants": {}}, "'variants'"),
    ({"variants": [{"id": "a", "file": "missing.bin", "engine": "onnxruntime", "precision": "fp32"}]}, "'file'"),
    ({"variants": [{"id": "a", "file": "labels.txt", "engine": "", "precision": "fp32"}]}, "'engine'"),
    ({"variants": [{"id": "a", "file": "labels.txt", "engine": "x", "precision": "int8"}] * 2}, "twice"),
])
def test_malformed_manifests_are_reported(change: dict, word: str) -> None:
    problems = validate_manifest({**MANIFEST, "files": _files(), **change})
    assert problems and any(word in p for p in problems), problems


def test_writer_refuses_invalid_manifest(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    with pytest.raises(ConfigError, match="'version' must be MAJOR.MINOR.PATCH"):
        write_bundle(tmp_path / "x.epk", dict(MANIFEST, version="v1"), PAYLOAD, signer[0])
    with pytest.raises(ConfigError, match="cannot be written as JSON"):
        write_bundle(tmp_path / "x.epk", dict(MANIFEST, extra=float("nan")), PAYLOAD, signer[0])
    assert not list(tmp_path.iterdir())


def test_signed_but_invalid_manifest_is_refused_by_the_device(tmp_path: Path, signer: tuple[Path, PublicKey]) -> None:
    data = _crafted(signer[0], _payload_list(), name="../../etc")
    with pytest.raises(BundleError, match="'manifest.json' is invalid: 'name' must match"):
        verify_bundle(_write(tmp_path, data), [signer[1]])


# -------------------------------------------------------------------- keys


def test_private_key_is_written_0600_and_public_key_is_openssl_pem(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path, "release")
    assert (private.name, public.name) == ("release.key", "release.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----\n")
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    loaded = serialization.load_pem_public_key(public.read_bytes())
    key = load_public_key(public)
    assert loaded.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == key.raw
    assert load_public_key(public.read_text()) == key == load_public_key(public.read_bytes())
    assert key.key_id == hashlib.sha256(key.raw).hexdigest()[:16]
    if shutil.which("openssl"):
        der = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(public), "-outform", "DER"], capture_output=True, check=True).stdout
        assert der == bytes.fromhex("302a300506032b6570032100") + key.raw


def test_generate_keypair_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path, "release")
    before = (private.read_bytes(), public.read_bytes())
    with pytest.raises(OutputError, match="refusing to overwrite a signing key"):
        generate_keypair(tmp_path, "release")
    assert (private.read_bytes(), public.read_bytes()) == before
    public.unlink()
    with pytest.raises(OutputError, match="already exists"):
        generate_keypair(tmp_path, "release")  # half a pair is still a key devices may trust
    generate_keypair(tmp_path, "release", force=True)
    assert private.read_bytes() != before[0]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden"])
def test_generate_keypair_refuses_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match="Key name"):
        generate_keypair(tmp_path, name)


def test_load_private_key_errors_are_clear(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path, "k")
    with pytest.raises(InputError, match="does not exist"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(InputError, match="is a public key"):
        load_private_key(public)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    with pytest.raises(InputError, match="not a PEM PKCS8 private key"):
        load_private_key(garbage)
    rsa_key = tmp_path / "rsa.key"
    rsa_key.write_bytes(rsa.generate_private_key(65537, 1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    rsa_key.chmod(0o600)
    with pytest.raises(InputError, match="not an Ed25519 key"):
        load_private_key(rsa_key)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    encrypted.chmod(0o600)
    with pytest.raises(InputError, match="encrypted"):
        load_private_key(encrypted)
    private.chmod(0o644)
    with pytest.raises(InputError, match="chmod 600"):
        load_private_key(private)


def test_load_public_key_refuses_private_and_foreign_keys(tmp_path: Path) -> None:
    private, _ = generate_keypair(tmp_path, "k")
    with pytest.raises(EdgepackError, match="is a private key"):
        load_public_key(private)
    rsa_pem = rsa.generate_private_key(65537, 1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(EdgepackError, match="not an Ed25519 public key"):
        load_public_key(rsa_pem)
    with pytest.raises(EdgepackError, match="does not exist"):
        load_public_key(tmp_path / "nope.pub")
    with pytest.raises(EdgepackError, match="not a PEM public key"):
        load_public_key(b"hello")


def test_device_runtime_never_imports_edgepack_or_cryptography() -> None:
    code = (
        "import sys; import edgepack_runtime.bundle, edgepack_runtime._ustar, edgepack_runtime._ed25519; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'edgepack', 'cryptography'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
