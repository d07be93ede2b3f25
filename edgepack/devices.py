"""Device profiles: what a target board can run, read from small YAML files.

A profile describes one class of device (a Raspberry Pi 5, a generic x86 gateway, an
emulated aarch64 guest): its CPU, memory, SIMD features, rough peak throughput and the
variant/engine/threads edgepack recommends for it. The shipped profiles live in the
repository's ``devices/`` directory; callers may pass another directory.

Configuration is always passed in: this module never reads the environment (the CLI
maps ``EDGEPACK_DEVICES_DIR`` to the ``directory`` argument).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError

__all__ = [
    "ARCHES", "ENGINES", "VARIANTS", "CpuSpec", "DeviceProfile", "PeakSpec", "Recommended",
    "builtin_profiles_dir", "get_profile", "list_profiles", "load_profile", "profile_from_dict",
    "profile_to_dict", "validate_profile",
]

ARCHES = ("aarch64", "x86_64", "armv7l")
ENGINES = ("onnxruntime", "litert")
VARIANTS = ("int8", "fp16", "fp32")
PROFILE_SUFFIXES = (".yaml", ".yml")

# Flags as /proc/cpuinfo spells them. Only these are accepted so that a typo such as
# "asimdp" is caught here instead of silently disabling a faster variant later.
SIMD_FLAGS = {
    "aarch64": frozenset(
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma "
        "lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca "
        "pacg dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm "
        "svef64mm svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres sme".split()
    ),
    "armv7l": frozenset(
        "half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32 "
        "aes pmull sha1 sha2 asimddp asimdhp fphp".split()
    ),
    "x86_64": frozenset(
        "mmx sse sse2 ssse3 sse4_1 sse4_2 popcnt aes pclmulqdq avx avx2 fma f16c bmi1 bmi2 sha_ni "
        "avx_vnni avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 "
        "avx512vbmi amx_tile amx_int8 amx_bf16".split()
    ),
}

# Which flag means "fp16 arithmetic" per arch, for checking a recommended fp16 variant.
_FP16_FLAGS = {"aarch64": "asimdhp", "armv7l": "asimdhp", "x86_64": "avx512_fp16"}

_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]*")

_TOP_FIELDS = ("id", "name", "arch", "cpu", "memory_mb", "simd", "peak", "engines", "recommended",
               "emulated", "arithmetic", "notes")
_OPTIONAL_TOP = frozenset({"notes", "arithmetic"})
_CPU_FIELDS = ("model", "cores", "clock_ghz")
_PEAK_FIELDS = ("fp32_gflops", "int8_gops", "memory_bandwidth_gbs", "source")
_RECOMMENDED_FIELDS = ("threads", "variant", "engine")


@dataclass(frozen=True)
class CpuSpec:
    """The CPU of a device.

    Attributes:
        model: SoC and core name, e.g. ``"Broadcom BCM2712, Cortex-A76"``.
        cores: Number of cores usable for inference.
        clock_ghz: Nominal clock; ``None`` only for emulated profiles, where it means nothing.
    """

    model: str
    cores: int
    clock_ghz: Optional[float]


@dataclass(frozen=True)
class PeakSpec:
    """Rough peak throughput, for ranking variants, never for predicting latency.

    Attributes:
        fp32_gflops: Peak FP32 GFLOPS, or ``None`` if unknown or meaningless.
        int8_gops: Peak int8 giga-ops per second, or ``None``.
        memory_bandwidth_gbs: Peak DRAM bandwidth in GB/s, or ``None``.
        source: How the numbers were derived, saying which are estimates.
    """

    fp32_gflops: Optional[float]
    int8_gops: Optional[float]
    memory_bandwidth_gbs: Optional[float]
    source: str


@dataclass(frozen=True)
class Recommended:
    """The settings edgepack recommends for a device.

    Attributes:
        threads: Inference threads.
        variant: Model variant: ``int8``, ``fp16`` or ``fp32``.
        engine: Inference engine, one of the profile's ``engines``.
    """

    threads: int
    variant: str
    engine: str


@dataclass(frozen=True)
class DeviceProfile:
    """One device profile.

    Attributes:
        id: Short identifier, equal to the profile file's stem (e.g. ``rpi5``).
        name: Human-readable name.
        arch: ``aarch64``, ``x86_64`` or ``armv7l`` (as ``uname -m`` prints it).
        cpu: CPU description.
        memory_mb: RAM the profile plans for, in MiB.
        simd: SIMD feature flags as ``/proc/cpuinfo`` names them.
        peak: Rough peak throughput and how it was derived.
        engines: Supported engines in preference order.
        recommended: Recommended threads, variant and engine.
        emulated: True for emulators, whose timings are not device timings.
        notes: Free text for humans.
        arithmetic: The integer arithmetic class its engines use (see
            :mod:`edgepack_runtime.arith`), when the file names one; otherwise
            :attr:`arith_class` derives it from ``arch`` and ``simd``.
        path: The file the profile was loaded from, if any (not part of equality).
    """

    id: str
    name: str
    arch: str
    cpu: CpuSpec
    memory_mb: int
    simd: tuple[str, ...]
    peak: PeakSpec
    engines: tuple[str, ...]
    recommended: Recommended
    emulated: bool
    notes: str = ""
    arithmetic: Optional[str] = None
    path: Optional[Path] = field(default=None, compare=False, repr=False)

    @property
    def arith_class(self) -> str:
        """The arithmetic class int8 variants are measured and certified under for this device."""
        from edgepack_runtime.arith import classify

        return self.arithmetic or classify(self.arch, self.simd)


# --- validation (pure: data in, list of problems out) ---------------------------------------


def _show(value: Any) -> str:
    """Render a value the way the user wrote it in YAML, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; YAML `true` must not pass as a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_keys(data: dict, allowed: tuple[str, ...], prefix: str, problems: list[str],
                optional: frozenset[str] = frozenset()) -> None:
    for key in data:
        if key in allowed:
            continue
        where = f"{prefix}{key}"
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        if close:
            problems.append(f"{where}: unknown field; did you mean '{close[0]}'?")
        else:
            problems.append(f"{where}: unknown field; allowed fields are {', '.join(allowed)}")
    for key in allowed:
        if key not in data and key not in optional:
            problems.append(f"{prefix}{key}: required field is missing")


