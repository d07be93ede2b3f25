"""Raw audio (PCM) and fixed-length numeric frames as raw input kinds.

Like images and tabular rows, the device feeds the raw form and the conversion runs
inside the model: ``int16`` PCM becomes float32 in ``[-1, 1)`` by ``x * 2**-15`` (exact
in float32, so the graph and :meth:`AudioPreprocess.reference` agree bit for bit);
``float32`` PCM and numeric frames pass through after the checks. Each spec carries its
own validation, graph nodes and numpy reference, so :mod:`.graph` and :mod:`.reference`
only dispatch to it (a plug-in, not one more branch per step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from onnx import TensorProto, helper

from ..errors import ConfigError, DataError
from .spec import _as_tuple, _is_int, _is_real, _jsonable, _raise_if

__all__ = ["AudioPreprocess", "FramesPreprocess", "INT16_SCALE"]

#: int16 PCM -> float: 1/32768 (a power of two, so the product is exact in float32).
INT16_SCALE = np.float32(1.0 / 32768.0)
SampleFormat = Literal["int16", "float32"]
_FORMATS = ("int16", "float32")


def _finite_problem(raw: np.ndarray, what: str) -> None:
    if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
        bad = np.argwhere(~np.isfinite(raw))[0].tolist()
        raise DataError(f"{what} contains NaN or infinity (first at index {bad}); replace it with finite values.")


@dataclass(frozen=True)
class AudioPreprocess:
    """Raw mono PCM chunks of a fixed length at a declared sample rate.

    Raw input is ``[N, samples]`` of ``sample_format``; the model input is float32
    ``[N, samples]``. ``int16`` samples are scaled to ``[-1, 1)`` by ``1/32768``;
    ``float32`` samples must already lie in ``[-1, 1]``.

    Attributes:
        sample_format: ``int16`` or ``float32``.
        sample_rate: Samples per second the model was trained at (a device resamples
            before feeding; the bundle's schema states it).
        samples: Samples per chunk (the model's fixed input length).
    """

    sample_format: SampleFormat = "int16"
    sample_rate: int = 16000
    samples: int = 512

    kind = "audio"

    def validate(self, *, raise_errors: bool = True) -> list[str]:
        """Check the spec on its own (see :meth:`ImagePreprocess.validate`)."""
        problems = []
        if self.sample_format not in _FORMATS:
            problems.append(f"sample_format must be int16 or float32, got {self.sample_format!r}.")
        if not (_is_int(self.sample_rate) and 1 <= self.sample_rate <= 384_000):
            problems.append(f"sample_rate must be an integer number of Hz from 1 to 384000, got {self.sample_rate!r}.")
        if not (_is_int(self.samples) and self.samples >= 1):
            problems.append(f"samples must be a positive integer (samples per chunk), got {self.samples!r}.")
        return _raise_if(problems, "audio preprocessing", raise_errors)

    @property
    def raw_dtype(self) -> np.dtype:
        return np.dtype(np.int16 if self.sample_format == "int16" else np.float32)

    def check_raw(self, raw: np.ndarray) -> None:
        """Reject raw PCM the model cannot take, with a sentence saying why (DataError)."""
        expected = f"{self.sample_format} [N, {self.samples}] mono PCM at {self.sample_rate} Hz"
        if raw.dtype != self.raw_dtype:
            hint = (" Convert float samples in [-1, 1) with (x * 32768).clip(-32768, 32767).astype(np.int16)."
                    if self.sample_format == "int16" and raw.dtype.kind == "f" else "")
            raise DataError(f"Raw audio must be {expected}, got dtype {raw.dtype}.{hint}")
        if raw.ndim != 2 or raw.shape[1] != self.samples:
            hint = " Add a batch axis with raw[None]." if raw.ndim == 1 and raw.shape[0] == self.samples else ""
            raise DataError(f"Raw audio must be {expected}, got shape {list(raw.shape)}; cut the signal into chunks "
                            f"of {self.samples} samples.{hint}")
        if raw.shape[0] == 0:
            raise DataError("The raw audio batch is empty; pass at least one chunk.")
        if self.sample_format == "float32":
            _finite_problem(raw, "Raw audio")
            peak = float(np.max(np.abs(raw)))
            if peak > 1.0:
                raise DataError(f"Raw float32 audio must lie in [-1, 1], but its peak is {peak:g}; "
                                "normalize it (e.g. divide int16 samples by 32768).")

    def reference(self, raw: np.ndarray) -> np.ndarray:
        """The model input computed in numpy exactly as the graph does."""
        x = raw.astype(np.float32)
        return x * INT16_SCALE if self.sample_format == "int16" else x

    def model_shape(self) -> str:
        return f"[N, {self.samples}] float32"

    def check_fit(self, dims: list | None, elem: int, name: str, describe) -> None:
        """Raise when the model input cannot take this spec's output (names both sides)."""
        both = (f"the model input {name!r} expects {describe(dims, elem)} but the audio preprocessing produces "
                f"{self.model_shape()}")
        if elem != TensorProto.FLOAT:
            from ..errors import ModelError

            raise ModelError(f"Cannot embed preprocessing: {both}; export the model with a float32 input.")
        if dims is not None and (len(dims) != 2 or (isinstance(dims[1], int) and dims[1] != self.samples)):
            raise ConfigError(f"Cannot embed preprocessing: {both}; set samples to the model's chunk length.")

    def raw_value_info(self, name: str, batch: Any):
        elem = TensorProto.INT16 if self.sample_format == "int16" else TensorProto.FLOAT
        return helper.make_tensor_value_info(name, elem, [batch, self.samples])

    def graph_nodes(self, b, raw: str) -> None:
        """Append the nodes computing the model input from ``raw`` (the last node's output is renamed)."""
        if self.sample_format == "int16":
            x = b.op("Cast", [raw], "to_float", to=TensorProto.FLOAT)
            b.op("Mul", [x, b.const("int16_scale", np.asarray(INT16_SCALE, dtype=np.float32))], "scale")
        else:
            b.op("Identity", [raw], "pcm")

    def schema_extra(self) -> dict[str, Any]:
        """What the bundle's io schema says about the raw input."""
        extra: dict[str, Any] = {"sample_rate": self.sample_rate, "samples": self.samples,
                                 "sample_format": self.sample_format}
        if self.sample_format == "float32":
            extra["value_range"] = [-1.0, 1.0]
        return extra

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "audio", **_jsonable(asdict(self))}


@dataclass(frozen=True)
class FramesPreprocess:
    """Fixed-length float32 frames of numeric values (sensor windows, feature frames).

    Raw input is float32 ``[N, frame_len]`` or, with ``frames``, ``[N, frames,
    frame_len]``; values must be finite. The model input is ``raw * scale``.

    Attributes:
        frame_len: Values per frame.
        frames: Frames per sample (None: one frame, a 2-D input).
        scale: Multiplier applied inside the model (1 passes the frames through).
    """

    frame_len: int = 1
    frames: int | None = None
    scale: float = 1.0

    kind = "frames"

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", _as_tuple(self.frames))

    def validate(self, *, raise_errors: bool = True) -> list[str]:
        """Check the spec on its own."""
        problems = []
        if not (_is_int(self.frame_len) and self.frame_len >= 1):
            problems.append(f"frame_len must be a positive integer, got {self.frame_len!r}.")
        if self.frames is not None and not (_is_int(self.frames) and self.frames >= 1):
            problems.append(f"frames must be a positive integer or null, got {self.frames!r}.")
        if not (_is_real(self.scale) and np.isfinite(self.scale) and self.scale != 0):
            problems.append(f"scale must be a finite non-zero number, got {self.scale!r}.")
        return _raise_if(problems, "frames preprocessing", raise_errors)

    @property
    def shape(self) -> list:
        return [self.frame_len] if self.frames is None else [self.frames, self.frame_len]

    def check_raw(self, raw: np.ndarray) -> None:
        expected = "float32 [N, " + ", ".join(map(str, self.shape)) + "]"
        if raw.dtype != np.float32:
            raise DataError(f"Raw frames must be {expected}, got dtype {raw.dtype}; convert with raw.astype(np.float32).")
        if list(raw.shape[1:]) != self.shape:
            hint = " Add a batch axis with raw[None]." if list(raw.shape) == self.shape else ""
            raise DataError(f"Raw frames must be {expected}, got shape {list(raw.shape)}.{hint}")
        if raw.shape[0] == 0:
            raise DataError("The raw frame batch is empty; pass at least one frame.")
        _finite_problem(raw, "Raw frames")

    def reference(self, raw: np.ndarray) -> np.ndarray:
        x = raw.astype(np.float32)
        return x * np.float32(self.scale) if np.float32(self.scale) != 1 else x

    def model_shape(self) -> str:
        return "[N, " + ", ".join(map(str, self.shape)) + "] float32"

    def check_fit(self, dims: list | None, elem: int, name: str, describe) -> None:
        both = (f"the model input {name!r} expects {describe(dims, elem)} but the frames preprocessing produces "
                f"{self.model_shape()}")
        if elem != TensorProto.FLOAT:
            from ..errors import ModelError

            raise ModelError(f"Cannot embed preprocessing: {both}; export the model with a float32 input.")
        if dims is not None and (len(dims) != 1 + len(self.shape)
                                 or any(isinstance(d, int) and d != w for d, w in zip(dims[1:], self.shape))):
            raise ConfigError(f"Cannot embed preprocessing: {both}; fix frame_len/frames in the spec.")

    def raw_value_info(self, name: str, batch: Any):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *self.shape])

    def graph_nodes(self, b, raw: str) -> None:
        if np.float32(self.scale) != 1:
            b.op("Mul", [raw, b.const("scale", np.asarray(self.scale, dtype=np.float32))], "scale")
        else:
            b.op("Identity", [raw], "frames")

    def schema_extra(self) -> dict[str, Any]:
        return {"frame_len": self.frame_len, **({"frames": self.frames} if self.frames is not None else {})}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "frames", **_jsonable(asdict(self))}


#: Raw input kinds that carry their own checks, graph nodes and reference (``kind`` -> class).
PLUGIN_KINDS = {"audio": AudioPreprocess, "frames": FramesPreprocess}
