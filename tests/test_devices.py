"""Device profiles: the shipped YAML files, the validator, lookup, and `edgepack devices`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from edgepack.devices import (
    DeviceProfile,
    builtin_profiles_dir,
    get_profile,
    list_profiles,
    load_profile,
    profile_from_dict,
    profile_to_dict,
    validate_profile,
)
from edgepack.errors import ConfigError
from edgepack_runtime.arith import CLASSES, classify, host_class

SHIPPED = sorted(builtin_profiles_dir().glob("*.yaml"))
EXPECTED_IDS = {"rpi5", "rpi4", "rpi3", "rpi-zero-2w", "x86-gateway", "qemu-aarch64"}


def assert_clean_error(code: int, out: str, err: str, expected_code: int = 2) -> str:
    assert code == expected_code, (code, out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def good() -> dict:
    """A valid profile as parsed YAML (a fresh copy of the shipped rpi5)."""
    return yaml.safe_load((builtin_profiles_dir() / "rpi5.yaml").read_text())


def write(folder: Path, data: dict | str, stem: str | None = None) -> Path:
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    stem = stem or (data["id"] if isinstance(data, dict) else "broken")
    path = folder / f"{stem}.yaml"
    path.write_text(text)
    return path


# --- shipped profiles -------------------------------------------------------------------------


def test_all_expected_profiles_ship():
    assert {p.stem for p in SHIPPED} == EXPECTED_IDS


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_profile_loads_and_validates(path):
    assert validate_profile(yaml.safe_load(path.read_text())) == []
    profile = load_profile(path)
    assert isinstance(profile, DeviceProfile)
    assert profile.id == path.stem
    assert profile.recommended.engine in profile.engines
    assert profile.recommended.threads <= profile.cpu.cores
    assert "estimate" in profile.peak.source.lower() or "theoretical" in profile.peak.source.lower() \
        or profile.emulated
    # profile_to_dict round-trips through the validator and back to an equal profile.
    data = profile_to_dict(profile)
    assert validate_profile(data) == []
    json.dumps(data)


def test_ids_unique_and_equal_to_stem():
    profiles = list_profiles()
    ids = [p.id for p in profiles]
    assert len(ids) == len(set(ids)) == len(SHIPPED)
    assert all(p.path is not None and p.id == p.path.stem for p in profiles)


def test_key_facts_of_shipped_profiles():
    rpi5, rpi4, qemu = get_profile("rpi5"), get_profile("rpi4"), get_profile("qemu-aarch64")
    assert rpi5.arch == "aarch64" and rpi5.cpu.cores == 4 and rpi5.cpu.clock_ghz == 2.4
    assert {"asimd", "asimddp", "asimdhp"} <= set(rpi5.simd)
    assert "asimddp" not in rpi4.simd
    assert "1.8" in rpi4.notes
    assert qemu.emulated and qemu.peak.fp32_gflops is None
    assert get_profile("x86-gateway").arch == "x86_64"
    assert {"sse4_2", "avx2"} <= set(get_profile("x86-gateway").simd)


def test_get_profile_by_path(tmp_path, good):
    good["id"] = "myboard"
    path = write(tmp_path, good)
    assert get_profile(str(path)).id == "myboard"
    assert get_profile(path).id == "myboard"
    assert get_profile("myboard", tmp_path).id == "myboard"


# --- validation -------------------------------------------------------------------------------


def test_bad_type_is_named_with_its_path(good):
    good["cpu"]["cores"] = "four"
    assert validate_profile(good) == ["cpu.cores: must be a positive integer, got 'four'"]


def test_negative_cores_and_bool_are_rejected(good):
    good["cpu"]["cores"] = -4
    good["memory_mb"] = True
    problems = validate_profile(good)
    assert "cpu.cores: must be a positive integer, got -4" in problems
    assert "memory_mb: must be a positive integer, got true" in problems


def test_unknown_key_suggests_the_close_field(good):
    good["memroy_mb"] = good.pop("memory_mb")
    problems = validate_profile(good)
    assert "memroy_mb: unknown field; did you mean 'memory_mb'?" in problems
    assert "memory_mb: required field is missing" in problems


def test_unknown_nested_key_and_simd_typo(good):
    good["peak"]["fp32_gflop"] = good["peak"].pop("fp32_gflops")
    good["simd"].append("asimdp")
    problems = validate_profile(good)
    assert "peak.fp32_gflop: unknown field; did you mean 'fp32_gflops'?" in problems
    assert any(p.startswith("simd[6]: unknown aarch64 flag 'asimdp'") and "asimddp" in p for p in problems)


def test_flag_of_another_arch_is_named(good):
    good["simd"].append("avx2")
    assert validate_profile(good) == ["simd[6]: 'avx2' is an x86_64 flag, not an aarch64 flag"]


def test_cross_field_checks(good):
    good["recommended"].update(threads=8, engine="litert")
    good["engines"] = ["onnxruntime"]
    problems = validate_profile(good)
    assert "recommended.threads: 8 is more than cpu.cores (4)" in problems
    assert any(p.startswith("recommended.engine:") for p in problems)


def test_clock_may_be_null_only_when_emulated(good):
    good["cpu"]["clock_ghz"] = None
    assert validate_profile(good) == [
        "cpu.clock_ghz: must be a positive number, got null (null is only allowed with emulated: true)"
    ]
    good["emulated"] = True
    assert validate_profile(good) == []


def test_all_problems_reported_at_once_in_one_error(tmp_path, good):
    good["cpu"]["cores"] = 0
    good["arch"] = "arm64"
    good["memroy_mb"] = good.pop("memory_mb")
    del good["peak"]["source"]
    good["recommended"]["variant"] = "int4"
    with pytest.raises(ConfigError) as info:
        load_profile(write(tmp_path, good))
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("cpu.cores: must be a positive integer, got 0",
                     "arch: must be one of aarch64, x86_64, armv7l, got 'arm64' (did you mean 'aarch64'?)",
                     "memroy_mb: unknown field; did you mean 'memory_mb'?",
                     "memory_mb: required field is missing",
                     "peak.source: required field is missing",
                     "recommended.variant: must be one of int8, fp16, fp32, got 'int4'"):
        assert fragment in message
    assert "(6 problems)" in message


def test_missing_required_field(tmp_path, good):
    del good["engines"]
    with pytest.raises(ConfigError, match=r"engines: required field is missing"):
        load_profile(write(tmp_path, good))


def test_id_must_match_file_stem(tmp_path, good):
    with pytest.raises(ConfigError, match=r"id: must equal the file name 'other'"):
        load_profile(write(tmp_path, good, stem="other"))


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "id: bad\nname: Bad\ncpu:\n  cores: [4\n  model: x\n", stem="bad")
    with pytest.raises(ConfigError, match=r"is not valid YAML \(line \d+, column \d+") as info:
        load_profile(path)
    assert "bad.yaml" in str(info.value)


def test_duplicate_key_is_an_error_with_line(tmp_path):
    path = write(tmp_path, "id: dup\nname: A\nname: B\n", stem="dup")
    with pytest.raises(ConfigError, match=r"line 3.*duplicate key 'name' \(first at line 2\)"):
        load_profile(path)


def test_non_mapping_profile(tmp_path):
    with pytest.raises(ConfigError, match=r"profile: must be a mapping"):
        load_profile(write(tmp_path, "- just\n- a list\n", stem="lst"))
    assert validate_profile(None) and validate_profile([]) and validate_profile("x")


def test_validator_is_pure(good):
    before = copy.deepcopy(good)
    good["cpu"]["cores"] = "four"
    snapshot = copy.deepcopy(good)
    validate_profile(good)
    assert good == snapshot and before != snapshot


# --- lookup -----------------------------------------------------------------------------------


def test_unknown_device_lists_known_ids_and_suggests():
    with pytest.raises(ConfigError) as info:
        get_profile("rpi6")
    message = str(info.value)
    assert "Unknown device 'rpi6'" in message and "Did you mean 'rpi5'?" in message
    for device_id in EXPECTED_IDS:
        assert device_id in message


def test_missing_profile_path():
    with pytest.raises(ConfigError, match=r"does not exist"):
        get_profile("no/such/profile.yaml")


def test_custom_directory(tmp_path, good):
    good["id"] = "board-a"
    write(tmp_path, good)
    assert [p.id for p in list_profiles(tmp_path)] == ["board-a"]
    with pytest.raises(ConfigError, match=r"Known devices in .*: board-a\."):
        get_profile("rpi5", tmp_path)
    with pytest.raises(ConfigError, match=r"directory .* does not exist"):
        list_profiles(tmp_path / "missing")


def test_one_broken_profile_fails_the_listing_with_its_file(tmp_path, good):
    good["id"] = "ok"
    write(tmp_path, good)
    write(tmp_path, "id: [\n", stem="broken")
    with pytest.raises(ConfigError, match=r"broken\.yaml is not valid YAML"):
        list_profiles(tmp_path)
    # Lookup of an unknown name still lists ids although one file is broken.
    with pytest.raises(ConfigError, match=r"broken, ok"):
        get_profile("nope", tmp_path)


def test_duplicate_ids_across_suffixes(tmp_path, good):
    good["id"] = "twin"
    write(tmp_path, good)
    (tmp_path / "twin.yml").write_text((tmp_path / "twin.yaml").read_text())
    with pytest.raises(ConfigError, match=r"both define id 'twin'"):
        list_profiles(tmp_path)


# --- CLI --------------------------------------------------------------------------------------


def test_cli_list_json(cli):
    code, out, err = cli("devices", "list", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert {d["id"] for d in data} == EXPECTED_IDS
    assert all(validate_profile(d) == [] for d in data)


def test_cli_list_table(cli):
    code, out, err = cli("devices", "list")
    assert code == 0, err
    for device_id in EXPECTED_IDS:
        assert device_id in out


def test_cli_show_rpi5(cli):
    code, out, err = cli("devices", "show", "rpi5")
    assert code == 0, err
    assert out.startswith("rpi5\n")
    for fragment in ("Raspberry Pi 5", "Cortex-A76", "4× 2.4 GHz", "asimddp", "153.6 GFLOPS",
                     "int8, 4 threads, onnxruntime", "rpi5.yaml"):
        assert fragment in out


def test_cli_show_json(cli):
    code, out, err = cli("devices", "show", "rpi5", "--json")
    assert code == 0, err
    assert json.loads(out) == {**profile_to_dict(get_profile("rpi5")), "arith_class": "aarch64-dotprod",
                               "host_arith_class": host_class()}


def test_cli_show_unknown_is_one_error_line(cli):
    line = assert_clean_error(*cli("devices", "show", "nope"))
    assert "Unknown device 'nope'" in line and "rpi5" in line


def test_cli_invalid_profile_is_one_error_line(cli, tmp_path, good):
    good["cpu"]["cores"] = "four"
    good["memroy_mb"] = good.pop("memory_mb")
    write(tmp_path, good)
    line = assert_clean_error(*cli("devices", "list", "--dir", tmp_path))
    assert "cpu.cores: must be a positive integer, got 'four'" in line
    assert "did you mean 'memory_mb'?" in line


def test_cli_dir_from_environment(tmp_path, good, monkeypatch):
    from typer.testing import CliRunner

    from edgepack.cli.app import app

    good["id"] = "env-board"
    write(tmp_path, good)
    monkeypatch.setenv("EDGEPACK_DEVICES_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["devices", "list", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert [d["id"] for d in json.loads(result.stdout)] == ["env-board"]


# --------------------------------------------------------------------------- arithmetic classes


@pytest.mark.parametrize("device, klass", [
    ("rpi4", "aarch64-neon"), ("rpi3", "aarch64-neon"), ("rpi-zero-2w", "aarch64-neon"),
    ("qemu-aarch64", "aarch64-neon"), ("rpi5", "aarch64-dotprod"), ("x86-gateway", "x86-avx2"),
])
def test_every_shipped_profile_derives_its_arithmetic_class_from_simd(device, klass):
    assert get_profile(device).arith_class == klass


# Flags as /proc/cpuinfo prints them on machines this project has run on (abridged).
EPYC_ZEN2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2"
EPYC_ZEN4 = EPYC_ZEN2 + " avx512f avx512bw avx512_vnni avx512_bf16"
XEON_SKX = EPYC_ZEN2 + " avx512f avx512bw avx512vl"
ALDER_LAKE = EPYC_ZEN2 + " avx_vnni"


@pytest.mark.parametrize("machine, flags, klass", [
    ("x86_64", EPYC_ZEN2, "x86-avx2"),
    ("x86_64", XEON_SKX, "x86-avx2"),        # AVX-512BW without VNNI saturates like AVX2
    ("x86_64", EPYC_ZEN4, "x86-vnni"),
    ("x86_64", ALDER_LAKE, "x86-vnni"),
    ("x86_64", "fpu sse sse2 ssse3", "x86_64-unclassified"),
    ("aarch64", "fp asimd evtstrm crc32 cpuid", "aarch64-neon"),
    ("aarch64", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp", "aarch64-dotprod"),
    ("armv7l", "half thumb fastmult vfp edsp neon", "armv7l-unclassified"),
])
def test_classify_reads_the_flags_that_change_int8_results(machine, flags, klass):
    assert classify(machine, flags.split()) == klass


def test_host_class_parses_proc_cpuinfo_text():
    text = f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {EPYC_ZEN2}\n\nprocessor\t: 1\n"
    assert host_class(text, "x86_64") == "x86-avx2"
    assert host_class("", "x86_64") == "x86_64-unclassified"  # unreadable cpuinfo: nothing certified


def test_profile_may_name_its_class_but_not_one_of_another_arch(good):
    good["arithmetic"] = "x86-vnni"
    assert "arithmetic: x86-vnni is an x86_64 class, but arch is aarch64" in " ".join(validate_profile(good))
    good["arithmetic"] = "aarch64-neon"
    assert validate_profile(good) == []
    assert profile_from_dict(good).arith_class == "aarch64-neon"
    good["arithmetic"] = "arm-fast"
    assert any(p.startswith("arithmetic: must be one of x86-avx2") for p in validate_profile(good))


def test_cli_show_prints_the_class_and_how_it_is_measured(cli):
    code, out, err = cli("devices", "show", "x86-gateway")
    assert code == 0, err
    assert "x86-avx2 (derived from simd)" in out and "vpmaddubsw" in out
    assert f"this host is {host_class()}" in " ".join(out.split())
    assert set(CLASSES) == {"x86-avx2", "x86-vnni", "aarch64-neon", "aarch64-dotprod"}
