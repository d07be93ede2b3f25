"""What data a model needs when random inputs cannot stand in for it.

Random samples are a fair smoke test for one image or feature tensor, but not for a
model with several inputs: a recurrent state, a sample rate or an index input drawn at
random exercises states and rates the model never sees, so a gate passed on them means
nothing. Such a model gets no unmeasured result: :func:`data_needed` says which arrays
to provide instead (pure).
"""

from __future__ import annotations

from collections.abc import Sequence

from .modelio import TensorSpec

__all__ = ["data_needed", "random_is_meaningful"]


def random_is_meaningful(inputs: Sequence[TensorSpec]) -> bool:
    """True when random samples are a fair stand-in: exactly one batched tensor input."""
    return len(inputs) == 1 and inputs[0].shape is not None and len(inputs[0].shape) >= 1 and inputs[0].dtype is not None


def _role(spec: TensorSpec, outputs: Sequence[TensorSpec]) -> str:
    if spec.shape == ():
        return "scalar (0-d): store it as a 0-d array, the same for every sample"
    same = [o.name for o in outputs if o.shape == spec.shape and o.dtype == spec.dtype and o.name != spec.name
            and (o.name.startswith(spec.name) or spec.name.startswith(o.name) or "state" in o.name.lower())]
    if same and spec.shape and spec.shape[0] == 1:
        return (f"looks like a recurrent state (output {same[0]!r} has its shape): give per-step rows "
                f"[n, {', '.join(str(d) for d in spec.shape[1:])}] of the states the model really carries (run fp32 over "
                "streams), or build it with role: state in edgepack.yaml, which does that itself")
    return "per sample: leading sample axis [n, ...]"


def data_needed(model: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> str:
    """One message naming every input's name, shape, dtype and role, and the file to write."""
    lines = []
    for spec in inputs:
        dims = "?" if spec.shape is None else "[" + ", ".join("N" if d is None else str(d) for d in spec.shape) + "]"
        lines.append(f"{spec.name!r} {spec.dtype} {dims} — {_role(spec, outputs)}")
    keys = ", ".join(f"{s.name}=..." for s in inputs)
    return (f"{model} has {len(inputs)} input(s) that random samples cannot stand in for, so no result can be "
            f"measured; pass --calibration/--validation as an .npz with one array per input ({keys}, plus optional "
            "labels): " + "; ".join(lines) + ".")
