"""The `engine` brain backend: delegated questions answered by an interaction engine (a bigger model than the
one that watches), through the interaction role's client like any other caller.

The delegation becomes one tick request whose standing instruction is to answer the question, with its frames
as samples and its memories, and a speak threshold of 0, so the engine always words an answer; the response's
text is the answer. The brain does not import the engines: it is given the client's `decide` (and
`check_health`) by its deployment, which holds a handle to an interaction deployment of its own.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable

from PIL import Image

from actors.brain.backend import BackendError, BackendTimeout, BrainAnswer, BrainBackend
from actors.common.messages import Decision, DelegationFrame, DelegationRequest, Sample, TickRequest, Turn

Decide = Callable[[TickRequest], Awaitable[Decision]]
Health = Callable[[], Awaitable[None]]

INSTRUCTION = (
    "You are now the background assistant: the user asked the question below and you said you would look into "
    "it. Answer it fully now, with `</response>` and the answer, from the frames and the memory."
)


def frame_samples(frames: tuple[DelegationFrame, ...]) -> tuple[Sample, ...]:
    """JPEG frames as RGB samples (blocking: call it in a thread)."""
    samples = []
    for frame in frames:
        try:
            with Image.open(io.BytesIO(frame.jpeg)) as image:
                rgb = image.convert("RGB")
        except OSError as exc:
            raise BackendError(f"a frame of the delegation is not an image ({exc})") from None
        samples.append(Sample(stream_time=frame.stream_time, width=rgb.width, height=rgb.height, rgb=rgb.tobytes()))
    return tuple(samples)


class EngineBackend(BrainBackend):
    """Answers with an interaction engine's decision; `decide` is the interaction client's (or, in tests, an
    engine's own `decide_one`). The session id carries a `.brain` suffix, so an engine that keys state on it
    (a prefix cache, JoyAI's adapter) keeps the brain's prompts apart from the session's ticks."""

    name = "engine"

    def __init__(
        self, decide: Decide, health: Health | None = None, timeout_s: float = 120.0, max_frames: int = 8
    ) -> None:
        self._decide = decide
        self._health = health
        self.timeout_s = timeout_s
        self.max_frames = max(1, max_frames)

    async def solve(self, request: DelegationRequest) -> BrainAnswer:
        frames = request.frames[-self.max_frames:]
        if not frames:
            raise BackendError("the engine backend needs at least one frame of the stream")
        samples = await asyncio.to_thread(frame_samples, frames)
        now = samples[-1].stream_time
        instructions = (INSTRUCTION,) + ((f"You said: {request.note}",) if request.note else ())
        tick = TickRequest(
            session_id=f"{request.session_id}.brain",
            tick=0,
            stream_time=now,
            samples=samples,
            instructions=instructions,
            dialog=(Turn(role="user", text=request.question, stream_time=now),),
            memories=request.memories,
            speak_threshold=0.0,
            deadline=time.time() + self.timeout_s,
        )
        try:
            async with asyncio.timeout(self.timeout_s):
                decision = await self._decide(tick)
        except TimeoutError:
            raise BackendTimeout(f"the engine gave no answer within {self.timeout_s:.0f} s") from None
        except Exception as exc:
            raise BackendError(f"the engine could not answer ({type(exc).__name__}: {exc})"[:300]) from None
        text = decision.text.strip()
        if decision.kind == "silent" or not text:
            raise BackendError("the engine gave no answer")
        return BrainAnswer(text=text)

    async def check_health(self) -> None:
        if self._health is None:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._health()
        except Exception as exc:
            raise BackendError(f"the engine is not ready ({type(exc).__name__}: {exc})"[:300]) from None
