"""edgepack device runtime.

Installable on its own (numpy plus one engine); it never imports ``edgepack``.

    import edgepack_runtime
    model = edgepack_runtime.open("/var/lib/edgepack")
    outputs = model.predict(raw_image)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .boxes import unletterbox_boxes
from .engines import available_engines
from .model import Model, RuntimeConfig, install, load, open  # noqa: A004
from .validate import InputValidationError

__all__ = ["InputValidationError", "Model", "RuntimeConfig", "__version__", "available_engines", "install", "load", "open", "unletterbox_boxes"]
