"""A scripted agent service for tests, speaking the JoyAI background agent's `/v1/solve`: real HTTP on
127.0.0.1, no agent.

`POST /v1/solve` answers `{status, text, thread_id, usage, duration_ms, events_digest, error}` as scripted by
`AgentScript` (completed, failed or timeout; after a delay; or an HTTP error; or no answer until the server
closes), checking that every frame is an image data URL. `GET /health` describes the agent. `AgentServer.calls`
holds what arrived.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from tests.fakes import ServerThread


@dataclass
class AgentScript:
    status: str = "completed"
    text: str = "The receipt adds up to 42 euros."
    error: str | None = None
    delay_s: float = 0.0
    hang: bool = False  # no answer until the server closes
    http_status: int = 200  # anything else: that status with an error body
    api_key: str | None = None
    # Per question: a delay that overrides `delay_s` (so one session's calls can be slow and another's quick).
    delay_by_question: dict[str, float] = field(default_factory=dict)


@dataclass
class SolveCall:
    headers: dict[str, str]
    body: dict[str, Any]
    frame_sizes: list[tuple[int, int]]
    started: float
    finished: float = 0.0


class AgentServer:
    """`with AgentServer() as agent:` runs it on a free port (`agent.base_url`)."""

    def __init__(self) -> None:
        self.script = AgentScript()
        self.calls: list[SolveCall] = []
        self._closing = threading.Event()
        self._thread = ServerThread(self._build())

    @property
    def base_url(self) -> str:
        return self._thread.url

    def reset(self) -> None:
        self.script = AgentScript()
        self.calls.clear()

    def __enter__(self) -> AgentServer:
        self._thread.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._thread.__exit__(*exc)

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return JSONResponse({"ok": True, "agent": "scripted", "max_concurrent": 2})

        @app.post("/v1/solve")
        async def solve(request: Request) -> Response:
            return await self._solve(request)

        return app

    async def _solve(self, request: Request) -> Response:
        script = self.script
        if script.api_key is not None and request.headers.get("authorization") != f"Bearer {script.api_key}":
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            return JSONResponse({"error": f"bad key {given}"}, status_code=401)
        body = await request.json()
        call = SolveCall(headers=dict(request.headers), body=body, frame_sizes=[], started=time.monotonic())
        self.calls.append(call)
        for frame in body.get("frames", []):
            head, _, data = frame["image_url"].partition(",")
            if head != "data:image/jpeg;base64":
                return JSONResponse({"error": f"not a JPEG data URL: {head[:40]}"}, status_code=400)
            with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
                call.frame_sizes.append(image.size)
        delay = script.delay_by_question.get(body.get("question", ""), script.delay_s)
        await asyncio.to_thread(self._closing.wait, None if script.hang else delay)
        call.finished = time.monotonic()
        if script.http_status != 200:
            return JSONResponse({"error": {"message": "the agent crashed"}}, status_code=script.http_status)
        return JSONResponse({
            "status": script.status,
            "text": script.text if script.status == "completed" else "",
            "thread_id": f"thread-{body.get('task_id')}",
            "usage": {"input_tokens": 10, "output_tokens": 5},
            "duration_ms": round(delay * 1000),
            "events_digest": [],
            "error": script.error,
        })
