"""Graph optimization and quantization of ONNX models behind an accuracy gate."""

from .gate import Gate
from .pipeline import MODES, OptimizeConfig, OptimizeReport, optimize

__all__ = ["MODES", "Gate", "OptimizeConfig", "OptimizeReport", "optimize"]
