"""Persistence: the :class:`Storage` interface and its backends."""

from __future__ import annotations

from .base import AlertRecord, BundleRecord, DriftStat, DeviceRecord, EventRecord, MemberRecord, RolloutRecord, StageChange, Storage, TokenOwner

__all__ = [
    "AlertRecord", "DriftStat", "BundleRecord", "DeviceRecord", "EventRecord", "MemberRecord", "RolloutRecord", "StageChange", "Storage",
    "TokenOwner", "open_storage",
]


def open_storage(db_url: str) -> Storage:
    """Open (not migrate) the storage named by a database URL (``sqlite:///PATH``)."""
    from ...errors import ServerError

    if db_url.startswith("sqlite:///"):
        from .sqlite import SqliteStorage

        return SqliteStorage(db_url[len("sqlite:///"):])
    raise ServerError(f"Database URL {db_url!r} is not supported; use sqlite:///PATH (PostgreSQL support is planned).")
