"""What the brain's tests share: real JPEG frames, delegations, a sink that records results, and a backend
whose answers a test releases one by one (a fake of the brain's own interface, for timing-exact tests)."""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from collections.abc import Callable

from PIL import Image

from actors.brain.backend import BackendError, BrainAnswer, BrainBackend
from actors.common.messages import DelegationFrame, DelegationRequest, DelegationResult


def jpeg(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG", quality=85)
    return out.getvalue()


def delegation(
    session_id: str = "s_a", delegation_id: str = "d1", question: str = "what do the prices add up to?",
    frames: int = 2, note: str = "Let me check the prices.", memories: tuple[str, ...] = (),
) -> DelegationRequest:
    return DelegationRequest(
        session_id=session_id, delegation_id=delegation_id, question=question, note=note,
        frames=tuple(DelegationFrame(stream_time=10.0 + index, jpeg=jpeg((40 * index, 90, 160)))
                     for index in range(frames)),
        memories=memories, stream_time=10.0 + frames,
    )


class Results:
    """A sink: every result it is given, in order."""

    def __init__(self) -> None:
        self.items: list[DelegationResult] = []
        self._changed = asyncio.Event()

    async def __call__(self, result: DelegationResult) -> None:
        self.items.append(result)
        self._changed.set()

    async def wait(self, count: int, timeout: float = 5.0) -> list[DelegationResult]:
        async with asyncio.timeout(timeout):
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.items

    def of(self, delegation_id: str, session_id: str = "s_a") -> DelegationResult:
        [result] = [r for r in self.items if (r.session_id, r.delegation_id) == (session_id, delegation_id)]
        return result

    def assert_one_each(self) -> None:
        counts = Counter((r.session_id, r.delegation_id) for r in self.items)
        assert all(count == 1 for count in counts.values()), counts


class GatedBackend(BrainBackend):
    """Answers a delegation when the test opens its gate (`release`); records the order calls started in and
    the calls that were cancelled. `fail` maps delegation ids to the exception their call raises."""

    name = "gated"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.answers: dict[str, BrainAnswer] = {}
        self.fail: dict[str, BaseException] = {}
        self._gates: dict[str, asyncio.Event] = {}
        self.closed = False

    def _gate(self, delegation_id: str) -> asyncio.Event:
        return self._gates.setdefault(delegation_id, asyncio.Event())

    def release(self, *delegation_ids: str) -> None:
        for delegation_id in delegation_ids:
            self._gate(delegation_id).set()

    async def solve(self, request: DelegationRequest) -> BrainAnswer:
        key = f"{request.session_id}/{request.delegation_id}"
        self.started.append(key)
        try:
            await self._gate(key).wait()
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        if key in self.fail:
            raise self.fail[key]
        return self.answers.get(key, BrainAnswer(text=f"The answer to {request.question}"))

    async def check_health(self) -> None:
        if self.closed:
            raise BackendError("closed")

    async def close(self) -> None:
        self.closed = True


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait for `condition` (state that a server thread, or several tasks, change), polling."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 (no one event says it: the state is written in other threads)
            await asyncio.sleep(0.005)


async def settle() -> None:
    """Let every ready task run (a few loop turns)."""
    for _ in range(5):
        await asyncio.sleep(0)
