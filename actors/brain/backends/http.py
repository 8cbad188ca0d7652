"""What the HTTP backends share: a client that reaches only the configured endpoint, the API key read from
the variable the config names, frames as data URLs, and short error reasons with the key blanked."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import httpx
from pydantic import SecretStr

from actors.brain.backend import BackendError
from actors.common.error_body import error_message_of
from actors.common.messages import DelegationFrame

REDACTED = "**********"


def read_api_key(variable: str) -> SecretStr | None:
    """The key in the environment variable `variable` (None: unset, empty, or no variable named)."""
    value = os.environ.get(variable, "") if variable else ""
    return SecretStr(value) if value else None


def http_client(timeout_s: float, api_key: SecretStr | None) -> httpx.AsyncClient:
    """A connection pool for one endpoint: the key as a bearer token; no redirects followed and no proxy taken
    from the environment, so no request goes anywhere but the URL it names."""
    headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key is not None else {}
    return httpx.AsyncClient(
        headers=headers,
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
    )


def data_url(frame: DelegationFrame) -> str:
    """A frame's JPEG as a `data:image/jpeg;base64,...` URL."""
    return "data:image/jpeg;base64," + base64.b64encode(frame.jpeg).decode("ascii")


def redact(text: str, api_key: SecretStr | None) -> str:
    if api_key is not None and api_key.get_secret_value():
        text = text.replace(api_key.get_secret_value(), REDACTED)
    return text


def error_reason(response: httpx.Response, api_key: SecretStr | None) -> str:
    """`HTTP <status>: <the server's message>`, short, with the key blanked (some servers echo what they
    refused)."""
    try:
        message = error_message_of(json.loads(response.content))
    except ValueError:
        message = response.content[:200].decode("utf-8", errors="replace")
    message = redact(" ".join(message.split())[:200], api_key)
    return f"HTTP {response.status_code}" + (f": {message}" if message else "")


def transport_reason(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return f"no answer within {timeout_s:.0f} s"
    if isinstance(exc, httpx.ConnectError):
        return f"could not connect ({type(exc).__name__})"
    return f"the connection failed ({type(exc).__name__})"


def json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    """The response's JSON object, or BackendError saying it is not one."""
    try:
        data = json.loads(response.content)
    except ValueError:
        raise BackendError(f"{what} did not answer with JSON") from None
    if not isinstance(data, dict):
        raise BackendError(f"{what} did not answer with a JSON object")
    return data

