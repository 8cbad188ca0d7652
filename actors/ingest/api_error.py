"""The one error an HTTP route of the ingest raises: its status, code and message (docs/protocol.md)."""

from __future__ import annotations


class ApiError(Exception):
    """An HTTP error with the documented body `{"error": {"code", "message"}}` (the JoyAI-compatible routes give
    it their own shape)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
