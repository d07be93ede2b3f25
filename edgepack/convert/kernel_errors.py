"""LiteRT kernel failures, turned into one sentence that names the op.

LiteRT reports a kernel that refuses its inputs as a ``RuntimeError`` such as
``tflite/kernels/div.cc:262 data[i] != zero_point was not true.Node number 5 (DIV)
failed to invoke.`` During validation that is not a bug in edgepack but a converted
model that cannot run on the user's data; :func:`kernel_error` names the op, the
node, the failed check and, for checks with a known cause, what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConvertError

__all__ = ["KernelFailure", "kernel_error", "parse_kernel_failure"]

_NODE = re.compile(r"Node number (\d+) \(([A-Za-z0-9_]+)\) failed to (invoke|prepare)")
_CHECK = re.compile(r"(tensorflow/lite/|tflite/)?kernels/([A-Za-z0-9_/]+)\.cc:(\d+) (.+?) was not true")

#: (kernel file, check) -> why, and what to do. Keyed by what LiteRT prints, so new
#: causes are one entry here.
_CAUSES: dict[tuple[str, str], str] = {
    ("div", "data[i] != zero_point"): (
        "a divisor was quantized to zero (int8 cannot represent a value that close to 0, e.g. an epsilon added to "
        "a norm of all-zero input); ship a tflite-fp16 or tflite-fp32 variant, or keep that division out of int8"),
}


@dataclass(frozen=True)
class KernelFailure:
    """What LiteRT said, parsed: the op, its node index, the kernel source and the failed check."""

    op: str | None
    node: int | None
    kernel: str | None
    check: str | None
    raw: str

    def describe(self) -> str:
        where = f"LiteRT's {self.op} kernel" if self.op else "a LiteRT kernel"
        if self.node is not None:
            where += f" (node {self.node})"
        what = f" refused its input ({self.check} was not true)" if self.check else f" failed ({self.raw[:200]})"
        cause = _CAUSES.get((self.kernel or "", self.check or ""))
        return where + what + (f": {cause}" if cause else "")


def parse_kernel_failure(message: str) -> KernelFailure:
    """Parse a LiteRT ``RuntimeError`` message (pure)."""
    node = _NODE.search(message)
    check = _CHECK.search(message)
    return KernelFailure(op=node.group(2) if node else None, node=int(node.group(1)) if node else None,
                         kernel=check.group(2).rsplit("/", 1)[-1] if check else None,
                         check=check.group(4).strip() if check else None, raw=" ".join(message.split()))


def kernel_error(cause: BaseException | KernelFailure, what: str) -> ConvertError:
    """A :class:`ConvertError` for a LiteRT failure (an exception, or one already parsed) while
    running ``what`` (e.g. "the TFLite int8 model, run on validation samples 0-31,")."""
    failure = cause if isinstance(cause, KernelFailure) else parse_kernel_failure(str(cause))
    error = ConvertError(f"{what[:1].upper()}{what[1:]} failed: {failure.describe()}. Refusing this variant.")
    error.failure = failure  # type: ignore[attr-defined]
    return error
