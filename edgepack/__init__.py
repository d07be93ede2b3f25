"""edgepack: optimize, verify, sign and ship ML models to fleets of small devices.

The public API is imported lazily so that ``import edgepack`` (and the CLI's
``--help``) stays fast; heavy dependencies load only when a function is used.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "optimize": ("edgepack.optimize", "optimize"),
    "OptimizeConfig": ("edgepack.optimize", "OptimizeConfig"),
    "OptimizeReport": ("edgepack.optimize", "OptimizeReport"),
    "Gate": ("edgepack.optimize", "Gate"),
    "EdgepackError": ("edgepack.errors", "EdgepackError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edgepack' has no attribute {name!r}")
