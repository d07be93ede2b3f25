"""Models below opset 13 are upgraded with onnx's version converter, and the upgrade is proven.

Opset 13 is where ``Squeeze``/``Unsqueeze`` took their axes as an input, ``Softmax``
changed its axis semantics and ``QuantizeLinear``/``DequantizeLinear`` gained ``axis``
(per-channel int8). Embedded preprocessing and per-channel quantization both need it,
so an opset 11/12 model is converted to :data:`TARGET_OPSET` (the smallest opset that
has all of these: the fewer adapters the converter runs, the less can go wrong), and
the converted model must give the same outputs as the original on the project's own
data before anything is built from it. A converter failure or any changed output is
refused with one sentence; nothing is silently re-exported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import ModelError
from ..modelio import ai_onnx_opset

__all__ = ["MIN_OPSET", "TARGET_OPSET", "OpsetUpgrade", "needs_upgrade", "prove_upgrade", "upgrade_opset"]

#: Below this, the model is converted (embedded preprocessing and per-channel QDQ need it).
MIN_OPSET = 13
#: What it is converted to.
TARGET_OPSET = 13


@dataclass(frozen=True)
class OpsetUpgrade:
    """A converted model and the evidence that it computes what the original did.

    Attributes:
        model: The converted model.
        from_opset: The original default-domain opset.
        to_opset: The opset converted to.
        samples: Samples both models were run on (0 until proven).
        max_abs_error: Largest absolute output difference over those samples.
        data: Which data proved it (for lineage).
    """

    model: onnx.ModelProto
    from_opset: int
    to_opset: int
    samples: int = 0
    max_abs_error: float = 0.0
    data: str = ""

    def lineage(self) -> dict:
        """The lineage entry: what was converted, with what, and how it was proven."""
        return {"applied": True, "from_opset": self.from_opset, "to_opset": self.to_opset,
                "tool": f"onnx.version_converter (onnx {onnx.__version__})",
                "proof": {"data": self.data, "samples": self.samples, "max_abs_error": self.max_abs_error,
                          "rule": f"every output within rtol={_rtol()} atol={_atol()} of the original (onnxruntime)"}}


def _rtol() -> float:
    from ..optimize.evaluate import RTOL

    return RTOL


def _atol() -> float:
    from ..optimize.evaluate import ATOL

    return ATOL


def needs_upgrade(model: onnx.ModelProto) -> bool:
    """True when the model imports a default-domain opset below :data:`MIN_OPSET`."""
    opset = ai_onnx_opset(model)
    return opset is not None and opset < MIN_OPSET


def _convert(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    from onnx import version_converter

    return version_converter.convert_version(model, target)


def upgrade_opset(model: onnx.ModelProto, source: str,
                  convert: Callable[[onnx.ModelProto, int], onnx.ModelProto] | None = None) -> OpsetUpgrade:
    """Convert ``model`` to :data:`TARGET_OPSET` (not yet proven: call :func:`prove_upgrade`).

    Raises:
        ModelError: The converter fails or writes an invalid model.
    """
    opset = ai_onnx_opset(model)
    try:
        converted = (convert or _convert)(model, TARGET_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError, ValueError, checker errors...
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{source} uses ONNX opset {opset}; edgepack needs opset {MIN_OPSET} or newer and onnx's version "
                         f"converter could not convert it ({detail}); re-export the model with opset {MIN_OPSET} or newer, "
                         "e.g. torch.onnx.export(..., opset_version=17).") from None
    return OpsetUpgrade(converted, opset, TARGET_OPSET)


def prove_upgrade(upgrade: OpsetUpgrade, original: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], source: str,
                  data: str) -> OpsetUpgrade:
    """Run original and converted model on ``feeds`` with onnxruntime; refuse any changed output.

    Args:
        feeds: Batches of model inputs (the project's calibration/validation data).
        data: Which data the feeds are, for the message and lineage.

    Returns:
        ``upgrade`` with the number of samples and the max abs error filled in.

    Raises:
        ModelError: An output changed (shape, dtype, beyond tolerance, NaN pattern), the
            converted model does not run, or there was no data to prove it on.
    """
    from ..optimize.evaluate import ATOL, RTOL, session

    refuse = (f"{source} uses ONNX opset {upgrade.from_opset}; edgepack converted it to opset {upgrade.to_opset} with onnx's "
              "version converter, but")
    hint = f"; re-export the model with opset {MIN_OPSET} or newer, e.g. torch.onnx.export(..., opset_version=17)."
    try:
        before = session(original.SerializeToString(), 1)
        after = session(upgrade.model.SerializeToString(), 1)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{refuse} the result does not load in onnxruntime ({str(exc).strip().splitlines()[0][:200]}){hint}") from None
    names = [o.name for o in before.get_outputs()]
    samples, worst = 0, 0.0
    for feed in feeds:
        want = before.run(None, dict(feed))
        try:
            got = after.run(None, dict(feed))
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{refuse} the result fails on the {data} ({str(exc).strip().splitlines()[0][:200]}){hint}") from None
        for name, a, b in zip(names, want, got):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ModelError(f"{refuse} its output {name!r} changed from {a.dtype}{list(a.shape)} to {b.dtype}{list(b.shape)} "
                                 f"on the {data}{hint}")
            if a.dtype.kind in "fc":
                if not np.array_equal(np.isfinite(a), np.isfinite(b)):
                    raise ModelError(f"{refuse} its output {name!r} became NaN or infinite differently on the {data}{hint}")
                a64, b64 = a[np.isfinite(a)].astype(np.float64), b[np.isfinite(b)].astype(np.float64)
                if a64.size:
                    diff = np.abs(a64 - b64)
                    worst = max(worst, float(diff.max()))
                    if float(np.max(diff - RTOL * np.abs(a64))) > ATOL:
                        raise ModelError(f"{refuse} its output {name!r} changed by up to {float(diff.max()):.3g} on the {data} "
                                         f"(allowed: rtol {RTOL:g}, atol {ATOL:g}){hint}")
            elif not np.array_equal(a, b):
                raise ModelError(f"{refuse} its integer output {name!r} changed on the {data}{hint}")
        samples += next(iter(feed.values())).shape[0] if feed else 0
    if samples == 0:
        raise ModelError(f"{refuse} there is no data to prove the converted model unchanged; pass calibration or validation "
                         f"data{hint}")
    from dataclasses import replace

    return replace(upgrade, samples=samples, max_abs_error=worst, data=data)
