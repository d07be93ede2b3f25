"""Model importers: ONNX, PyTorch, scikit-learn and TFLite sources in, a checked model out.

``edgepack build`` turns the project file's ``model:`` section into a source with
:func:`source_from_config` and calls :func:`import_model`. PyTorch and skl2onnx are
only imported when a model of that kind is imported.

Example::

    source = TorchSource("models/net.py:Net", (1, 3, 32, 32), weights=Path("net.pt"))
    imported = import_model("pytorch", source)
    imported.model, imported.source_sha256, imported.description
"""

from __future__ import annotations

from .base import (
    DEFAULT_OPSET, ImportedModel, Importer, ModelSource, OnnxSource, SklearnSource, SourceFile, TfliteSource, TorchSource,
)
from .registry import DEFAULT_KIND, IMPORTERS, get_importer, import_model, source_from_config

__all__ = [
    "DEFAULT_KIND", "DEFAULT_OPSET", "IMPORTERS", "ImportedModel", "Importer", "ModelSource", "OnnxSource",
    "SklearnSource", "SourceFile", "TfliteSource", "TorchSource", "get_importer", "import_model", "source_from_config",
]
