"""Golden vectors: known raw inputs and each variant's outputs, checked on every host.

``golden/vectors.npz`` holds the first N raw validation inputs (``input:NAME``) and
every variant's outputs on them (``output:VARIANT:NAME``). It is written with a fixed
zip timestamp and sorted entries, so the same arrays always give the same bytes
(``np.savez`` stamps the current time into the zip).

Tolerance rule (per variant and float output, absolute)::

    atol = max(1e-4 * max|golden output|, 0.5 * max_abs_error(variant vs fp32 on validation))

The first term absorbs float rounding differences between CPUs/BLAS builds; the
second scales the allowance with how far the variant already is from the float
model (an int8 variant's outputs move by a quantization step when a different
kernel rounds differently). Integer outputs (class ids, top-k indices) must match
exactly (atol 0).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping

import numpy as np

__all__ = ["RELATIVE_FLOOR", "ERROR_SHARE", "check_golden", "read_npz", "tolerance", "write_npz"]

#: Share of the largest golden output magnitude always allowed.
RELATIVE_FLOOR = 1e-4
#: Share of the variant's max abs error vs fp32 (on validation) allowed.
ERROR_SHARE = 0.5
RULE = "atol = max(1e-4 * max|output|, 0.5 * variant max_abs_error vs fp32 on validation); integer outputs exact"
CLASS_RULE = ("per class: atol = max(1e-4 * max|output|, min(0.5 * max_abs_error vs fp32 under that class, "
              "0.5 * smallest nonzero difference from another class's outputs)); integer outputs exact; "
              "NaN, infinity or another dtype always fails")

_FIXED_DATE = (1980, 1, 1, 0, 0, 0)


def write_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Deterministic ``.npz`` bytes (stored, fixed timestamps, sorted entries), loadable by ``np.load``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key in sorted(arrays):
            member = io.BytesIO()
            # asarray, not ascontiguousarray: that turns a 0-d scalar input (a sample rate) into [1].
            np.lib.format.write_array(member, np.asarray(arrays[key], order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=_FIXED_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` given as bytes."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def tolerance(output: np.ndarray, max_abs_error: float) -> float:
    """Absolute tolerance of one golden output (see the module docstring)."""
    output = np.asarray(output)
    if output.dtype.kind not in "fc":
        return 0.0
    finite = output[np.isfinite(output)]
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    error = max_abs_error if np.isfinite(max_abs_error) else 0.0
    return float(max(RELATIVE_FLOOR * peak, ERROR_SHARE * error))


def class_tolerance(output: np.ndarray, others: list[np.ndarray], max_abs_error: float) -> float:
    """Tolerance of one class's golden output: loose enough for its own rounding, tight enough
    that another class's outputs (a device misdetecting its class, the wrong file) fail.

    Args:
        output: This class's golden output.
        others: The same output measured under the other classes.
        max_abs_error: This variant's max abs error vs fp32 under this class (validation).
    """
    output = np.asarray(output)
    if output.dtype.kind not in "fc":
        return 0.0
    base = tolerance(output, max_abs_error)
    finite = output[np.isfinite(output)]
    floor = RELATIVE_FLOOR * (float(np.max(np.abs(finite))) if finite.size else 0.0)
    gaps = []
    for other in others:
        other = np.asarray(other)
        if other.shape == output.shape and other.dtype == output.dtype:
            diff = np.abs(other.astype(np.float64) - output.astype(np.float64))
            diff = diff[np.isfinite(diff)]
            if diff.size and float(diff.max()) > 0:
                gaps.append(float(diff.max()))
    if not gaps:
        return base
    return float(max(floor, min(base, 0.5 * min(gaps))))


def input_key(name: str) -> str:
    return f"input:{name}"


def output_key(variant: str, name: str) -> str:
    return f"output:{variant}:{name}"


def golden_count(requested: int, available: int, fixed_batch: int | None) -> int:
    """How many golden vectors to ship: ``requested``, capped by the validation data, and a
    whole multiple of a fixed batch size (at least one batch) so every run is a full batch."""
    count = min(requested, available)
    if fixed_batch:
        count = max(fixed_batch, count - count % fixed_batch)
    return count


def check_golden(sess, variant: str, arrays: Mapping[str, np.ndarray], tolerances: Mapping[str, float],
                 stream: Mapping | None = None, *, batch: int | None = None) -> list[str]:
    """Run ``sess`` on the golden inputs; describe every output outside its tolerance.

    The comparison is the device's own (:func:`edgepack_runtime.selftest.compare_golden`), so
    ``edgepack verify`` and a device's self-test can never disagree about the same outputs.
    """
    from edgepack_runtime.selftest import compare_golden, run_golden

    feed = {i.name: arrays[input_key(i.name)] for i in sess.get_inputs() if input_key(i.name) in arrays}
    missing = [i.name for i in sess.get_inputs() if input_key(i.name) not in arrays]
    if missing:
        return [f"{variant}: golden vectors have no input {', '.join(missing)}"]
    names = [o.name for o in sess.get_outputs()]
    if stream:  # the manifest's golden stream: replayed step by step like the device does
        from edgepack_runtime.stream import replay

        outputs = replay(lambda f: sess.run(None, f), [i.name for i in sess.get_inputs()], names, arrays, stream)
    else:
        outputs = run_golden(lambda f: sess.run(None, f), feed, batch)
    return [f"{variant}: {p}" for p in compare_golden(variant, names, outputs, arrays, tolerances)]
