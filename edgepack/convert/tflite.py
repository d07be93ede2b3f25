"""ONNX (and Keras / SavedModel) to TFLite, validated against the source on real data.

ONNX models go through onnx2tf (the ``edgepack[tflite]`` extra); Keras models and
SavedModels go straight through TensorFlow's ``TFLiteConverter``.

Guarantees:

* **No network.** onnx2tf downloads a sample image file for some 4-D 3-channel
  inputs unless ``calibration_image_sample_data_20x128x128x3_float32.npy`` is in its
  working directory. Conversion runs in a private temporary working directory where
  that file is written first, derived from the user's own calibration data, so the
  download is never attempted. int8 calibration always uses the user's calibration
  data (a representative dataset through ``TFLiteConverter``), never onnx2tf's.
* **Same raw input.** Every input keeps its ONNX shape and layout
  (``keep_shape_absolutely_input_names``): the embedded preprocessing already starts
  from raw NHWC pixels and absorbs the NCHW model layout, so a device feeds the same
  raw array to an ONNX and a TFLite variant. Input and output tensor names (and the
  signature's names) are set to the ONNX names. Image preprocessing whose resize/crop
  depend on the raw size (``resize_shorter``, or any resize/crop with a raw size range)
  is not converted by onnx2tf, which mistranslates that dynamic arithmetic and would
  fix the raw size: the TFLite graph is that preprocessing rebuilt with TensorFlow ops
  from the same :class:`~edgepack.preprocess.ImagePreprocess` (:func:`tf_image_preprocess`)
  followed by the onnx2tf-converted model body, with input ``[1, -1, -1, C]`` uint8, so
  it takes every raw size the ONNX variant takes (validated on extra raw sizes too).
* **Names TensorFlow rejects** (``@``, ``:`` …) are rewritten before conversion
  (:func:`sanitize_names`); the TFLite file still carries the original I/O names.
* **Validation.** :func:`validate_tflite` runs the TFLite model with the LiteRT
  interpreter and the ONNX model with onnxruntime on the validation data and reports,
  per output, max abs error and agreement (top-1 for class scores, exact rows for
  integer outputs), plus accuracy. A variant beyond tolerance raises
  :class:`GateError` naming the first diverging output.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..errors import ConfigError, GateError, MissingExtraError, OptimizationError

__all__ = [
    "TFLITE_PRECISIONS", "ConversionResult", "LiteRTSession", "OutputAgreement", "TFLiteValidation",
    "convert_onnx_to_tflite", "convert_tensorflow_to_tflite", "require_tflite", "sanitize_names",
    "tflite_available", "validate_tflite", "TOLERANCES", "TensorFlowSession", "build_tflite_variants",
]

TFLITE_PRECISIONS = ("fp32", "fp16", "int8")
#: The file onnx2tf downloads when it is not in its working directory.
ONNX2TF_SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
EXTRA_HINT = "install the TFLite extra: pip install 'edgepack[tflite]'"
#: Per precision: (max abs error allowed as a share of max(1, peak |reference output|),
#: smallest top-1 / integer-row agreement allowed).
TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-3, 0.99),
    "fp16": (2e-2, 0.98),
    "int8": (0.25, 0.95),
}
MAX_CALIBRATION_SAMPLES = 200

Progress = Callable[[str], None]
_CWD_LOCK = threading.Lock()
_TF_NAME_OK = re.compile(r"[^A-Za-z0-9_./-]")


def _noop(_: str) -> None:
    pass


# --------------------------------------------------------------------------- availability


def tflite_available() -> bool:
    """True when the ``edgepack[tflite]`` extra (tensorflow + onnx2tf) is importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "onnx2tf", "tf_keras"))


def require_tflite(onnx2tf: bool = True) -> None:
    """Raise :class:`MissingExtraError` naming the extra when TensorFlow/onnx2tf are missing."""
    needed = ("tensorflow", "onnx2tf", "tf_keras", "onnx_graphsurgeon", "sng4onnx", "psutil") if onnx2tf else ("tensorflow",)
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"TFLite conversion needs {', '.join(missing)}, which is not installed; {EXTRA_HINT}.")


def _quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- names


def _clean(name: str, taken: set[str]) -> str:
    new = _TF_NAME_OK.sub("_", name) or "t"
    if not new[0].isalnum() and new[0] != ".":
        new = "t" + new
    base, index = new, 1
    while new in taken:
        new = f"{base}_{index}"
        index += 1
    taken.add(new)
    return new


def sanitize_names(model):
    """A copy of ``model`` whose node and tensor names TensorFlow accepts.

    Characters outside ``[A-Za-z0-9_./-]`` (``@``, ``:``, spaces …) become ``_``;
    clashes get a numeric suffix. Returns ``(model, renamed)`` with ``renamed`` the
    map of every changed tensor name (old → new); graph I/O names are restored in
    the TFLite file afterwards, so callers see the original names.
    """
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    tensors: list[str] = [v.name for v in graph.input] + [i.name for i in graph.initializer]
    for node in graph.node:
        tensors += list(node.input) + list(node.output)
    tensors += [v.name for v in graph.output] + [v.name for v in graph.value_info]
    taken: set[str] = {t for t in tensors if t and not _TF_NAME_OK.search(t)}
    renamed: dict[str, str] = {}
    for name in tensors:
        if name and name not in renamed and _TF_NAME_OK.search(name):
            renamed[name] = _clean(name, taken)
    node_taken = {n.name for n in graph.node if n.name and not _TF_NAME_OK.search(n.name)}
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = _clean(f"{node.op_type}_{index}", node_taken)
        elif _TF_NAME_OK.search(node.name):
            node.name = _clean(node.name, node_taken)
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                if name in renamed:
                    seq[i] = renamed[name]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH and attr.g is not None:
                raise ConfigError(f"TFLite conversion does not support control flow (node {node.name!r} has a subgraph).")
    for seq in (graph.input, graph.output, graph.value_info):
        for value in seq:
            if value.name in renamed:
                value.name = renamed[value.name]
    for init in graph.initializer:
        if init.name in renamed:
            init.name = renamed[init.name]
    return model, renamed


# --------------------------------------------------------------------------- shapes and data


