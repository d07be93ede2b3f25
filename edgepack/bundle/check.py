"""What ``edgepack verify`` checks, as a function: signature, member hashes, golden vectors.

``edgepack verify`` and the build's last step (:mod:`edgepack.build.verify_step`) both
call :func:`check_bundle`, so a bundle the build lets through is one ``verify`` accepts.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BundleCheck", "check_bundle"]


@dataclass(frozen=True)
class BundleCheck:
    """The outcome of checking one bundle on this host.

    Attributes:
        manifest: The verified manifest (signature and member hashes passed).
        golden: Variant id -> None (its engine is not installed here), a string (skipped,
            with why) or a list of problems (empty: its golden vectors passed).
    """

    manifest: Any
    golden: dict[str, Any] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        return [p for value in self.golden.values() if isinstance(value, list) for p in value]

    @property
    def verified(self) -> bool:
        return not self.problems


def _litert_available() -> bool:
    from edgepack_runtime.engines import ENGINES

    return ENGINES["litert"].available()


def _golden(root: Path, manifest) -> dict[str, Any]:
    """Run every variant this host can run on the golden vectors; variant id -> problems (empty: passed)."""
    from ..build.golden import check_golden, read_npz
    from ..optimize.evaluate import session

    golden = manifest.get("golden") or {}
    if not golden.get("file"):
        return {}
    from edgepack_runtime.arith import host_class
    from edgepack_runtime.selftest import golden_batch, golden_entry

    arrays = read_npz((root / golden["file"]).read_bytes())
    batch = golden_batch(manifest)
    klass = host_class()
    results: dict[str, Any] = {}
    for variant in manifest.variants:
        vid = variant.get("id")
        litert = variant.get("engine") == "litert" and _litert_available()
        if variant.get("engine") != "onnxruntime" and not litert:
            results[vid] = None
            continue
        chosen = golden_entry(manifest, variant, klass)
        if chosen is None:
            results[vid] = f"skipped: not certified for this host's arithmetic {klass} (a device of that class never serves it)"
            continue
        key, tolerances, _why = chosen
        try:
            if litert:
                from ..convert.tflite import LiteRTSession

                sess = LiteRTSession((root / variant["file"]).read_bytes(), 1)
            else:
                sess = session((root / variant["file"]).read_bytes(), 1)
            results[vid] = check_golden(sess, key, arrays, tolerances, golden.get("stream"), batch=batch)
        except Exception as exc:  # noqa: BLE001 - a variant that does not run on this host fails verification
            engine = "LiteRT" if litert else "onnxruntime"
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            results[vid] = [f"{vid}: does not run on this host's {engine} ({detail})"]
    return results


def check_bundle(bundle: Path, public) -> BundleCheck:
    """Verify ``bundle`` with ``public``: signature, every member's hash, golden vectors here.

    Raises:
        BundleError: The file is not a bundle or cannot be read.
        VerificationError: The signature or a member hash is wrong (tampered or corrupted).
    """
    from ..errors import BundleError, VerificationError
    from . import extract_bundle

    with tempfile.TemporaryDirectory(prefix="edgepack-verify-") as tmp:
        root = Path(tmp) / "bundle"
        try:
            manifest = extract_bundle(bundle, root, public)
        except BundleError as exc:
            if "tampered" in str(exc) or "corrupted" in str(exc):
                raise VerificationError(str(exc)) from None  # a damaged bundle failed verification: exit 1
            raise
        return BundleCheck(manifest, _golden(root, manifest))
