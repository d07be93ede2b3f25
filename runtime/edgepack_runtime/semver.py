"""Semantic versions (semver.org 2.0.0, without build metadata): one rule for the workstation,
the server and the device.

The project file, the bundle manifest check and the device's "is this older" decision
all use :func:`is_valid` and :func:`precedence`, so a version the build accepts is one
the device orders correctly (``1.0.0-rc.2 < 1.0.0-rc.10 < 1.0.0``).
"""

from __future__ import annotations

import re
from typing import Tuple, Union

__all__ = ["is_valid", "precedence"]

_NUM = r"(?:0|[1-9][0-9]*)"
_IDENT = rf"(?:{_NUM}|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_RE = re.compile(rf"({_NUM})\.({_NUM})\.({_NUM})(?:-({_IDENT}(?:\.{_IDENT})*))?")


def is_valid(version: object) -> bool:
    """True for ``MAJOR.MINOR.PATCH[-prerelease]`` with no leading zeros and nothing around it."""
    return isinstance(version, str) and _RE.fullmatch(version) is not None


def precedence(version: str) -> Tuple:
    """A sort key with semver precedence.

    Numeric pre-release identifiers compare as numbers and sort before alphanumeric
    ones; a longer set of identifiers wins when the shorter is its prefix; a release
    sorts after all of its pre-releases.

    Raises:
        ValueError: ``version`` is not valid (see :func:`is_valid`).
    """
    match = _RE.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise ValueError(f"{version!r} is not a semantic version MAJOR.MINOR.PATCH[-prerelease]")
    major, minor, patch, pre = match.groups()
    core = (int(major), int(minor), int(patch))
    if pre is None:
        return (*core, 1, ())
    idents: Tuple[Tuple[int, Union[int, str]], ...] = tuple(
        (0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return (*core, 0, idents)
