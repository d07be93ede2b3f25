"""The one exception tree for edgepack (root re-exported from the runtime).

Every error a user can cause derives from :class:`EdgepackError`; branches say where
the problem came from. Messages are full sentences that say what to do next, because
the CLI prints them as the only line a user sees.
"""

from __future__ import annotations

from edgepack_runtime.errors import BundleError, DownloadError, EdgepackError, UpdateError, VerificationError

__all__ = [
    "BundleError", "ConfigError", "ConvertError", "DataError", "DownloadError", "EdgepackError", "GateError", "InputError",
    "MissingExtraError", "ModelError", "NotQuantizableError", "OptimizationError", "OutputError", "ServerError",
    "UpdateError", "VerificationError",
]


class InputError(EdgepackError):
    """A file, option or dataset given by the user is unusable."""


class ModelError(InputError):
    """A model file is missing, unreadable, truncated or unsupported."""


class DataError(InputError):
    """Calibration or validation data is missing, empty or does not fit the model."""


class ConfigError(InputError):
    """A project file or option value is invalid."""


class MissingExtraError(EdgepackError):
    """An optional dependency is needed but not installed."""


class OptimizationError(EdgepackError):
    """Graph optimization or quantization could not produce a usable model."""


class NotQuantizableError(OptimizationError):
    """The model cannot be quantized by the requested mode without being wrong."""


class GateError(EdgepackError):
    """A measured value missed a declared threshold (an accuracy or size gate)."""

    exit_code = 1


class ServerError(EdgepackError):
    """The update server refused a request or is misconfigured."""


class OutputError(EdgepackError):
    """An output file could not be written."""


class ConvertError(GateError):
    """A converted model was refused: it fails or diverges when run (nothing is written)."""
