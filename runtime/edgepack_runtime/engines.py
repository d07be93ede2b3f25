"""Inference engines, each a small plug-in in :data:`ENGINES`.

An engine turns a model file into a :class:`Session` that maps input arrays to
output arrays. Engines are imported only when used, so a device needs just the one
it has: onnxruntime for ``.onnx`` variants, LiteRT (``ai_edge_litert``, falling back
to ``tflite_runtime`` and then ``tensorflow.lite``) for ``.tflite`` variants.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Protocol, Sequence, Tuple

import numpy as np

from .errors import EdgepackError


class EngineError(EdgepackError):
    """An engine is missing or cannot load or run a model."""


class Session(Protocol):
    """A loaded model."""

    input_names: List[str]
    output_names: List[str]

    def run(self, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """Run one inference; outputs in ``output_names`` order."""


@dataclass(frozen=True)
class Engine:
    """An inference engine a variant can name in the manifest.

    Attributes:
        name: The manifest's ``engine`` value.
        modules: Importable modules providing it, best first.
        load: ``load(path, threads) -> Session``.
    """

    name: str
    modules: Tuple[str, ...]
    load: Callable[[Path, int], Session]

    def available(self) -> bool:
        return any(importlib.util.find_spec(m.split(".")[0]) is not None for m in self.modules)


class _OrtSession:
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime cannot load {path.name}: {str(exc).splitlines()[0][:300]}") from exc
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        return self._session.run(None, feed)


def _load_ort(path: Path, threads: int) -> Session:
    return _OrtSession(path, threads)


def _litert_interpreter_class():
    for module, attr in (("ai_edge_litert.interpreter", "Interpreter"), ("tflite_runtime.interpreter", "Interpreter"), ("tensorflow.lite", "Interpreter")):
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
    raise EngineError("No LiteRT engine is installed; install ai-edge-litert (or tflite-runtime on numpy<2 systems).")


class _LiteRTSession:
    def __init__(self, path: Path, threads: int) -> None:
        interpreter_class = _litert_interpreter_class()
        try:
            # num_threads also sizes XNNPACK's thread pool; the XNNPACK delegate is on by default.
            self._interp = interpreter_class(model_path=str(path), num_threads=threads)
            self._interp.allocate_tensors()
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"LiteRT cannot load {path.name}: {str(exc).splitlines()[0][:300]}") from exc
        self._inputs = self._interp.get_input_details()
        self._outputs = self._interp.get_output_details()
        self.input_names = [d["name"] for d in self._inputs]
        self.output_names = [d["name"] for d in self._outputs]

    def _invoke(self, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        for detail in self._inputs:
            array = np.ascontiguousarray(feed[detail["name"]])
            if tuple(detail["shape"]) != array.shape:
                fixed = [int(s) for s in detail.get("shape_signature", detail["shape"])]
                if any(f > 0 and f != a for f, a in zip(fixed[1:], array.shape[1:])) or len(fixed) != array.ndim:
                    raise EngineError(f"This TFLite variant takes {detail['name']!r} shaped {['N'] + fixed[1:]}, got {list(array.shape)}.")
                self._interp.resize_tensor_input(detail["index"], array.shape)
                self._interp.allocate_tensors()
                self._inputs = self._interp.get_input_details()
                self._outputs = self._interp.get_output_details()
            self._interp.set_tensor(detail["index"], array)
        self._interp.invoke()
        return [np.array(self._interp.get_tensor(d["index"])) for d in self._outputs]

    def run(self, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        rows = next(iter(feed.values())).shape[0] if feed else 1
        signature = self._inputs[0].get("shape_signature", self._inputs[0]["shape"]) if self._inputs else []
        if len(signature) and signature[0] == 1 and rows != 1:
            # A static batch of 1 (usual for converted edge models): run row by row.
            parts = [self._invoke({k: v[i:i + 1] for k, v in feed.items()}) for i in range(rows)]
            return [np.concatenate([p[j] for p in parts]) for j in range(len(self._outputs))]
        return self._invoke(feed)


def _load_litert(path: Path, threads: int) -> Session:
    return _LiteRTSession(path, threads)


ENGINES: Dict[str, Engine] = {
    "onnxruntime": Engine("onnxruntime", ("onnxruntime",), _load_ort),
    "litert": Engine("litert", ("ai_edge_litert", "tflite_runtime", "tensorflow"), _load_litert),
}


def available_engines() -> List[str]:
    """Names of the engines importable here, in registry order."""
    return [name for name, engine in ENGINES.items() if engine.available()]


def load_session(engine: str, path: Path, threads: int = 1) -> Session:
    """Load ``path`` with the named engine.

    Raises:
        EngineError: Unknown or missing engine, or the model does not load.
    """
    if engine not in ENGINES:
        raise EngineError(f"Unknown engine '{engine}'; this runtime knows {', '.join(ENGINES)}. Upgrade edgepack-runtime.")
    if not ENGINES[engine].available():
        raise EngineError(f"The bundle needs the {engine} engine, which is not installed on this device.")
    return ENGINES[engine].load(path, threads)


def cpu_features() -> List[str]:
    """SIMD feature flags of this CPU from /proc/cpuinfo (empty where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return value.split()
    return []


def choose_variant(variants: Sequence[dict], engines: Sequence[str], features: Sequence[str], prefer: Sequence[str] = ()) -> dict | None:
    """The best variant this device can run, or None.

    Preference: an explicit ``prefer`` order of variant ids first; otherwise int8,
    then fp16 only on CPUs with half-precision arithmetic (fphp/asimdhp, avx512fp16),
    then fp32. Among equal precisions the engine listed first in ``engines`` wins.
    """
    runnable = [v for v in variants if v.get("engine") in engines]
    if not runnable:
        return None
    by_id = {v["id"]: v for v in runnable}
    for wanted in prefer:
        if wanted in by_id:
            return by_id[wanted]
    has_fp16 = any(f in features for f in ("fphp", "asimdhp", "avx512fp16"))
    order = ["int8", "fp16", "fp32"] if has_fp16 else ["int8", "fp32", "fp16"]

    def rank(v: dict) -> tuple:
        precision = v.get("precision", "fp32")
        return (order.index(precision) if precision in order else len(order), list(engines).index(v["engine"]))

    return min(runnable, key=rank)


def rank_variants(variants: Sequence[dict], engines: Sequence[str], features: Sequence[str], klass: str,
                  prefer: Sequence[str] = ()) -> Tuple[List[dict], Dict[str, str]]:
    """Variants this device may serve, best first, and why each other one is refused (pure).

    A variant is eligible when its engine is installed and it is certified for the
    device's arithmetic class ``klass`` (its manifest ``classes``). fp32 runs float
    kernels and is eligible everywhere; bundles without ``classes`` (built before
    per-class certification) keep every variant eligible. So a device of a class nobody
    measured gets fp32 unless ``prefer`` names a variant certified for it.
    """
    refused: Dict[str, str] = {}
    eligible = []
    for v in variants:
        vid = v.get("id", "?")
        if v.get("engine") not in engines:
            refused[vid] = f"its engine {v.get('engine')} is not installed here"
            continue
        classes = v.get("classes")
        if isinstance(classes, dict) and klass not in classes and v.get("precision", "fp32") != "fp32":
            certified = ", ".join(sorted(classes)) or "no class"
            refused[vid] = f"not certified for this device's arithmetic {klass} (certified for {certified})"
            continue
        eligible.append(v)
    ordered: List[dict] = []
    for wanted in prefer:
        ordered.extend(v for v in eligible if v.get("id") == wanted and v not in ordered)
    rest = [v for v in eligible if v not in ordered]
    best = choose_variant(rest, engines, features)
    while best is not None:
        ordered.append(best)
        rest = [v for v in rest if v is not best]
        best = choose_variant(rest, engines, features)
    return ordered, refused
