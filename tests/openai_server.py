"""A scripted OpenAI-compatible chat-completions server for tests: real HTTP on 127.0.0.1, no model.

It answers `GET /v1/models` and `POST /v1/chat/completions` the way vLLM does: a `structured_outputs` choice
is honoured, `logprobs`/`top_logprobs` come back per token (the decision prefixes tokenised as Qwen2's
tokenizer does, `</` first), and a prefilled assistant turn with `continue_final_message` is continued. Every
frame must be a data URL that decodes as an image. A test scripts P(speak), the words, and faults (refused
parameters, 5xx runs, slowness, hanging, garbage bodies, a required key) through `ChatScript`, and reads what arrived
from `ChatServer.calls`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL import Image

from tests.fakes import ServerThread

MODEL = "scripted-vlm"
SILENCE, RESPONSE = "</silence>", "</response>"
_TOKEN = re.compile(r"</|<|>|\s*[^\s<>]+|\s+")


@dataclass
class ChatScript:
    """How the server behaves; tests change it between calls."""

    p_speak: float = 0.0
    # P(speak) for particular sessions (by the `x-streaming-session` header), overriding `p_speak`.
    p_by_session: dict[str, float] = field(default_factory=dict)
    words: str = " A man is working on a laptop."
    # Body fields answered with 400, as a server that does not know them would.
    refuse: set[str] = field(default_factory=set)
    # The next `fail_times` chat calls answer `fail_status`; `always_status` answers every chat call.
    fail_times: int = 0
    fail_status: int = 503
    always_status: int | None = None
    error_message: str = "the model backend failed"
    delay_s: float = 0.0
    # Chat calls get no answer until the server closes (a server that hangs; closing is not held up by them).
    hang: bool = False
    garbage: str | None = None  # "not_json" or "no_choices"
    api_key: str | None = None
    # Text a server without the decision constraint generates (None: the likelier decision, then the words).
    free_text: str | None = None
    # Answer in full whatever max_tokens says (as JoyAI's adapter does).
    ignore_max_tokens: bool = False
    # Extra top-level fields of each reply (e.g. JoyAI's `streamingharness`).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Frame:
    """A frame as the server decoded it."""

    format: str
    size: tuple[int, int]
    jpeg: bytes


@dataclass
class ChatCall:
    """One chat-completions request as it arrived (refused and failed ones included)."""

    headers: dict[str, str]
    body: dict[str, Any]
    frames: list[Frame]
    status: int = 200


def tokens(text: str) -> list[str]:
    """The fake tokenizer: `</`, `<`, `>` and words (with their leading space) are tokens."""
    return _TOKEN.findall(text)


def _logprob_entry(token: str, logprob: float, top: list[tuple[str, float]], k: int) -> dict[str, Any]:
    alternatives = sorted(top, key=lambda item: -item[1])[:k]
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives],
    }


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -9999.0


class ChatServer:
    """The scripted server; `with ChatServer() as server:` runs it on a free port (`server.base_url`)."""

    def __init__(self) -> None:
        self.script = ChatScript()
        self.calls: list[ChatCall] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.app = self._build()
        self._thread = ServerThread(self.app)

    @property
    def base_url(self) -> str:
        return f"{self._thread.url}/v1"

    def reset(self) -> None:
        """A fresh script and no recorded calls (the server keeps running)."""
        with self._lock:
            self.script = ChatScript()
            self.calls.clear()

    def __enter__(self) -> ChatServer:
        self._thread.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._thread.__exit__(*exc)

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            refused = self._refuse_key(request)
            if refused is not None:
                return refused
            return JSONResponse(
                {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "test"}]}
            )

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._chat(request)

        return app

    def _refuse_key(self, request: Request) -> Response | None:
        expected = self.script.api_key
        if expected is None:
            return None
        given = request.headers.get("authorization", "")
        if given == f"Bearer {expected}":
            return None
        # Like some hosted APIs, echo what was refused: the engine must not repeat it.
        message = f"Incorrect API key provided: {given.removeprefix('Bearer ')}"
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=401)

    async def _chat(self, request: Request) -> Response:
        script = self.script
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            return self._error(400, "bad JSON", None)
        call = ChatCall(headers=dict(request.headers), body=body, frames=[])
        with self._lock:
            self.calls.append(call)
            failing = script.fail_times > 0
            if failing:
                script.fail_times -= 1
        refused = self._refuse_key(request)
        if refused is not None:
            call.status = 401
            return refused
        if script.delay_s:
            await asyncio.sleep(script.delay_s)
        if script.hang:
            await asyncio.to_thread(self._closing.wait)
        if script.always_status is not None:
            return self._error(script.always_status, script.error_message, call)
        if failing:
            return self._error(script.fail_status, script.error_message, call)
        messages = body.get("messages")
        if not isinstance(messages, list):
            return self._error(400, "messages must be a list", call)
        try:
            call.frames = _frames(messages)
        except ValueError as exc:
            return self._error(400, f"bad image: {exc}", call)
        for name in sorted(script.refuse):
            if name in body:
                return self._error(400, f"unsupported parameter: {name}", call)
        if script.garbage == "not_json":
            return PlainTextResponse("<html>502 Bad Gateway</html>")
        if script.garbage == "no_choices":
            return JSONResponse({"id": "chatcmpl-0", "object": "chat.completion", "choices": []})
        p_speak = script.p_by_session.get(request.headers.get("x-streaming-session", ""), script.p_speak)
        return JSONResponse(self._complete(body, script, p_speak))

    def _error(self, status: int, message: str, call: ChatCall | None) -> Response:
        if call is not None:
            call.status = status
        error = {"message": message, "type": "server_error" if status >= 500 else "BadRequestError"}
        return JSONResponse({"error": {**error, "param": None, "code": None}}, status_code=status)

    def _complete(self, body: dict[str, Any], script: ChatScript, p_speak: float) -> dict[str, Any]:
        messages = body["messages"]
        max_tokens = 10_000 if script.ignore_max_tokens else int(body.get("max_tokens") or 10_000)
        speak = p_speak >= 0.5
        continuing = bool(body.get("continue_final_message")) and messages[-1].get("role") == "assistant"
        if continuing:
            pieces = tokens(script.words)
        elif isinstance(body.get("structured_outputs"), dict):
            # Greedy decoding under the constraint: the likelier of the two choices.
            choices = body["structured_outputs"]["choice"]
            assert sorted(choices) == sorted([SILENCE, RESPONSE]), choices
            pieces = tokens(RESPONSE if speak else SILENCE)
        else:
            text = script.free_text
            if text is None:
                text = RESPONSE + script.words if speak else SILENCE
            pieces = tokens(text)
        finish = "length" if len(pieces) > max_tokens else "stop"
        pieces = pieces[:max_tokens]
        choice_out: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(pieces)},
            "finish_reason": finish,
        }
        if body.get("logprobs") and not continuing:
            choice_out["logprobs"] = {"content": _logprobs(pieces, p_speak, int(body.get("top_logprobs") or 0))}
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", MODEL),
            "choices": [choice_out],
            "usage": {"prompt_tokens": 100, "completion_tokens": len(pieces), "total_tokens": 100 + len(pieces)},
            **script.extra,
        }


def _logprobs(pieces: list[str], p: float, k: int) -> list[dict[str, Any]]:
    # The raw model distribution (vLLM reports it before the constraint): the two decision tokens share 90%,
    # other tokens the rest, so that P(speak) is only right once renormalised over the two.
    entries = []
    for index, piece in enumerate(pieces):
        if index == 0 and piece == "</":
            top = [("</", _log(0.98)), ("<", _log(0.01)), ("The", _log(0.005))]
        elif index == 1 and piece in ("response", "silence"):
            top = [
                ("response", _log(0.9 * p)),
                ("silence", _log(0.9 * (1 - p))),
                ("delegation", _log(0.06)),
                ("think", _log(0.04)),
            ]
        else:
            top = [(piece, 0.0)]
        logprob = dict(top).get(piece, 0.0)
        entries.append(_logprob_entry(piece, logprob, top, k))
    return entries


def _frames(messages: list[Any]) -> list[Frame]:
    frames = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") != "image_url":
                continue
            url = part["image_url"]["url"]
            head, _, data = url.partition(",")
            if not head.startswith("data:image/") or not head.endswith(";base64"):
                raise ValueError(f"not an image data URL: {url[:40]!r}")
            try:
                encoded = base64.b64decode(data, validate=True)
                with Image.open(io.BytesIO(encoded)) as image:
                    image.load()
                    frames.append(Frame(format=str(image.format), size=image.size, jpeg=encoded))
            except (binascii.Error, OSError) as exc:
                raise ValueError(str(exc)) from exc
    return frames


__all__ = ["MODEL", "ChatCall", "ChatScript", "ChatServer", "Frame", "tokens"]
