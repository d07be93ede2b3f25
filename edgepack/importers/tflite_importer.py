"""TFLite models pass through unchanged, once they look like a TFLite flatbuffer."""

from __future__ import annotations

from ..errors import ModelError
from ._common import read_source_file, source_file
from .base import ImportedModel, TfliteSource

# The flatbuffer file identifier of the TFLite schema, stored at bytes 4..8.
TFLITE_IDENTIFIER = b"TFL3"
# Flatbuffers address at most 2 GB; TFLite files for small devices are far smaller.
MAX_TFLITE_BYTES = 2 * 1024**3


class TfliteImporter:
    """Checks the TFLite flatbuffer identifier and hands the bytes on as they are."""

    kind = "tflite"
    source_type = TfliteSource

    def import_model(self, source: TfliteSource) -> ImportedModel:
        """Read a ``.tflite`` file.

        Raises:
            ModelError: The file is missing, empty, above 2 GB, or not a TFLite flatbuffer.
        """
        path = source.path
        data = read_source_file(path, "Model file", limit=MAX_TFLITE_BYTES)
        if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
            hint = " It looks like an ONNX file: use kind: onnx." if path.suffix.lower() == ".onnx" else ""
            raise ModelError(
                f"{path} is not a TFLite model (it lacks the 'TFL3' flatbuffer identifier at bytes 4..8, so it is "
                f"truncated or another format); convert the model with the TensorFlow Lite converter and retry.{hint}"
            )
        return ImportedModel(
            kind="tflite",
            description=f"TFLite model {path.name} ({len(data) / 1024:.0f} KiB), passed through unchanged",
            source_files=(source_file("model", path, data),),
            data=data,
        )
