"""Arithmetic classes and measuring variants under them (see :mod:`edgepack_runtime.arith`)."""

from edgepack_runtime.arith import CLASSES, ArithClass, classify, host_class

from .measure import METHODS, MeasureConfig, Measurer, Unavailable, open_measurer
from .remote import RemoteError, RemoteSession

__all__ = ["CLASSES", "METHODS", "ArithClass", "MeasureConfig", "Measurer", "RemoteError", "RemoteSession",
           "Unavailable", "classify", "host_class", "open_measurer"]
