"""Bundle catalog: accept verified uploads, list them, move them between stages."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgepack_runtime.bundle import PublicKey, read_member, verify_bundle

from ..errors import EdgepackError
from .blobs import BlobStore
from .http_errors import ApiError
from .storage import BundleRecord, Storage

__all__ = ["Catalog", "gate_failures"]

STAGES = ("staging", "production", "archived")


def gate_failures(manifest: Any) -> list[str]:
    """Failed gates recorded in a manifest's ``gates`` section (empty: none failed or no gates)."""
    gates = manifest.get("gates") if hasattr(manifest, "get") else None
    if not isinstance(gates, dict):
        return []
    failures = []
    if gates.get("passed") is False:
        failures.append("the manifest's gates record 'passed': false")
    results = gates.get("results")
    if isinstance(results, dict):
        for variant, result in sorted(results.items()):
            if isinstance(result, dict) and result.get("passed") is False:
                failures.append(f"variant {variant!r} failed its gates")
    listed = gates.get("failures")
    if isinstance(listed, list):
        failures.extend(str(f) for f in listed)
    return failures


REFERENCE_MEMBER = "stats/reference.json"


def reference_of(path: Path, manifest: Any) -> Any:
    """The bundle's reference statistics (``stats/reference.json``), or None; call after verification."""
    if REFERENCE_MEMBER not in manifest.files:
        return None
    try:
        doc = json.loads(read_member(path, REFERENCE_MEMBER, max_size=16 * 1024**2))
    except (EdgepackError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class Catalog:
    def __init__(self, storage: Storage, blobs: BlobStore, trusted_keys: Sequence[PublicKey], clock: Callable[[], float]) -> None:
        self.storage = storage
        self.blobs = blobs
        self.trusted_keys = list(trusted_keys)
        self.clock = clock

    def register_upload(self, temp_path: Path, digest: str, size: int) -> tuple[BundleRecord, bool]:
        """Verify an uploaded file and add it; returns (bundle, created).

        Raises:
            ApiError: 422 unverifiable or failed-gate bundle, 409 name/version clash,
                503 no trusted keys configured.
        """
        if not self.trusted_keys:
            raise ApiError(503, "no_trusted_keys", "The server has no trusted public keys configured, so no upload can "
                           "be verified; restart it with --trusted-key PUB.")
        existing = self.storage.get_bundle_by_digest(digest)
        if existing is not None:
            return existing, False
        try:
            manifest = verify_bundle(temp_path, self.trusted_keys)
        except EdgepackError as exc:
            message = str(exc).replace(str(temp_path), "The uploaded bundle")
            raise ApiError(422, "bundle_rejected", message) from None
        failed = gate_failures(manifest)
        if failed:
            raise ApiError(422, "gate_failed", f"Bundle {manifest.name} {manifest.version} records failed gates "
                           f"({'; '.join(failed)}); only bundles that passed their gates can be published.")
        clash = self.storage.find_bundle(manifest.name, manifest.version)
        if clash is not None:
            raise ApiError(409, "version_exists", f"Bundle {manifest.name} {manifest.version} already exists with a "
                           f"different digest ({clash.digest[:12]}…); bump the version and rebuild.")
        reference = reference_of(temp_path, manifest)
        self.blobs.adopt(temp_path, digest)
        record = BundleRecord(
            id=f"b_{digest[:16]}", name=manifest.name, version=manifest.version, digest=digest, size=size,
            stage="staging", key_id=manifest.key_id, manifest={k: manifest[k] for k in manifest}, created_at=self.clock(),
        )
        with self.storage.transaction():
            self.storage.add_bundle(record)
            if reference is not None:  # drift monitoring compares device summaries with it
                self.storage.set_reference(digest, reference, record.created_at)
        return record, True

    def get(self, bundle_id: str) -> BundleRecord:
        bundle = self.storage.get_bundle(bundle_id)
        if bundle is None:
            raise ApiError(404, "unknown_bundle", f"There is no bundle {bundle_id!r}; list bundles with GET /v1/admin/bundles.")
        return bundle

    def set_stage(self, bundle_id: str, stage: str) -> BundleRecord:
        bundle = self.get(bundle_id)
        if bundle.stage != stage:
            self.storage.set_bundle_stage(bundle_id, stage, self.clock())
        return self.get(bundle_id)
