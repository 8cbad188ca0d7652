"""The `openai` brain backend: delegated questions answered by any OpenAI-compatible chat-completions server
that takes images (vllm serve, SGLang, a hosted API), frames sent as JPEG data URLs."""

from __future__ import annotations

import asyncio
import logging
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
    transport_reason,
)
from actors.common.messages import DelegationRequest
from actors.common.stream_time import clock

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are the background assistant of a live video assistant. It watches a stream with the user and has "
    "handed you a question it could not answer at once. Answer it from the frames and notes you are given. "
    "Start with a short answer that can be spoken aloud: one or two sentences. When a table, an HTML page or a "
    "chart makes the answer clearer, add exactly one fenced block after it: ```table with a Markdown table, "
    "```html with a self-contained page (no scripts, no external resources), or ```chart with a Vega-Lite JSON "
    "spec."
)


def chat_messages(request: DelegationRequest, max_frames: int) -> list[dict[str, Any]]:
    """The delegation as chat messages: the context, the newest frames with their times, the question."""
    context = []
    if request.memories:
        context.append("What the stream's memory holds about it:\n" + "\n".join(request.memories))
    if request.note:
        context.append(f"What the live assistant told the user: {request.note}")
    parts: list[dict[str, Any]] = [{"type": "text", "text": "\n\n".join(context)}] if context else []
    for frame in request.frames[-max_frames:] if max_frames else ():
        parts.append({"type": "text", "text": f"The stream at {clock(frame.stream_time)}:"})
        parts.append({"type": "image_url", "image_url": {"url": data_url(frame)}})
    parts.append({"type": "text", "text": f"The user's question: {request.question}"})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": parts}]


class ChatBackend(BrainBackend):
    """Answers through `POST {base_url}/chat/completions`; an empty `model` takes the first one the server lists
    (`GET {base_url}/models`). One call per delegation, no retries (a retry would spend the delegation's time);
    each call has `timeout_s`. The API key is sent as a bearer token and never logged or shown."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str = "",
        api_key: SecretStr | None = None,
        timeout_s: float = 120.0,
        max_tokens: int = 1024,
        max_frames: int = 8,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.max_frames = max_frames
        self._client = http_client(timeout_s, api_key)

    def __repr__(self) -> str:
        key = "'**********'" if self._api_key is not None else "None"
        return f"ChatBackend(base_url={self.base_url!r}, model={self.model!r}, api_key={key})"

    async def solve(self, request: DelegationRequest) -> BrainAnswer:
        model = self.model or await self._first_model()
        body = {
            "model": model,
            "messages": chat_messages(request, self.max_frames),
            "max_tokens": self.max_tokens,
            "temperature": 0.2,
            "stream": False,
            "user": request.session_id,
        }
        response = await self._call("POST", "/chat/completions", json=body)
        if response.status_code in (401, 403):
            raise BackendError(self._refused_key(response.status_code))
        if response.status_code != 200:
            raise BackendError(f"the chat server answered {error_reason(response, self._api_key)}")
        return split_answer(_reply_text(json_object(response, "the chat server")))

    async def check_health(self) -> None:
        response = await self._call("GET", "/models")
        if response.status_code in (401, 403):
            raise BackendError(self._refused_key(response.status_code))
        if response.status_code != 200:
            raise BackendError(f"the chat server answered {error_reason(response, self._api_key)}")

    async def close(self) -> None:
        async with asyncio.timeout(self.timeout_s):
            await self._client.aclose()

    async def _first_model(self) -> str:
        response = await self._call("GET", "/models")
        if response.status_code != 200:
            raise BackendError(f"the chat server's model list answered {error_reason(response, self._api_key)}")
        try:
            self.model = str(json_object(response, "the chat server")["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise BackendError("the chat server lists no model; set VIGIL_BRAIN_MODEL") from None
        log.info("brain: %s at %s", self.model, self.base_url)
        return self.model

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._client.request(method, self.base_url + path, **kwargs)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise BackendTimeout(f"the chat server gave {transport_reason(exc, self.timeout_s)}") from None
        except httpx.TransportError as exc:
            raise BackendError(f"the chat server at {self.base_url}: {transport_reason(exc, self.timeout_s)}") from None

    def _refused_key(self, status: int) -> str:
        if self._api_key is None:
            return f"the chat server needs an API key (HTTP {status}): set the variable brain.api_key_env names"
        return f"the chat server refused the API key (HTTP {status})"


def _reply_text(data: dict[str, Any]) -> str:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BackendError("the chat server's reply has no choices")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or not content.strip():
        raise BackendError("the chat server's reply has no text")
    return content
