"""Typed preprocessing and post-processing specifications.

A spec is the single source of truth for how raw device input becomes model
features: :mod:`edgepack.preprocess.graph` compiles it into ONNX nodes and
:mod:`edgepack.preprocess.reference` runs it in numpy. Both read the same frozen
dataclasses, so training-time and serving-time features cannot drift apart.

``validate()`` is pure: it only inspects the spec and never touches a model or data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Union

import numpy as np

from ..errors import ConfigError, DataError

__all__ = [
    "Column", "ColumnPlan", "ImagePreprocess", "Postprocess", "Preprocess", "TabularPreprocess",
    "fit_tabular", "preprocess_from_dict", "LUMA_WEIGHTS",
]

Color = Literal["rgb", "bgr", "gray"]
Layout = Literal["NCHW", "NHWC"]
Interpolation = Literal["bilinear", "nearest", "area"]
ColumnKind = Literal["numeric", "categorical"]
Scaling = Literal["none", "standard", "minmax"]
ImputeStrategy = Literal["auto", "mean", "median", "most_frequent", "none"]

_COLORS = ("rgb", "bgr", "gray")
_LAYOUTS = ("NCHW", "NHWC")
_INTERPOLATIONS = ("bilinear", "nearest", "area")
_RESIZE_MODES = ("resize", "resize_shorter", "keep_ratio_pad", "letterbox")
_KINDS = ("numeric", "categorical")
_SCALINGS = ("none", "standard", "minmax")
_STRATEGIES = ("auto", "mean", "median", "most_frequent", "none")

#: ITU-R BT.601 luma weights for (R, G, B); the same weights PIL's ``convert("L")`` uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _raise_if(problems: list[str], what: str, raise_errors: bool) -> list[str]:
    if problems and raise_errors:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"The {what} is invalid; fix these and retry:\n{listing}")
    return problems


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _pair_problem(name: str, value: object) -> str | None:
    if not (isinstance(value, tuple) and len(value) == 2 and all(_is_int(v) for v in value)):
        return f"{name} must be a (height, width) pair of integers, got {value!r}."
    if value[0] < 1 or value[1] < 1:
        return f"{name} must be positive, got {value!r}."
    return None


def _as_tuple(value: Any) -> Any:
    # YAML and JSON give lists; a frozen spec must hold hashable tuples.
    if isinstance(value, (list, np.ndarray)):
        return tuple(v.item() if isinstance(v, np.generic) else v for v in value)
    return value


@dataclass(frozen=True)
class ImagePreprocess:
    """How a raw uint8 image becomes the model's float32 input.

    Steps run in this order: color conversion, resize (one of ``resize``,
    ``resize_shorter``, ``keep_ratio_pad``, ``letterbox``), padding (the last two),
    center crop, ``(x * scale - mean) / std``, layout. Raw input is uint8 ``[N, H, W, C]``
    with ``C`` 3 for rgb/bgr and 1 for gray; everything after the cast is float32.

    Geometry rules (integer arithmetic, identical in the graph and the reference):

    * ``resize`` (stretch): output is exactly ``resize``.
    * ``resize_shorter``: shorter side ``S``, longer side ``floor(long * S / short)``.
    * ``keep_ratio_pad`` ``(Ht, Wt)`` -- the PaddleOCR text-line rule: height ``Ht``,
      width ``min(Wt, ceil(Ht * W / H))`` (at least 1), then pad on the RIGHT to ``Wt``.
      The ceiling is exact integer arithmetic (PaddleOCR's float ``math.ceil(Ht * W / H)``
      can differ by one pixel when ``Ht * W / H`` is an integer that float64 misses).
    * ``letterbox`` ``(Ht, Wt)`` -- the YOLO rule: scale ``min(Ht / H, Wt / W)``; the
      limiting side becomes exactly its target and the other ``round_half_up(side *
      scale)`` (at least 1); then pad centred, ``pad_top = (Ht - h) // 2`` and
      ``pad_left = (Wt - w) // 2`` (an odd remainder goes to the bottom/right). The
      model gets an extra output ``letterbox`` (float32 ``[N, 6]`` of exact integers:
      ``resized_height, resized_width, pad_top, pad_left, raw_height, raw_width``; the
      per-axis scale is ``resized / raw``), so :func:`unletterbox_boxes` maps boxes back
      to raw pixels.

    Interpolation (every resize step uses the same one):

    * ``bilinear``: half_pixel source coordinates, no antialias, clamped at the border
      (cv2.INTER_LINEAR, PIL without its reducing filter only when enlarging).
    * ``nearest``: ``src = floor(dst / float32(out / in))`` (ONNX ``asymmetric`` +
      ``floor``, the rule of cv2.INTER_NEAREST), computed in float32 as onnxruntime does;
      the float32 ratio moves a few pixels by one against the exact integer
      ``floor(dst * in / out)`` for about 3% of (in, out) size pairs.
    * ``area``: exact box average -- each output pixel is the mean of the input area it
      covers, edge pixels weighted by the covered fraction (cv2.INTER_AREA when
      shrinking, for any factor; when enlarging it is the same coverage rule, not
      cv2's bilinear fallback).

    Attributes:
        color: Channel order of the raw input.
        model_color: Channel order the model expects. rgb<->bgr reverses channels,
            rgb/bgr->gray uses :data:`LUMA_WEIGHTS`, gray->rgb/bgr repeats the channel.
        min_size: Smallest accepted raw ``(height, width)``; at least ``(2, 2)``.
        max_size: Largest accepted raw ``(height, width)``.
        resize: Fixed output ``(height, width)`` (stretch), or None.
        resize_shorter: Resize so the shorter side has this length, keeping aspect, or None.
        keep_ratio_pad: ``(height, width)`` of the PaddleOCR keep-ratio + right-pad rule, or None.
        letterbox: ``(height, width)`` of the YOLO letterbox, or None. The four resize
            modes are mutually exclusive.
        interpolation: ``bilinear``, ``nearest`` or ``area`` (see above).
        pad_value: Value of padded pixels in RAW units (0-255 pixel scale, before
            ``scale``/``mean``/``std``), one per model channel or one for all; e.g.
            YOLO's 114, or 127.5 for PaddleOCR's zero padding after ``(x/255 - 0.5)/0.5``.
        center_crop: ``(height, width)`` cut from the center, or None. The top-left
            corner is ``((H - h) // 2, (W - w) // 2)``. Not with the padding modes.
        scale: Multiplier applied first, e.g. ``1/255``.
        mean: Per model channel (or one value for all), subtracted after ``scale``.
        std: Per model channel (or one value for all), divisor after ``mean``.
        layout: Layout of the model input.
    """

    color: Color = "rgb"
    model_color: Color = "rgb"
    min_size: tuple[int, int] = (2, 2)
    max_size: tuple[int, int] = (4096, 4096)
    resize: tuple[int, int] | None = None
    resize_shorter: int | None = None
    keep_ratio_pad: tuple[int, int] | None = None
    letterbox: tuple[int, int] | None = None
    interpolation: Interpolation = "bilinear"
    pad_value: tuple[float, ...] = (0.0,)
    center_crop: tuple[int, int] | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: Layout = "NCHW"

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _as_tuple(getattr(self, f.name)))

    @property
    def raw_channels(self) -> int:
        """Channel count of the raw input."""
        return 1 if self.color == "gray" else 3

    @property
    def model_channels(self) -> int:
        """Channel count of the model input."""
        return 1 if self.model_color == "gray" else 3

    def channel_mean(self) -> tuple[float, ...]:
        """``mean`` expanded to one value per model channel."""
        return self.mean * self.model_channels if len(self.mean) == 1 else self.mean

    def channel_std(self) -> tuple[float, ...]:
        """``std`` expanded to one value per model channel."""
        return self.std * self.model_channels if len(self.std) == 1 else self.std

    def channel_pad_value(self) -> tuple[float, ...]:
        """``pad_value`` expanded to one raw-unit value per model channel."""
        return self.pad_value * self.model_channels if len(self.pad_value) == 1 else self.pad_value

    @property
    def resize_mode(self) -> str | None:
        """Which resize step is declared (``resize``, ``resize_shorter``, ``keep_ratio_pad``, ``letterbox``), or None."""
        declared = [m for m in _RESIZE_MODES if getattr(self, m) is not None]
        return declared[0] if declared else None

    @property
    def pads(self) -> bool:
        """True when a padding step follows the resize (keep_ratio_pad, letterbox)."""
        return self.keep_ratio_pad is not None or self.letterbox is not None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size after the resize step (before any padding) for a raw ``height x width`` image."""
        if self.resize is not None:
            return self.resize
        if self.resize_shorter is not None:
            # Integer arithmetic so the graph (int64 Div) and numpy agree exactly; equals
            # torchvision's int(size * long / short) because the quotient is never
            # within rounding distance of an integer it is not equal to.
            short = min(height, width)
            return (height * self.resize_shorter // short, width * self.resize_shorter // short)
        if self.keep_ratio_pad is not None:
            target_h, target_w = self.keep_ratio_pad
            return (target_h, max(1, min(target_w, -(-target_h * width // height))))
        if self.letterbox is not None:
            target_h, target_w = self.letterbox
            if height * target_w >= width * target_h:  # height limits: scale = target_h / height
                return (target_h, max(1, (2 * width * target_h + height) // (2 * height)))
            return (max(1, (2 * height * target_w + width) // (2 * width)), target_w)
        return (height, width)

    def pad_amounts(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` padding after the resize for a raw ``height x width`` image."""
        target = self.keep_ratio_pad or self.letterbox
        if target is None:
            return (0, 0, 0, 0)
        h, w = self.resized_size(height, width)
        extra_h, extra_w = target[0] - h, target[1] - w
        if self.keep_ratio_pad is not None:
            return (0, 0, extra_h, extra_w)
        return (extra_h // 2, extra_w // 2, extra_h - extra_h // 2, extra_w - extra_w // 2)

    def letterbox_transform(self, height: int, width: int) -> tuple[int, int, int, int, int, int]:
        """The ``letterbox`` output row for a raw ``height x width`` image (see the class docstring)."""
        h, w = self.resized_size(height, width)
        top, left, _, _ = self.pad_amounts(height, width)
        return (h, w, top, left, height, width)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the model input for a raw image of ``height x width``."""
        if self.center_crop is not None:
            return self.center_crop
        return self.keep_ratio_pad or self.letterbox or self.resized_size(height, width)

    @property
    def static_output_size(self) -> tuple[int, int] | None:
        """Model-input ``(height, width)`` when it does not depend on the raw size."""
        for fixed in (self.center_crop, self.resize, self.keep_ratio_pad, self.letterbox):
            if fixed is not None:
                return fixed
        if self.resize_shorter is None and tuple(self.min_size) == tuple(self.max_size):
            return tuple(self.min_size)  # fixed raw size, nothing rescales it
        return None

    def validate(self, *, raise_errors: bool = True) -> list[str]:
        """Check the spec on its own.

        Args:
            raise_errors: Raise instead of returning when something is wrong.

        Returns:
            Every problem found, as sentences; empty when the spec is valid.

        Raises:
            ConfigError: Listing all problems, when ``raise_errors`` and any exist.
        """
        problems: list[str] = []
        for name in ("color", "model_color"):
            if getattr(self, name) not in _COLORS:
                problems.append(f"{name} must be one of {', '.join(_COLORS)}, got {getattr(self, name)!r}.")
        if self.layout not in _LAYOUTS:
            problems.append(f"layout must be NCHW or NHWC, got {self.layout!r}.")
        size_ok = True
        for name in ("min_size", "max_size"):
            problem = _pair_problem(name, getattr(self, name))
            if problem:
                problems.append(problem)
                size_ok = False
        if size_ok:
            if self.min_size[0] < 2 or self.min_size[1] < 2:
                problems.append(f"min_size must be at least (2, 2) so bilinear resize is meaningful, "
                                f"got {self.min_size}.")
            if self.max_size[0] < self.min_size[0] or self.max_size[1] < self.min_size[1]:
                problems.append(f"max_size {self.max_size} must not be smaller than min_size {self.min_size}.")
        declared = [m for m in _RESIZE_MODES if getattr(self, m) is not None]
        if len(declared) > 1:
            problems.append(f"{' and '.join(declared)} are mutually exclusive resize modes; keep one of them.")
        for name in ("resize", "keep_ratio_pad", "letterbox"):
            if getattr(self, name) is not None and (problem := _pair_problem(name, getattr(self, name))):
                problems.append(problem)
        if self.interpolation not in _INTERPOLATIONS:
            problems.append(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {self.interpolation!r}.")
        if self.center_crop is not None and self.pads:
            mode = "keep_ratio_pad" if self.keep_ratio_pad is not None else "letterbox"
            problems.append(f"center_crop cannot follow {mode}: it would cut the padding that {mode} adds; "
                            f"remove center_crop (the {mode} size is already the model input size).")
        if self.resize_shorter is not None and not (_is_int(self.resize_shorter) and self.resize_shorter >= 1):
            problems.append(f"resize_shorter must be a positive integer, got {self.resize_shorter!r}.")
        if self.center_crop is not None and not self.pads:
            problem = _pair_problem("center_crop", self.center_crop)
            if problem:
                problems.append(problem)
            else:
                problems.extend(self._crop_problems(size_ok))
        if not (_is_real(self.scale) and math.isfinite(self.scale) and self.scale != 0):
            problems.append(f"scale must be a finite non-zero number, got {self.scale!r}.")
        channels = self.model_channels if self.model_color in _COLORS else None
        for name in ("mean", "std", "pad_value"):
            values = getattr(self, name)
            if not (isinstance(values, tuple) and values and all(_is_real(v) and math.isfinite(v) for v in values)):
                problems.append(f"{name} must be a non-empty list of finite numbers, got {values!r}.")
            elif channels is not None and len(values) not in (1, channels):
                problems.append(f"{name} has {len(values)} values but model_color {self.model_color!r} has "
                                f"{channels} channel(s); give one value per channel or a single value.")
        if not self.pads and isinstance(self.pad_value, tuple) and self.pad_value != (0.0,):
            problems.append("pad_value is only used by keep_ratio_pad or letterbox; add one of them or remove "
                            "pad_value.")
        if isinstance(self.std, tuple) and any(_is_real(v) and v == 0 for v in self.std):
            problems.append("std must not contain 0; use 1 to leave a channel unscaled.")
        return _raise_if(problems, "image preprocessing", raise_errors)

    def _crop_problems(self, size_ok: bool) -> list[str]:
        crop = self.center_crop
        if self.resize is not None and isinstance(self.resize, tuple) and len(self.resize) == 2:
            if crop[0] > self.resize[0] or crop[1] > self.resize[1]:
                return [f"center_crop {crop} is larger than resize {self.resize}."]
        elif _is_int(self.resize_shorter) and self.resize is None:
            # The longer side never ends up shorter than the shorter side.
            if crop[0] > self.resize_shorter or crop[1] > self.resize_shorter:
                return [f"center_crop {crop} is larger than resize_shorter {self.resize_shorter}."]
        elif self.resize is None and self.resize_shorter is None and size_ok:
            if crop[0] > self.min_size[0] or crop[1] > self.min_size[1]:
                return [f"center_crop {crop} without a resize needs min_size of at least {crop}, "
                        f"got {self.min_size}; raise min_size or add a resize."]
        return []

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, tagged with ``kind: image``."""
        return {"kind": "image", **_jsonable(asdict(self))}


@dataclass(frozen=True)
class Column:
    """One model feature source: a raw column, imputed, scaled or one-hot encoded.

    Attributes:
        name: Raw column name.
        kind: ``numeric`` gives one feature; ``categorical`` gives one per category.
        impute: Value replacing NaN, or None when NaN is invalid input.
        scaling: ``standard`` gives ``(x - mean) / std``; ``minmax`` gives
            ``(x - min) / (max - min)``; numeric columns only.
        mean: Used by ``standard``.
        std: Used by ``standard``.
        min: Used by ``minmax``.
        max: Used by ``minmax``.
        categories: Categorical values, one-hot in this order; an unseen value gives an
            all-zero one-hot.
    """

    name: str
    kind: ColumnKind = "numeric"
    impute: float | None = None
    scaling: Scaling = "none"
    mean: float = 0.0
    std: float = 1.0
    min: float = 0.0
    max: float = 1.0
    categories: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", _as_tuple(self.categories))

    @property
    def width(self) -> int:
        """Number of model features this column produces."""
        return len(self.categories) if self.kind == "categorical" else 1

    def offset_and_divisor(self) -> tuple[float, float]:
        """The column's scaling as ``(x - offset) / divisor``."""
        if self.scaling == "standard":
            return float(self.mean), float(self.std)
        if self.scaling == "minmax":
            return float(self.min), float(self.max) - float(self.min)
        return 0.0, 1.0

    def problems(self) -> list[str]:
        """Problems with this column on its own (see :meth:`TabularPreprocess.validate`)."""
        where = f"column {self.name!r}"
        out: list[str] = []
        if not isinstance(self.name, str) or not self.name:
            out.append(f"A column name must be a non-empty string, got {self.name!r}.")
        if self.kind not in _KINDS:
            out.append(f"{where}: kind must be numeric or categorical, got {self.kind!r}.")
        if self.scaling not in _SCALINGS:
            out.append(f"{where}: scaling must be none, standard or minmax, got {self.scaling!r}.")
        if self.impute is not None and not (_is_real(self.impute) and math.isfinite(self.impute)):
            out.append(f"{where}: impute must be a finite number or null, got {self.impute!r}.")
        for stat in ("mean", "std", "min", "max"):
            if not (_is_real(getattr(self, stat)) and math.isfinite(getattr(self, stat))):
                out.append(f"{where}: {stat} must be a finite number, got {getattr(self, stat)!r}.")
        if self.kind == "categorical":
            if self.scaling != "none":
                out.append(f"{where}: categorical columns are one-hot encoded; set scaling to none.")
            cats = self.categories
            if not (isinstance(cats, tuple) and cats and all(_is_real(c) and math.isfinite(c) for c in cats)):
                out.append(f"{where}: categorical columns need a non-empty list of finite category values.")
            elif len({float(np.float32(c)) for c in cats}) != len(cats):
                out.append(f"{where}: categories must be distinct (as float32), got {cats!r}.")
        elif self.kind == "numeric":
            if self.categories:
                out.append(f"{where}: categories are only for categorical columns; remove them or set kind.")
            if self.scaling == "standard" and _is_real(self.std) and not self.std > 0:
                out.append(f"{where}: standard scaling needs std > 0, got {self.std!r}.")
            if self.scaling == "minmax" and _is_real(self.min) and _is_real(self.max) and not self.max > self.min:
                out.append(f"{where}: minmax scaling needs max > min, got min={self.min!r}, max={self.max!r}.")
        return out


@dataclass(frozen=True)
class TabularPreprocess:
    """How a raw float32 row becomes the model's feature vector.

    Attributes:
        raw_columns: Names of the raw row's columns, in raw order. Raw input is
            float32 ``[N, len(raw_columns)]`` with NaN for missing values.
        columns: Feature sources in the MODEL's feature order. The output is float32
            ``[N, F]``, F = numeric columns + sum of category counts.
    """

    raw_columns: tuple[str, ...]
    columns: tuple[Column, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw_columns", _as_tuple(self.raw_columns))
        cols = _as_tuple(self.columns)
        if isinstance(cols, tuple):
            cols = tuple(Column(**c) if isinstance(c, dict) else c for c in cols)
        object.__setattr__(self, "columns", cols)

    @property
    def n_features(self) -> int:
        """Width of the model input."""
        return sum(c.width for c in self.columns)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """One name per model feature; one-hot features are named ``column=value``."""
        names: list[str] = []
        for c in self.columns:
            names.extend([f"{c.name}={v:g}" for v in c.categories] if c.kind == "categorical" else [c.name])
        return tuple(names)

    def raw_index(self, name: str) -> int:
        """Position of raw column ``name``."""
        return self.raw_columns.index(name)

    def validate(self, *, raise_errors: bool = True) -> list[str]:
        """Check the spec on its own.

        Args:
            raise_errors: Raise instead of returning when something is wrong.

        Returns:
            Every problem found, as sentences; empty when the spec is valid.

        Raises:
            ConfigError: Listing all problems, when ``raise_errors`` and any exist.
        """
        problems: list[str] = []
        raw = self.raw_columns
        if not (isinstance(raw, tuple) and raw and all(isinstance(n, str) and n for n in raw)):
            problems.append(f"raw_columns must be a non-empty list of column names, got {raw!r}.")
            raw = ()
        duplicates = sorted({n for n in raw if raw.count(n) > 1})
        if duplicates:
            problems.append(f"raw_columns names must be unique; repeated: {', '.join(duplicates)}.")
        if not (isinstance(self.columns, tuple) and self.columns):
            problems.append("columns must list at least one model feature column.")
            return _raise_if(problems, "tabular preprocessing", raise_errors)
        for column in self.columns:
            if not isinstance(column, Column):
                problems.append(f"columns must hold Column entries, got {column!r}.")
                continue
            problems.extend(column.problems())
            if raw and isinstance(column.name, str) and column.name not in raw:
                problems.append(f"column {column.name!r} is not among raw_columns ({', '.join(raw)}); "
                                f"add it to raw_columns or fix the name.")
        names = [c.name for c in self.columns if isinstance(c, Column)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            problems.append(f"each raw column may feed the model once; repeated: {', '.join(map(str, repeated))}.")
        return _raise_if(problems, "tabular preprocessing", raise_errors)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, tagged with ``kind: tabular``."""
        return {"kind": "tabular", **_jsonable(asdict(self))}

    @classmethod
    def fit(cls, raw_columns: Sequence[str], X: np.ndarray, columns: Sequence[ColumnPlan | str]) -> TabularPreprocess:
        """Same as :func:`fit_tabular`."""
        return fit_tabular(raw_columns, X, columns)


@dataclass(frozen=True)
class ColumnPlan:
    """What to fit for one column; :func:`fit_tabular` fills in the statistics.

    Attributes:
        name: Raw column name.
        kind: ``numeric`` or ``categorical``.
        scaling: ``none``, ``standard`` or ``minmax`` (numeric only).
        impute: ``auto`` (mean for numeric, most frequent for categorical), ``mean``,
            ``median``, ``most_frequent``, ``none`` (NaN stays invalid input) or a
            fixed number.
        categories: Category values; None takes the sorted distinct training values.
    """

    name: str
    kind: ColumnKind = "numeric"
    scaling: Scaling = "none"
    impute: ImputeStrategy | float = "auto"
    categories: tuple[float, ...] | None = None


def fit_tabular(raw_columns: Sequence[str], X: np.ndarray, columns: Sequence[ColumnPlan | str]) -> TabularPreprocess:
    """Compute imputation values, scaling statistics and categories from training data.

    Statistics ignore NaN. Like scikit-learn's scalers, a constant column gets std 1
    (standard) or a range of 1 (minmax) instead of dividing by zero.

    Args:
        raw_columns: Names of ``X``'s columns, in order.
        X: Training rows, ``[N, len(raw_columns)]``, NaN for missing.
        columns: Model feature order; a bare name means an unscaled numeric column.

    Returns:
        A validated :class:`TabularPreprocess`.

    Raises:
        DataError: ``X`` has the wrong shape, or a fitted column has no values.
        ConfigError: The plan itself is invalid.
    """
    raw_columns = tuple(raw_columns)
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(raw_columns) or X.shape[0] == 0:
        raise DataError(f"Training data must be a non-empty [rows, {len(raw_columns)}] array matching raw_columns, "
                        f"got shape {list(X.shape)}; pass one column per raw column name.")
    fitted: list[Column] = []
    problems: list[str] = []
    for plan in columns:
        plan = ColumnPlan(plan) if isinstance(plan, str) else plan
        if plan.name not in raw_columns:
            problems.append(f"column {plan.name!r} is not among raw_columns ({', '.join(raw_columns)}).")
            continue
        if plan.kind not in _KINDS:
            problems.append(f"column {plan.name!r}: kind must be numeric or categorical, got {plan.kind!r}.")
            continue
        if isinstance(plan.impute, str) and plan.impute not in _STRATEGIES:
            problems.append(f"column {plan.name!r}: impute must be one of {', '.join(_STRATEGIES)} or a number, "
                            f"got {plan.impute!r}.")
            continue
        values = X[:, raw_columns.index(plan.name)]
        values = values[~np.isnan(values)]
        if values.size == 0:
            raise DataError(f"Column {plan.name!r} has no non-missing training values, so nothing can be fitted; "
                            f"drop the column or provide data for it.")
        fitted.append(_fit_column(plan, values))
    _raise_if(problems, "tabular fit plan", True)
    spec = TabularPreprocess(raw_columns=raw_columns, columns=tuple(fitted))
    spec.validate()
    return spec


def _fit_column(plan: ColumnPlan, values: np.ndarray) -> Column:
    # float32 statistics: the model computes in float32, and a float64 mean that is not
    # representable would only round differently in the graph and the reference.
    def f32(v: float) -> float:
        return float(np.float32(v))

    strategy = plan.impute
    if strategy == "auto":
        strategy = "most_frequent" if plan.kind == "categorical" else "mean"
    if not isinstance(strategy, str):
        impute: float | None = f32(strategy)
    elif strategy == "none":
        impute = None
    elif strategy == "mean":
        impute = f32(values.mean())
    elif strategy == "median":
        impute = f32(np.median(values))
    else:
        uniques, counts = np.unique(values, return_counts=True)
        impute = f32(uniques[np.argmax(counts)])  # ties go to the smallest value, deterministically
    if plan.kind == "categorical":
        cats = plan.categories if plan.categories is not None else tuple(np.unique(values.astype(np.float32)))
        return Column(plan.name, "categorical", impute=impute, scaling=plan.scaling,
                      categories=tuple(f32(c) for c in cats))
    std = float(values.std())
    lo, hi = float(values.min()), float(values.max())
    return Column(plan.name, "numeric", impute=impute, scaling=plan.scaling, mean=f32(values.mean()),
                  std=f32(std) if std > 0 else 1.0, min=f32(lo), max=f32(hi) if hi > lo else f32(lo) + 1.0)


@dataclass(frozen=True)
class Postprocess:
    """What to append after the model's first output.

    Attributes:
        softmax: Softmax over the class axis (axis 1), output ``scores``.
        top_k: Keep the k best classes along axis 1, outputs ``top_k_indices`` (int64)
            and ``top_k_scores``; ties go to the lower index.
        labels: Class names, carried as model metadata; the graph returns indices.
    """

    softmax: bool = False
    top_k: int | None = None
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _as_tuple(self.labels))

    def validate(self, *, raise_errors: bool = True) -> list[str]:
        """Check the spec on its own; see :meth:`ImagePreprocess.validate`."""
        problems: list[str] = []
        if not isinstance(self.softmax, bool):
            problems.append(f"softmax must be true or false, got {self.softmax!r}.")
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            problems.append(f"top_k must be a positive integer or null, got {self.top_k!r}.")
        if self.labels is not None:
            if not (isinstance(self.labels, tuple) and self.labels and all(isinstance(v, str) for v in self.labels)):
                problems.append(f"labels must be a non-empty list of strings, got {self.labels!r}.")
            elif _is_int(self.top_k) and self.top_k > len(self.labels):
                problems.append(f"top_k {self.top_k} exceeds the {len(self.labels)} labels.")
        return _raise_if(problems, "post-processing", raise_errors)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return _jsonable(asdict(self))


Preprocess = Union[ImagePreprocess, TabularPreprocess]


def preprocess_from_dict(data: dict[str, Any]) -> Preprocess:
    """Build a spec from a ``to_dict()`` result or a project-file mapping.

    Args:
        data: Mapping with ``kind`` (``image`` or ``tabular``) and the spec's fields.

    Returns:
        The spec (not yet validated; call ``validate()``).

    Raises:
        ConfigError: ``kind`` is missing or unknown, or a key is not a spec field.
    """
    data = dict(data)
    kind = data.pop("kind", None)
    from .audio import PLUGIN_KINDS

    classes = {"image": ImagePreprocess, "tabular": TabularPreprocess, **PLUGIN_KINDS}
    if kind not in classes:
        raise ConfigError(f"Preprocessing needs kind: {', '.join(classes)}, got {kind!r}.")
    cls = classes[kind]
    _reject_unknown(cls, data, f"{kind} preprocessing")
    if kind == "tabular":
        cols = data.get("columns", ())
        for c in cols if isinstance(cols, (list, tuple)) else ():
            if isinstance(c, dict):
                _reject_unknown(Column, c, f"column {c.get('name')!r}")
    return cls(**data)


def _reject_unknown(cls: type, data: dict[str, Any], what: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"Unknown key(s) {', '.join(unknown)} in {what}; valid keys are {', '.join(sorted(known))}.")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
