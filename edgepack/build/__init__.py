"""``edgepack build``: project file + trained model -> one signed, deterministic bundle.

See :mod:`edgepack.build.pipeline` for the steps, :mod:`edgepack.build.golden` for the
golden-vector tolerance rule and :mod:`edgepack.build.stats` for the reference
statistics.
"""

from __future__ import annotations

from .pipeline import BuildResult, VariantResult, build

__all__ = ["BuildResult", "VariantResult", "build"]
