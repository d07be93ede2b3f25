"""Inference engines a device may have, probed without importing them."""

from __future__ import annotations

import importlib.util

# Engine name -> importable module names, best first.
_ENGINE_MODULES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime",),
    "litert": ("ai_edge_litert", "tflite_runtime", "tensorflow"),
}


def available_engines() -> list[str]:
    """Names of the engines importable here, in registry order."""
    return [name for name, modules in _ENGINE_MODULES.items() if any(importlib.util.find_spec(m) for m in modules)]
