"""Multi-input and stateful (streaming) models: the project declaration, data, evaluation.

A model may take, next to the raw input its preprocessing computes, other inputs with a
``role`` (project key ``inputs:``):

* ``per_sample``: one value per sample, like the raw input (npz key = input name,
  leading sample axis; for streams ``[streams, chunks, ...]``);
* ``constant``: the same for every sample — a scalar such as a sample rate (0-d) or a
  shared tensor whose batch axis is 1 — given as ``value`` in the project file or as an
  npz array of the input's own shape;
* ``state``: recurrent state, fed back from the declared ``output`` after each chunk,
  starting from ``initial: zeros``.

A model with state needs ``stream: {decision: ...}``; its validation data are streams
(npz ``RAW`` ``[n_streams, n_chunks, *chunk]``, optional ``labels`` per chunk
``[n_streams, n_chunks]`` or per stream ``[n_streams]``). Every stream is run chunk by
chunk carrying the state, for fp32 and for each variant; the per-chunk decision
(``output > threshold`` or the argmax) is compared per stream, and every output,
state included, is compared numerically (:func:`compare_streams`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset
from .errors import DataError
from .modelio import TensorSpec
from .optimize.evaluate import Numerics

__all__ = ["Decision", "ExtraInput", "StreamNumerics", "StreamSet", "StreamSpec", "compare_streams",
           "decision_agreement", "open_inputs", "parse_project", "validate_section"]

ROLES = ("per_sample", "constant", "state")
INPUT_KEYS = ("name", "role", "output", "initial", "value", "dtype")
STREAM_KEYS = ("decision",)
DECISION_KEYS = ("output", "threshold", "argmax")
LABEL_KEYS = ("labels", "y")
#: Cosine every variant's state outputs must keep against fp32 (state drift compounds over a stream).
DEFAULT_MIN_STATE_COSINE = 0.99


@dataclass(frozen=True)
class ExtraInput:
    """A model input besides the preprocessed raw one."""

    name: str
    role: str = "per_sample"
    output: str | None = None     # state: the output that carries its next value
    initial: str = "zeros"        # state: the initial value
    value: Any = None             # constant: its value (None: read from the data file)
    dtype: str | None = None      # constant: dtype of ``value`` (default: the model input's)


@dataclass(frozen=True)
class Decision:
    """What a device acts on per chunk: ``output > threshold`` or the argmax of ``output``."""

    output: str
    threshold: float | None = 0.5
    argmax: bool = False

    def decide(self, value: np.ndarray) -> np.ndarray:
        """Per-row decisions (int64) of one output array ``[rows, ...]``."""
        rows = np.asarray(value, dtype=np.float64).reshape(value.shape[0] if np.ndim(value) else 1, -1)
        if self.argmax:
            return np.nan_to_num(rows, nan=-np.inf).argmax(axis=1).astype(np.int64)
        return (np.nan_to_num(rows[:, 0], nan=-np.inf) > float(self.threshold)).astype(np.int64)

    def describe(self) -> str:
        return f"argmax of {self.output!r}" if self.argmax else f"{self.output!r} > {self.threshold:g}"


@dataclass(frozen=True)
class StreamSpec:
    """A stateful model's declaration: state pairs and the per-chunk decision."""

    state: tuple[ExtraInput, ...]
    decision: Decision

    @property
    def pairs(self) -> dict[str, str]:
        return {s.name: s.output for s in self.state}


# --------------------------------------------------------------------------- project file


