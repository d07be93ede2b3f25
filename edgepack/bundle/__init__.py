"""Signed bundles on the workstation: keys, writing, and (re-exported) verification.

Writing lives here because it needs ``cryptography`` to sign; verification and
unpacking are the device runtime's (:mod:`edgepack_runtime.bundle`), re-exported so
the workstation checks bundles with exactly the code devices run.
"""

from __future__ import annotations

from edgepack_runtime.bundle import (
    BundleLimits,
    FileEntry,
    Manifest,
    PublicKey,
    canonical_json,
    extract_bundle,
    load_public_key,
    read_member,
    validate_manifest,
    verify_bundle,
)

from .keys import generate_keypair, load_private_key, public_key_of
from .writer import bundle_filename, source_date_epoch_from_env, write_bundle

__all__ = [
    "BundleLimits", "FileEntry", "Manifest", "PublicKey", "bundle_filename", "canonical_json", "extract_bundle",
    "generate_keypair", "load_private_key", "load_public_key", "public_key_of", "read_member",
    "source_date_epoch_from_env", "validate_manifest", "verify_bundle", "write_bundle",
]
