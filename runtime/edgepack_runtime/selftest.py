"""Golden-vector self-test: a bundle proves on this device that it computes what it did at build.

``golden/vectors.npz`` (named by ``manifest["golden"]["file"]``) holds raw inputs as
``input:NAME`` and each variant's expected outputs as ``output:VARIANT:NAME``;
``manifest["golden"]["tolerances"][VARIANT][NAME]`` is the absolute tolerance derived
at build (integer outputs must match exactly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

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


def golden_batch(manifest: Mapping) -> Optional[int]:
    """Rows per call when the golden inputs are run: the model's fixed batch size, or None (all at once).

    A model with a fixed leading dimension (batch 1, say) cannot take 8 golden rows in one
    call; the build records that size as ``golden.batch`` and runs the vectors that way.
    """
    value = (manifest.get("golden") or {}).get("batch")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def run_golden(run, feed: Mapping[str, np.ndarray], batch: Optional[int]) -> List[np.ndarray]:
    """``run(feed) -> outputs`` over the golden feed, ``batch`` rows per call (None: one call).

    Used by the device's self-test and by ``edgepack verify``, so both run the vectors
    exactly as the build did.
    """
    # Scalars and shared tensors (a constant, a batch-1 state) are fed whole with every chunk:
    # only arrays with the per-sample row count are sliced.
    rows = max((np.shape(v)[0] for v in feed.values() if np.ndim(v) > 0), default=0)
    if batch is None or rows <= batch:
        return [np.asarray(o) for o in run(dict(feed))]

    def chunk(value, start):
        return value[start:start + batch] if np.ndim(value) > 0 and np.shape(value)[0] == rows else value

    parts = [run({k: chunk(v, s) for k, v in feed.items()}) for s in range(0, rows, batch)]
    return [np.concatenate([np.asarray(p[i]) for p in parts]) for i in range(len(parts[0]))]


def golden_entry(manifest: Mapping, variant: Mapping, klass: str) -> Optional[Tuple[str, Mapping[str, float], str]]:
    """Which expected outputs a device of ``klass`` checks ``variant`` against (pure).

    Returns:
        ``(outputs key, tolerances, why)``, or None when the variant is not certified for
        that class (the device must not serve it). Bundles from before per-class golden
        vectors have one set of outputs for every device.
    """
    golden = manifest.get("golden") or {}
    vid = variant.get("id")
    legacy = ((golden.get("tolerances") or {}).get(vid) or {})
    classes = golden.get("classes")
    if not isinstance(classes, Mapping) or vid not in classes:
        return vid, legacy, "the bundle has one set of golden outputs for every device"
    entry = (classes.get(vid) or {}).get(klass)
    if isinstance(entry, Mapping) and isinstance(entry.get("outputs"), str):
        return entry["outputs"], entry.get("tolerances") or {}, f"golden outputs measured under {klass} ({entry.get('how')})"
    if variant.get("precision") == "fp32":
        return vid, legacy, "fp32 runs float kernels, which integer arithmetic classes do not change"
    return None


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
        if got.dtype != want.dtype:
            problems.append(f"output {name!r} is {got.dtype}, expected {want.dtype}")
            continue
        if want.dtype.kind in "fc":
            # NaN expected and NaN produced would "match": a broken model must never pass that way.
            if not np.all(np.isfinite(want)):
                problems.append(f"the expected value of output {name!r} contains NaN or infinity (the bundle was built from a broken model)")
                continue
            if not np.all(np.isfinite(got)):
                problems.append(f"output {name!r} contains NaN or infinity")
                continue
            diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
            err = float(diff.max()) if diff.size else 0.0
            atol = float(tolerances.get(name, 0.0))
            if err > atol:
                problems.append(f"output {name!r} differs by {err:.3g}, more than the {atol:.3g} tolerance")
        elif not np.array_equal(want, got):
            problems.append(f"output {name!r} differs (integer outputs must match exactly)")
    return problems


def self_test(session, variant: str, directory: Path, manifest: Mapping, klass: Optional[str] = None) -> None:
    """Run the golden inputs through ``session`` and compare with the outputs expected for ``klass``.

    Args:
        klass: This device's arithmetic class (default: detected).

    Raises:
        VerificationError: Naming the variant and every diverging output, or saying the
            variant is not certified for this class.
    """
    from .arith import host_class

    klass = klass or host_class()
    entry = next((v for v in manifest.get("variants", []) if v.get("id") == variant), {"id": variant})
    chosen = golden_entry(manifest, entry, klass)
    if chosen is None:
        raise VerificationError(f"Variant {variant} is not certified for this device's arithmetic ({klass}); "
                                "it was not measured there, so it is not served. Rebuild with a target of this class.")
    key, tolerances, _why = chosen
    arrays = load_golden(directory, manifest)
    feed = golden_feed(arrays, session.input_names)
    stream = (manifest.get("golden") or {}).get("stream")
    try:
        if stream:  # a stateful model: replay the golden stream, carrying the state step by step
            from .stream import replay

            outputs = replay(session.run, session.input_names, session.output_names, arrays, stream)
        else:
            outputs = run_golden(session.run, feed, golden_batch(manifest))
    except Exception as exc:  # noqa: BLE001 - any engine failure fails the self-test
        raise VerificationError(f"Variant {variant} crashed on its golden vectors: {str(exc).splitlines()[0][:200]}") from exc
    problems = compare_golden(key, session.output_names, outputs, arrays, tolerances)
    if problems:
        raise VerificationError(f"Variant {variant} failed its golden-vector self-test: " + "; ".join(problems) + ".")