def _check_str(data: dict, key: str, prefix: str, problems: list[str]) -> None:
    if key in data:
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{prefix}{key}: must be a non-empty string, got {_show(value)}")


def _check_choice(data: dict, key: str, choices: tuple[str, ...], prefix: str, problems: list[str]) -> bool:
    """Check a one-of field; returns True when it holds a valid choice."""
    if key not in data:
        return False
    value = data[key]
    if value in choices and isinstance(value, str):
        return True
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
    problems.append(f"{prefix}{key}: must be one of {', '.join(choices)}, got {_show(value)}{hint}")
    return False


def _check_positive_int(data: dict, key: str, prefix: str, problems: list[str]) -> bool:
    if key not in data:
        return False
    value = data[key]
    if _is_int(value) and value > 0:
        return True
    problems.append(f"{prefix}{key}: must be a positive integer, got {_show(value)}")
    return False


def _check_positive_number(data: dict, key: str, prefix: str, problems: list[str], nullable: bool,
                           null_hint: str = "") -> None:
    if key not in data:
        return
    value = data[key]
    if value is None and nullable:
        return
    if _is_number(value) and value > 0:
        return
    extra = " or null" if nullable else ""
    hint = null_hint if value is None else ""
    problems.append(f"{prefix}{key}: must be a positive number{extra}, got {_show(value)}{hint}")


