"""Ed25519 signing keys for bundles: create and load them on the workstation.

Keys are standard PEM so OpenSSL and other tools can read them: the private key is
unencrypted PKCS8 (``NAME.key``, mode 0600), the public key is SubjectPublicKeyInfo
(``NAME.pub``) and is what devices are given to trust. Errors from ``cryptography``
and the OS are translated here, once, into edgepack errors.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgepack_runtime.bundle import PublicKey

from .._atomic import atomic_writer
from ..errors import InputError, OutputError

__all__ = ["PRIVATE_KEY_SUFFIX", "PUBLIC_KEY_SUFFIX", "generate_keypair", "load_private_key", "public_key_of"]

PRIVATE_KEY_SUFFIX = ".key"
PUBLIC_KEY_SUFFIX = ".pub"

_KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_KEY_FILE_SIZE = 64 * 1024


def generate_keypair(directory: str | os.PathLike[str], name: str, force: bool = False) -> tuple[Path, Path]:
    """Create a new Ed25519 signing key pair as ``NAME.key`` and ``NAME.pub``.

    Args:
        directory: Existing directory to write both files into.
        name: Base name of the files: letters, digits, ``.``, ``_``, ``-``.
        force: Replace existing key files. Devices that trusted the old public key
            will reject bundles signed with the new one.

    Returns:
        (private key path, public key path). The private key file has mode 0600.

    Raises:
        InputError: ``name`` is not a safe file name.
        OutputError: A key file already exists (and ``force`` is False), or the files
            cannot be written.
    """
    if not isinstance(name, str) or not _KEY_NAME_RE.fullmatch(name):
        raise InputError(
            f"Key name {name!r} is not usable as a file name: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )
    base = Path(directory)
    private_path = base / f"{name}{PRIVATE_KEY_SUFFIX}"
    public_path = base / f"{name}{PUBLIC_KEY_SUFFIX}"
    if not force:
        for path in (private_path, public_path):
            if os.path.lexists(path):
                raise OutputError(
                    f"{path} already exists: refusing to overwrite a signing key, because devices trust its public "
                    "half. Choose another name, or pass force=True (--force) to replace the pair."
                )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    had_private = os.path.lexists(private_path)
    try:
        # atomic_writer's temp file is created 0600, so the key is never readable by
        # others, not even for a moment.
        with atomic_writer(private_path, mode=0o600) as out:
            out.write(private_pem)
        try:
            with atomic_writer(public_path, mode=0o644) as out:
                out.write(public_pem)
        except BaseException:
            # A private key without its public half would block the next attempt.
            if not had_private:
                with contextlib.suppress(OSError):
                    private_path.unlink()
            raise
    except OSError as exc:
        raise OutputError(
            f"Cannot write the key pair in {base}: {exc.strerror or exc}. Choose a writable directory."
        ) from exc
    return private_path, public_path


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load an unencrypted PEM PKCS8 Ed25519 private key.

    Args:
        path: The ``.key`` file written by :func:`generate_keypair` (or
            ``openssl genpkey -algorithm ed25519``).

    Returns:
        The private key.

    Raises:
        InputError: The file is missing or unreadable, readable by other users, a
            public key, encrypted, or not an Ed25519 private key.
    """
    path = Path(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"Private key {path} is not a regular file; pass the .key file.")
        with open(path, "rb") as fh:
            data = fh.read(_MAX_KEY_FILE_SIZE + 1)
    except FileNotFoundError as exc:
        raise InputError(
            f"Private key {path} does not exist; pass the right path, or create a key pair first."
        ) from exc
    except PermissionError as exc:
        raise InputError(
            f"Private key {path} cannot be read: permission denied. Run as the key's owner."
        ) from exc
    except OSError as exc:
        raise InputError(f"Private key {path} cannot be read: {exc.strerror or exc}.") from exc
    if b"PRIVATE KEY-----" not in data and b"-----BEGIN PUBLIC KEY-----" in data:
        raise InputError(f"{path} is a public key; signing needs the matching private key (.key file).")
    if os.name == "posix" and info.st_mode & 0o077:
        raise InputError(
            f"Private key {path} is accessible by other users (mode {stat.S_IMODE(info.st_mode):04o}): anyone who can "
            f"read it can sign bundles your devices trust. Run 'chmod 600 {path}', and replace the key if it may "
            "have been copied."
        )
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
        raise InputError(
            f"Private key {path} is encrypted; edgepack needs an unencrypted PKCS8 key: protect it with file "
            "permissions or a secrets store instead."
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InputError(
            f"{path} is not a PEM PKCS8 private key ('-----BEGIN PRIVATE KEY-----'); pass the .key file of an "
            "Ed25519 key pair."
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"Private key {path} is not an Ed25519 key; bundles are signed with Ed25519 keys only.")
    return key


def public_key_of(private_key: Ed25519PrivateKey) -> PublicKey:
    """Return the device-side :class:`PublicKey` (raw bytes and key id) of a private key."""
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey.from_raw(raw)
