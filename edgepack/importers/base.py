"""What an importer takes (a model source) and what it gives back (an imported model).

Sources are frozen dataclasses, one per model kind, validated on construction so a
bad project-file value fails with a :class:`ConfigError` naming the ``model.`` key.
This module imports no converter: PyTorch and skl2onnx load only inside importers.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Union

from ..errors import ConfigError
from ..modelio import MIN_OPSET

if TYPE_CHECKING:
    import onnx

__all__ = [
    "DEFAULT_OPSET", "TORCH_INPUT_DTYPES", "ImportedModel", "Importer", "ModelSource", "OnnxSource", "SklearnSource",
    "SourceFile", "TfliteSource", "TorchSource", "split_module_spec",
]

# The opset converters export to unless the project file says otherwise: old enough for
# every runtime edgepack targets, new enough for the operators those models use.
DEFAULT_OPSET = 17
# Input dtypes an example input can be made in (and that numpy/onnxruntime can feed).
TORCH_INPUT_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


_REQUIRED = object()


def _path_field(default: Any = _REQUIRED) -> Any:
    """A dataclass field holding a file path (resolved against the project directory)."""
    if default is _REQUIRED:
        return field(metadata={"path": True})
    return field(default=default, metadata={"path": True})


def _as_path(value: Any, key: str, *, optional: bool = False) -> Path | None:
    if value is None and optional:
        return None
    if isinstance(value, (str, os.PathLike)) and str(value):
        return Path(value)
    raise ConfigError(f"model.{key} must be a file path, got {value!r}; give the path relative to the project file.")


def _name(value: Any, key: str) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise ConfigError(f"model.{key} must be a non-empty string, got {value!r}.")


def _opset(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_OPSET:
        raise ConfigError(f"model.opset must be an integer ONNX opset of at least {MIN_OPSET}, got {value!r}; {DEFAULT_OPSET} is a safe choice.")
    return value


def split_module_spec(spec: str) -> tuple[str, str, bool]:
    """Split ``"pkg.module:Attr"`` or ``"path/to/file.py:Attr"`` into its parts.

    Returns:
        ``(target, attribute, is_file)``: the module name or file path, the (possibly
        dotted) attribute, and whether ``target`` is a file path.

    Raises:
        ConfigError: The spec has no ``:attribute`` part or an empty side.
    """
    target, sep, attr = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not target.strip() or not attr.strip() or not all(part.isidentifier() for part in attr.split(".")):
        raise ConfigError(
            f"model.module must look like 'package.module:ClassOrFactory' or 'path/to/net.py:ClassOrFactory', got {spec!r}."
        )
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    return target, attr, is_file


class _Source:
    """Behaviour shared by the source dataclasses."""

    kind: ClassVar[str]
    # Project-file key -> dataclass field, where the two differ.
    config_aliases: ClassVar[dict[str, str]] = {}

    def resolve(self, base_dir: str | Path) -> _Source:
        """A copy with relative file paths made relative to ``base_dir`` (the project directory)."""
        changes = {
            f.name: Path(base_dir) / value
            for f in fields(self)  # type: ignore[arg-type]
            if f.metadata.get("path") and (value := getattr(self, f.name)) is not None and not value.is_absolute()
        }
        return replace(self, **changes) if changes else self  # type: ignore[type-var]


@dataclass(frozen=True)
class OnnxSource(_Source):
    """An ONNX model file (external data files are read from its directory).

    Attributes:
        path: The ``.onnx`` file.
    """

    kind: ClassVar[str] = "onnx"
    path: Path = _path_field()

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _as_path(self.path, "path"))


@dataclass(frozen=True)
class TorchSource(_Source):
    """A PyTorch ``nn.Module`` plus its weights, exported to ONNX by tracing.

    The module file is executed and the weights are read with ``weights_only=True``;
    only point ``module`` at code you trust.

    Attributes:
        module: ``"package.module:ClassOrFactory"`` (importable) or
            ``"path/to/net.py:ClassOrFactory"``. The attribute is a ``nn.Module``
            instance, or a class/factory callable with no arguments that returns one.
        example_input_shape: Shape of one example input, batch dimension first
            (``(1, 3, 32, 32)``). The exported graph gets a dynamic batch dimension.
        weights: A ``state_dict`` saved with ``torch.save(model.state_dict(), path)``;
            None keeps the module's weights as constructed.
        input_dtype: Element type of the input, one of :data:`TORCH_INPUT_DTYPES`.
        input_name: Name of the ONNX graph input.
        output_name: Name of the ONNX graph output (``name_0``, ``name_1``... for several).
        opset: ONNX opset to export.
    """

    kind: ClassVar[str] = "pytorch"
    config_aliases: ClassVar[dict[str, str]] = {"input_shape": "example_input_shape"}
    module: str
    example_input_shape: tuple[int, ...]
    weights: Path | None = _path_field(None)
    input_dtype: str = "float32"
    input_name: str = "input"
    output_name: str = "output"
    opset: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        split_module_spec(self.module)
        shape = self.example_input_shape
        if (
            not isinstance(shape, (list, tuple))
            or not shape
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)
        ):
            raise ConfigError(
                f"model.input_shape must be a list of positive integers with the batch dimension first, such as "
                f"[1, 3, 32, 32]; got {shape!r}."
            )
        object.__setattr__(self, "example_input_shape", tuple(shape))
        object.__setattr__(self, "weights", _as_path(self.weights, "weights", optional=True))
        if self.input_dtype not in TORCH_INPUT_DTYPES:
            raise ConfigError(f"model.input_dtype must be one of {', '.join(TORCH_INPUT_DTYPES)}, got {self.input_dtype!r}.")
        _name(self.input_name, "input_name")
        _name(self.output_name, "output_name")
        _opset(self.opset)

    def resolve(self, base_dir: str | Path) -> TorchSource:
        """A copy with the weights and a module *file* made relative to ``base_dir``."""
        resolved = super().resolve(base_dir)
        target, attr, is_file = split_module_spec(self.module)
        if is_file and not Path(target).is_absolute():
            resolved = replace(resolved, module=f"{Path(base_dir) / target}:{attr}")
        return resolved  # type: ignore[return-value]


@dataclass(frozen=True)
class SklearnSource(_Source):
    """A fitted scikit-learn estimator or Pipeline saved with joblib or pickle.

    Loading a pickle runs code stored in it: only import files you trust.

    Attributes:
        path: The ``.joblib`` / ``.pkl`` file.
        n_features: Number of input columns; None reads ``n_features_in_`` from the estimator.
        input_name: Name of the ONNX graph input.
        opset: ONNX opset of the default domain.
    """

    kind: ClassVar[str] = "sklearn"
    path: Path = _path_field()
    n_features: int | None = None
    input_name: str = "input"
    opset: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _as_path(self.path, "path"))
        n = self.n_features
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"model.n_features must be a positive integer (the number of input columns), got {n!r}.")
        _name(self.input_name, "input_name")
        _opset(self.opset)


@dataclass(frozen=True)
class TfliteSource(_Source):
    """A TensorFlow Lite flatbuffer, passed through unchanged.

    Attributes:
        path: The ``.tflite`` file.
    """

    kind: ClassVar[str] = "tflite"
    path: Path = _path_field()

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _as_path(self.path, "path"))


ModelSource = Union[OnnxSource, TorchSource, SklearnSource, TfliteSource]


@dataclass(frozen=True)
class SourceFile:
    """One input file of an import, for lineage.

    Attributes:
        role: What the file is (``"model"``, ``"weights"``, ``"module"``, ``"external data"``).
        path: Where it was read from.
        sha256: Hex SHA-256 of its bytes.
    """

    role: str
    path: Path
    sha256: str


@dataclass(frozen=True, eq=False)
class ImportedModel:
    """The result of an import: an ONNX graph, or raw TFLite bytes.

    Attributes:
        kind: ``"onnx"`` (``model`` is set) or ``"tflite"`` (``data`` is set).
        description: One line for lineage, e.g. ``"PyTorch net.py:Net ... exported to ONNX opset 17"``.
        source_files: Every file the model was built from, with its hash.
        model: The ONNX model, for ``kind == "onnx"``.
        data: The flatbuffer bytes, for ``kind == "tflite"``.
    """

    kind: str
    description: str
    source_files: tuple[SourceFile, ...]
    model: onnx.ModelProto | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if (self.kind == "onnx") != (self.model is not None) or (self.kind == "tflite") != (self.data is not None):
            raise ValueError(f"ImportedModel of kind {self.kind!r} needs exactly {'model' if self.kind == 'onnx' else 'data'}")

    @property
    def source_sha256(self) -> str:
        """SHA-256 of the input: the file's hash for one file; for several, the hash of
        their ``role:sha256`` lines in order (paths are left out, so moving the project
        does not change it)."""
        if len(self.source_files) == 1:
            return self.source_files[0].sha256
        lines = "".join(f"{f.role}:{f.sha256}\n" for f in self.source_files)
        return hashlib.sha256(lines.encode()).hexdigest()

    @property
    def suffix(self) -> str:
        """File suffix for the serialized model (``.onnx`` or ``.tflite``)."""
        return ".tflite" if self.kind == "tflite" else ".onnx"

    def to_bytes(self) -> bytes:
        """The serialized model (ONNX protobuf or TFLite flatbuffer)."""
        if self.data is not None:
            return self.data
        assert self.model is not None
        return self.model.SerializeToString()


class Importer(Protocol):
    """Turns one kind of model source into an :class:`ImportedModel`."""

    kind: str
    source_type: type

    def import_model(self, source: Any) -> ImportedModel:
        """Import ``source`` (an instance of ``source_type``).

        Raises:
            ModelError: The model file is unreadable, or conversion failed or changed the numbers.
            ConfigError: A source setting does not fit the model.
            MissingExtraError: The converter for this kind is not installed.
        """
        ...