def _check_name_list(data: dict, key: str, allowed: frozenset[str] | tuple[str, ...], what: str,
                     problems: list[str], allow_empty: bool, foreign: Optional[dict[str, str]] = None) -> list[str]:
    """Check a list of names; returns the valid entries for cross-field checks.

    ``foreign`` maps names valid elsewhere (another arch's flags) to where they belong.
    """
    if key not in data:
        return []
    value = data[key]
    if not isinstance(value, list) or (not value and not allow_empty):
        kind = "a list" if allow_empty else "a non-empty list"
        problems.append(f"{key}: must be {kind} of {what}, got {_show(value)}")
        return []
    valid: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, str):
            problems.append(f"{where}: must be a string, got {_show(item)}")
        elif item in seen:
            problems.append(f"{where}: '{item}' is listed twice")
        elif allowed and item not in allowed and foreign and item in foreign:
            problems.append(f"{where}: '{item}' is an {foreign[item]} flag, not an {what}")
        elif allowed and item not in allowed:
            # Flag names differ by one letter (asimdhp/asimddp), so offer every close one.
            close = [f"'{c}'" for c in difflib.get_close_matches(item, sorted(allowed), n=3, cutoff=0.5)]
            options = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
            hint = f"; did you mean {options}?" if close else ""
            problems.append(f"{where}: unknown {what} '{item}'{hint}")
        else:
            valid.append(item)
        if isinstance(item, str):
            seen.add(item)
    return valid


def validate_profile(data: Any) -> list[str]:
    """Check a parsed profile and collect every problem at once.

    Pure: no I/O, no exceptions for bad data. Each problem starts with the field's path
    (``cpu.cores: must be a positive integer, got 'four'``).

    Args:
        data: The profile as parsed from YAML (normally a dict).

    Returns:
        Every problem found (none means the profile is valid).
    """
    if not isinstance(data, dict):
        return [f"profile: must be a mapping of fields ({', '.join(_TOP_FIELDS)}), got {_show(data)}"]
    problems: list[str] = []
    _check_keys(data, _TOP_FIELDS, "", problems, _OPTIONAL_TOP)

    if "id" in data:
        value = data["id"]
        if not isinstance(value, str) or not _ID_RE.fullmatch(value):
            problems.append(f"id: must be lowercase letters, digits and '-' (e.g. 'rpi5'), got {_show(value)}")
    _check_str(data, "name", "", problems)
    arch_ok = _check_choice(data, "arch", ARCHES, "", problems)
    arch = data["arch"] if arch_ok else None
    emulated = data.get("emulated") is True

    cores: Optional[int] = None
    cpu = data.get("cpu")
    if "cpu" in data:
        if isinstance(cpu, dict):
            _check_keys(cpu, _CPU_FIELDS, "cpu.", problems)
            _check_str(cpu, "model", "cpu.", problems)
            if _check_positive_int(cpu, "cores", "cpu.", problems):
                cores = cpu["cores"]
            # A clock is meaningless only for an emulator; a real device must state one.
            _check_positive_number(cpu, "clock_ghz", "cpu.", problems, nullable=emulated,
                                   null_hint="" if emulated else " (null is only allowed with emulated: true)")
        else:
            problems.append(f"cpu: must be a mapping with {', '.join(_CPU_FIELDS)}, got {_show(cpu)}")

    _check_positive_int(data, "memory_mb", "", problems)
    foreign = {flag: other for other, flags in SIMD_FLAGS.items() if other != arch for flag in flags}
    simd = _check_name_list(data, "simd", SIMD_FLAGS.get(arch, ()), f"{arch or 'SIMD'} flag", problems,
                            allow_empty=True, foreign=foreign)

    peak = data.get("peak")
    if "peak" in data:
        if isinstance(peak, dict):
            _check_keys(peak, _PEAK_FIELDS, "peak.", problems)
            for key in _PEAK_FIELDS[:3]:
                _check_positive_number(peak, key, "peak.", problems, nullable=True)
            _check_str(peak, "source", "peak.", problems)
        else:
            problems.append(f"peak: must be a mapping with {', '.join(_PEAK_FIELDS)}, got {_show(peak)}")

    engines = _check_name_list(data, "engines", ENGINES, "engine", problems, allow_empty=False)

    rec = data.get("recommended")
    if "recommended" in data:
        if isinstance(rec, dict):
            _check_keys(rec, _RECOMMENDED_FIELDS, "recommended.", problems)
            if _check_positive_int(rec, "threads", "recommended.", problems) and cores is not None:
                if rec["threads"] > cores:
                    problems.append(f"recommended.threads: {rec['threads']} is more than cpu.cores ({cores})")
            if _check_choice(rec, "variant", VARIANTS, "recommended.", problems) and rec["variant"] == "fp16":
                flag = _FP16_FLAGS.get(arch or "")
                if arch and flag not in simd:
                    problems.append(f"recommended.variant: fp16 needs fp16 arithmetic ('{flag}' in simd)")
            if _check_choice(rec, "engine", ENGINES, "recommended.", problems) and engines:
                if rec["engine"] not in engines:
                    problems.append(f"recommended.engine: '{rec['engine']}' is not in engines ({', '.join(engines)})")
        else:
            problems.append(f"recommended: must be a mapping with {', '.join(_RECOMMENDED_FIELDS)}, got {_show(rec)}")

    if "emulated" in data and not isinstance(data["emulated"], bool):
        problems.append(f"emulated: must be true or false, got {_show(data['emulated'])}")
    if "notes" in data and not isinstance(data["notes"], str):
        problems.append(f"notes: must be a string, got {_show(data['notes'])}")
    if "arithmetic" in data:
        from edgepack_runtime.arith import CLASSES

        value = data["arithmetic"]
        if value not in CLASSES:
            problems.append(f"arithmetic: must be one of {', '.join(CLASSES)} (or left out to derive it from simd), got {_show(value)}")
        elif arch and CLASSES[value].arch != arch:
            problems.append(f"arithmetic: {value} is an {CLASSES[value].arch} class, but arch is {arch}")
    return problems


