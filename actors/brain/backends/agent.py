"""The `agent` brain backend: an agent service over HTTP that speaks the JoyAI background agent's `/v1/solve`.

Request: `{session_id, task_id, question, foreground_text, frames: [{image_url, timestamp, timestamp_kind, pts}],
timeout_seconds}`; answer: `{status: "completed" | "failed" | "timeout", text, thread_id, usage, duration_ms,
events_digest, error}`. `completed` is done, `failed` failed with its `error`, `timeout` timed out. What the
agent does with the question is up to the service: Vigil sends it the frames and notes and nothing else, and
reaches no other address.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import httpx
from pydantic import SecretStr

from actors.brain.answer import split_answer
from actors.brain.backend import BackendError, BackendTimeout, BrainAnswer, BrainBackend
from actors.brain.backends.http import (
    data_url,
    error_reason,
    http_client,
    json_object,
    redact,
    transport_reason,
)
from actors.common.messages import DelegationRequest

log = logging.getLogger(__name__)

# Frames carry their stream time: seconds since the session's stream began, and the same in milliseconds.
TIMESTAMP_KIND = "stream_time"
# The agent is asked to finish a little before our own timeout, so that its `timeout` answer still arrives.
AGENT_MARGIN_S = 2.0


def solve_body(request: DelegationRequest, max_frames: int, timeout_s: float) -> dict[str, Any]:
    """The `/v1/solve` request for a delegation."""
    frames = request.frames[-max_frames:] if max_frames else ()
    foreground = request.note
    if request.memories:
        foreground += ("\n\n" if foreground else "") + "Memory of the stream:\n" + "\n".join(request.memories)
    return {
        "session_id": request.session_id,
        "task_id": request.delegation_id,
        "question": request.question,
        "foreground_text": foreground,
        "frames": [
            {
                "image_url": data_url(frame),
                "timestamp": frame.stream_time,
                "timestamp_kind": TIMESTAMP_KIND,
                "pts": round(frame.stream_time * 1000),
            }
            for frame in frames
        ],
        "timeout_seconds": max(1, math.floor(timeout_s - AGENT_MARGIN_S)),
    }


class AgentBackend(BrainBackend):
    """Answers through `POST {base_url}/v1/solve`; `GET {base_url}/health` is its health. Each call has
    `timeout_s`; the API key, when set, is sent as a bearer token and never logged or shown."""

    name = "agent"

    def __init__(
        self, base_url: str, api_key: SecretStr | None = None, timeout_s: float = 120.0, max_frames: int = 8
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.max_frames = max_frames
        self._client = http_client(timeout_s, api_key)

    def __repr__(self) -> str:
        key = "'**********'" if self._api_key is not None else "None"
        return f"AgentBackend(base_url={self.base_url!r}, api_key={key})"

    async def solve(self, request: DelegationRequest) -> BrainAnswer:
        body = solve_body(request, self.max_frames, self.timeout_s)
        response = await self._call("POST", "/v1/solve", json=body)
        if response.status_code != 200:
            raise BackendError(f"the agent answered {error_reason(response, self._api_key)}")
        data = json_object(response, "the agent")
        status, text = data.get("status"), data.get("text")
        if status == "completed":
            if not isinstance(text, str) or not text.strip():
                raise BackendError("the agent completed without an answer")
            return split_answer(text)
        error = self._short(data.get("error")) or self._short(text)
        if status == "timeout":
            raise BackendTimeout("the agent ran out of time" + (f": {error}" if error else ""))
        if status == "failed":
            raise BackendError("the agent failed" + (f": {error}" if error else ""))
        raise BackendError(f"the agent answered an unknown status {self._short(status)!r}")

    async def check_health(self) -> None:
        response = await self._call("GET", "/health")
        if response.status_code != 200:
            raise BackendError(f"the agent's health answered {error_reason(response, self._api_key)}")

    async def close(self) -> None:
        async with asyncio.timeout(self.timeout_s):
            await self._client.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._client.request(method, self.base_url + path, **kwargs)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise BackendTimeout(f"the agent gave {transport_reason(exc, self.timeout_s)}") from None
        except httpx.TransportError as exc:
            raise BackendError(f"the agent at {self.base_url}: {transport_reason(exc, self.timeout_s)}") from None

    def _short(self, value: Any, limit: int = 200) -> str:
        if value is None:
            return ""
        return redact(" ".join(str(value).split())[:limit], self._api_key)
