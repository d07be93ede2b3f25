"""edgepack device runtime.

Installable on its own (numpy plus one engine); it never imports ``edgepack``.
The cache, A/B slots, daemon and OTA client arrive with later work; today it offers
engine discovery so the workstation and the device agree on what can run.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .engines import available_engines

__all__ = ["__version__", "available_engines"]
