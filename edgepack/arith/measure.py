"""Where and how a variant is measured under a target's arithmetic class.

One plug-in per way of measuring, in :data:`METHODS`, tried in order:

* ``native``: the host is of that class; the host's own session is used.
* ``emulated:<cpu>``: qemu-user with a CPU model of that class runs the real kernels
  (``qemu-x86_64 -cpu Haswell`` on an x86 host with the host's own Python;
  ``qemu-aarch64 -cpu cortex-a72|cortex-a76`` in the sysroot of
  ``edgepack bench setup-emulator``). Emulated numerics are exact; timings are not kept.
* ``reference``: QEMU's TCG has no AVX-512/VNNI, so a VNNI target on another host is
  measured with the QDQ graph evaluated without fused integer kernels
  (``ORT_DISABLE_ALL``: dequantize, float op, quantize), which computes the exact
  products VNNI computes; the manifest says ``reference`` so nobody mistakes it for a run.

A class none of them can measure raises :class:`Unavailable`, whose message says what to
install; the build then does not certify int8/fp16 for that target.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack_runtime.arith import CLASSES, host_class

from ..errors import EdgepackError

__all__ = ["METHODS", "MeasureConfig", "Unavailable", "open_measurer"]


class Unavailable(EdgepackError):
    """No way to measure a variant under this arithmetic class on this host."""


@dataclass(frozen=True)
class MeasureConfig:
    """How this host measures other classes.

    Attributes:
        host_class: The host's class (detected by default).
        emulator_root: The aarch64 sysroot's cache directory (default: ``edgepack bench setup-emulator``'s).
        threads: Inference threads of every measuring session.
        cache_dir: Store of emulated measurements reused for identical bytes and data.
    """

    host_class: str = ""
    emulator_root: Path | None = None
    threads: int = 1
    #: Where emulated measurements are kept for reuse (see :mod:`edgepack.arith.cache`); None: never reused.
    cache_dir: Path | None = None

    def resolved(self) -> MeasureConfig:
        from dataclasses import replace

        return self if self.host_class else replace(self, host_class=host_class())


@dataclass
class Measurer:
    """An open way of running one model file under one class."""

    how: str
    session: Any  # InferenceSession-like: get_inputs, get_outputs, run(None, feed)
    closer: Callable[[], None] | None = None

    def close(self) -> None:
        if self.closer is not None:
            self.closer()


Method = Callable[[str, Path, str, MeasureConfig], "Measurer | None"]


def _native(klass: str, path: Path, engine: str, config: MeasureConfig) -> Measurer | None:
    if klass != config.host_class:
        return None
    return Measurer("native", _host_session(path, engine, config.threads, optimized=True))


def _qemu(name: str) -> str | None:
    return shutil.which(f"{name}-static") or shutil.which(name)


def _emulated(klass: str, path: Path, engine: str, config: MeasureConfig) -> Measurer | None:
    from .remote import RemoteSession

    spec = CLASSES.get(klass)
    if spec is None or spec.emulate is None:
        return None
    binary, cpu = spec.emulate
    qemu = _qemu(binary)
    label = f"{binary} -cpu {cpu}"
    if qemu is None:
        raise Unavailable(f"{klass} is measured under {label}, which is not installed; "
                          "run `edgepack bench setup-emulator` (it installs qemu-user-static) and build again.")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QEMU_")}
    if spec.arch == "x86_64":
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise Unavailable(f"{klass} can be emulated only on an x86-64 host (this is {platform.machine()}).")
        # The host's own interpreter and packages: only the CPU the kernels see changes.
        prefix = [qemu, "-cpu", cpu, sys.executable, "-s", "-B"]
    else:
        from ..bench.emulator import Emulator, EmulatorError, runtime_source

        try:
            emu = Emulator.open(config.emulator_root)
        except EmulatorError as exc:
            raise Unavailable(f"{klass} is measured in the aarch64 emulator: {exc}") from exc
        prefix = [emu.qemu, "-cpu", cpu, "-L", str(emu.sysroot), str(emu.python), "-s", "-B"]
        # The host's edgepack_runtime first (qemu -L falls through to host paths): the worker is this edgepack's.
        env = emu.env([str(runtime_source().parent)])
    session = RemoteSession(prefix, engine, path, env=env, label=label, threads=config.threads)
    return Measurer(f"emulated:{cpu}", session, session.close)


def _reference(klass: str, path: Path, engine: str, config: MeasureConfig) -> Measurer | None:
    spec = CLASSES.get(klass)
    if spec is None or spec.emulate is not None or engine != "onnxruntime":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        return None
    return Measurer("reference", _host_session(path, engine, config.threads, optimized=False))


#: Ways of measuring, tried in order; the first that returns a Measurer is used.
METHODS: dict[str, Method] = {"native": _native, "emulated": _emulated, "reference": _reference}


def _host_session(path: Path, engine: str, threads: int, optimized: bool):
    if engine == "litert":
        from ..convert.tflite import LiteRTSession

        return LiteRTSession(Path(path).read_bytes(), threads)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def planned_how(klass: str, engine: str, config: MeasureConfig) -> str | None:
    """How ``klass`` would be measured here (``native``, ``emulated:<cpu>``, ``reference``), without starting anything."""
    config = config.resolved()
    spec = CLASSES.get(klass)
    if spec is None:
        return None
    if klass == config.host_class:
        return "native"
    if spec.emulate is not None:
        return f"emulated:{spec.emulate[1]}"
    return "reference" if engine == "onnxruntime" else None


def open_measurer(klass: str, path: Path, engine: str, config: MeasureConfig) -> Measurer:
    """A session that runs ``path`` under ``klass``'s arithmetic, and how it does so.

    Raises:
        Unavailable: Nothing on this host can measure that class; the message says why.
    """
    config = config.resolved()
    if klass not in CLASSES:
        raise Unavailable(f"{klass} is not an arithmetic class edgepack can measure, so only fp32 is certified for it.")
    reasons = []
    for method in METHODS.values():
        try:
            measurer = method(klass, Path(path), engine, config)
        except Unavailable as exc:
            reasons.append(str(exc))
            continue
        if measurer is not None:
            return measurer
    raise Unavailable(" ".join(reasons) or f"Nothing on this {config.host_class} host can run {engine} under {klass}.")
