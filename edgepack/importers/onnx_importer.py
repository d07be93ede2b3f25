"""ONNX models pass through, after the same checks as every other model file."""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from ..modelio import ai_onnx_opset, parse_model
from ._common import read_source_file, source_file
from .base import ImportedModel, OnnxSource


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def _external_locations(model: onnx.ModelProto) -> list[str]:
    """Relative paths of the external data files the model refers to, in first-use order."""
    seen: dict[str, None] = {}
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                seen.setdefault(location, None)
    return list(seen)


class OnnxImporter:
    """Reads an ``.onnx`` file (and its external data), checks it and hashes every file."""

    kind = "onnx"
    source_type = OnnxSource

    def import_model(self, source: OnnxSource) -> ImportedModel:
        """Load and check an ONNX model.

        Raises:
            ModelError: The file is missing, not ONNX, invalid, or uses an opset onnxruntime cannot run.
        """
        path = source.path
        data = read_source_file(path, "Model file")
        files = [source_file("model", path, data)]
        # A first, unchecked parse finds the external data files (a parse costs far less
        # than the checker); the second is modelio's full load and check.
        locations = _external_locations(parse_model(data, str(path), check=False))
        model = parse_model(data, str(path), base_dir=path.parent if locations else None, check=True)
        files += [source_file("external data", path.parent / loc) for loc in locations]
        producer = f", produced by {model.producer_name} {model.producer_version}".rstrip() if model.producer_name else ""
        return ImportedModel(
            kind="onnx",
            description=f"ONNX model {path.name} (opset {ai_onnx_opset(model)}{producer})",
            source_files=tuple(files),
            model=model,
        )
