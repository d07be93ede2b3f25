"""Keras models (``.keras`` / ``.h5`` files or SavedModel directories), through the tflite extra.

Two routes, chosen by the variants a project asks for (:func:`litert_only`):

* **ONNX** (``fp32``/``int8``/``fp16`` variants): the model is exported to a SavedModel
  and converted with tf2onnx (``python -m tf2onnx.convert``, offline), then checked
  against Keras's own outputs on random inputs of its input shape; the ONNX model
  then goes through the normal build like any other; ``tflite-*`` variants asked for next
  to ONNX ones are converted from that ONNX model with onnx2tf, as for an ONNX source.
* **TFLite only** (``tflite-*`` variants): TensorFlow's own ``TFLiteConverter``
  (:func:`edgepack.convert.tflite.convert_tensorflow_to_tflite`), no tf2onnx needed;
  see :mod:`edgepack.build.tflite_source`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import ConfigError, MissingExtraError, ModelError
from ._common import max_abs_diff, onnx_session, run_session, source_file, tolerance
from .base import (
    DEFAULT_OPSET,
    ImportedModel,
    SourceFile,
    _as_path,
    _opset,
    _path_field,
    _Source,
)

__all__ = ["KerasImporter", "KerasSource", "keras_files", "litert_only"]

#: Largest difference allowed between Keras and the tf2onnx export (scaled for outputs above 1).
ATOL = 1e-4
EXTRA = "pip install 'edgepack[tflite]'"


@dataclass(frozen=True)
class KerasSource(_Source):
    """A Keras model file (``.keras``, ``.h5``) or a TensorFlow SavedModel directory.

    Attributes:
        path: The file or directory.
        opset: ONNX opset of the tf2onnx export (ONNX variants only).
    """

    kind: ClassVar[str] = "keras"
    path: Path = _path_field()
    opset: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _as_path(self.path, "path"))
        _opset(self.opset)


def litert_only(project) -> bool:
    """True when a ``kind: keras`` project asks only for TFLite variants (no tf2onnx needed)."""
    return all(v.startswith("tflite-") for t in project.targets for v in t.variants)


def keras_files(path: Path) -> tuple[SourceFile, ...]:
    """The model file, or every file of a SavedModel directory (sorted), hashed for lineage.

    Raises:
        ModelError: The path is neither a Keras file nor a SavedModel directory.
    """
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ModelError(f"{path} is a directory without saved_model.pb, so it is not a SavedModel; point model.path "
                             "at the SavedModel directory or a .keras file.")
        return tuple(source_file(f"savedmodel:{p.relative_to(path).as_posix()}", p)
                     for p in sorted(path.rglob("*")) if p.is_file())
    if path.suffix.lower() not in (".keras", ".h5"):
        raise ModelError(f"{path} is not a Keras model (.keras or .h5) or a SavedModel directory; save the model with "
                         "model.save('model.keras') and retry.")
    if not path.is_file():
        raise ModelError(f"Model file {path} does not exist; check model.path.")
    return (source_file("model", path),)


def _saved_model(path: Path, work: Path) -> Path:
    """A SavedModel of the Keras model (a SavedModel directory is used as is)."""
    from ..convert.tflite import load_keras

    if path.is_dir():
        return path
    model = load_keras(path)
    out = work / "saved_model"
    with contextlib.redirect_stdout(io.StringIO()):
        model.export(str(out))
    return out


def _tf2onnx(saved: Path, opset: int, out: Path) -> None:
    if importlib.util.find_spec("tf2onnx") is None:
        raise MissingExtraError("ONNX variants of a Keras model need tf2onnx, which is not installed; " + EXTRA
                                + " (or build only tflite-* variants, which need TensorFlow alone).")
    # A child process: tf2onnx configures TensorFlow's logging and graph state globally.
    result = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved), "--opset", str(opset),
                             "--output", str(out)], capture_output=True, text=True, timeout=1800, check=False,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1"})
    if result.returncode != 0 or not out.is_file():
        lines = [line for line in result.stderr.splitlines() if "Error" in line or "error" in line] or result.stderr.splitlines()[-1:]
        raise ModelError(f"tf2onnx could not convert the Keras model ({(lines[-1] if lines else 'no output').strip()[:300]}); "
                         "build tflite-* variants only, or replace the unsupported layer.")


class KerasImporter:
    """Converts a Keras model to ONNX with tf2onnx and checks the numbers against Keras."""

    kind = "keras"
    source_type = KerasSource

    def import_model(self, source: KerasSource) -> ImportedModel:
        """Export and convert; refuse a conversion that changes the outputs.

        Raises:
            ModelError: Unreadable model, conversion failure, or outputs that differ from Keras.
            MissingExtraError: TensorFlow or tf2onnx is not installed.
        """
        import onnx

        from ..convert.tflite import TensorFlowSession, require_tflite

        require_tflite(onnx2tf=False)
        files = keras_files(source.path)
        reference = TensorFlowSession(source.path)
        with tempfile.TemporaryDirectory(prefix="edgepack-keras-") as tmp:
            out = Path(tmp) / "model.onnx"
            _tf2onnx(_saved_model(source.path, Path(tmp)), source.opset, out)
            data = out.read_bytes()
        model = onnx.load_from_string(data)
        self._check(reference, model, data, source)
        return ImportedModel(kind="onnx", description=f"Keras model {source.path.name} converted to ONNX opset {source.opset} "
                             f"with tf2onnx", source_files=files, model=model)

    @staticmethod
    def _check(reference, model, data: bytes, source: KerasSource) -> None:
        inputs = reference.get_inputs()
        if len(inputs) != 1 or len(model.graph.input) < 1:
            raise ConfigError(f"{source.path} has {len(inputs)} inputs; edgepack builds single-input Keras models.")
        shape = list(inputs[0].shape)
        if any(d is None for d in shape[1:]):
            raise ConfigError(f"{source.path} has a free input dimension {shape}; give the Keras Input a fixed shape "
                              "(except the batch) so the export can be checked.")
        x = np.random.default_rng(0).uniform(0, 1, (2, *shape[1:])).astype(np.float32)
        want = reference.run(None, {inputs[0].name: x})
        sess = onnx_session(data, f"The ONNX export of {source.path.name}")
        got = run_session(sess, {sess.get_inputs()[0].name: x}, f"The ONNX export of {source.path.name} fails on a batch of 2")
        for index, (w, g) in enumerate(zip(want, got)):
            err, allowed = max_abs_diff(w, g), tolerance(w, ATOL)
            if not err <= allowed:
                raise ModelError(f"The ONNX export of {source.path.name} differs from Keras on output {index} by {err:.3g} "
                                 f"(allowed {allowed:.3g}); build tflite-* variants only, or report the layer to tf2onnx.")