def validate_section(data: Mapping[str, Any]) -> list[str]:
    """Problems with the ``inputs:`` and ``stream:`` sections of a parsed project file. Pure."""
    problems: list[str] = []
    inputs = data.get("inputs")
    states = []
    if inputs is not None:
        if not isinstance(inputs, list):
            return ["inputs: must be a list of {name, role} entries"]
        seen = set()
        for i, item in enumerate(inputs):
            path = f"inputs[{i}]"
            if not isinstance(item, dict):
                problems.append(f"{path}: must be a mapping with 'name' and 'role'")
                continue
            for key in item:
                if key not in INPUT_KEYS:
                    problems.append(f"{path}.{key}: unknown key (allowed: {', '.join(INPUT_KEYS)})")
            name, role = item.get("name"), item.get("role", "per_sample")
            if not isinstance(name, str) or not name:
                problems.append(f"{path}.name: required model input name")
            elif name in seen:
                problems.append(f"{path}.name: {name!r} is declared twice")
            seen.add(name)
            if role not in ROLES:
                problems.append(f"{path}.role: must be one of {', '.join(ROLES)}, got {role!r}")
            if role == "state":
                states.append(item)
                if not isinstance(item.get("output"), str) or not item.get("output"):
                    problems.append(f"{path}.output: a state input needs the model output that carries its next value")
                if item.get("initial", "zeros") != "zeros":
                    problems.append(f"{path}.initial: only 'zeros' is supported (the device starts every stream from it)")
            else:
                for key in ("output", "initial"):
                    if key in item:
                        problems.append(f"{path}.{key}: only for role: state")
            if role != "constant":
                for key in ("value", "dtype"):
                    if key in item:
                        problems.append(f"{path}.{key}: only for role: constant")
            elif "dtype" in item:
                try:
                    np.dtype(item["dtype"])
                except TypeError:
                    problems.append(f"{path}.dtype: not a numpy dtype name: {item['dtype']!r}")
    stream = data.get("stream")
    if stream is not None:
        if not isinstance(stream, dict):
            return problems + ["stream: must be a mapping with 'decision'"]
        for key in stream:
            if key not in STREAM_KEYS:
                problems.append(f"stream.{key}: unknown key (allowed: {', '.join(STREAM_KEYS)})")
        decision = stream.get("decision")
        if not isinstance(decision, dict):
            problems.append("stream.decision: required mapping {output, threshold} or {output, argmax: true}")
        else:
            for key in decision:
                if key not in DECISION_KEYS:
                    problems.append(f"stream.decision.{key}: unknown key (allowed: {', '.join(DECISION_KEYS)})")
            if not isinstance(decision.get("output"), str):
                problems.append("stream.decision.output: required model output name")
            argmax = decision.get("argmax", False)
            if not isinstance(argmax, bool):
                problems.append("stream.decision.argmax: must be true or false")
            threshold = decision.get("threshold", 0.5)
            if not argmax and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
                problems.append(f"stream.decision.threshold: must be a number, got {threshold!r}")
        if not states:
            problems.append("stream: declared, but no input has role: state; declare the state input(s) under inputs:")
    elif states:
        problems.append("inputs: a state input makes the model a stream; add stream: {decision: {output: NAME, threshold: 0.5}}")
    return problems


def parse_project(data: Mapping[str, Any]) -> tuple[tuple[ExtraInput, ...], StreamSpec | None]:
    """The validated sections as typed values."""
    extras = tuple(ExtraInput(**{"role": "per_sample", **item}) for item in data.get("inputs") or [])
    stream = data.get("stream")
    if not stream:
        return extras, None
    d = stream["decision"]
    decision = Decision(d["output"], None if d.get("argmax") else float(d.get("threshold", 0.5)), bool(d.get("argmax", False)))
    return extras, StreamSpec(tuple(e for e in extras if e.role == "state"), decision)