def _static_inputs(model, samples: Mapping[str, np.ndarray]) -> None:
    """Give every graph input a static shape: batch 1, other free dims from a real sample."""
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        sample = samples.get(value.name)
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if axis == 0:
                size = 1
            elif sample is not None and sample.ndim == len(dims):
                size = int(sample.shape[axis])
            else:
                raise ConfigError(f"TFLite conversion needs a static shape for input {value.name!r} (axis {axis} is free); "
                                  "give calibration data with real samples.")
            dim.Clear()
            dim.dim_value = size
    # Stale intermediate shapes (dynamic) would only confuse onnx2tf; it infers its own.
    del model.graph.value_info[:]


def _fold_static(model):
    """With static input shapes, fold Shape/Slice/Concat arithmetic (resize and crop sizes
    of the embedded preprocessing) into constants: onnx2tf mistranslates such subgraphs."""
    from ..optimize.graph import optimize_graph

    try:
        folded, _report = optimize_graph(model, 1)
    except Exception:  # noqa: BLE001 - folding is an aid, not a requirement
        return model
    return folded


def _sample_image_file(calibration: Mapping[str, np.ndarray], directory: Path) -> None:
    """Write onnx2tf's sample file, derived from the user's calibration data, so it never downloads."""
    target = np.zeros((20, 128, 128, 3), np.float32)
    first = next(iter(calibration.values()), None) if calibration else None
    if first is not None and first.ndim == 4 and len(first):
        data = first.astype(np.float32)
        channels_last = first.shape[-1] in (1, 3, 4) or first.shape[1] not in (1, 3, 4)
        if not channels_last:
            data = data.transpose(0, 2, 3, 1)
        peak = float(np.max(np.abs(data))) or 1.0
        data = data / (255.0 if peak > 1.0 else 1.0)
        h, w = data.shape[1:3]
        rows = np.arange(128) * h // 128
        cols = np.arange(128) * w // 128
        resized = data[:, rows][:, :, cols]
        if resized.shape[-1] < 3:
            resized = np.repeat(resized[..., :1], 3, axis=-1)
        resized = resized[..., :3]
        for i in range(20):
            target[i] = resized[i % len(resized)]
    np.save(directory / ONNX2TF_SAMPLE_FILE, target)


class _ScalarInt(int):
    """``int`` that also takes the 1-element arrays ONNX uses for scalars (numpy 2 refuses them)."""

    def __new__(cls, value=0, *args):
        if isinstance(value, np.ndarray):
            value = value.reshape(-1)[0]
        return int.__new__(cls, value, *args)


@contextlib.contextmanager
def _onnx2tf_numpy2_shims() -> Iterator[None]:
    """onnx2tf 1.28 calls ``int()`` on TopK's 1-element K array, which numpy 2 rejects: shadow ``int`` there."""
    import importlib

    patched = []
    for name in ("onnx2tf.ops.TopK",):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        patched.append((module, module.__dict__.get("int")))
        module.int = _ScalarInt  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, old in patched:
            if old is None:
                del module.int
            else:
                module.int = old


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    with _CWD_LOCK:
        old = os.getcwd()
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(old)


# --------------------------------------------------------------------------- flatbuffer names


def _output_order(tflite_bytes: bytes, reference, feed: Mapping[str, np.ndarray]) -> list[int]:
    """For each ONNX output, the position of the TFLite output that holds it.

    TensorFlow does not keep the ONNX output order (a SavedModel's signature sorts its
    outputs), so outputs are matched on one real sample: same shape and dtype kind,
    closest values.
    """
    sess = LiteRTSession(tflite_bytes, 1)
    feed_list = [np.asarray(feed[n]) for n in sorted(feed)]
    tfl = sess._invoke(dict(zip([d["name"] for d in sorted(sess._in, key=lambda d: d["index"])], feed_list))) \
        if len(feed) == 1 else None
    if tfl is None:
        return list(range(len(sess._out)))
    ref = [np.asarray(x) for x in reference.run(None, dict(feed))]
    order: list[int] = []
    for r in ref:
        best, best_err = None, float("inf")
        for pos, c in enumerate(tfl):
            if pos in order or c.shape != r.shape or (c.dtype.kind in "fc") != (r.dtype.kind in "fc"):
                continue
            err = float(np.max(np.abs(r.astype(np.float64) - c.astype(np.float64)))) if r.size else 0.0
            if best is None or err < best_err:
                best, best_err = pos, err
        if best is None:
            return list(range(len(tfl)))  # validation will name the mismatch
        order.append(best)
    return order


def _set_io_names(tflite_bytes: bytes, inputs: list[str], outputs: list[str], out_order: list[int] | None = None) -> bytes:
    """Name the TFLite I/O tensors (and signature entries) after the ONNX graph I/O, in ONNX order."""
    from tensorflow.lite.tools import flatbuffer_utils as fu

    model = fu.convert_bytearray_to_object(bytearray(tflite_bytes))
    sub = model.subgraphs[0]
    if len(sub.inputs) != len(inputs) or len(sub.outputs) != len(outputs):
        raise OptimizationError(f"The TFLite model has {len(sub.inputs)} inputs and {len(sub.outputs)} outputs; "
                                f"the ONNX model has {len(inputs)} and {len(outputs)}.")
    if out_order is not None:
        sub.outputs = [list(sub.outputs)[p] for p in out_order]
    # Intermediate tensor names are debug strings a device never reads (TensorFlow's own
    # flatbuffer_utils.strip_strings drops them all); keep only the I/O names.
    io = set(sub.inputs) | set(sub.outputs)
    for index, tensor in enumerate(sub.tensors):
        if index not in io:
            tensor.name = b""
    by_index = {}
    for index, name in zip(list(sub.inputs) + list(sub.outputs), inputs + outputs):
        sub.tensors[index].name = name.encode()
        by_index[index] = name
    for sig in model.signatureDefs or []:
        for entry in list(sig.inputs or []) + list(sig.outputs or []):
            if entry.tensorIndex in by_index:
                entry.name = by_index[entry.tensorIndex].encode()
    return bytes(fu.convert_object_to_bytearray(model))


# --------------------------------------------------------------------------- conversion


@dataclass
class ConversionResult:
    """TFLite bytes per precision and notes on how they were made."""

    models: dict[str, bytes]
    notes: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)


