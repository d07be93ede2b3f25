"""Integer arithmetic classes: which int8 kernels a CPU's engines run, hence which numbers it gives.

An int8 model does not compute the same outputs on every CPU. onnxruntime's x86 kernels
without VNNI multiply u8 activations by s8 weights with ``vpmaddubsw``, which saturates
each pair of products at 16 bits; with AVX-512 VNNI / AVX-VNNI (``vpdpbusd``) and on Arm
(widening NEON multiplies, or ``sdot``/``udot``) the products are exact. The same file
can therefore score 95% on a Raspberry Pi and 84% on an x86 gateway. edgepack measures
every variant under the arithmetic of the device it ships to and certifies it per class;
the device detects its own class here and serves only what was certified for it.

:func:`classify` is pure (machine name and CPU flags in, class id out) so the build host,
profiles and devices all use the same rule.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

__all__ = ["CLASSES", "ArithClass", "classify", "cpu_flags", "host_class"]


@dataclass(frozen=True)
class ArithClass:
    """One family of CPUs whose int8 kernels compute the same numbers.

    Attributes:
        id: Class id as manifests and profiles spell it.
        arch: ``x86_64`` or ``aarch64``.
        summary: What distinguishes its integer arithmetic, in one sentence.
        emulate: ``(qemu binary, -cpu model)`` that runs this class's kernels under
            qemu-user, or None when QEMU's TCG cannot (it has no AVX-512/VNNI).
    """

    id: str
    arch: str
    summary: str
    emulate: Optional[Tuple[str, str]]


CLASSES: Dict[str, ArithClass] = {
    "x86-avx2": ArithClass(
        "x86-avx2", "x86_64",
        "x86-64 with AVX2 and no VNNI: u8 x s8 products go through vpmaddubsw, which saturates pairs at 16 bits",
        ("qemu-x86_64", "Haswell")),
    "x86-vnni": ArithClass(
        "x86-vnni", "x86_64",
        "x86-64 with AVX-512 VNNI or AVX-VNNI: vpdpbusd accumulates exact 32-bit int8 products",
        None),
    "aarch64-neon": ArithClass(
        "aarch64-neon", "aarch64",
        "Armv8 NEON without dot product: widening multiplies, exact 32-bit accumulation",
        ("qemu-aarch64", "cortex-a72")),
    "aarch64-dotprod": ArithClass(
        "aarch64-dotprod", "aarch64",
        "Armv8.2 with dot product (sdot/udot): exact 32-bit accumulation",
        ("qemu-aarch64", "cortex-a76")),
}

_VNNI = frozenset({"avx512_vnni", "avx512vnni", "avx_vnni", "avxvnni"})
_X86 = frozenset({"x86_64", "amd64", "x64"})
_ARM64 = frozenset({"aarch64", "arm64", "armv8"})


def classify(machine: str, flags: Iterable[str]) -> str:
    """The arithmetic class of a CPU (pure).

    Args:
        machine: ``platform.machine()`` or a profile's ``arch``.
        flags: CPU feature flags as ``/proc/cpuinfo`` prints them (``flags`` on x86,
            ``Features`` on Arm) or a profile's ``simd`` list.

    Returns:
        A key of :data:`CLASSES`, or ``"<machine>-unclassified"`` for a CPU no class
        covers (x86 without AVX2, 32-bit Arm, others): nothing is certified for it, so
        devices of that kind get fp32.
    """
    m = machine.strip().lower()
    f = {x.strip().lower() for x in flags}
    if m in _X86:
        if f & _VNNI:
            return "x86-vnni"
        # AVX-512BW without VNNI runs the same saturating vpmaddubsw pairs as AVX2.
        return "x86-avx2" if "avx2" in f else "x86_64-unclassified"
    if m in _ARM64:
        return "aarch64-dotprod" if "asimddp" in f else "aarch64-neon"
    return f"{m or 'unknown'}-unclassified"


def cpu_flags(cpuinfo: Optional[str] = None) -> Tuple[str, ...]:
    """Feature flags of the first CPU in ``/proc/cpuinfo`` text (read from the host when None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return tuple(value.split())
    return ()


def host_class(cpuinfo: Optional[str] = None, machine: Optional[str] = None) -> str:
    """This machine's arithmetic class (``/proc/cpuinfo`` flags and ``platform.machine()``)."""
    return classify(machine if machine is not None else platform.machine(), cpu_flags(cpuinfo))
