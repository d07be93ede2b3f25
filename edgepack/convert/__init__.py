"""Converting models to other engines' formats (TFLite through onnx2tf / TensorFlow)."""

from __future__ import annotations

from .tflite import (
    TFLITE_PRECISIONS,
    ConversionResult,
    LiteRTSession,
    OutputAgreement,
    TFLiteValidation,
    convert_onnx_to_tflite,
    convert_tensorflow_to_tflite,
    require_tflite,
    sanitize_names,
    tflite_available,
    validate_tflite,
)

__all__ = [
    "TFLITE_PRECISIONS", "ConversionResult", "LiteRTSession", "OutputAgreement", "TFLiteValidation",
    "convert_onnx_to_tflite", "convert_tensorflow_to_tflite", "require_tflite", "sanitize_names",
    "tflite_available", "validate_tflite",
]