def _invalid(where: str, problems: list[str]) -> ConfigError:
    # One line: the CLI prints the message as its only `error:` line.
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return ConfigError(f"Device profile {where} is invalid ({count}): {'; '.join(problems)}. "
                       "Fix these fields and try again.")


def _as_float(value: Any) -> Optional[float]:
    # YAML reads "2" as an int; the dataclasses promise floats.
    return None if value is None else float(value)


def profile_from_dict(data: Any, *, where: str = "<dict>", path: Optional[Path] = None) -> DeviceProfile:
    """Validate parsed data and build a :class:`DeviceProfile`.

    Args:
        data: The profile as parsed from YAML.
        where: How to name the source in error messages.
        path: The file the data came from, stored on the profile.

    Returns:
        The profile.

    Raises:
        ConfigError: Listing every problem found, each with its field path.
    """
    problems = validate_profile(data)
    if problems:
        raise _invalid(where, problems)
    cpu, peak, rec = data["cpu"], data["peak"], data["recommended"]
    return DeviceProfile(
        id=data["id"],
        name=data["name"].strip(),
        arch=data["arch"],
        cpu=CpuSpec(model=cpu["model"].strip(), cores=cpu["cores"], clock_ghz=_as_float(cpu["clock_ghz"])),
        memory_mb=data["memory_mb"],
        simd=tuple(data["simd"]),
        peak=PeakSpec(
            fp32_gflops=_as_float(peak["fp32_gflops"]),
            int8_gops=_as_float(peak["int8_gops"]),
            memory_bandwidth_gbs=_as_float(peak["memory_bandwidth_gbs"]),
            source=" ".join(peak["source"].split()),
        ),
        engines=tuple(data["engines"]),
        recommended=Recommended(threads=rec["threads"], variant=rec["variant"], engine=rec["engine"]),
        emulated=data["emulated"],
        notes=data.get("notes", "").strip(),
        arithmetic=data.get("arithmetic"),
        path=path,
    )


def profile_to_dict(profile: DeviceProfile) -> dict[str, Any]:
    """The profile as plain JSON-ready data, in the YAML schema (round-trips through validation).

    Args:
        profile: The profile.

    Returns:
        A dict with the profile's fields; tuples become lists, ``path`` is left out.
    """
    return {
        "id": profile.id,
        "name": profile.name,
        "arch": profile.arch,
        "cpu": {"model": profile.cpu.model, "cores": profile.cpu.cores, "clock_ghz": profile.cpu.clock_ghz},
        "memory_mb": profile.memory_mb,
        "simd": list(profile.simd),
        "peak": {
            "fp32_gflops": profile.peak.fp32_gflops,
            "int8_gops": profile.peak.int8_gops,
            "memory_bandwidth_gbs": profile.peak.memory_bandwidth_gbs,
            "source": profile.peak.source,
        },
        "engines": list(profile.engines),
        "recommended": {
            "threads": profile.recommended.threads,
            "variant": profile.recommended.variant,
            "engine": profile.recommended.engine,
        },
        "emulated": profile.emulated,
        "notes": profile.notes,
        **({"arithmetic": profile.arithmetic} if profile.arithmetic else {}),
    }


