"""Which outputs another gate already covers, read from the graph.

The per-output gate is for outputs that nothing else gates (a state, an auxiliary head).
An output computed FROM a gated output (softmax scores and top-k after the logits, a
decoded box list after the score map) is a function of what that gate measured, so it is
covered by it: gating ``top_k_scores`` or the second-best index on its own would refuse
a variant for a near-tie that the first-output or task gate judged harmless.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

__all__ = ["covered_outputs", "covered_outputs_of_bytes"]


def covered_outputs(model, primary: Iterable[str]) -> tuple[str, ...]:
    """``primary`` plus every graph output downstream of one of them (nodes are in topological order)."""
    reached = set(primary)
    for node in model.graph.node:
        if any(i in reached for i in node.input):
            reached.update(o for o in node.output if o)
    return tuple(o.name for o in model.graph.output if o.name in reached)


@functools.lru_cache(maxsize=8)
def _parsed_cover(model_bytes: bytes, primary: tuple[str, ...]) -> tuple[str, ...] | None:
    import onnx

    try:
        model = onnx.load_from_string(model_bytes)
    except Exception:  # noqa: BLE001 - not an ONNX graph (TFLite bytes): no graph to follow
        return None
    return covered_outputs(model, primary)


def covered_outputs_of_bytes(model_bytes: bytes | None, primary: Iterable[str]) -> tuple[str, ...]:
    """:func:`covered_outputs` of serialized ONNX; just ``primary`` when the bytes are not ONNX."""
    primary = tuple(primary)
    found = _parsed_cover(model_bytes, primary) if model_bytes else None
    return tuple(dict.fromkeys((*primary, *(found or ()))))
