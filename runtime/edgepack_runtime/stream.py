"""Stateful (streaming) models on the device: state carried across the calls of one stream.

A streaming bundle declares in ``io.stream`` which inputs are recurrent state and which
output feeds each back (``{"state": [{"input": "state", "output": "stateN"}]}``); its io
schema marks every input with a ``role`` (``raw``, ``per_sample``, ``constant`` with its
``value``, ``state``). :class:`Stream` starts from zero state, validates each chunk
against the schema, fills in constants the caller leaves out (and refuses another value),
runs the model and keeps the new state for the next call. :class:`Streams` holds many
streams by id for the daemon: bounded in number, expired when idle.

:func:`replay` runs a golden stream (step inputs stacked on a leading step axis) and
stacks the outputs the same way; the self-test and ``edgepack verify`` both use it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np

from .errors import EdgepackError
from .validate import InputValidationError, check_input

Run = Callable[[Dict[str, np.ndarray]], List[np.ndarray]]


class StreamLimitError(EdgepackError):
    """Too many streams are open at once (the daemon answers 429)."""


def layout(manifest: Mapping) -> Optional[Mapping[str, Any]]:
    """The bundle's stream declaration (``io.stream``), or None for a stateless model."""
    stream = (manifest.get("io") or {}).get("stream")
    return stream if isinstance(stream, Mapping) and stream.get("state") else None


def state_pairs(stream: Mapping[str, Any]) -> Dict[str, str]:
    """State input name -> the output that carries its next value."""
    return {p["input"]: p["output"] for p in stream.get("state") or []}


def replay(run: Run, input_names: List[str], output_names: List[str], arrays: Mapping[str, np.ndarray],
           golden_stream: Mapping[str, Any]) -> List[np.ndarray]:
    """Run a golden stream step by step, carrying state; outputs stacked on a step axis.

    Args:
        run: Runs one feed, returning outputs in ``output_names`` order.
        arrays: ``input:NAME`` arrays; step inputs have a leading step axis, state
            inputs hold the initial state, constants their value.
        golden_stream: ``{"steps": T, "step_inputs": [...], "state": {input: output}}``.
    """
    steps = int(golden_stream["steps"])
    step_inputs = set(golden_stream.get("step_inputs") or [])
    pairs = dict(golden_stream.get("state") or {})
    fixed = {n: arrays[f"input:{n}"] for n in input_names if n not in step_inputs}
    per_step: List[List[np.ndarray]] = []
    for t in range(steps):
        feed = dict(fixed)
        for name in step_inputs:
            feed[name] = arrays[f"input:{name}"][t]
        outputs = [np.asarray(o) for o in run(feed)]
        named = dict(zip(output_names, outputs))
        for state_in, state_out in pairs.items():
            fixed[state_in] = named[state_out]
        per_step.append(outputs)
    return [np.stack([step[i] for step in per_step]) for i in range(len(output_names))]


def _zeros(spec: Mapping[str, Any]) -> np.ndarray:
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.get("shape") or []]
    return np.zeros(shape, dtype=np.dtype(spec["dtype"]))


def constant_value(spec: Mapping[str, Any]) -> Optional[np.ndarray]:
    """A constant input's declared value as an array (None when the schema gives none)."""
    if spec.get("role") != "constant" or "value" not in spec:
        return None
    return np.asarray(spec["value"], dtype=np.dtype(spec["dtype"]))


def with_constants(inputs: List[Mapping[str, Any]], feed: Mapping[str, Any]) -> Dict[str, Any]:
    """``feed`` plus every declared constant the caller left out; a different value is refused."""
    out = dict(feed)
    for spec in inputs:
        value = constant_value(spec)
        if value is None:
            continue
        name = spec["name"]
        if name not in out:
            out[name] = value
            continue
        given = check_input(spec, out[name])
        if given.shape != value.shape or not np.array_equal(given, value):
            shown = value.tolist() if value.size <= 8 else f"the declared {list(value.shape)} tensor"
            raise InputValidationError(name, f"must be {shown} (the value this model was built and measured with)")
        out[name] = given
    return out


