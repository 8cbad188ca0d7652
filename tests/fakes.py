"""Fakes of Vigil's interfaces for tests of the plumbing around them (one fake per interface)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import uvicorn

from actors.common.messages import Decision, EngineInfo, MemoryContext, SampleVerdict, TickRequest
from actors.common.replicas import ReplicaFailed
from actors.interaction.engine import Engine, EngineError
from actors.sampler.frame_sampler import FrameSampler


class ScriptedEngine(Engine):
    """Decides by a rule over the newest sample; can be made slow or failing to exercise the tick path."""

    def __init__(
        self,
        rule: Callable[[TickRequest], Decision] | None = None,
        delay_s: float = 0.0,
        fail: bool = False,
    ) -> None:
        self.rule = rule or (lambda request: Decision(kind="silent", raw="</silence>"))
        self.delay_s = delay_s
        self.fail = fail
        self.requests: list[TickRequest] = []
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def check_health(self) -> None:
        if not self.started:
            raise EngineError("not started")

    async def decide(self, requests: list[TickRequest]) -> list[Decision]:
        self.requests.extend(requests)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise EngineError("scripted failure")
        return [self.rule(r) for r in requests]

    def info(self) -> EngineInfo:
        return EngineInfo(engine="scripted", model="scripted-test-engine")


class LocalEngineHandle:
    """An Engine seen the way the gateway sees the interaction deployment (decide one, async info)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def decide(self, request: TickRequest) -> Decision:
        return (await self.engine.decide([request]))[0]

    async def info(self) -> EngineInfo:
        return self.engine.info()

    async def check_health(self) -> None:
        await self.engine.check_health()


def red_pixels(request: TickRequest) -> bool:
    """Whether the newest sample shows a red disc (many strongly red pixels)."""
    sample = request.samples[-1]
    rgb = np.frombuffer(sample.rgb, dtype=np.uint8).reshape(sample.height, sample.width, 3).astype(int)
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    return bool(red.mean() > 0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """A real uvicorn HTTP server on 127.0.0.1 in a thread with its own event loop."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class RecordingMemory:
    """A MemoryClient that records what it is given and answers `context` with the texts it holds; it can be
    made to fail its next calls (a lost replica) or to refuse an item (a bad one)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str, float]] = []
        self.keyframes: list[tuple[str, float, tuple[int, ...]]] = []
        self.queries: list[str | None] = []
        self.fail_next = 0
        self.refuse: set[str] = set()
        self.released: list[str] = []
        self.lookback: tuple[tuple[float, bytes], ...] = ()  # keyframes every context brings back

    def _maybe_fail(self) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ReplicaFailed("scripted replica loss")

    async def add(self, session_id: str, kind: str, text: str, stream_time: float) -> None:
        self._maybe_fail()
        if text in self.refuse:
            raise ValueError(f"refused {text!r}")
        self.items.append((session_id, kind, text, stream_time))

    async def add_keyframe(self, session_id: str, stream_time: float, image: np.ndarray, caption: str) -> None:
        self._maybe_fail()
        self.keyframes.append((session_id, stream_time, image.shape))

    async def context(self, session_id: str, query: str | None, k: int) -> MemoryContext:
        self._maybe_fail()
        self.queries.append(query)
        lines = tuple(f"at {t:.0f} s {kind}: {text}" for sid, kind, text, t in self.items if sid == session_id)
        return MemoryContext(lines=lines[-k:], keyframes=self.lookback)

    async def recall(self, session_id: str, question: str, k: int) -> tuple[str, ...]:
        return (await self.context(session_id, question, k)).lines

    async def release(self, session_id: str) -> None:
        self.released.append(session_id)

    async def check_health(self) -> None:
        self._maybe_fail()


def threaded_sample(sampler: FrameSampler) -> Callable[..., Any]:
    """A session loop's `sample` without Ray: the frame made and sampled (its pixels in the sample) in a worker
    thread, as the ingest's sampler does."""

    def made_and_sampled(to_rgb: Callable[[], np.ndarray], stream_time: float, previous: bytes | None,
                         due: bool) -> tuple[np.ndarray, SampleVerdict]:
        rgb = to_rgb()
        return rgb, sampler.sample(rgb, stream_time, previous, due)

    async def sample(to_rgb: Callable[[], np.ndarray], stream_time: float, previous: bytes | None,
                     due: bool) -> tuple[np.ndarray, SampleVerdict]:
        return await asyncio.to_thread(made_and_sampled, to_rgb, stream_time, previous, due)

    return sample