def check_model(extras: Sequence[ExtraInput], stream: StreamSpec | None, raw_name: str, feeds: str | None,
                inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """Every model input is declared once and every state/decision output exists (DataError otherwise)."""
    names = [s.name for s in inputs]
    declared = {e.name for e in extras}
    undeclared = [n for n in names if n != raw_name and n not in declared]
    if undeclared:
        raise DataError(f"The model has inputs {names}; besides the raw input {raw_name!r} (fed into {feeds!r}) "
                        f"{undeclared} are not declared; list each under inputs: with role per_sample, constant or state.")
    unknown = sorted(declared - set(names))
    if unknown:
        raise DataError(f"inputs: declares {unknown}, which are not inputs of the model ({names}); fix the names.")
    out_names = [o.name for o in outputs]
    by_in = {s.name: s for s in inputs}
    by_out = {o.name: o for o in outputs}
    for e in extras:
        if e.role == "state":
            if e.output not in by_out:
                raise DataError(f"inputs: state {e.name!r} is fed back from output {e.output!r}, which the model does "
                                f"not have (outputs: {out_names}).")
            i, o = by_in[e.name], by_out[e.output]
            if i.shape is not None and o.shape is not None and i.shape != o.shape or i.dtype != o.dtype:
                raise DataError(f"inputs: state {e.name!r} is {i.describe()} but output {e.output!r} is "
                                f"{o.describe()}; a state must come back with its own shape and dtype.")
            if i.shape is None or any(d is None for d in i.shape):
                raise DataError(f"inputs: state {e.name!r} has a dynamic shape ({i.describe()}); the initial zero "
                                "state needs a fixed shape — export the model with a fixed state shape.")
    if stream is not None and stream.decision.output not in by_out:
        raise DataError(f"stream.decision.output {stream.decision.output!r} is not an output of the model ({out_names}).")


# --------------------------------------------------------------------------- data


def _load_npz(path: Path, role: str) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DataError(f"The {role} data {path} does not exist; check the path.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"The {role} data {path} is not a readable .npz archive ({exc}); save it with numpy.savez.") from exc


def _cast(array: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    if spec.dtype is None or array.dtype == spec.dtype:
        return array
    if (spec.dtype.kind == "f" and array.dtype.kind in "fiu") or (spec.dtype.kind in "iu" and array.dtype.kind in "iu"):
        return array.astype(spec.dtype)
    raise DataError(f"{where} has dtype {array.dtype} but model input {spec.name!r} expects {spec.dtype}; convert it.")


def _fits(shape: tuple, spec: TensorSpec) -> bool:
    return spec.shape is None or (len(shape) == len(spec.shape) and all(w is None or w == g for w, g in zip(spec.shape, shape)))


def _dims(spec: TensorSpec) -> str:
    return "?" if spec.shape is None else "[" + ", ".join("N" if d is None else str(d) for d in spec.shape) + "]"


def _constants(extras, specs, arrays, source) -> dict[str, np.ndarray]:
    out = {}
    for e in extras:
        if e.role != "constant":
            continue
        spec = specs[e.name]
        if e.value is not None:
            value = np.asarray(e.value, dtype=np.dtype(e.dtype) if e.dtype else spec.dtype)
            where = f"inputs: constant {e.name!r}"
        elif e.name in arrays:
            value, where = arrays[e.name], f"{source}: constant {e.name!r}"
        else:
            raise DataError(f"{source} has no array {e.name!r} and inputs: gives it no value; constant {e.name!r} "
                            f"({_dims(spec)} {spec.dtype}) needs one or the other.")
        value = _cast(np.asarray(value), spec, where)
        if not _fits(value.shape, spec):
            raise DataError(f"{where} has shape {list(value.shape)} but the model input is {_dims(spec)} {spec.dtype}; "
                            "a constant is given once, in the input's own shape (a scalar is 0-d).")
        out[e.name] = np.array(value, order="C")  # not ascontiguousarray: it turns a 0-d scalar into [1]
    return out


def _labels(arrays, key, source) -> np.ndarray | None:
    name = key or next((k for k in LABEL_KEYS if k in arrays), None)
    if key is not None and key not in arrays:
        raise DataError(f"{source} has no labels array {key!r} (it has {sorted(arrays)}); fix the name or add the labels.")
    if name is None:
        return None
    labels = arrays[name]
    if labels.dtype.kind not in "iub":
        raise DataError(f"{source}: labels {name!r} must be integers (decisions), got dtype {labels.dtype}.")
    return labels.astype(np.int64)


def open_inputs(path: Path, role: str, raw_name: str, raw_key: str, labels_key: str | None,
                extras: Sequence[ExtraInput], inputs: Sequence[TensorSpec]) -> Dataset:
    """A stateless multi-input model's data: per-sample arrays with a leading sample axis, constants added to every batch."""
    arrays = _load_npz(path, role)
    source = str(path)
    specs = {s.name: s for s in inputs}
    per_sample = {raw_name: raw_key, **{e.name: e.name for e in extras if e.role == "per_sample"}}
    samples: dict[str, np.ndarray] = {}
    for name, key in per_sample.items():
        if key not in arrays:
            raise DataError(f"{source} has no array {key!r} for input {name!r} (it has {sorted(arrays)}); per-sample "
                            f"inputs are keyed by name with a leading sample axis [n, ...].")
        a = arrays[key]
        if a.ndim == 0 or (name != raw_name and not _fits(a.shape[1:], TensorSpec(name, None, specs[name].sample_shape))):
            raise DataError(f"{source}: {key!r} has shape {list(a.shape)} but per-sample input {name!r} is "
                            f"{_dims(specs[name])}; store [n, ...] with one row per sample.")
        samples[name] = a if name == raw_name else _cast(a, specs[name], f"{source}: {key!r}")
    counts = {k: v.shape[0] for k, v in samples.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{source}: per-sample inputs have different sample counts {counts}; each needs one row per sample.")
    n = next(iter(counts.values()))
    if n == 0:
        raise DataError(f"{source} is empty (0 samples); provide at least one sample.")
    consts = _constants(extras, specs, arrays, source)
    labels = _labels(arrays, labels_key, source)
    if labels is not None and labels.shape != (n,):
        raise DataError(f"{source}: labels must be [n] = [{n}], got shape {list(labels.shape)}.")

    def take(start: int, stop: int) -> dict[str, np.ndarray]:
        return {**{k: np.ascontiguousarray(v[start:stop]) for k, v in samples.items()}, **consts}

    return Dataset(source, n, take, labels)


@dataclass
class StreamSet:
    """Streams of chunks for a stateful model (duck-types the parts of Dataset a build uses)."""

    source: str
    raw_name: str
    steps: dict[str, np.ndarray]          # per-step inputs [S, T, *chunk]
    constants: dict[str, np.ndarray]
    initial: dict[str, np.ndarray]        # state input -> initial value
    chunk_labels: np.ndarray | None       # [S, T]

    @property
    def n_streams(self) -> int:
        return next(iter(self.steps.values())).shape[0]

    @property
    def n_chunks(self) -> int:
        return next(iter(self.steps.values())).shape[1]

    def __len__(self) -> int:
        return self.n_streams * self.n_chunks

    @property
    def labels(self) -> np.ndarray | None:
        return None if self.chunk_labels is None else self.chunk_labels.reshape(-1)

    def step_feed(self, s: int, t: int, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**{k: np.ascontiguousarray(v[s, t]) for k, v in self.steps.items()}, **self.constants, **state}

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The first chunk of stream ``start`` from the initial state (for timing one call)."""
        return self.step_feed(start // self.n_chunks, start % self.n_chunks, self.initial)

    def raw_chunks(self) -> np.ndarray:
        raw = self.steps[self.raw_name]
        return raw.reshape(-1, *raw.shape[3:]) if raw.ndim > 3 else raw.reshape(-1, raw.shape[-1])


def open_streams(path: Path, role: str, raw_name: str, raw_key: str, labels_key: str | None,
                 extras: Sequence[ExtraInput], inputs: Sequence[TensorSpec]) -> StreamSet:
    """Streams from an npz: ``RAW`` ``[n_streams, n_chunks, *chunk]`` (chunk = the raw input's shape)."""
    arrays = _load_npz(path, role)
    source = str(path)
    specs = {s.name: s for s in inputs}
    keys = {raw_name: raw_key, **{e.name: e.name for e in extras if e.role == "per_sample"}}
    steps: dict[str, np.ndarray] = {}
    for name, key in keys.items():
        spec = specs[name]
        if key not in arrays:
            raise DataError(f"{source} has no array {key!r} for input {name!r} (it has {sorted(arrays)}); a stream model's "
                            f"data holds [n_streams, n_chunks, ...] per chunk input, each chunk shaped {_dims(spec)}.")
        a = arrays[key]
        if (a.ndim >= 2 and spec.shape and spec.shape[0] in (1, None) and not _fits(a.shape[2:], spec)
                and _fits(a.shape[2:], TensorSpec(name, None, spec.shape[1:]))):
            a = a[:, :, None]  # chunks stored without the model's batch axis of 1
        if a.ndim < 2 or not _fits(a.shape[2:], spec):
            raise DataError(f"{source}: {key!r} has shape {list(a.shape)}, but each chunk of input {name!r} is "
                            f"{_dims(spec)} {spec.dtype}; store streams as [n_streams, n_chunks, "
                            + ", ".join("N" if d is None else str(d) for d in (spec.shape or ())[1:]) + "].")
        steps[name] = a if name == raw_name else _cast(a, spec, f"{source}: {key!r}")
    shapes = {k: v.shape[:2] for k, v in steps.items()}
    if len(set(shapes.values())) != 1:
        raise DataError(f"{source}: chunk inputs have different [n_streams, n_chunks] {shapes}; they must match.")
    n_streams, n_chunks = next(iter(shapes.values()))
    if n_streams == 0 or n_chunks == 0:
        raise DataError(f"{source} holds no chunks ({n_streams} streams x {n_chunks} chunks); provide at least one.")
    consts = _constants(extras, specs, arrays, source)
    initial = {e.name: np.zeros(specs[e.name].shape, dtype=specs[e.name].dtype) for e in extras if e.role == "state"}
    labels = _labels(arrays, labels_key, source)
    if labels is not None:
        if labels.shape == (n_streams,):
            labels = np.repeat(labels[:, None], n_chunks, axis=1)
        elif labels.shape != (n_streams, n_chunks):
            raise DataError(f"{source}: labels must be per chunk [{n_streams}, {n_chunks}] or per stream [{n_streams}], "
                            f"got shape {list(labels.shape)}.")
    return StreamSet(source, raw_name, steps, consts, initial, labels)


# --------------------------------------------------------------------------- running and comparing


def run_stream(sess, streams: StreamSet, s: int, pairs: Mapping[str, str], names: list[str]) -> list[list[np.ndarray]]:
    """Outputs of every chunk of stream ``s`` (state carried), chunk-major."""
    state = dict(streams.initial)
    out = []
    for t in range(streams.n_chunks):
        result = [np.asarray(o) for o in sess.run(None, streams.step_feed(s, t, state))]
        named = dict(zip(names, result))
        state = {i: named[o] for i, o in pairs.items()}
        out.append(result)
    return out


def _output_names(sess) -> list[str]:
    return [o.name for o in sess.get_outputs()]


def decision_agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> list[float]:
    """Per stream: the share of chunks whose decision matches (pure; each array holds one stream's decisions).

    The ``streaming`` task metric (:func:`edgepack.tasks.metrics.stream_decision_agreement`).
    """
    from .tasks.metrics import stream_decision_agreement

    return stream_decision_agreement(reference, candidate)["per_stream"]


@dataclass(frozen=True)
class StreamNumerics(Numerics):
    """Numerics of a stream model; ``agreement`` is the per-chunk decision agreement over all streams.

    Attributes:
        streams: Streams compared.
        stream_agreement: Per-stream decision agreement (share of chunks).
        min_stream_agreement: The worst stream's agreement.
        streams_identical: Share of streams whose every decision matches.
        state_max_abs_error: Largest difference over the state outputs.
        state_cosine: Cosine similarity of the state outputs (all chunks, all streams).
        output_cosine: Per output, cosine similarity over all chunks.
        decision: How a decision is made.
    """

    streams: int = 0
    stream_agreement: tuple[float, ...] = ()
    min_stream_agreement: float | None = None
    streams_identical: float | None = None
    state_max_abs_error: float = 0.0
    state_cosine: float = 1.0
    output_cosine: dict = field(default_factory=dict)
    decision: str = ""


def _cos(dot: float, a: float, b: float) -> float:
    if a == 0.0 and b == 0.0:
        return 1.0
    if a == 0.0 or b == 0.0:
        return 0.0
    return float(dot / (np.sqrt(a) * np.sqrt(b)))


def compare_streams(reference, candidate, streams: StreamSet, spec: StreamSpec) -> StreamNumerics:
    """Run every stream through both sessions, carrying each one's own state, and compare."""
    from .optimize.evaluate import ATOL, RTOL

    names = _output_names(reference)
    sums = {n: [0.0, 0.0, 0.0] for n in names}
    max_err = state_err = 0.0
    finite = close = True
    ref_dec, cand_dec = [], []
    state_outputs = set(spec.pairs.values())
    d_index = names.index(spec.decision.output)
    for s in range(streams.n_streams):
        ref = run_stream(reference, streams, s, spec.pairs, names)
        cand = run_stream(candidate, streams, s, spec.pairs, _output_names(candidate))
        for r_step, c_step in zip(ref, cand):
            for name, r, c in zip(names, r_step, c_step):
                if r.shape != c.shape or r.dtype != c.dtype:
                    close, max_err = False, float("inf")
                    continue
                if r.dtype.kind not in "f":
                    close = close and bool(np.array_equal(r, c))
                    continue
                r64, c64 = r.astype(np.float64), c.astype(np.float64)
                if not np.all(np.isfinite(c64[np.isfinite(r64)])):
                    finite = close = False
                    max_err = float("inf")
                    continue
                diff = np.abs(r64 - c64)
                err = float(diff.max()) if diff.size else 0.0
                max_err = max(max_err, err)
                if name in state_outputs:
                    state_err = max(state_err, err)
                if diff.size and float(np.max(diff - RTOL * np.abs(r64))) > ATOL:
                    close = False
                rr, cc = np.nan_to_num(r64.ravel()), np.nan_to_num(c64.ravel())
                acc = sums[name]
                acc[0] += float(rr @ cc)
                acc[1] += float(rr @ rr)
                acc[2] += float(cc @ cc)
        ref_dec.append(np.concatenate([spec.decision.decide(step[d_index]) for step in ref]))
        cand_dec.append(np.concatenate([spec.decision.decide(step[d_index]) for step in cand]))
    per_stream = decision_agreement(ref_dec, cand_dec)
    cosines = {n: _cos(*sums[n]) for n in names if n in sums}
    labels = streams.chunk_labels
    accuracy = ref_accuracy = None
    if labels is not None:
        truth = labels.reshape(-1)
        flat_ref, flat_cand = np.concatenate(ref_dec), np.concatenate(cand_dec)
        if flat_ref.shape == truth.shape:
            accuracy = float(np.mean(flat_cand == truth))
            ref_accuracy = float(np.mean(flat_ref == truth))
    all_r, all_c = np.concatenate(ref_dec), np.concatenate(cand_dec)
    state_cos = min([cosines[n] for n in state_outputs if n in cosines] or [1.0])
    return StreamNumerics(
        samples=len(streams), max_abs_error=max_err, cosine=min(cosines.values()) if cosines else 1.0,
        agreement=float(np.mean(all_r == all_c)), accuracy=accuracy, reference_accuracy=ref_accuracy,
        finite=finite, close=close, streams=streams.n_streams, stream_agreement=tuple(per_stream),
        min_stream_agreement=min(per_stream), streams_identical=float(np.mean([a == 1.0 for a in per_stream])),
        state_max_abs_error=state_err, state_cosine=state_cos, output_cosine=cosines, decision=spec.decision.describe())


def state_gate_failures(n: Numerics, min_cosine: float = DEFAULT_MIN_STATE_COSINE) -> list[str]:
    """Every output is gated: a state that drifts from fp32 fails even when this chunk's decisions agree."""
    if not isinstance(n, StreamNumerics):
        return []
    return [f"output {name!r} cosine {c:.4f} against fp32 over every chunk is below {min_cosine:.4f}"
            for name, c in sorted(n.output_cosine.items()) if c < min_cosine - 1e-12]


def collect(sess, streams: StreamSet, spec: StreamSpec) -> list[np.ndarray]:
    """Every output of every chunk of every stream, concatenated chunk-wise (for statistics)."""
    names = _output_names(sess)
    chunks = [step for s in range(streams.n_streams) for step in run_stream(sess, streams, s, spec.pairs, names)]
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(names))]


def calibration_dataset(reference, streams: StreamSet, spec: StreamSpec) -> Dataset:
    """Calibration samples for a stateful model: each chunk with the state fp32 really carries into it."""
    names = _output_names(reference)
    feeds = []
    for s in range(streams.n_streams):
        state = dict(streams.initial)
        for t in range(streams.n_chunks):
            feed = streams.step_feed(s, t, state)
            feeds.append(feed)
            named = dict(zip(names, reference.run(None, feed)))
            state = {i: np.asarray(named[o]) for i, o in spec.pairs.items()}

    def take(start: int, stop: int) -> dict[str, np.ndarray]:
        if stop - start == 1:
            return feeds[start]
        raise DataError("Stream calibration runs one chunk at a time (its state has batch 1).")

    return Dataset(streams.source, len(feeds), take)


def golden_stream(streams: StreamSet, spec: StreamSpec, steps: int) -> tuple[dict[str, np.ndarray], dict]:
    """The golden feed (step inputs stacked over the first ``steps`` chunks of stream 0) and its manifest entry."""
    steps = min(steps, streams.n_chunks)
    feed = {k: np.ascontiguousarray(v[0, :steps]) for k, v in streams.steps.items()}
    feed.update(streams.constants)
    feed.update(streams.initial)
    layout = {"steps": steps, "step_inputs": sorted(streams.steps), "state": spec.pairs}
    return feed, layout


def golden_runner(layout: dict) -> Callable:
    """``run(session, golden_feed) -> stacked outputs`` for the build (the device's own replay)."""
    from edgepack_runtime.stream import replay

    def run(sess, feed):
        arrays = {f"input:{k}": v for k, v in feed.items()}
        return replay(lambda f: sess.run(None, f), [i.name for i in sess.get_inputs()], _output_names(sess), arrays, layout)

    return run


def annotate_schema(schema: dict, raw_name: str, extras: Sequence[ExtraInput], stream: StreamSpec | None,
                    constants: Mapping[str, np.ndarray]) -> dict:
    """Mark each input's role in the bundle's io schema (constants carry their value, state its output)."""
    by_name = {e.name: e for e in extras}
    for index, spec in enumerate(schema["inputs"]):
        e = by_name.get(spec["name"])
        if e is None:
            spec["role"] = "raw"
            continue
        # The preprocessing describes the raw input only; the others are plain tensors with a role.
        spec = {k: spec[k] for k in ("name", "dtype", "shape", "value_range") if k in spec}
        schema["inputs"][index] = spec
        spec["role"] = e.role
        if e.role == "constant" and e.name in constants:
            value = constants[e.name]
            spec["value"] = value.tolist()
            if value.dtype.kind in "iuf" and value.size:
                spec["value_range"] = [value.min().item(), value.max().item()]
        elif e.role == "state":
            spec["state_output"] = e.output
            spec["initial"] = e.initial
            spec["value_range"] = None
    if stream is not None:
        schema["stream"] = {"state": [{"input": e.name, "output": e.output, "initial": e.initial} for e in stream.state],
                            "decision": {"output": stream.decision.output, "threshold": stream.decision.threshold,
                                         "argmax": stream.decision.argmax}}
    return schema
