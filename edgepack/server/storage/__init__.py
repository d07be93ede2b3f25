"""Persistence: the :class:`Storage` interface and its backends."""

from __future__ import annotations

from .base import (AlertRecord, BundleRecord, BundleRef, DeviceRecord, DriftStat, EventRecord, MemberRecord, MonitorWindowRecord, RolloutRecord,
                   StageChange, Storage, StorageConflict, StorageUnavailable, TokenOwner)

__all__ = [
    "AlertRecord", "BundleRef", "DriftStat", "BundleRecord", "DeviceRecord", "EventRecord", "MemberRecord", "RolloutRecord", "StageChange", "Storage",
    "TokenOwner", "open_storage", "MonitorWindowRecord", "StorageConflict", "StorageUnavailable", "POSTGRES_SCHEMES",
]

#: URL schemes that name a PostgreSQL database.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_storage(db_url: str, pool_size: int = 16) -> Storage:
    """Open (not migrate) the storage named by a database URL.

    Args:
        db_url: ``sqlite:///PATH`` or ``postgresql://USER:PASSWORD@HOST:PORT/DB`` (libpq URL;
            ``?options=-csearch_path%3DSCHEMA`` selects a schema).
        pool_size: Most PostgreSQL connections this process keeps open.

    Raises:
        ServerError: Unsupported URL, the database cannot be reached, or the PostgreSQL
            driver (extra ``postgres``) is not installed.
    """
    from ...errors import ServerError

    if db_url.startswith("sqlite:///"):
        from .sqlite import SqliteStorage

        return SqliteStorage(db_url[len("sqlite:///"):])
    if db_url.startswith(POSTGRES_SCHEMES):
        from .postgres import PostgresStorage

        return PostgresStorage(db_url, pool_size=pool_size)
    raise ServerError(f"Database URL {redact_url(db_url)!r} is not supported; use sqlite:///PATH or "
                      "postgresql://USER:PASSWORD@HOST:PORT/DATABASE.")


def redact_url(db_url: str) -> str:
    """``db_url`` with any password replaced by ``***`` (for messages and logs)."""
    import re

    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", db_url)