def _representative(calibration: Mapping[str, np.ndarray], names: list[str]):
    count = min(min(len(v) for v in calibration.values()), MAX_CALIBRATION_SAMPLES)

    def generate():
        for i in range(count):
            yield {name: np.ascontiguousarray(calibration[name][i:i + 1]) for name in names}

    return generate


def _int8(converter_factory, calibration: Mapping[str, np.ndarray], names: list[str], notes: list[str],
          representative=None) -> bytes:
    """Full-integer quantization calibrated on the user's data; float I/O kept (same raw schema)."""
    import tensorflow as tf

    if not calibration:
        raise ConfigError("int8 TFLite conversion needs calibration data (--calibration).")
    last: Exception | None = None
    for ops, note in (([tf.lite.OpsSet.TFLITE_BUILTINS_INT8], None),
                      ([tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS],
                       "int8: some ops have no integer kernel and stayed float")):
        converter = converter_factory()
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative or _representative(calibration, names)
        converter.target_spec.supported_ops = ops
        try:
            result = converter.convert()
        except Exception as exc:  # noqa: BLE001 - TF's converter raises many types
            last = exc
            continue
        if note:
            notes.append(note)
        return result
    raise OptimizationError(f"TensorFlow could not quantize the model to int8: {str(last).splitlines()[0][:300]}")


def convert_onnx_to_tflite(model, precisions=TFLITE_PRECISIONS, calibration: Mapping[str, np.ndarray] | None = None,
                           progress: Progress = _noop) -> ConversionResult:
    """Convert an ONNX model (``ModelProto``, bytes or path) to TFLite, once per precision.

    Args:
        model: The ONNX model; its inputs keep their shape and layout.
        precisions: Any of ``fp32``, ``fp16``, ``int8``.
        calibration: Raw calibration arrays by input name: fixes free input dims,
            derives onnx2tf's sample file, and calibrates int8.
    """
    import onnx

    require_tflite()
    _quiet_tf()
    unknown = [p for p in precisions if p not in TFLITE_PRECISIONS]
    if unknown:
        raise ConfigError(f"Unknown TFLite precision {unknown[0]!r}; choose from {', '.join(TFLITE_PRECISIONS)}.")
    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    elif isinstance(model, (bytes, bytearray)):
        model = onnx.ModelProto.FromString(bytes(model))
    calibration = {k: np.asarray(v) for k, v in (calibration or {}).items()}
    in_names = [v.name for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}]
    out_names = [v.name for v in model.graph.output]
    split = _size_dependent_image_split(model, in_names)
    if split is not None:
        return _convert_image_split(model, split[0], split[1], precisions, calibration, in_names, out_names, progress)
    clean, renamed = sanitize_names(model)
    clean_calib = {renamed.get(k, k): v for k, v in calibration.items()}
    _static_inputs(clean, clean_calib)
    clean_in = [renamed.get(n, n) for n in in_names]
    clean = _fold_static(clean)
    notes = [f"renamed {len(renamed)} tensor name(s) TensorFlow rejects (e.g. {next(iter(renamed))!r})"] if renamed else []

    import tensorflow as tf

    from ..optimize.evaluate import session

    sample = {n: np.ascontiguousarray(clean_calib[n][:1]) for n in clean_in if n in clean_calib and len(clean_calib[n])}
    if len(sample) != len(clean_in):
        sample = {}
    from .maxpool import zero_pad_relu_maxpools

    clean, pools = zero_pad_relu_maxpools(clean, sample)
    if pools:
        notes.append(f"{pools} MaxPool(s) after a Relu padded with 0 instead of -inf (bit-exact on a calibration sample): "
                     "onnx2tf's -inf padding breaks int8 quantization")
    reference = session(clean.SerializeToString(), 1)
    models: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-tflite-") as tmp:
        work = Path(tmp)
        saved = _onnx2tf_saved_model(clean, clean_in, clean_calib, work, progress)
        files = {"fp32": saved / "model_float32.tflite", "fp16": saved / "model_float16.tflite"}
        relaid = _relaid_outputs(saved, clean_in, reference, sample, out_names, notes)
        for precision in precisions:
            progress(f"Writing TFLite {precision}")
            if relaid is not None:
                data = _convert_function(relaid, precision, clean_calib, clean_in, notes)
            elif precision in files:
                if not files[precision].is_file():
                    raise OptimizationError(f"onnx2tf wrote no {files[precision].name}.")
                data = files[precision].read_bytes()
            else:
                data = _int8(lambda: tf.lite.TFLiteConverter.from_saved_model(str(saved)), clean_calib, clean_in, notes)
            order = _output_order(data, reference, sample) if len(out_names) > 1 and sample else None
            models[precision] = _set_io_names(data, in_names, out_names, order)
    return ConversionResult(models, notes, renamed)


# --------------------------------------------------------------------------- size-dependent image preprocessing


def _size_dependent_image_split(model, in_names: list[str]):
    """``(spec, tensor)`` when ``model`` embeds image preprocessing whose resize/crop depend on the raw size.

    ``tensor`` is the output of the last spatial preprocessing node (crop, else resize):
    NCHW pixels of a fixed size, the input of the model body. onnx2tf mistranslates the
    dynamic resize/crop arithmetic in front of it (and fixing the raw size would accept
    one frame size only), so these steps are rebuilt with TensorFlow ops instead.
    None when the model has no such preprocessing (the plain onnx2tf path applies).
    """
    import json

    from ..preprocess.graph import METADATA_PREPROCESS
    from ..preprocess.reference import has_spatial_ops
    from ..preprocess.spec import ImagePreprocess, preprocess_from_dict

    meta = {p.key: p.value for p in model.metadata_props}
    if METADATA_PREPROCESS not in meta or len(in_names) != 1:
        return None
    try:
        pre = preprocess_from_dict(json.loads(meta[METADATA_PREPROCESS]))
        pre.validate()
    except Exception:  # noqa: BLE001 - not edgepack's own embedding: plain path
        return None
    if not isinstance(pre, ImagePreprocess) or not has_spatial_ops(pre) or pre.static_output_size is None:
        return None
    if tuple(pre.min_size) == tuple(pre.max_size):
        return None  # one raw size: the plain path fixes it and folds the arithmetic
    from ..preprocess.graph import PREFIX

    last = f"{PREFIX}/crop" if pre.center_crop is not None else f"{PREFIX}/resize"
    node = next((n for n in model.graph.node if n.name == last), None)
    if node is None or list(node.input[:1]) == [] or not node.output:
        return None
    return pre, node.output[0]


