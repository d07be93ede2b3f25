"""The importers by model kind, and the project file's ``model:`` section turned into a source.

Adding a kind means adding one entry to :data:`IMPORTERS`; nothing here branches on kinds.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .base import ImportedModel, Importer, ModelSource
from .keras_importer import KerasImporter
from .onnx_importer import OnnxImporter
from .sklearn_importer import SklearnImporter
from .tflite_importer import TfliteImporter
from .torch_importer import TorchImporter

IMPORTERS: dict[str, Importer] = {
    importer.kind: importer for importer in (OnnxImporter(), TorchImporter(), SklearnImporter(), TfliteImporter(), KerasImporter())
}
# The kind a project file's model: section gets when it names none.
DEFAULT_KIND = "onnx"


def get_importer(kind: str) -> Importer:
    """The importer for ``kind``.

    Raises:
        ConfigError: Unknown kind (the message lists the known ones and suggests the closest).
    """
    importer = IMPORTERS.get(kind) if isinstance(kind, str) else None
    if importer is None:
        close = difflib.get_close_matches(str(kind), list(IMPORTERS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"Unknown model kind {kind!r}; {hint}model.kind must be one of: {', '.join(IMPORTERS)}.")
    return importer


def import_model(kind: str, source: ModelSource) -> ImportedModel:
    """Import a model with the importer registered for ``kind``.

    Args:
        kind: ``"onnx"``, ``"pytorch"``, ``"sklearn"`` or ``"tflite"``.
        source: The matching source (:class:`OnnxSource`, :class:`TorchSource`, ...).

    Raises:
        ConfigError: Unknown kind, or a source of another kind.
        ModelError: The model cannot be read, converted or verified.
        MissingExtraError: The kind's converter is not installed.
    """
    importer = get_importer(kind)
    if not isinstance(source, importer.source_type):
        raise ConfigError(f"Model kind {kind!r} takes a {importer.source_type.__name__}, got a {type(source).__name__}.")
    return importer.import_model(source)


def source_from_config(section: Mapping[str, Any], base_dir: str | Path | None = None) -> ModelSource:
    """Build the source for a project file's ``model:`` section.

    Keys are the source's fields (``input_shape`` stands for ``example_input_shape``);
    ``kind`` defaults to ``"onnx"``. Relative paths are resolved against ``base_dir``.

    Raises:
        ConfigError: Unknown kind, a key the kind does not use, a missing required key, or a bad value.
    """
    kind = section.get("kind", DEFAULT_KIND)
    source_type = get_importer(kind).source_type
    aliases: dict[str, str] = source_type.config_aliases
    to_key = {field_name: key for key, field_name in aliases.items()}
    keys = {to_key.get(f.name, f.name): f for f in fields(source_type)}
    unknown = [key for key in section if key != "kind" and key not in keys]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(keys), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"model.{unknown[0]} is not used by kind {kind!r}; {hint}that kind takes: {', '.join(keys)}.")
    missing = [key for key, f in keys.items() if key not in section and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"model.{missing[0]} is required for kind {kind!r}; add it to the model: section.")
    source = source_type(**{keys[key].name: value for key, value in section.items() if key != "kind"})
    return source.resolve(base_dir) if base_dir is not None else source
