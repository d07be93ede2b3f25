"""A strict, canonical subset of POSIX ustar: the container of edgepack bundles.

Any ``tar`` can list these archives, but we write and read them with this small code
instead of :mod:`tarfile` so that every byte is accounted for: the reader rebuilds
each header from its parsed fields with the writer's own :func:`header` and demands
byte equality, demands zero padding and exactly two zero end blocks, and rejects
everything else (links, devices, pax/GNU extensions, unsafe names, trailing bytes).

Subset: regular files only, mode 0644, uid/gid 0, empty uname/gname, names of at most
100 bytes (only the ustar ``name`` field, never ``prefix``), sizes below 8 GiB (11
octal digits), checksum written as GNU tar and Python's tarfile do (``%06o\\0 ``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import BinaryIO, NamedTuple

from .errors import BundleError

BLOCK = 512
NAME_MAX = 100
MAX_SIZE = 8**11 - 1
MAX_MTIME = 8**11 - 1

_ZERO_BLOCK = bytes(BLOCK)
_OCTAL_ZERO = b"0000000\0"
_MAGIC = b"ustar\0"

# A canonical header has about 60 non-zero bytes; a block with far fewer can only be a
# damaged end-of-archive marker, and saying so beats calling it a broken header.
_MIN_HEADER_NONZERO = 32

_TYPE_NAMES = {
    b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
    b"5": "directory", b"6": "FIFO", b"7": "contiguous file", b"g": "pax global header",
    b"x": "pax extended header", b"L": "GNU long name", b"K": "GNU long link name",
    b"S": "GNU sparse file", b"\0": "old-style (pre-POSIX) file",
}


class Member(NamedTuple):
    """One member of an archive, as located by :func:`iter_members`.

    Attributes:
        name: Relative POSIX path of the member.
        size: Size of its data in bytes.
        offset: Byte offset of its data in the archive.
        header_offset: Byte offset of its 512-byte header.
        index: 1-based position in the archive.
    """

    name: str
    size: int
    offset: int
    header_offset: int
    index: int


def name_problem(name: object) -> str | None:
    """Say why ``name`` is not a safe member name, or return None if it is.

    The rules keep every name a relative, normalized POSIX path that stays inside the
    extraction directory and fits the ustar ``name`` field on its own.

    Args:
        name: The candidate member name.

    Returns:
        A phrase that completes "the name ..." (e.g. "is an absolute path"), or None.
    """
    if not isinstance(name, str):
        return "is not a string"
    if not name:
        return "is empty"
    if any(not " " <= ch <= "~" for ch in name):
        return "contains a character that is not printable ASCII"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "is an absolute path"
    if any(seg in ("", ".", "..") for seg in name.split("/")):
        return "has an empty, '.' or '..' path segment"
    if len(name) > NAME_MAX:
        return f"is longer than {NAME_MAX} bytes"
    return None


def _round_up(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def header(name: str, size: int, mtime: int) -> bytes:
    """Serialize the one canonical header for a member.

    Args:
        name: Member name; must satisfy :func:`name_problem`.
        size: Data size in bytes, 0 <= size < 8 GiB.
        mtime: Modification time in seconds since the epoch, 0 <= mtime < 8**11.

    Returns:
        The 512-byte header.

    Raises:
        ValueError: A field is out of the canonical subset.
    """
    problem = name_problem(name)
    if problem:
        raise ValueError(f"member name {name!r} {problem}")
    if not 0 <= size <= MAX_SIZE:
        raise ValueError(f"member size {size} does not fit in a ustar header")
    if not 0 <= mtime <= MAX_MTIME:
        raise ValueError(f"mtime {mtime} does not fit in a ustar header")
    buf = bytearray(BLOCK)
    encoded = name.encode("ascii")
    buf[0:len(encoded)] = encoded
    buf[100:108] = b"0000644\0"
    buf[108:116] = _OCTAL_ZERO
    buf[116:124] = _OCTAL_ZERO
    buf[124:136] = b"%011o\0" % size
    buf[136:148] = b"%011o\0" % mtime
    buf[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    buf[156:157] = b"0"
    buf[257:263] = _MAGIC
    buf[263:265] = b"00"
    buf[329:337] = _OCTAL_ZERO
    buf[337:345] = _OCTAL_ZERO
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def write_member(out: BinaryIO, name: str, size: int, mtime: int, chunks: Iterable[bytes]) -> None:
    """Append one member: header, data, zero padding.

    Raises:
        ValueError: A header field is invalid, or ``chunks`` did not add up to ``size``
            bytes (the source changed while it was being written).
    """
    out.write(header(name, size, mtime))
    written = 0
    for chunk in chunks:
        written += len(chunk)
        if written > size:
            break
        out.write(chunk)
    if written != size:
        raise ValueError(f"member {name!r} was declared as {size} bytes but its source produced {written}")
    out.write(bytes(_round_up(size) - size))


def write_end(out: BinaryIO) -> None:
    """Append the end-of-archive marker (two zero blocks)."""
    out.write(_ZERO_BLOCK * 2)


def _read_at(fh: BinaryIO, offset: int, length: int) -> bytes:
    # Loops because unbuffered files may return short reads; short only at EOF.
    fh.seek(offset)
    parts = []
    while length > 0:
        chunk = fh.read(length)
        if not chunk:
            break
        parts.append(chunk)
        length -= len(chunk)
    return b"".join(parts)


def _parse_octal(field: bytes) -> int | None:
    # Lenient on purpose: the canonical comparison rejects any non-canonical spelling;
    # here we only need a value to build that comparison (and to apply size limits).
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if not text or any(c not in b"01234567" for c in text):
        return None
    return int(text, 8)


def _parse_size(field: bytes) -> int | None:
    # GNU base-256 sizes are never canonical, but decoding them lets a header that
    # claims e.g. 100 GB be refused by the size limit with an honest message.
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] & 0x80:
        return None  # negative base-256: no valid size
    return _parse_octal(field)


def iter_members(
    fh: BinaryIO,
    *,
    max_members: int,
    max_member_size: int,
    max_total_size: int,
) -> Iterator[Member]:
    """Walk a canonical archive strictly, header by header, without reading data.

    Each member is yielded only after its header, name, size limits and padding were
    checked; the generator ends only after the exact end-of-archive marker at the exact
    end of the file. Reads use explicit offsets, so callers may read from ``fh`` between
    iterations.

    Args:
        fh: The archive, opened for binary reading; must be seekable.
        max_members: Refuse archives with more members than this.
        max_member_size: Refuse any member larger than this, before reading its data.
        max_total_size: Refuse archives whose members add up to more than this.

    Yields:
        Each member in archive order.

    Raises:
        BundleError: The archive is truncated, corrupted, oversized, not canonical,
            or contains something other than safely named regular files.
    """
    file_size = fh.seek(0, 2)
    pos = 0
    index = 0
    total = 0
    names: set[str] = set()
    dirs: set[str] = set()
    previous = "the start of the archive"
    while True:
        block = _read_at(fh, pos, BLOCK)
        if len(block) < BLOCK:
            raise BundleError(
                f"The bundle is truncated: it ends at byte {file_size}, after {previous}, without an "
                "end-of-archive marker; re-download or rebuild it."
            )
        if block == _ZERO_BLOCK:
            _check_end(fh, pos, file_size)
            return
        if BLOCK - block.count(0) < _MIN_HEADER_NONZERO:
            raise BundleError(
                f"The end of archive (after {previous}, at byte {pos}) is damaged: its marker is not all "
                "zeros; the bundle is corrupted or was tampered with; re-download or rebuild it."
            )
        index += 1
        if index > max_members:
            raise BundleError(
                f"The bundle has more than {max_members} members, the limit: refusing it. Rebuild it with "
                "fewer files, or raise BundleLimits.max_members if you trust it."
            )
        member = _check_header(block, pos, index, max_member_size)
        total += member.size
        if total > max_total_size:
            raise BundleError(
                f"Bundle member {member.name!r} brings the bundle's total size past the limit of "
                f"{max_total_size} bytes: refusing it without reading its data. Raise "
                "BundleLimits.max_total_size if you trust this bundle."
            )
        end = member.offset + _round_up(member.size)
        if end > file_size:
            raise BundleError(
                f"Bundle member {member.name!r} declares {member.size} bytes but the file ends at byte "
                f"{file_size}: the bundle is truncated; re-download or rebuild it."
            )
        _check_placement(member.name, names, dirs)
        pad = _read_at(fh, member.offset + member.size, end - member.offset - member.size)
        if pad.count(0) != len(pad):
            raise BundleError(
                f"The padding after bundle member {member.name!r} is not zero: the bundle is corrupted or "
                "was tampered with; re-download or rebuild it."
            )
        yield member
        previous = f"member {member.name!r}"
        pos = end


def _check_header(block: bytes, pos: int, index: int, max_member_size: int) -> Member:
    raw_name = block[:NAME_MAX].split(b"\0", 1)[0]
    shown = raw_name.decode("ascii", "backslashreplace")
    # The name itself may be the damaged byte, so also say where the header is.
    who = f"bundle member {index} ({shown!r}, header at byte {pos})"
    stored = _parse_octal(block[148:156])
    if stored != sum(block[:148]) + 8 * ord(" ") + sum(block[156:]):
        raise BundleError(
            f"The tar header of {who} is corrupted (its checksum does not match): the bundle is "
            "corrupted or was tampered with; re-download or rebuild it."
        )
    typeflag = block[156:157]
    if typeflag != b"0":
        kind = _TYPE_NAMES.get(typeflag, f"tar entry of type {typeflag!r}")
        raise BundleError(
            f"The tar header of {who} describes a {kind}, but an edgepack bundle may only contain "
            "regular files: refusing to unpack it. Rebuild the bundle with edgepack."
        )
    try:
        name = raw_name.decode("ascii")
    except UnicodeDecodeError:
        name = None
    problem = name_problem(name) if name is not None else "contains a character that is not printable ASCII"
    if problem:
        raise BundleError(
            f"The name of {who} is unsafe: it {problem}. Refusing to unpack it; rebuild the bundle "
            "with edgepack."
        )
    size = _parse_size(block[124:136])
    if size is None:
        raise BundleError(
            f"The tar header of {who} has an unreadable size field: the bundle is corrupted; "
            "re-download or rebuild it."
        )
    if size > max_member_size:
        raise BundleError(
            f"Bundle member {name!r} declares {size} bytes, over the limit of {max_member_size} bytes per "
            "member: refusing it without reading its data. Raise BundleLimits.max_member_size if you "
            "trust this bundle."
        )
    mtime = _parse_octal(block[136:148])
    try:
        canonical = header(name, size, mtime if mtime is not None else -1)
    except ValueError:
        canonical = None
    if canonical != block:
        raise BundleError(
            f"The tar header of {who} is not in canonical edgepack form (a field was changed or the "
            "archive was not written by edgepack): re-download the bundle or rebuild it with edgepack."
        )
    return Member(name, size, pos + BLOCK, pos, index)


def _check_placement(name: str, names: set[str], dirs: set[str]) -> None:
    # A file and a directory of the same path cannot both be unpacked, and a duplicate
    # would silently shadow the member that was checked first.
    if name in names:
        raise BundleError(
            f"Bundle member {name!r} appears twice: refusing the bundle; rebuild it with edgepack."
        )
    parts = name.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
    if name in dirs or any(p in names for p in prefixes):
        raise BundleError(
            f"Bundle member {name!r} clashes with another member used as a directory of the same "
            "path: refusing the bundle; rebuild it with edgepack."
        )
    names.add(name)
    dirs.update(prefixes)


def _check_end(fh: BinaryIO, pos: int, file_size: int) -> None:
    second = _read_at(fh, pos + BLOCK, BLOCK)
    if len(second) < BLOCK:
        raise BundleError(
            f"The end of archive at byte {pos} is truncated: the bundle is incomplete; re-download or "
            "rebuild it."
        )
    if second != _ZERO_BLOCK:
        raise BundleError(
            f"The end of archive at byte {pos} is damaged (its second block is not zero): the bundle is "
            "corrupted or was tampered with; re-download or rebuild it."
        )
    if file_size != pos + 2 * BLOCK:
        raise BundleError(
            f"The bundle has {file_size - pos - 2 * BLOCK} bytes of trailing data after the end of "
            "archive: it is corrupted or was tampered with; re-download or rebuild it."
        )


def read_data(fh: BinaryIO, member: Member, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Stream a member's data in chunks of at most ``chunk_size`` bytes.

    Raises:
        BundleError: The file became shorter than the member (it changed on disk).
    """
    pos, remaining = member.offset, member.size
    while remaining:
        chunk = _read_at(fh, pos, min(chunk_size, remaining))
        if not chunk:
            raise BundleError(
                f"Bundle member {member.name!r} ended early while being read: the file changed on disk; "
                "re-download or rebuild it."
            )
        pos += len(chunk)
        remaining -= len(chunk)
        yield chunk
