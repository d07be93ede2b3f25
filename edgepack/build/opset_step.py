"""Build hook: an imported model below opset 13 is converted, then proven on the project's data.

The conversion happens before preprocessing is embedded (embedding needs opset 13); the
proof needs the datasets, which are opened after embedding, so it is a second call.
Both original and converted model are run on the MODEL inputs the declared
preprocessing makes from the raw calibration and validation data (the numpy reference,
which the embedded graph matches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx

from ..importers.opset import OpsetUpgrade, needs_upgrade, prove_upgrade, upgrade_opset

__all__ = ["PendingUpgrade", "convert_source", "prove_source"]

#: Samples per run when proving (the model's fixed batch size wins).
_BATCH = 64


@dataclass(frozen=True)
class PendingUpgrade:
    upgrade: OpsetUpgrade
    original: onnx.ModelProto


def convert_source(model: onnx.ModelProto, description: str) -> tuple[onnx.ModelProto, PendingUpgrade | None]:
    """The model to build from, and the pending proof when it was converted.

    Raises:
        ModelError: The version converter failed.
    """
    if not needs_upgrade(model):
        return model, None
    upgrade = upgrade_opset(model, description)
    return upgrade.model, PendingUpgrade(upgrade, model)


def prove_source(pending: PendingUpgrade | None, pre, raw_name: str, datasets: dict[str, Any], lineage: dict, description: str) -> None:
    """Prove a conversion on every calibration and validation sample and record it in ``lineage``.

    Raises:
        ModelError: An output changed; nothing is built from the converted model.
    """
    if pending is None:
        return
    from ..modelio import graph_inputs
    from ..optimize.evaluate import batch_size_for
    from ..preprocess import apply_reference

    inputs = graph_inputs(pending.original)
    name = inputs[0].name
    batch = batch_size_for(inputs, _BATCH)
    fixed = batch_size_for(inputs, 0) or None

    def feeds():
        for ds in datasets.values():
            for _start, feed in ds.batches(batch):
                if fixed and next(iter(feed.values())).shape[0] != fixed:
                    continue  # a fixed-batch model cannot take the short tail
                yield {name: apply_reference(pre, feed[raw_name])}

    roles = " and ".join(f"{role} data ({len(ds)} samples)" for role, ds in datasets.items())
    proven = prove_upgrade(pending.upgrade, pending.original, feeds(), description, roles)
    lineage["opset_conversion"] = proven.lineage()
