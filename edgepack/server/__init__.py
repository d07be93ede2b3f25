"""The OTA update server: signed-bundle catalog, device fleet, staged rollouts.

Modules, one job each: :mod:`.settings` (configuration, built only from CLI/env),
:mod:`.storage` (persistence interface + SQLite), :mod:`.blobs` (content-addressed
files), :mod:`.rollout` (pure rollout decisions), :mod:`.delta` (zstd patches),
:mod:`.catalog` / :mod:`.fleet` / :mod:`.orchestration` / :mod:`.summary` (use cases),
:mod:`.schemas` (wire models) and :mod:`.app` (HTTP). The contract is
``docs/ota-protocol.md``.
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):  # lazy: importing the package must not pull in FastAPI
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