class Stream:
    """One stream: feed chunks in order; the state stays here between calls.

    Created by :meth:`edgepack_runtime.Model.stream`. Not thread-safe on its own (the
    daemon's :class:`Streams` locks each stream).
    """

    def __init__(self, inputs: List[Mapping[str, Any]], output_names: List[str], run: Run,
                 stream: Mapping[str, Any]) -> None:
        self._inputs = list(inputs)
        self._outputs = list(output_names)
        self._run = run
        self._pairs = state_pairs(stream)
        by_name = {s["name"]: s for s in self._inputs}
        missing = [n for n in self._pairs if n not in by_name]
        if missing:
            raise InputValidationError(missing[0], "is declared as state but is not an input of this model")
        self._state_specs = {n: by_name[n] for n in self._pairs}
        self.steps = 0
        self.state: Dict[str, np.ndarray] = {}
        self.reset()

    @property
    def state_outputs(self) -> List[str]:
        return list(self._pairs.values())

    def reset(self) -> None:
        """Start over from the initial (zero) state."""
        self.state = {n: _zeros(s) for n, s in self._state_specs.items()}
        self.steps = 0

    def validate(self, chunk: Any) -> Dict[str, np.ndarray]:
        """The checked feed for one chunk (an array for the raw input, or a dict by name)."""
        raw_name = next((s["name"] for s in self._inputs if s.get("role") in (None, "raw")), None)
        feed = dict(chunk) if isinstance(chunk, Mapping) else {raw_name: chunk}
        for name in self._pairs:
            if name in feed:
                raise InputValidationError(name, "is the stream's state; the runtime carries it (end the stream to reset it)")
        feed = with_constants(self._inputs, feed)
        checked: Dict[str, np.ndarray] = {}
        for spec in self._inputs:
            name = spec["name"]
            if name in self._pairs:
                continue
            if name not in feed:
                raise InputValidationError(name, "is missing; every input except the state is needed on each call")
            checked[name] = check_input(spec, feed[name])
        unknown = sorted(set(feed) - set(checked))
        if unknown:
            raise InputValidationError(unknown[0], f"is not an input of this model (inputs: {', '.join(checked)})")
        return checked

    def feed(self, chunk: Any) -> Dict[str, np.ndarray]:
        """Run one chunk; returns every output by name and keeps the new state.

        Raises:
            InputValidationError: The chunk does not match the schema; the state is unchanged.
        """
        checked = self.validate(chunk)
        outputs = dict(zip(self._outputs, self._run({**checked, **self.state})))
        for state_in, state_out in self._pairs.items():
            self.state[state_in] = np.asarray(outputs[state_out])
        self.steps += 1
        return outputs


class Streams:
    """Streams by id (daemon sessions): at most ``max_streams``, each dropped after ``idle_seconds``."""

    def __init__(self, max_streams: int = 64, idle_seconds: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_streams = max_streams
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._items: Dict[str, tuple] = {}  # id -> (Stream, lock, last used, model digest)

    def expire(self) -> int:
        """Drop idle streams; returns how many."""
        now = self._clock()
        with self._lock:
            old = [k for k, v in self._items.items() if now - v[2] > self.idle_seconds]
            for k in old:
                del self._items[k]
        return len(old)

    def __len__(self) -> int:
        return len(self._items)

    def feed(self, stream_id: str, digest: str, make: Callable[[], Stream], chunk: Any) -> tuple:
        """Feed ``chunk`` to stream ``stream_id`` (created on first use); returns ``(outputs, stream)``.

        A stream opened on another model (an update happened) restarts from zero state:
        the old state means nothing to the new model.
        """
        self.expire()
        with self._lock:
            item = self._items.get(stream_id)
            fresh = item is None or item[3] != digest
            if fresh:
                if item is None and len(self._items) >= self.max_streams:
                    raise StreamLimitError(f"{len(self._items)} streams are open, the limit; end one with DELETE /stream "
                                           f"or wait {self.idle_seconds:g} s for idle streams to expire")
                item = (make(), threading.Lock(), self._clock(), digest)
            self._items[stream_id] = (item[0], item[1], self._clock(), digest)
            stream, lock = item[0], item[1]
        with lock:
            try:
                return stream.feed(chunk), stream
            except Exception:
                if fresh and stream.steps == 0:  # a refused first chunk opens no stream
                    with self._lock:
                        if self._items.get(stream_id, (None,))[0] is stream:
                            del self._items[stream_id]
                raise

    def end(self, stream_id: str) -> bool:
        """Forget a stream; False when it was not open."""
        with self._lock:
            return self._items.pop(stream_id, None) is not None
