"""``edgepack-runtime``: install, status, rollback, verify and serve on the device.

Only this entry point (and the daemon it starts) reads files and the environment;
everything below it receives typed, frozen config.

Exit codes: 0 success, 1 a verification/self-test failed, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__
from .bundle import load_public_key
from .cache import DEFAULT_ROOT, Cache, CacheConfig
from .arith import CLASSES, host_class
from .engines import available_engines
from .errors import EdgepackError

# Test-only fault injection: the installer SIGKILLs itself when it reaches this step
# (power-loss tests). Read here, at the entry point, and passed down as a hook.
FAULT_ENV = "EDGEPACK_RUNTIME_KILL_AT"


def _keys(args: argparse.Namespace) -> tuple:
    paths = [Path(p) for p in (args.key or [])]
    if not paths:
        paths = sorted((Path(args.cache) / "keys").glob("*.pub"))
    if not paths:
        raise EdgepackError(f"No trusted public key: pass --key PUB or place the publisher's .pub file in {Path(args.cache) / 'keys'}.")
    return tuple(load_public_key(p) for p in paths)


def _config(args: argparse.Namespace):
    from .model import RuntimeConfig

    prefer = tuple(args.prefer.split(",")) if getattr(args, "prefer", None) else ()
    return RuntimeConfig(CacheConfig(root=Path(args.cache), trusted_keys=_keys(args), keep=args.keep), prefer=prefer, threads=args.threads,
                         arith_class=getattr(args, "arith_class", None), profile=getattr(args, "profile", None))


def _fault_hook():
    target = os.environ.get(FAULT_ENV)
    if not target:
        return lambda step: None
    step_name, _, count = target.partition("#")
    remaining = [int(count or 1)]

    def hook(step: str) -> None:
        if step == step_name:
            remaining[0] -= 1
            if remaining[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _print(data, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        for key, value in data.items():
            print(f"{key}: {value}")


def _pin_keys(cache: Path, key_paths: List[str]) -> None:
    """Pin keys given on the command line into CACHE/keys (atomically), so later starts
    and the daemon verify offline without --key. A key already pinned is left alone."""
    if not key_paths:
        return
    from ._fs import atomic_write

    keys_dir = cache / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    pinned = {load_public_key(p).key_id for p in keys_dir.glob("*.pub")}
    for path in key_paths:
        key = load_public_key(path)
        if key.key_id not in pinned:
            atomic_write(keys_dir / f"{key.key_id}.pub", Path(path).read_bytes())
            pinned.add(key.key_id)


def cmd_install(args: argparse.Namespace) -> int:
    from .model import install

    config = _config(args)
    _pin_keys(Path(args.cache), args.key or [])
    slot = install(Path(args.bundle), config, fault=_fault_hook(), allow_downgrade=args.allow_downgrade)
    _print({"installed": slot.name, "version": slot.version, "digest": slot.digest}, args.json)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .model import plan, read_choice

    cache = Cache(CacheConfig(root=Path(args.cache), trusted_keys=_keys(args)))
    status = cache.status()
    status["engines"] = available_engines()
    config = _config(args)
    status["arith_class"] = config.arith_class or host_class()
    current = status.get("current")
    if current:
        overridden = config.arith_class or config.profile
        choice = None if overridden else read_choice(Path(args.cache), current["digest"])
        if choice is None:
            # Not yet served here: what the device would choose, from the installed (unverified) manifest.
            try:
                manifest = json.loads((cache.store / current["digest"] / "manifest.json").read_text())
                planned = plan(manifest, config)
                best = planned["candidates"][0] if planned["candidates"] else None
                choice = {"class": planned["class"], "class_source": planned["class_source"],
                          "variant": best["id"] if best else None, "refused": planned["refused"],
                          "reason": "planned (not yet self-tested on this device)" if best else "no variant is eligible here"}
            except (OSError, ValueError, EdgepackError) as exc:
                choice = {"error": str(exc)}
        status["arith_class"] = choice.get("class", status["arith_class"])
        status["serving"] = choice
    _print(status, args.json)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    slot = Cache(_config(args).cache).rollback()
    _print({"current": slot.name, "version": slot.version, "digest": slot.digest}, args.json)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .model import load

    model = load(_config(args))
    _print({"ok": True, **{k: v for k, v in model.info().items() if k != "io"}}, args.json)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from . import daemon

    if getattr(args, "ota_server", None):
        _pin_keys(Path(args.cache), args.key or [])
    return daemon.main_from_args(args, _config(args))


def cmd_ota(args: argparse.Namespace) -> int:
    from .ota.client import main_from_args

    _pin_keys(Path(args.cache), args.key or [])
    return main_from_args(args, _config(args), _fault_hook())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgepack-runtime", description="edgepack device runtime.")
    parser.add_argument("--version", action="version", version=f"edgepack-runtime {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache", default=os.environ.get("EDGEPACK_CACHE", str(DEFAULT_ROOT)), help="Cache directory (default: %(default)s).")
    common.add_argument("--key", action="append", help="Trusted publisher public key (.pub); repeatable. Default: CACHE/keys/*.pub.")
    common.add_argument("--keep", type=int, default=3, help="Known-good bundles to keep.")
    common.add_argument("--threads", type=int, default=1, help="Inference threads.")
    common.add_argument("--prefer", help="Comma-separated variant ids to prefer, e.g. onnx-int8,onnx-fp32.")
    common.add_argument("--json", action="store_true", help="Machine-readable output.")
    common.add_argument("--profile", default=None, help="The device profile this device is (e.g. rpi4): serve what the bundle "
                        "certified for that target's arithmetic class instead of detecting the CPU.")
    common.add_argument("--class", dest="arith_class", choices=sorted(CLASSES), default=None,
                        help="This device's arithmetic class, overriding detection from /proc/cpuinfo.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", parents=[common], help="Verify, self-test and switch to a bundle file (e.g. from a USB stick).")
    p.add_argument("bundle")
    p.add_argument("--allow-downgrade", action="store_true", help="Allow installing an older version (an explicit rollback).")
    p.set_defaults(func=cmd_install)
    sub.add_parser("status", parents=[common], help="Show slots, known-good bundles and engines.").set_defaults(func=cmd_status)
    sub.add_parser("rollback", parents=[common], help="Switch back to the previous bundle.").set_defaults(func=cmd_rollback)
    sub.add_parser("verify", parents=[common], help="Re-verify and self-test the installed model.").set_defaults(func=cmd_verify)
    p = sub.add_parser("serve", parents=[common], help="Run the local inference daemon.")
    p.add_argument("--socket", default=None, help="Unix socket path (default: CACHE/edgepack.sock).")
    p.add_argument("--http", default=None, help="Also listen on HTTP at HOST:PORT (127.0.0.1 only unless --http-any).")
    p.add_argument("--http-any", action="store_true", help="Allow a non-loopback --http host (the local API has no authentication).")
    p.add_argument("--log-dir", default=None, help="Keep a size-capped prediction log here.")
    p.add_argument("--log-sample", type=float, default=0.0, help="Share of requests to log (0..1).")
    p.add_argument("--log-max-mb", type=float, default=64.0, help="Prediction log size cap.")
    p.add_argument("--ota-server", default=None, help="Also apply fleet updates from this OTA server (base URL), in a background thread.")
    p.add_argument("--device-id", default=None, help="This device's id at the OTA server (with --ota-server).")
    p.add_argument("--token-file", default=None, help="File holding the device token (with --ota-server).")
    p.add_argument("--ota-interval", type=float, default=60.0, help="OTA poll interval in seconds until the server sets one.")
    p.add_argument("--shadow", default=None, help="Candidate bundle (.epk) to run beside the served model on a sample of live "
                   "requests (its answers are never served); agreement and latency go into check-in summaries and /info.")
    p.add_argument("--shadow-sample", type=float, default=0.25, help="Share of requests also run on the --shadow candidate (0..1].")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("ota", parents=[common], help="Poll an OTA server and apply its updates (docs/ota-protocol.md).")
    p.add_argument("--server", required=True, help="OTA server base URL.")
    p.add_argument("--device-id", required=True, help="This device's id.")
    p.add_argument("--token-file", required=True, help="File holding the device token.")
    p.add_argument("--once", action="store_true", help="One cycle (finish or undo any half-done update, check in, act), then exit.")
    p.add_argument("--interval", type=float, default=60.0, help="Poll interval in seconds until the server sets one.")
    p.set_defaults(func=cmd_ota)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EdgepackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: {exc.strerror or exc} ({getattr(exc, 'filename', '') or ''}); check the path and permissions.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
