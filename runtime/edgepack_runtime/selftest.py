"""Golden-vector self-test: a bundle proves on this device that it computes what it did at build.

``golden/vectors.npz`` (named by ``manifest["golden"]["file"]``) holds raw inputs as
``input:NAME`` and each variant's expected outputs as ``output:VARIANT:NAME``;
``manifest["golden"]["tolerances"][VARIANT][NAME]`` is the absolute tolerance derived
at build (integer outputs must match exactly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping

import numpy as np

from .errors import VerificationError

MAX_GOLDEN_BYTES = 64 * 1024**2


def load_golden(directory: Path, manifest: Mapping) -> Dict[str, np.ndarray]:
    """The golden arrays of an unpacked bundle.

    Raises:
        VerificationError: The manifest names no golden file or it cannot be read.
    """
    golden = manifest.get("golden") or {}
    name = golden.get("file")
    if not isinstance(name, str) or name not in manifest.get("files", {}):
        raise VerificationError("The bundle carries no golden vectors, so it cannot prove itself on this device; rebuild it with edgepack build.")
    path = directory / name
    if path.stat().st_size > MAX_GOLDEN_BYTES:
        raise VerificationError(f"Golden vectors {name!r} exceed {MAX_GOLDEN_BYTES} bytes; rebuild the bundle with fewer vectors.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise VerificationError(f"Golden vectors {name!r} cannot be read ({exc}); the install is damaged.") from exc


def golden_feed(arrays: Mapping[str, np.ndarray], input_names: List[str]) -> Dict[str, np.ndarray]:
    missing = [n for n in input_names if f"input:{n}" not in arrays]
    if missing:
        raise VerificationError(f"Golden vectors have no input {', '.join(missing)}; rebuild the bundle.")
    return {n: arrays[f"input:{n}"] for n in input_names}


def compare_golden(variant: str, output_names: List[str], outputs: List[np.ndarray], arrays: Mapping[str, np.ndarray], tolerances: Mapping[str, float]) -> List[str]:
    """Every output of ``variant`` that misses its golden value (empty list: passed). Pure."""
    problems = []
    for name, got in zip(output_names, outputs):
        key = f"output:{variant}:{name}"
        if key not in arrays:
            problems.append(f"no expected value for output {name!r}")
            continue
        want = arrays[key]
        got = np.asarray(got)
        if got.shape != want.shape:
            problems.append(f"output {name!r} has shape {list(got.shape)}, expected {list(want.shape)}")
            continue
        if want.dtype.kind in "fc":
            if not np.array_equal(np.isnan(want), np.isnan(got)):
                problems.append(f"output {name!r} has NaN where the golden vectors do not")
                continue
            finite = np.isfinite(want) & np.isfinite(got)
            diff = np.abs(want.astype(np.float64)[finite] - got.astype(np.float64)[finite])
            err = float(diff.max()) if diff.size else 0.0
            atol = float(tolerances.get(name, 0.0))
            if err > atol:
                problems.append(f"output {name!r} differs by {err:.3g} (tolerance {atol:.3g})")
        elif not np.array_equal(want, got):
            problems.append(f"output {name!r} differs (integer outputs must match exactly)")
    return problems


def self_test(session, variant: str, directory: Path, manifest: Mapping) -> None:
    """Run the golden inputs through ``session`` and compare.

    Raises:
        VerificationError: Naming the variant and every diverging output.
    """
    arrays = load_golden(directory, manifest)
    feed = golden_feed(arrays, session.input_names)
    try:
        outputs = session.run(feed)
    except Exception as exc:  # noqa: BLE001 - any engine failure fails the self-test
        raise VerificationError(f"Variant {variant} crashed on its golden vectors: {str(exc).splitlines()[0][:200]}") from exc
    tolerances = ((manifest.get("golden") or {}).get("tolerances") or {}).get(variant, {})
    problems = compare_golden(variant, session.output_names, outputs, arrays, tolerances)
    if problems:
        raise VerificationError(f"Variant {variant} failed its golden-vector self-test: " + "; ".join(problems) + ".")
