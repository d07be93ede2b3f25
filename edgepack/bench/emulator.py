"""An emulated aarch64 Debian sysroot for running the device runtime under ``qemu-aarch64-static -L``.

No binfmt_misc, chroot, mounts or root inside the guest: qemu-user translates one
process, and ``-L SYSROOT`` makes it look guest paths (the ELF interpreter, shared
libraries, ``/usr/lib/python3.X``, ``/proc/cpuinfo``) up in the sysroot first.

``setup_emulator`` builds the sysroot once and is idempotent (a stamp file records
what was built; a rerun with the same settings does nothing). Downloads are cached
next to the sysroot (``debs/``, ``wheels/``), so a rebuild from the cache works offline.

Steps, with the pitfalls each one handles:

1. ``apt-get install qemu-user-static debootstrap`` when either tool is missing.
2. ``debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.X,...``: the
   first stage only, which needs no guest execution. It downloads the ``--include``
   packages but does not unpack them, so step 3 does.
3. Every downloaded .deb is unpacked with ``dpkg-deb --fsys-tarfile | tar -x
   --keep-directory-symlink`` so the merged-/usr links (``/lib -> usr/lib``) stay links.
4. ``proc`` in the sysroot is a link to the host's ``/proc``; it becomes a directory
   holding an aarch64 ``cpuinfo`` (onnxruntime's cpuinfo segfaults under qemu-user on
   an x86 one). Other ``/proc`` paths fall through to the host's.
5. ``pip download`` of numpy, onnxruntime (and ai-edge-litert when the host has it) aarch64 wheels (every
   ``manylinux_2_NN_aarch64`` tag from 17 to 36, ``--python-version 3.X``,
   ``--only-binary=:all:``), unzipped into ``/opt/edgepack/site`` in the sysroot.
6. A copy of ``edgepack_runtime`` into the same directory, then a smoke test that
   imports numpy and onnxruntime in the guest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import EdgepackError

__all__ = ["CPUINFO", "GUEST_SITE", "Emulator", "EmulatorConfig", "default_root", "setup_emulator"]

GUEST_SITE = "/opt/edgepack/site"
STAMP_NAME = ".edgepack-emulator.json"
STAMP_VERSION = 1

# Python of each Debian release (the wheels must match it).
_PYTHON_OF_SUITE = {"bullseye": "3.9", "bookworm": "3.11", "trixie": "3.13"}

# A Cortex-A72 as the kernel prints it; read by onnxruntime's cpuinfo through -L.
CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
    "CPU revision\t: 3\n\n"
    for i in range(4)
)

Log = Callable[[str], None]


class EmulatorError(EdgepackError):
    """The emulator could not be set up or run."""


def default_root() -> Path:
    return Path.home() / ".cache" / "edgepack" / "emulator"


def _host_suite() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                codename = line.split("=", 1)[1].strip().strip('"')
                if codename in _PYTHON_OF_SUITE:
                    return codename
    except OSError:
        pass
    return "bookworm"


def _installed_version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - not installed
        return None


def _default_requirements() -> tuple[str, ...]:
    # The host's versions, so emulated and host numbers come from the same engine release.
    reqs = []
    for dist in ("numpy", "onnxruntime"):
        ver = _installed_version(dist)
        reqs.append(f"{dist}=={ver}" if ver else dist)
    # LiteRT too when the host has it: builds measure tflite variants under Arm kernels as well.
    litert = _installed_version("ai-edge-litert")
    if litert:
        reqs.append(f"ai-edge-litert=={litert}")
    return tuple(reqs)


@dataclass(frozen=True)
class EmulatorConfig:
    """What to build and where.

    Attributes:
        root: Cache directory; the sysroot is ``root/sysroot``.
        suite: Debian release of the guest (default: the host's, else bookworm).
        mirror: Debian mirror.
        requirements: pip requirements for the guest (default: the host's numpy and
            onnxruntime versions).
    """

    root: Path = field(default_factory=default_root)
    suite: str = field(default_factory=_host_suite)
    mirror: str = "http://deb.debian.org/debian"
    requirements: tuple[str, ...] = field(default_factory=_default_requirements)

    @property
    def python_version(self) -> str:
        if self.suite not in _PYTHON_OF_SUITE:
            raise EmulatorError(f"Unknown Debian suite '{self.suite}'; use one of {', '.join(_PYTHON_OF_SUITE)}.")
        return _PYTHON_OF_SUITE[self.suite]

    @property
    def sysroot(self) -> Path:
        return Path(self.root) / "sysroot"

    def key(self) -> dict:
        return {"stamp_version": STAMP_VERSION, "suite": self.suite, "mirror": self.mirror,
                "python": self.python_version, "requirements": list(self.requirements)}


def _run(cmd: list[str], log: Log, **kwargs) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise EmulatorError(f"Command failed ({result.returncode}): {' '.join(cmd)}\n{tail}")
    return result


def _ensure_tools(log: Log) -> None:
    missing = [pkg for tool, pkg in (("qemu-aarch64-static", "qemu-user-static"), ("debootstrap", "debootstrap"))
               if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise EmulatorError(f"{', '.join(missing)} not installed and apt-get is not available; install them and retry.")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise EmulatorError(f"Run as root or install {' '.join(missing)} first (apt-get install -y {' '.join(missing)}).")
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        _run(prefix + ["apt-get", "install", "-y", "--no-install-recommends", *missing], log, env=env)
    except EmulatorError:
        _run(prefix + ["apt-get", "update"], log, env=env)
        _run(prefix + ["apt-get", "install", "-y", "--no-install-recommends", *missing], log, env=env)


def _unpack_deb(deb: Path, sysroot: Path) -> None:
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(sysroot)], stdin=dpkg.stdout,
                         capture_output=True, text=True)
    dpkg.stdout.close()
    if dpkg.wait() != 0 or tar.returncode != 0:
        raise EmulatorError(f"Could not unpack {deb.name} into {sysroot}: {tar.stderr.strip()[-500:]}")


def _debs_of(sysroot: Path) -> list[Path]:
    debs: list[Path] = []
    debpaths = sysroot / "debootstrap" / "debpaths"
    if debpaths.is_file():
        for line in debpaths.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                path = Path(parts[1])
                path = path if path.is_absolute() and path.exists() and not str(path).startswith("/var/") else sysroot / parts[1].lstrip("/")
                if path.is_file():
                    debs.append(path)
    if not debs:
        debs = sorted((sysroot / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    return debs


def _fix_proc(sysroot: Path) -> None:
    proc = sysroot / "proc"
    if proc.is_symlink() or (proc.exists() and not proc.is_dir()):
        proc.unlink()
    proc.mkdir(exist_ok=True)
    (proc / "cpuinfo").write_text(CPUINFO)


def _wheel_platforms() -> list[str]:
    return [f"manylinux_2_{n}_aarch64" for n in range(17, 37)] + ["manylinux2014_aarch64"]


def _download_wheels(config: EmulatorConfig, wheels: Path, log: Log) -> list[Path]:
    wheels.mkdir(parents=True, exist_ok=True)
    lock = wheels / "requirements.json"
    if lock.is_file():
        recorded = json.loads(lock.read_text())
        files = [wheels / name for name in recorded.get("files", [])]
        if recorded.get("requirements") == list(config.requirements) and files and all(f.is_file() for f in files):
            log(f"wheels cached in {wheels}")
            return files
    py = config.python_version
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
           "--python-version", py, "--implementation", "cp", "--abi", f"cp{py.replace('.', '')}",
           "--abi", "abi3", "--abi", "none", "-d", str(wheels)]
    for tag in _wheel_platforms():
        cmd += ["--platform", tag]
    result = _run(cmd + list(config.requirements), log, timeout=1800)
    # pip names every file it resolved: "Saved X" or "File was already downloaded X".
    names = re.findall(r"(?:Saved|File was already downloaded) (\S+\.whl)", result.stdout)
    wanted = sorted({wheels / Path(n).name for n in names})
    if not wanted or not all(p.is_file() for p in wanted):
        raise EmulatorError(f"pip download did not report the wheels it resolved into {wheels}:\n{result.stdout[-800:]}")
    lock.write_text(json.dumps({"requirements": list(config.requirements), "files": [p.name for p in wanted]}, indent=1))
    return wanted


def _install_wheels(files: list[Path], site: Path, log: Log) -> None:
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    for wheel in files:
        log(f"unzip {wheel.name}")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    # Wheels may put modules under <dist>.data/{purelib,platlib}; move them up.
    for data in site.glob("*.data"):
        for sub in ("purelib", "platlib"):
            for item in (data / sub).glob("*") if (data / sub).is_dir() else []:
                target = site / item.name
                if not target.exists():
                    shutil.move(str(item), str(target))
        shutil.rmtree(data)
    for so in site.rglob("*.so*"):
        so.chmod(so.stat().st_mode | 0o755)


def runtime_source() -> Path:
    """The ``edgepack_runtime`` package directory that this edgepack uses."""
    import edgepack_runtime

    return Path(edgepack_runtime.__file__).resolve().parent


def copy_runtime(dest_parent: Path) -> Path:
    target = dest_parent / "edgepack_runtime"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(runtime_source(), target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


@dataclass
class Emulator:
    """A prepared sysroot; builds commands that run a guest Python under qemu-user."""

    sysroot: Path
    python_version: str
    qemu: str = "qemu-aarch64-static"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / f"python{self.python_version}"

    def command(self, args: list[str]) -> list[str]:
        return [self.qemu, "-L", str(self.sysroot), str(self.python), "-s", "-B", *args]

    def env(self, extra_path: list[str] | None = None) -> dict:
        paths = list(extra_path or []) + [GUEST_SITE]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "QEMU_"))}
        env.update(PYTHONPATH=":".join(paths), PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1", LC_ALL="C.UTF-8")
        return env

    @classmethod
    def open(cls, root: Path | None = None) -> Emulator:
        root = Path(root) if root else default_root()
        stamp = root / "sysroot" / STAMP_NAME
        if not stamp.is_file():
            raise EmulatorError(f"The aarch64 emulator is not set up in {root}; run `edgepack bench setup-emulator` first.")
        info = json.loads(stamp.read_text())
        qemu = shutil.which("qemu-aarch64-static")
        if qemu is None:
            raise EmulatorError("qemu-aarch64-static is not installed; run `edgepack bench setup-emulator`.")
        return cls(root / "sysroot", info["python"], qemu)


def _smoke_test(emu: Emulator, log: Log) -> dict:
    code = ("import json, platform, numpy, onnxruntime, edgepack_runtime; print(json.dumps({'machine': platform.machine(), "
            "'python': platform.python_version(), 'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__, "
            "'providers': onnxruntime.get_available_providers()}))")
    result = _run(emu.command(["-c", code]), log, env=emu.env(), timeout=600)
    info = json.loads(result.stdout.strip().splitlines()[-1])
    if info.get("machine") != "aarch64":
        raise EmulatorError(f"The guest reports machine {info.get('machine')!r}, not aarch64.")
    return info


def setup_emulator(config: EmulatorConfig | None = None, log: Log | None = None, force: bool = False) -> dict:
    """Build (once) the aarch64 sysroot described by ``config``; returns the stamp with timings.

    Raises:
        EmulatorError: A tool is missing and cannot be installed, or a step failed.
    """
    config = config or EmulatorConfig()
    log = log or (lambda _m: None)
    start = time.monotonic()
    root = Path(config.root).expanduser().resolve()
    sysroot = root / "sysroot"
    stamp = sysroot / STAMP_NAME
    if platform.machine() not in ("x86_64", "aarch64", "AMD64"):
        log(f"note: host is {platform.machine()}")
    _ensure_tools(log)
    if stamp.is_file() and not force:
        recorded = json.loads(stamp.read_text())
        if recorded.get("key") == config.key():
            copy_runtime(sysroot / GUEST_SITE.lstrip("/"))
            recorded["elapsed_s"] = round(time.monotonic() - start, 2)
            recorded["cached"] = True
            log(f"emulator already set up in {sysroot}")
            return recorded
    root.mkdir(parents=True, exist_ok=True)
    partial = root / "sysroot.partial"
    if partial.exists():
        shutil.rmtree(partial)
    py = config.python_version
    include = [f"python{py}", f"python{py}-minimal", f"libpython{py}-stdlib", "libstdc++6", "libgcc-s1", "zlib1g"]
    base = ["--foreign", "--arch=arm64", "--variant=minbase", f"--include={','.join(include)}"]
    # The packages are fetched once into a tarball; building from it needs no network.
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps([config.suite, config.mirror, include]).encode()).hexdigest()[:10]
    tarball = debs / f"{config.suite}-arm64-{digest}.tgz"
    # debootstrap must run as root (it creates device nodes); without root, use sudo and take the tree back.
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        raise EmulatorError("debootstrap needs root: run setup-emulator as root or with passwordless sudo.")
    t0 = time.monotonic()
    if not tarball.is_file():
        scratch = root / "debs.partial"
        if scratch.exists():
            shutil.rmtree(scratch)
        tmp_tar = tarball.with_suffix(".tgz.partial")
        _run(sudo + ["debootstrap", *base[1:], f"--make-tarball={tmp_tar}", config.suite, str(scratch), config.mirror], log, timeout=3600)
        if sudo:
            _run(sudo + ["chown", "-R", f"{os.getuid()}:{os.getgid()}", str(tmp_tar), str(scratch)], log)
        tmp_tar.rename(tarball)
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        log(f"packages cached in {tarball}")
    _run(sudo + ["debootstrap", *base, f"--unpack-tarball={tarball}", config.suite, str(partial), config.mirror], log, timeout=3600)
    if sudo:
        _run(sudo + ["chown", "-R", f"{os.getuid()}:{os.getgid()}", str(partial)], log)
    t_debootstrap = time.monotonic() - t0
    packages = _debs_of(partial)
    if not packages:
        raise EmulatorError(f"debootstrap left no .deb files in {partial}; cannot unpack python{py}.")
    for deb in packages:
        _unpack_deb(deb, partial)
    for link in ("lib", "bin", "sbin"):
        if not (partial / link).is_symlink():
            raise EmulatorError(f"/{link} in the sysroot is no longer a symlink; unpacking broke the merged /usr.")
    if not (partial / "usr" / "bin" / f"python{py}").exists():
        raise EmulatorError(f"python{py} is missing from the sysroot after unpacking {len(packages)} packages.")
    _fix_proc(partial)
    t1 = time.monotonic()
    wheel_files = _download_wheels(config, root / "wheels" / f"py{py}", log)
    t_wheels = time.monotonic() - t1
    site = partial / GUEST_SITE.lstrip("/")
    _install_wheels(wheel_files, site, log)
    copy_runtime(site)
    if sysroot.exists():
        shutil.rmtree(sysroot)
    partial.rename(sysroot)
    emu = Emulator(sysroot, py, shutil.which("qemu-aarch64-static") or "qemu-aarch64-static")
    guest = _smoke_test(emu, log)
    info = {"key": config.key(), "python": py, "sysroot": str(sysroot), "guest": guest,
            "wheels": [p.name for p in wheel_files], "debs": len(packages),
            "timings_s": {"debootstrap": round(t_debootstrap, 1), "wheels": round(t_wheels, 1)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    stamp.write_text(json.dumps(info, indent=1))
    info["elapsed_s"] = round(time.monotonic() - start, 2)
    info["cached"] = False
    return info


def config_digest(config: EmulatorConfig) -> str:
    return hashlib.sha256(json.dumps(asdict(config), default=str, sort_keys=True).encode()).hexdigest()[:12]
