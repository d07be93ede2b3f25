"""The one error type use cases raise; the app renders it as the protocol's error body."""

from __future__ import annotations

from ..errors import ServerError

__all__ = ["ApiError", "error_body"]


class ApiError(ServerError):
    """A refused request: HTTP status, a stable slug, and a sentence for humans."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}
