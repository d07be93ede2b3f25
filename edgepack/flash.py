"""``edgepack flash``: put a bundle into a device's offline cache before it boots.

Two kinds of target:

* A directory: the device's root filesystem mounted on this computer (an SD card).
  The bundle is installed into ``TARGET/var/lib/edgepack`` by the device runtime's own
  code path — :meth:`edgepack_runtime.cache.Cache.install` with the golden-vector
  self-test of :mod:`edgepack_runtime.model` — and the public key(s) are pinned in
  its ``keys/`` directory, so the device verifies and runs the model offline at its
  next start.
* ``ssh://user@host[:port]``: the bundle and keys are copied with the system ``scp``
  to a temporary directory on the device, the keys are pinned, and the device's own
  ``edgepack-runtime install`` verifies, self-tests and switches to it.

Nothing is written anywhere before the bundle verified against the given keys here.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence, Union

from .errors import EdgepackError, InputError, MissingExtraError, UpdateError, VerificationError

DEFAULT_CACHE_PATH = "/var/lib/edgepack"
SSH_FORM = "ssh://user@host[:port]"
_MAX_SYMLINKS = 40
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
_REMOTE_TMP = re.compile(r"/[A-Za-z0-9._/-]+")

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class SshTarget:
    """A device reached with the system ssh client."""

    user: str
    host: str
    port: int = 22

    @property
    def destination(self) -> str:
        """``user@host`` as ``ssh`` takes it."""
        return f"{self.user}@{self.host}"

    @property
    def scp_destination(self) -> str:
        """``user@host`` as ``scp`` takes it (IPv6 addresses in brackets)."""
        return f"{self.user}@[{self.host}]" if ":" in self.host else self.destination

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user}@{host}" + (f":{self.port}" if self.port != 22 else "")


@dataclass(frozen=True)
class FlashResult:
    """What was installed where."""

    target: str
    transport: str  # "directory" or "ssh"
    cache: str
    name: str
    version: str
    digest: str
    keys_pinned: tuple

    def to_dict(self) -> dict:
        data = asdict(self)
        data["keys_pinned"] = list(self.keys_pinned)
        return data


# ---------------------------------------------------------------------- parsing


def _bad_url(url: str, reason: str) -> InputError:
    return InputError(
        f"Bad TARGET {url!r}: {reason}. Use {SSH_FORM} (for example ssh://pi@raspberrypi.local:2222) "
        "or the mount point of the device's root filesystem."
    )


def parse_ssh_url(url: str) -> SshTarget:
    """Parse ``ssh://user@host[:port]`` strictly.

    A user is required; the host is a DNS name, an IPv4 address or a bracketed IPv6
    address; the port is 1-65535; there is no password, path, query or fragment.

    Raises:
        InputError: ``url`` is not of that form (the message says which part is wrong).
    """
    if not url.startswith("ssh://"):
        raise _bad_url(url, "it does not start with ssh://")
    rest = url[len("ssh://"):]
    if any(ch in rest for ch in "?#"):
        raise _bad_url(url, "a query or fragment is not allowed")
    authority, slash, path = rest.partition("/")
    if slash and path:
        raise _bad_url(url, f"the path /{path} is not used (choose the device's cache directory with --cache-path)")
    user, at, hostport = authority.rpartition("@")
    if not at or not user:
        raise _bad_url(url, "the user name is missing")
    if ":" in user:
        raise _bad_url(url, "a password in the URL is not allowed (flashing uses key-based ssh login only)")
    if not _USER.fullmatch(user):
        raise _bad_url(url, f"the user name {user!r} is not valid")
    port_text: Optional[str] = None
    if hostport.startswith("["):
        host, bracket, after = hostport[1:].partition("]")
        if not bracket:
            raise _bad_url(url, "the IPv6 address has no closing ]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad_url(url, f"{host!r} is not an IPv6 address") from None
        if after:
            if not after.startswith(":"):
                raise _bad_url(url, f"unexpected {after!r} after the host")
            port_text = after[1:]
    else:
        host, colon, port_part = hostport.partition(":")
        if colon:
            port_text = port_part
        if not host:
            raise _bad_url(url, "the host is missing")
        if not _HOSTNAME.fullmatch(host):
            raise _bad_url(url, f"the host {host!r} is not a valid host name or address")
    port = 22
    if port_text is not None:
        if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise _bad_url(url, f"the port {port_text!r} is not a number from 1 to 65535")
        port = int(port_text)
    return SshTarget(user, host, port)


def _cache_rel(cache_path: str) -> PurePosixPath:
    path = PurePosixPath(cache_path)
    if not path.is_absolute() or ".." in path.parts or "\0" in cache_path or path == PurePosixPath("/"):
        raise InputError(f"The device cache path {cache_path!r} must be an absolute directory path without '..', "
                         f"like {DEFAULT_CACHE_PATH}.")
    return path.relative_to("/")


def _pin_name(path: Path) -> str:
    """The file name a key is pinned under: safe characters, ending in .pub (the runtime reads keys/*.pub)."""
    name = _SAFE_NAME.sub("_", path.name).lstrip(".-") or "publisher.pub"
    return name if name.endswith(".pub") else f"{Path(name).stem or 'publisher'}.pub"


# ------------------------------------------------------------------------ flash


def flash(
    bundle: PathLike,
    target: str,
    key_paths: Sequence[PathLike],
    cache_path: str = DEFAULT_CACHE_PATH,
    *,
    force: bool = False,
    allow_downgrade: bool = False,
    connect_timeout: int = 10,
) -> FlashResult:
    """Install ``bundle`` into the offline cache of the device at ``target``.

    Args:
        bundle: The signed ``.epk`` file.
        target: The device's root filesystem mounted here (a directory with ``etc/``),
            or ``ssh://user@host[:port]``.
        key_paths: The publisher's public key(s); the bundle must verify against
            them, and they are pinned on the device.
        cache_path: The cache directory as the device sees it.
        force: Install into a directory that does not look like a root filesystem.
        allow_downgrade: Allow replacing a newer version of the same model.
        connect_timeout: Seconds ssh waits for the device to answer.

    Returns:
        What was installed, and where.

    Raises:
        InputError: A bad target, cache path or key pin conflict (nothing written).
        BundleError / VerificationError: The bundle is malformed, unsigned or tampered
            with (nothing written).
        UpdateError: The self-test failed, a downgrade was refused, or the device could
            not be reached or refused the bundle.
    """
    from edgepack_runtime.bundle import load_public_key, verify_bundle

    bundle_path = Path(bundle)
    rel = _cache_rel(cache_path)
    if not key_paths:
        raise InputError("No public key was given: pass the publisher's .pub file with --key, so the bundle can be "
                         "verified and the device can verify it offline.")
    key_files = [Path(p) for p in key_paths]
    keys = tuple(load_public_key(p) for p in key_files)
    ssh = None
    if "://" in target or target.startswith("ssh:"):
        ssh = parse_ssh_url(target)
    elif not Path(target).is_dir():
        hint = f" To flash over the network use {SSH_FORM}." if "@" in target else ""
        raise InputError(f"TARGET {target} does not exist or is not a directory; pass the mount point of the device's "
                         f"root filesystem (an SD card).{hint}")
    if not bundle_path.is_file():
        raise InputError(f"Bundle {bundle_path} does not exist or is not a file; check the path.")
    # Nothing is written (and no connection made) before the whole bundle verified.
    verify_bundle(bundle_path, keys)
    if ssh is not None:
        return _flash_ssh(bundle_path, ssh, key_files, str(PurePosixPath("/") / rel), allow_downgrade, connect_timeout)
    return _flash_directory(bundle_path, Path(target), key_files, keys, rel, force, allow_downgrade)


# -------------------------------------------------------------- mounted rootfs


def _inside(root: Path, rel: PurePosixPath) -> Path:
    """``root/rel`` with symlinks resolved as the device would (absolute links stay under ``root``).

    A mounted root filesystem may hold ``var -> /data/var``; followed naively that
    would write into this computer's own /data.
    """
    parts = list(rel.parts)
    current = root
    links = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            links += 1
            if links > _MAX_SYMLINKS:
                raise InputError(f"Too many symbolic links under {root} while resolving {rel}; fix the links on the device.")
            link = PurePosixPath(os.readlink(candidate))
            if link.is_absolute():
                current = root
                parts = list(link.parts[1:]) + parts
            else:
                parts = list(link.parts) + parts
            continue
        current = candidate
    return current


def _first_missing(path: Path, root: Path) -> Optional[Path]:
    """The outermost directory of ``path`` (below ``root``) that does not exist yet."""
    missing = None
    for parent in [path, *path.parents]:
        if parent == root:
            break
        if not parent.exists():
            missing = parent
    return missing


def _flash_directory(bundle: Path, root: Path, key_files: Sequence[Path], keys: tuple, rel: PurePosixPath,
                     force: bool, allow_downgrade: bool) -> FlashResult:
    from edgepack_runtime.bundle import load_public_key
    from edgepack_runtime.cache import CacheConfig
    from edgepack_runtime.model import RuntimeConfig, install

    from ._atomic import atomic_write_bytes

    if not force:
        if root.resolve() == Path("/").resolve():
            raise InputError("TARGET / is this computer's own root filesystem; to install here use "
                             "`edgepack-runtime install`, or pass --force.")
        if not (root / "etc").is_dir():
            raise InputError(f"TARGET {root} does not look like a device's root filesystem (it has no etc/ directory); "
                             "pass the mount point of the root partition (not the boot partition), or --force to "
                             "install there anyway.")
    cache_dir = _inside(root, rel)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise InputError(f"{cache_dir} exists on the device but is not a directory; remove it or choose --cache-path.")
    keys_dir = cache_dir / "keys"

    # Plan the key pins and check for conflicts before writing anything.
    planned: dict = {}  # pinned file name -> (raw key, bytes to write or None if already pinned)
    for path, key in zip(key_files, keys):
        name = _pin_name(path)
        if name in planned:
            if planned[name][0] != key.raw:
                raise InputError(f"Two different keys would be pinned as {name}; rename one of the key files.")
            continue
        dest = keys_dir / name
        if dest.exists():
            try:
                same = load_public_key(dest).raw == key.raw
            except EdgepackError:
                same = False
            if not same:
                raise InputError(f"{dest} already pins a different key on the device; rename your key file, or remove "
                                 "the old pin first if you mean to replace it.")
            planned[name] = (key.raw, None)
        else:
            planned[name] = (key.raw, path.read_bytes())
    pins = [(keys_dir / name, data) for name, (_, data) in planned.items() if data is not None]

    created_root = _first_missing(cache_dir, root)
    created_keys_dir = not keys_dir.exists()
    written = []
    try:
        keys_dir.mkdir(parents=True, exist_ok=True)
        for dest, data in pins:
            atomic_write_bytes(dest, data)
            written.append(dest)
        config = RuntimeConfig(CacheConfig(root=cache_dir, trusted_keys=keys))
        slot = install(bundle, config, allow_downgrade=allow_downgrade)
    except BaseException:
        # Leave the card as it was: drop what this call created (never anything older).
        if created_root is not None:
            shutil.rmtree(created_root, ignore_errors=True)
        else:
            for dest in written:
                dest.unlink(missing_ok=True)
            if created_keys_dir:
                try:
                    keys_dir.rmdir()
                except OSError:
                    pass
        raise
    return FlashResult(str(root), "directory", str(cache_dir), slot.name, slot.version, slot.digest, tuple(sorted(planned)))


# ------------------------------------------------------------------------- ssh


def _ssh_options(timeout: int) -> list:
    return ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout)}", "-o", "ServerAliveInterval=15",
            "-o", "ServerAliveCountMax=4"]


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


def _unreachable(ssh: SshTarget, stderr: str) -> UpdateError:
    return UpdateError(
        f"Cannot reach {ssh} over ssh ({_tail(stderr)}); check the host and port, and that key-based login works "
        "without a prompt (`ssh -o BatchMode=yes` is used, so passwords and unknown host keys are refused)."
    )


def _run(argv: list, timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise UpdateError(f"{argv[0]} did not finish within {timeout:.0f} seconds; check the connection to the device.") from exc
    except OSError as exc:
        raise UpdateError(f"Cannot run {argv[0]}: {exc.strerror or exc}; check the OpenSSH client installation.") from exc


def _remote_script(tmp: str, cache: str, pins: Sequence[str], allow_downgrade: bool) -> str:
    q = shlex.quote
    names = " ".join(q(n) for n in pins)
    install = ["edgepack-runtime", "install", f"{tmp}/bundle.epk", "--cache", cache, "--json"]
    for name in pins:
        install += ["--key", f"{tmp}/{name}"]
    if allow_downgrade:
        install.append("--allow-downgrade")
    # Runs under `sh -c` on the device: pin the keys (refusing to replace a different
    # key pinned under the same name), install, and on failure undo this call's pins.
    return f"""
tmp={q(tmp)}; cache={q(cache)}; keys="$cache/keys"; added=""; made_keys=""
fail() {{ echo "error: $*" >&2; rm -rf -- "$tmp"; exit 2; }}
for k in {names}; do
  if [ -e "$keys/$k" ] && ! cmp -s -- "$tmp/$k" "$keys/$k"; then
    fail "$keys/$k already pins a different key on the device; rename your key file, or remove the old pin first if you mean to replace it."
  fi
done
[ -d "$keys" ] || made_keys=1
mkdir -p -- "$keys" || fail "Cannot create $keys on the device; flash as a user who may write there."
for k in {names}; do
  if [ ! -e "$keys/$k" ]; then
    cp -- "$tmp/$k" "$keys/.$k.tmp" && mv -f -- "$keys/.$k.tmp" "$keys/$k" || fail "Cannot pin $k in $keys on the device; check permissions and free space."
    added="$added $k"
  fi
done
{" ".join(q(a) for a in install)}
rc=$?
if [ "$rc" -ne 0 ]; then
  for k in $added; do rm -f -- "$keys/$k"; done
  [ -z "$made_keys" ] || rmdir -- "$keys" 2>/dev/null
fi
rm -rf -- "$tmp"
exit "$rc"
"""


def _flash_ssh(bundle: Path, ssh: SshTarget, key_files: Sequence[Path], cache: str, allow_downgrade: bool,
               connect_timeout: int) -> FlashResult:
    ssh_exe, scp_exe = shutil.which("ssh"), shutil.which("scp")
    if not ssh_exe or not scp_exe:
        raise MissingExtraError("Flashing over ssh needs the ssh and scp commands, which are not on PATH; install the "
                                "OpenSSH client, or mount the device's SD card and flash into its mount point.")
    options = _ssh_options(connect_timeout)
    ssh_cmd = [ssh_exe, *options, "-p", str(ssh.port), "--", ssh.destination]

    with tempfile.TemporaryDirectory(prefix="edgepack-flash-") as staging_dir:
        # Stage under fixed, safe names (what the device sees); the bundle is linked, not copied.
        staging = Path(staging_dir)
        (staging / "bundle.epk").symlink_to(bundle.resolve())
        pins: list = []
        for path in key_files:
            name, data = _pin_name(path), path.read_bytes()
            if name in pins:
                if (staging / name).read_bytes() != data:
                    raise InputError(f"Two different keys would be pinned as {name}; rename one of the key files.")
                continue
            (staging / name).write_bytes(data)
            pins.append(name)

        made = _run([*ssh_cmd, 'sh -c \'mktemp -d "${TMPDIR:-/tmp}/edgepack-flash.XXXXXX"\''], timeout=connect_timeout + 60)
        if made.returncode == 255:
            raise _unreachable(ssh, made.stderr)
        remote_tmp = made.stdout.strip()
        if made.returncode != 0 or not _REMOTE_TMP.fullmatch(remote_tmp or "-"):
            raise UpdateError(f"Cannot create a temporary directory on {ssh} ({_tail(made.stderr)}); check that the "
                              "device has a writable /tmp and a POSIX shell.")
        sources = [str(staging / "bundle.epk"), *(str(staging / n) for n in pins)]
        copied = _run([scp_exe, "-q", *options, "-P", str(ssh.port), "--", *sources, f"{ssh.scp_destination}:{remote_tmp}/"])

    def cleanup() -> None:
        _run([*ssh_cmd, f"rm -rf -- {shlex.quote(remote_tmp)}"], timeout=connect_timeout + 30)

    if copied.returncode != 0:
        cleanup()
        if copied.returncode == 255:
            raise _unreachable(ssh, copied.stderr)
        raise UpdateError(f"Copying the bundle to {ssh}:{remote_tmp} failed ({_tail(copied.stderr)}); check free space "
                          "on the device.")

    script = _remote_script(remote_tmp, cache, pins, allow_downgrade)
    done = _run([*ssh_cmd, f"sh -c {shlex.quote(script)}"])
    if done.returncode == 255:
        raise UpdateError(f"The connection to {ssh} was lost during the install ({_tail(done.stderr)}); the device "
                          "keeps serving its previous model. Flash again.")
    if done.returncode == 127:
        cleanup()
        raise UpdateError(f"edgepack-runtime was not found on {ssh} (not installed, or not on PATH for non-interactive "
                          "ssh logins); install it there with `pip install edgepack-runtime[onnx]`.")
    if done.returncode != 0:
        message = _tail(done.stderr)
        message = message[len("error: "):] if message.startswith("error: ") else message
        error = VerificationError if done.returncode == 1 else UpdateError
        raise error(f"The device {ssh} refused the bundle, and keeps serving its previous model: {message}")
    try:
        info = json.loads(done.stdout)
        name, version, digest = str(info["installed"]), str(info["version"]), str(info["digest"])
    except (ValueError, KeyError, TypeError):
        raise UpdateError(f"The device {ssh} reported success but its answer could not be read ({_tail(done.stdout)}); "
                          "run `edgepack-runtime status` there to check.") from None
    return FlashResult(str(ssh), "ssh", cache, name, version, digest, tuple(sorted(pins)))