# --- files ----------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would silently overwrite."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first at line {seen[key]})", key_node.start_mark)
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Device profile {path} does not exist; check the path or use a known device id.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Device profile {path} could not be read ({exc}); check the file and its permissions.") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        reason = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise ConfigError(f"Device profile {path} is not valid YAML ({where}: {reason}); "
                          "fix the syntax and try again.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Device profile {path} is not valid YAML ({exc}); fix the syntax and try again.") from None


def load_profile(path: str | Path) -> DeviceProfile:
    """Read, validate and return one profile file.

    The profile's ``id`` must equal the file's stem so that a profile found by name and
    one loaded by path are the same thing.

    Args:
        path: A ``.yaml`` profile file.

    Returns:
        The profile.

    Raises:
        ConfigError: The file is missing, not YAML (with the line number) or invalid
            (listing every problem with its field path).
    """
    path = Path(path)
    data = _parse_yaml(path)
    problems = validate_profile(data)
    if isinstance(data, dict) and isinstance(data.get("id"), str) and data["id"] != path.stem:
        problems.insert(0, f"id: must equal the file name '{path.stem}' so the profile can be found by name, "
                           f"got {_show(data['id'])}")
    if problems:
        raise _invalid(str(path), problems)
    return profile_from_dict(data, where=str(path), path=path)


def builtin_profiles_dir() -> Path:
    """The directory of the profiles shipped with edgepack (``devices/`` at the repository root)."""
    return Path(__file__).resolve().parents[1] / "devices"


def _profiles_dir(directory: str | Path | None) -> Path:
    folder = Path(directory) if directory is not None else builtin_profiles_dir()
    if not folder.is_dir():
        state = "is not a directory" if folder.exists() else "does not exist"
        raise ConfigError(f"Device profile directory {folder} {state}; "
                          "pass a directory that holds device .yaml files.")
    return folder


def _profile_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in PROFILE_SUFFIXES and p.is_file())


def list_profiles(dir: str | Path | None = None) -> list[DeviceProfile]:  # noqa: A002 - public name from the spec
    """Load every profile in a directory, sorted by id.

    Args:
        dir: Directory of ``*.yaml`` profiles; the shipped profiles when ``None``.

    Returns:
        The profiles.

    Raises:
        ConfigError: The directory is missing, a profile is invalid, or two files share an id.
    """
    folder = _profiles_dir(dir)
    profiles: dict[str, DeviceProfile] = {}
    for path in _profile_files(folder):
        profile = load_profile(path)
        if profile.id in profiles:
            other = profiles[profile.id].path
            raise ConfigError(f"Device profiles {other} and {path} both define id '{profile.id}'; "
                              "remove or rename one of them.")
        profiles[profile.id] = profile
    return [profiles[key] for key in sorted(profiles)]


def get_profile(name_or_path: str | Path, dir: str | Path | None = None) -> DeviceProfile:  # noqa: A002
    """Find a profile by id, or load it from a path.

    Anything containing a path separator or ending in ``.yaml``/``.yml`` is treated as a
    path; everything else as an id in ``dir``.

    Args:
        name_or_path: A device id such as ``rpi5``, or a path to a profile file.
        dir: Directory to look ids up in; the shipped profiles when ``None``.

    Returns:
        The profile.

    Raises:
        ConfigError: The id is unknown (listing the known ids and a close match) or the
            profile is invalid.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.endswith(PROFILE_SUFFIXES):
        return load_profile(Path(name_or_path))
    folder = _profiles_dir(dir)
    for suffix in PROFILE_SUFFIXES:
        candidate = folder / f"{text}{suffix}"
        if candidate.is_file():
            return load_profile(candidate)
    # Known ids come from file names, so one broken profile cannot hide the list.
    known = [p.stem for p in _profile_files(folder)]
    close = difflib.get_close_matches(text, known, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    listing = ", ".join(known) if known else "none"
    raise ConfigError(f"Unknown device '{text}'.{hint} Known devices in {folder}: {listing}. "
                      "Use one of these ids or a path to a profile .yaml file.")
