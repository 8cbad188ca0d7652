"""The human message inside an HTTP server's JSON error body, whatever its shape."""

from __future__ import annotations

from typing import Any


def error_message_of(data: Any) -> str:
    """OpenAI and vLLM nest the message under "error"; FastAPI-style servers use "detail"; others "message"."""
    if isinstance(data, dict):
        for key in ("error", "detail", "message"):
            value = data.get(key)
            if isinstance(value, dict):
                return error_message_of(value)
            if value:
                return str(value)
    return "" if data is None else str(data)
