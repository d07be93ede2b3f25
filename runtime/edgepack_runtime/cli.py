"""``edgepack-runtime`` command line (device side)."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__, available_engines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgepack-runtime", description="edgepack device runtime.")
    parser.add_argument("--version", action="version", version=f"edgepack-runtime {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("engines", help="List the inference engines installed on this device.")
    args = parser.parse_args(argv)
    if args.command == "engines":
        print(json.dumps({"engines": available_engines()}))
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