def tf_image_preprocess(pre, raw, channels_last: bool = False):
    """The spatial part of ``pre`` in TensorFlow ops: uint8 NHWC ``raw`` -> float32 NCHW (or NHWC) pixels.

    Cast, color conversion, bilinear resize (half-pixel centers, no antialias: the ONNX
    ``Resize`` the graph embeds), integer ``resize_shorter`` arithmetic as
    :meth:`ImagePreprocess.resized_size`, center crop at ``(H - h) // 2``. Scale/mean/std
    and the model layout stay in the model body (they may be folded into its first Conv).
    """
    import tensorflow as tf

    from ..preprocess.reference import color_indices, color_matrix

    x = tf.cast(raw, tf.float32)
    if (matrix := color_matrix(pre)) is not None:
        x = tf.reduce_sum(x * tf.constant(matrix.reshape(1, 1, 1, -1)), axis=3, keepdims=True)
    elif (indices := color_indices(pre)) is not None:
        x = tf.gather(x, list(indices), axis=3)
    if pre.resize is not None or pre.resize_shorter is not None:
        if pre.resize is not None:
            size = tf.constant(list(pre.resize), tf.int32)
        else:
            shape = tf.shape(x)
            height, width = shape[1], shape[2]
            shorter = tf.minimum(height, width)
            size = tf.stack([height * pre.resize_shorter // shorter, width * pre.resize_shorter // shorter])
        x = tf.image.resize(x, size, method="bilinear", antialias=False)
    if pre.center_crop is not None:
        crop_h, crop_w = pre.center_crop
        shape = tf.shape(x)
        top, left = (shape[1] - crop_h) // 2, (shape[2] - crop_w) // 2
        x = tf.slice(x, tf.stack([0, top, left, 0]), [-1, crop_h, crop_w, -1])
        x = tf.reshape(x, [-1, crop_h, crop_w, pre.model_channels])
    elif pre.resize is not None:
        x = tf.reshape(x, [-1, pre.resize[0], pre.resize[1], pre.model_channels])
    return x if channels_last else tf.transpose(x, [0, 3, 1, 2])


def _convert_image_split(model, pre, split: str, precisions, calibration: Mapping[str, np.ndarray], in_names: list[str],
                         out_names: list[str], progress: Progress) -> ConversionResult:
    """Raw-size-independent TFLite: TensorFlow preprocessing from ``pre``, then the onnx2tf-converted body."""
    import onnx
    import onnx.utils
    import tensorflow as tf

    from ..optimize.evaluate import session

    progress("Splitting the embedded preprocessing from the model body")
    height, width = pre.static_output_size
    annotated = onnx.ModelProto.FromString(model.SerializeToString())
    kept = [v for v in annotated.graph.value_info if v.name != split]
    del annotated.graph.value_info[:]
    annotated.graph.value_info.extend(kept)
    annotated.graph.value_info.append(onnx.helper.make_tensor_value_info(
        split, onnx.TensorProto.FLOAT, [1, pre.model_channels, height, width]))
    try:
        body = onnx.utils.Extractor(annotated).extract_model([split], out_names)
    except Exception as exc:
        raise OptimizationError(f"Cannot split the model at the preprocessing output {split!r}: {exc}") from exc
    body_input = body.graph.input[0]
    body_input.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    dims = body_input.type.tensor_type.shape
    dims.Clear()
    for size in (1, pre.model_channels, height, width):
        dims.dim.add().dim_value = size
    del body.graph.value_info[:]
    clean, renamed = sanitize_names(body)
    clean_in = [renamed.get(split, split)]
    clean = _fold_static(clean)
    notes = [(f"{in_names[0]}: resize/crop preprocessing built with TensorFlow ops (any raw size from "
              f"{pre.min_size[0]}x{pre.min_size[1]} to {pre.max_size[0]}x{pre.max_size[1]})")]
    from .maxpool import zero_pad_relu_maxpools

    # The rewrite is exact for every input, so a random feature map proves it as well as a real one.
    body_sample = {clean_in[0]: np.random.default_rng(0).normal(size=(1, pre.model_channels, height, width)).astype(np.float32)}
    clean, pools = zero_pad_relu_maxpools(clean, body_sample)
    if pools:
        notes.append(f"{pools} MaxPool(s) after a Relu padded with 0 instead of -inf (bit-exact on a sample): "
                     "onnx2tf's -inf padding breaks int8 quantization")
    raw_calib = calibration.get(in_names[0])
    reference = session(model.SerializeToString(), 1)
    sample = {in_names[0]: np.ascontiguousarray(raw_calib[:1])} if raw_calib is not None and len(raw_calib) else {}
    models: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-tflite-") as tmp:
        # The body's NCHW pixel input may become NHWC (onnx2tf's default): no transposes at the seam.
        saved = _onnx2tf_saved_model(clean, clean_in, calibration, Path(tmp), progress, keep_shape=False)
        loaded = tf.saved_model.load(str(saved))
        body_fn = loaded.signatures["serving_default"]
        ((body_key, body_spec),) = body_fn.structured_input_signature[1].items()
        out_keys = _signature_outputs(body_fn)
        channels_last = list(body_spec.shape) == [1, height, width, pre.model_channels]
        if not channels_last and list(body_spec.shape) != [1, pre.model_channels, height, width]:
            raise OptimizationError(f"onnx2tf gave the model body the input shape {list(body_spec.shape)}, "
                                    f"expected [1, {pre.model_channels}, {height}, {width}] or its NHWC form.")

        def serving(perms: dict[int, list[int]]):
            # A new tf.function per layout: a traced function would keep its first trace.
            @tf.function(input_signature=[tf.TensorSpec([1, None, None, pre.raw_channels], tf.uint8, name="raw")])
            def serve(raw):
                pixels = tf_image_preprocess(pre, raw, channels_last)
                result = body_fn(**{body_key: pixels})
                return [tf.transpose(result[k], perms[i]) if i in perms else result[k] for i, k in enumerate(out_keys)]

            return serve

        serve = serving({})
        if sample:
            # Feature-map outputs may come back channels-last: transpose them back (ONNX layout).
            matches = _layout_fix([np.asarray(x) for x in serve(tf.constant(sample[in_names[0]]))],
                                  [np.asarray(x) for x in reference.run(None, dict(sample))], out_names, notes)
            if matches is not None:
                serve = serving({m.source: list(m.perm) for m in matches if m.perm is not None})
        concrete = serve.get_concrete_function()

        def factory():
            return tf.lite.TFLiteConverter.from_concrete_functions([concrete], loaded)

        def representative():
            count = min(len(raw_calib), MAX_CALIBRATION_SAMPLES)
            for i in range(count):
                yield [np.ascontiguousarray(raw_calib[i:i + 1])]

        with contextlib.redirect_stdout(io.StringIO()):
            for precision in precisions:
                progress(f"Writing TFLite {precision}")
                if precision == "int8":
                    if raw_calib is None or not len(raw_calib):
                        raise ConfigError("int8 TFLite conversion needs calibration data (--calibration).")
                    data = _int8(factory, calibration, in_names, notes, representative)
                else:
                    converter = factory()
                    if precision == "fp16":
                        converter.optimizations = [tf.lite.Optimize.DEFAULT]
                        converter.target_spec.supported_types = [tf.float16]
                    data = converter.convert()
                order = _output_order(data, reference, sample) if len(out_names) > 1 and sample else None
                models[precision] = _set_io_names(data, in_names, out_names, order)
    return ConversionResult(models, notes, renamed)


def _signature_outputs(fn) -> list[str]:
    """The signature's output keys in ONNX order (onnx2tf names them ``output_0``, ``output_1`` …)."""
    keys = list(fn.structured_outputs)
    numbered = all(k.rsplit("_", 1)[-1].isdigit() for k in keys)
    return sorted(keys, key=lambda k: int(k.rsplit("_", 1)[-1])) if numbered else sorted(keys)


def _layout_fix(tf_outputs, onnx_outputs, out_names: list[str], notes: list[str]):
    """The output matches when some TensorFlow output is laid out differently from ONNX, else None."""
    from .layout import match_outputs

    matches = match_outputs(tf_outputs, onnx_outputs)
    if matches is None or all(m.perm is None for m in matches):
        return None
    for m in matches:
        if m.perm is not None:
            shape = list(np.asarray(onnx_outputs[m.index]).shape)
            notes.append(f"output {out_names[m.index]!r}: onnx2tf returned it as {list(np.asarray(tf_outputs[m.source]).shape)} "
                         f"(channels-last); a Transpose {list(m.perm)} restores the ONNX layout {shape}")
    return matches


def _relaid_outputs(saved: Path, clean_in: list[str], reference, sample: Mapping[str, np.ndarray], out_names: list[str],
                    notes: list[str]):
    """A concrete function returning the ONNX layout, when onnx2tf changed an output's layout (else None).

    The SavedModel's serving function is run on one real sample next to onnxruntime;
    outputs whose layout changed are transposed back inside the TensorFlow graph.
    """
    import tensorflow as tf

    if not sample:
        return None
    loaded = tf.saved_model.load(str(saved))
    fn = loaded.signatures["serving_default"]
    specs = fn.structured_input_signature[1]
    if sorted(specs) != sorted(clean_in):
        return None
    keys = _signature_outputs(fn)
    result = fn(**{k: tf.constant(sample[k]) for k in specs})
    matches = _layout_fix([result[k].numpy() for k in keys], [np.asarray(x) for x in reference.run(None, dict(sample))],
                          out_names, notes)
    if matches is None:
        return None
    arg_specs = [tf.TensorSpec(specs[n].shape, specs[n].dtype, name=n) for n in clean_in]

    @tf.function(input_signature=arg_specs)
    def serve(*args):
        out = fn(**dict(zip(clean_in, args)))
        return [out[keys[m.source]] if m.perm is None else tf.transpose(out[keys[m.source]], list(m.perm)) for m in matches]

    return SimpleNamespace(concrete=serve.get_concrete_function(), trackable=loaded)


def _convert_function(relaid, precision: str, calibration: Mapping[str, np.ndarray], names: list[str], notes: list[str]) -> bytes:
    """TFLite bytes of a re-laid-out concrete function (see :func:`_relaid_outputs`)."""
    import tensorflow as tf

    def factory():
        return tf.lite.TFLiteConverter.from_concrete_functions([relaid.concrete], relaid.trackable)

    def representative():
        count = min(min(len(calibration[n]) for n in names), MAX_CALIBRATION_SAMPLES)
        for i in range(count):
            yield [np.ascontiguousarray(calibration[n][i:i + 1]) for n in names]

    with contextlib.redirect_stdout(io.StringIO()):
        if precision == "int8":
            return _int8(factory, calibration, names, notes, representative)
        converter = factory()
        if precision == "fp16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        return converter.convert()


def _onnx2tf_saved_model(clean, clean_in: list[str], sample_calib: Mapping[str, np.ndarray], work: Path,
                         progress: Progress, keep_shape: bool = True) -> Path:
    """Run onnx2tf on ``clean`` (sanitized, static inputs) in ``work``; the SavedModel folder it wrote."""
    import onnx
    import onnx2tf

    src = work / "model.onnx"
    onnx.save(clean, str(src))
    _sample_image_file(sample_calib, work)
    saved = work / "saved_model"
    progress("Converting to TensorFlow (onnx2tf)")
    chatter = io.StringIO()
    with _working_dir(work), _onnx2tf_numpy2_shims(), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnx2tf's own checks use the deprecated tf.lite.Interpreter
        try:
            onnx2tf.convert(
                input_onnx_file_path=str(src),
                output_folder_path=str(saved),
                keep_shape_absolutely_input_names=clean_in if keep_shape else None,
                # A signature export (tf_keras ExportArchive) instead of a Keras SavedModel:
                # the latter JSON-encodes every constant and takes minutes on large models.
                output_signaturedefs=True,
                non_verbose=True,
                verbosity="error",
            )
        except SystemExit as exc:  # onnx2tf calls sys.exit on unsupported graphs
            tail = " | ".join(line.strip() for line in chatter.getvalue().splitlines()[-5:] if line.strip())
            raise OptimizationError(f"onnx2tf could not convert the model (exit {exc.code}): {tail[-600:]}") from None
        except Exception as exc:
            raise OptimizationError(f"onnx2tf could not convert the model: {str(exc).splitlines()[0][:300]}") from exc
    return saved


def load_keras(path: str | Path):
    """A Keras model file, with Keras 3 or (for older files) tf_keras."""
    errors = []
    for module, attr in (("keras", "saving"), ("tf_keras", "models")):
        try:
            loader = getattr(importlib.import_module(module), attr).load_model
            return loader(str(path), compile=False)
        except Exception as exc:  # noqa: BLE001 - try the other Keras
            errors.append(f"{module}: {str(exc).splitlines()[0][:150]}")
    raise ConfigError(f"Cannot load the Keras model {path} ({'; '.join(errors)}).")


def convert_tensorflow_to_tflite(path: str | Path, precisions=TFLITE_PRECISIONS,
                                 calibration: Mapping[str, np.ndarray] | None = None) -> ConversionResult:
    """Convert a Keras model file (``.keras``/``.h5``) or a SavedModel directory directly with TensorFlow."""
    require_tflite(onnx2tf=False)
    _quiet_tf()
    import tensorflow as tf

    path = Path(path)
    exported = None
    if path.suffix in (".keras", ".h5"):
        # Export with the model's own Keras (Keras 3 or tf_keras) to a SavedModel: TensorFlow's
        # converter reads that whichever Keras onnx2tf switched tf.keras to in this process.
        keras_model = load_keras(path)
        exported = tempfile.TemporaryDirectory(prefix="edgepack-keras-")
        with contextlib.redirect_stdout(io.StringIO()):
            keras_model.export(exported.name)
        source = Path(exported.name)
    elif path.is_dir():
        source = path
    else:
        raise ConfigError(f"{path} is neither a SavedModel directory nor a Keras .keras/.h5 file.")

    def factory():
        return tf.lite.TFLiteConverter.from_saved_model(str(source))

    notes: list[str] = []
    models: dict[str, bytes] = {}
    # TensorFlow prints "Saved artifact at ..." on stdout; keep stdout for the CLI's own output.
    with contextlib.redirect_stdout(io.StringIO()):
        for precision in precisions:
            if precision == "int8":
                names = list(calibration or {})
                models[precision] = _int8(factory, calibration or {}, names, notes)
                continue
            converter = factory()
            if precision == "fp16":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.target_spec.supported_types = [tf.float16]
            models[precision] = converter.convert()
    if exported is not None:
        exported.cleanup()
    return ConversionResult({k: _signature_names(v) for k, v in models.items()}, notes)


def _signature_names(tflite_bytes: bytes) -> bytes:
    """Name I/O tensors after the serving signature (``pixels``, not ``serving_default_pixels:0``)."""
    from tensorflow.lite.tools import flatbuffer_utils as fu

    model = fu.convert_bytearray_to_object(bytearray(tflite_bytes))
    sig = (model.signatureDefs or [None])[0]
    if sig is None:
        return tflite_bytes
    sub = model.subgraphs[sig.subgraphIndex or 0]
    for entry in list(sig.inputs or []) + list(sig.outputs or []):
        sub.tensors[entry.tensorIndex].name = entry.name
    return bytes(fu.convert_object_to_bytearray(model))


# --------------------------------------------------------------------------- running


def _interpreter_class():
    from edgepack_runtime.engines import _litert_interpreter_class

    return _litert_interpreter_class()


class LiteRTSession:
    """A TFLite model behind onnxruntime's session interface (``run(None, feed)``,
    ``get_inputs()``, ``get_outputs()``), so edgepack's measuring code runs it unchanged.

    A model with a static batch of 1 runs larger feeds row by row.
    """

    def __init__(self, model_bytes: bytes, threads: int = 1) -> None:
        interpreter = _interpreter_class()
        try:
            self._interp = interpreter(model_content=bytes(model_bytes), num_threads=threads)
            self._interp.allocate_tensors()
        except Exception as exc:  # noqa: BLE001
            raise OptimizationError(f"The TFLite model does not load in the LiteRT interpreter: {str(exc).splitlines()[0][:300]}") from exc
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()

    def get_inputs(self):
        return [SimpleNamespace(name=d["name"], shape=[None if s < 0 else int(s) for s in d.get("shape_signature", d["shape"])],
                                type=np.dtype(d["dtype"]).name) for d in self._in]

    def get_outputs(self):
        return [SimpleNamespace(name=d["name"], shape=[int(s) for s in d["shape"]], type=np.dtype(d["dtype"]).name)
                for d in self._out]

    def _invoke(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        for d in self._in:
            array = np.ascontiguousarray(np.asarray(feed[d["name"]]).astype(d["dtype"], copy=False))
            if tuple(d["shape"]) != array.shape:
                self._interp.resize_tensor_input(d["index"], array.shape)
                self._interp.allocate_tensors()
                self._in = self._interp.get_input_details()
                self._out = self._interp.get_output_details()
            self._interp.set_tensor(d["index"], array)
        try:
            self._interp.invoke()
        except RuntimeError as exc:  # a kernel refused these inputs (see kernel_errors)
            from .kernel_errors import kernel_error

            raise kernel_error(exc, "the TFLite model") from None
        return [np.array(self._interp.get_tensor(d["index"])) for d in self._out]

    def run(self, output_names, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        rows = next(iter(feed.values())).shape[0] if feed else 1
        signature = self._in[0].get("shape_signature", self._in[0]["shape"]) if self._in else []
        if len(signature) and signature[0] == 1 and rows != 1:
            parts = [self._invoke({k: v[i:i + 1] for k, v in feed.items()}) for i in range(rows)]
            outs = [np.concatenate([p[j] for p in parts]) for j in range(len(self._out))]
        else:
            outs = self._invoke(feed)
        if output_names:
            names = [d["name"] for d in self._out]
            outs = [outs[names.index(n)] for n in output_names]
        return outs


# --------------------------------------------------------------------------- validation


@dataclass
class OutputAgreement:
    """How one TFLite output compares with the ONNX output."""

    name: str
    max_abs_error: float
    tolerance: float
    agreement: float | None
    min_agreement: float
    shape_ok: bool = True

    @property
    def passed(self) -> bool:
        return (self.shape_ok and self.max_abs_error <= self.tolerance
                and (self.agreement is None or self.agreement >= self.min_agreement - 1e-12))

    def describe(self) -> str:
        if not self.shape_ok:
            return f"output {self.name!r} has a different shape or is not finite"
        parts = [f"max abs error {self.max_abs_error:.3g} (tolerance {self.tolerance:.3g})"]
        if self.agreement is not None:
            parts.append(f"agreement {self.agreement * 100:.2f}% (minimum {self.min_agreement * 100:.2f}%)")
        return f"output {self.name!r}: " + ", ".join(parts)


@dataclass
class TFLiteValidation:
    """The TFLite model against the ONNX model on the validation data."""

    precision: str
    samples: int
    outputs: list[OutputAgreement]
    accuracy: float | None
    reference_accuracy: float | None
    agreement: float | None
    #: For raw-size-independent image models, per other raw size (``"HxW"``): max abs error and top-1 agreement.
    raw_sizes: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def first_divergence(self) -> OutputAgreement | None:
        return next((o for o in self.outputs if not o.passed), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision, "samples": self.samples, "passed": self.passed,
            "max_abs_error": self.max_abs_error, "agreement": self.agreement,
            "accuracy": self.accuracy, "reference_accuracy": self.reference_accuracy,
            "outputs": {o.name: {"max_abs_error": o.max_abs_error, "tolerance": o.tolerance, "agreement": o.agreement,
                                 "min_agreement": o.min_agreement, "passed": o.passed} for o in self.outputs},
            **({"raw_sizes": {k: dict(v) for k, v in self.raw_sizes.items()}} if self.raw_sizes else {}),
        }


def validate_tflite(onnx_model, tflite_bytes: bytes, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None = None,
                    precision: str = "fp32", tolerance: tuple[float, float] | None = None, raise_on_failure: bool = True,
                    limit: int | None = None) -> TFLiteValidation:
    """Run both models on ``inputs`` and compare every output.

    Raises:
        GateError: (``raise_on_failure``) an output is beyond tolerance; the message
            names the first diverging output.
    """
    from ..optimize.evaluate import session

    if hasattr(onnx_model, "run") and hasattr(onnx_model, "get_outputs"):
        ref = onnx_model  # any session-like reference (e.g. a TensorFlow model for Keras/SavedModel sources)
        reference_is_onnx = False
    else:
        onnx_bytes = onnx_model if isinstance(onnx_model, (bytes, bytearray)) else Path(onnx_model).read_bytes() \
            if isinstance(onnx_model, (str, Path)) else onnx_model.SerializeToString()
        ref = session(bytes(onnx_bytes), 1)
        reference_is_onnx = True
    cand = LiteRTSession(tflite_bytes, 1)
    share, min_agree = tolerance or TOLERANCES[precision]
    names = [o.name for o in ref.get_outputs()]
    cand_names = [o.name for o in cand.get_outputs()]
    by_name = sorted(cand_names) == sorted(names)
    if not by_name and len(cand_names) != len(names):
        raise GateError(f"The TFLite {precision} model's outputs {cand_names} are not the reference model's {names}; refusing it.")
    count = min(len(v) for v in inputs.values())
    if limit is not None:
        count = min(count, limit)
    fixed = {i.shape[0] for i in ref.get_inputs() if i.shape and isinstance(i.shape[0], int)}
    batch = fixed.pop() if len(fixed) == 1 else 32
    if batch != 32:
        count -= count % batch
    ref_all: list[list[np.ndarray]] = []
    cand_all: list[list[np.ndarray]] = []
    from ..errors import ConvertError

    for start in range(0, count, batch):
        stop = min(start + batch, count)
        feed = {k: np.asarray(v[start:stop]) for k, v in inputs.items()}
        ref_all.append([np.asarray(x) for x in ref.run(None, feed)])
        try:
            cand_all.append(cand.run(names if by_name else None, feed))
        except ConvertError as exc:
            from .kernel_errors import kernel_error

            # Say which precision and which samples: the user can look at exactly those.
            raise kernel_error(exc.failure, f"the TFLite {precision} model, run on validation samples {start}-{stop - 1},") \
                if hasattr(exc, "failure") else exc from None
    results: list[OutputAgreement] = []
    accuracy = reference_accuracy = agreement = None
    for j, name in enumerate(names):
        r = np.concatenate([b[j] for b in ref_all]) if ref_all else np.zeros(0)
        c = np.concatenate([b[j] for b in cand_all]) if cand_all else np.zeros(0)
        if r.shape != c.shape:
            results.append(OutputAgreement(name, float("inf"), 0.0, None, min_agree, shape_ok=False))
            continue
        if r.dtype.kind in "fc":
            r64, c64 = r.astype(np.float64), c.astype(np.float64)
            if not np.all(np.isfinite(c64[np.isfinite(r64)])):
                results.append(OutputAgreement(name, float("inf"), 0.0, None, min_agree, shape_ok=False))
                continue
            finite = np.isfinite(r64)
            err = float(np.max(np.abs(r64[finite] - c64[finite]))) if finite.any() else 0.0
            peak = float(np.max(np.abs(r64[finite]))) if finite.any() else 0.0
            agree = None
            if r.ndim == 2 and r.shape[1] > 1 and len(r):
                ref_top, cand_top = r.argmax(axis=1), c.argmax(axis=1)
                agree = float(np.mean(ref_top == cand_top))
                if j == 0:
                    agreement = agree
                    if labels is not None:
                        truth = np.asarray(labels)[:len(r)]
                        accuracy = float(np.mean(cand_top == truth))
                        reference_accuracy = float(np.mean(ref_top == truth))
            results.append(OutputAgreement(name, err, share * max(1.0, peak), agree, min_agree))
        else:
            # Integer outputs (class ids, top-k indices): the share of rows whose first
            # entry (the top-1 class) matches is the agreement measure.
            first_r = r.reshape(len(r), -1)[:, :1] if r.size else np.zeros((len(r), 1))
            first_c = c.reshape(len(c), -1)[:, :1] if c.size else np.zeros((len(c), 1))
            agree = float(np.mean((first_r == first_c).all(axis=1))) if len(r) else 1.0
            results.append(OutputAgreement(name, 0.0, 0.0, agree, min_agree))
    report = TFLiteValidation(precision, count, results, accuracy, reference_accuracy, agreement)
    first = report.first_divergence
    if raise_on_failure and first is not None:
        source = "the ONNX model" if reference_is_onnx else "the source model"
        error = GateError(f"The TFLite {precision} model diverges from {source} on {count} validation samples; "
                          f"first diverging {first.describe()}. Refusing this variant.")
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report


class TensorFlowSession:
    """A Keras model or SavedModel behind the session interface (the reference for direct conversions)."""

    def __init__(self, path: str | Path) -> None:
        require_tflite(onnx2tf=False)
        _quiet_tf()
        import tensorflow as tf

        path = Path(path)
        if path.is_dir():
            loaded = tf.saved_model.load(str(path))
            self._fn = loaded.signatures["serving_default"]
            specs = self._fn.structured_input_signature[1]
            self._inputs = [SimpleNamespace(name=k, shape=list(v.shape), type=v.dtype.name) for k, v in sorted(specs.items())]
            outs = self._fn.structured_outputs
            self._out_keys = sorted(outs)
            self._outputs = [SimpleNamespace(name=k, shape=list(outs[k].shape), type=outs[k].dtype.name) for k in self._out_keys]
            self._keras = None
        else:
            self._keras = load_keras(path)
            self._inputs = [SimpleNamespace(name=t.name.split(":")[0], shape=list(t.shape), type=t.dtype.name if hasattr(t.dtype, "name") else str(t.dtype))
                            for t in self._keras.inputs]
            names = list(getattr(self._keras, "output_names", None) or [t.name.split(":")[0] for t in self._keras.outputs])
            self._outputs = [SimpleNamespace(name=n, shape=list(t.shape), type="float32") for n, t in zip(names, self._keras.outputs)]

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs

    def run(self, output_names, feed):
        if self._keras is not None:
            args = [feed[i.name] if i.name in feed else next(iter(feed.values())) for i in self._inputs]
            out = self._keras(args if len(args) > 1 else args[0], training=False)
            outs = [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]
        else:
            result = self._fn(**{k: v for k, v in feed.items()})
            outs = [np.asarray(result[k]) for k in self._out_keys]
        return outs


# --------------------------------------------------------------------------- build integration


def tool_versions() -> dict[str, str]:
    """Versions of the conversion tools, for a bundle's lineage."""
    import importlib.metadata as md

    versions = {}
    for dist in ("tensorflow", "onnx2tf", "ai-edge-litert"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def build_tflite_variants(onnx_bytes: bytes, variants, calibration, validation, progress: Progress = _noop,
                          limit: int = MAX_CALIBRATION_SAMPLES) -> dict[str, tuple[bytes, TFLiteValidation, list[str]]]:
    """``tflite-*`` build variants of the (embedded, optimized) fp32 ONNX model, each validated.

    Args:
        onnx_bytes: The fp32 ONNX model with embedded pre/post-processing (raw input).
        variants: Build variant names (``tflite-fp32``, ``tflite-fp16``, ``tflite-int8``).
        calibration, validation: :class:`edgepack.data.Dataset` of raw inputs.

    Raises:
        MissingExtraError: The ``edgepack[tflite]`` extra is not installed.
        GateError: A variant diverges from ONNX beyond tolerance (names the output).
    """
    precisions = [v.split("-", 1)[1] for v in variants]
    calib = calibration.batch(0, min(len(calibration), limit))
    result = convert_onnx_to_tflite(onnx_bytes, precisions, calib, progress)
    val = validation.batch(0, len(validation))
    out = {}
    for variant, precision in zip(variants, precisions):
        progress(f"Validating {variant} against ONNX")
        try:
            report = validate_tflite(onnx_bytes, result.models[precision], val, validation.labels, precision)
        except GateError as exc:
            # No .report here: the build CLI renders only its own build reports.
            raise GateError(f"The build failed its gates; no bundle was written:\n  - {variant}: {exc}") from None
        for size, frames in _other_size_frames(onnx_bytes, val).items():
            # Resampled frames carry no labels and many near-ties: the gate here is the error
            # tolerance (and shape); top-1 agreement is recorded, not enforced.
            extra = validate_tflite(onnx_bytes, result.models[precision], frames, None, precision, raise_on_failure=False)
            bad = next((o for o in extra.outputs if not o.shape_ok or o.max_abs_error > o.tolerance), None)
            if bad is not None:
                raise GateError(f"The build failed its gates; no bundle was written:\n  - {variant}: on {extra.samples} "
                                f"raw {size} frames the TFLite {precision} model diverges from the ONNX model; first "
                                f"diverging {bad.describe()}. Refusing this variant.")
            report.raw_sizes[size] = {"max_abs_error": extra.max_abs_error, "agreement": extra.agreement}
        out[variant] = (result.models[precision], report, list(result.notes))
    return out


#: Raw (height, width) sizes besides the data's own that a raw-size-independent image
#: variant is also validated on (clamped to the spec's min_size/max_size).
OTHER_RAW_SIZES = ((48, 64), (120, 90), (33, 200))


def _other_size_frames(onnx_bytes: bytes, val: Mapping[str, np.ndarray], count: int = 16) -> dict[str, dict[str, np.ndarray]]:
    """Validation frames resampled (nearest) to :data:`OTHER_RAW_SIZES`, when the model's resize/crop
    preprocessing makes it accept any raw size; empty otherwise."""
    import onnx

    model = onnx.ModelProto.FromString(bytes(onnx_bytes))
    in_names = [v.name for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}]
    split = _size_dependent_image_split(model, in_names)
    if split is None or in_names[0] not in val:
        return {}
    pre, raw = split[0], np.asarray(val[in_names[0]])[:count]
    if raw.ndim != 4 or not len(raw):
        return {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for height, width in OTHER_RAW_SIZES:
        height = min(max(height, pre.min_size[0]), pre.max_size[0])
        width = min(max(width, pre.min_size[1]), pre.max_size[1])
        if (height, width) == tuple(raw.shape[1:3]):
            continue
        rows = (np.arange(height) * raw.shape[1]) // height
        cols = (np.arange(width) * raw.shape[2]) // width
        out[f"{height}x{width}"] = {in_names[0]: np.ascontiguousarray(raw[:, rows][:, :, cols])}
    return out
