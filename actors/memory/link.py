"""A session's link to its memory, seen from the session loop: writes that never hold up a tick, the memory
lines of a tick's prompt, and recall ("what happened at 10:30?") with times.

Writes go through a bounded queue drained by one task, in order; a write that meets a lost memory replica is
retried until a replacement (which restores the session from Redis) takes it, so an outage of a few seconds
loses nothing. Prompt lines are cached between refreshes: the memory block of the prompt then changes only
every `refresh_s` or when a question arrives, which keeps the engine's prefix cache warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from actors.common.messages import MemoryContext
from actors.common.metrics import VigilMetrics

log = logging.getLogger(__name__)


class MemoryClient(Protocol):
    """What the ingest calls on the memory deployment (`actors.memory.deployment.RemoteMemory`, or a `MemoryService`
    wrapped for tests). Every call opens the session's memory where it lands, restoring it if needed."""

    async def add(self, session_id: str, kind: str, text: str, stream_time: float) -> None: ...

    async def add_keyframe(self, session_id: str, stream_time: float, image: np.ndarray, caption: str) -> None: ...

    async def context(self, session_id: str, query: str | None, k: int) -> MemoryContext: ...

    async def recall(self, session_id: str, question: str, k: int) -> tuple[str, ...]: ...

    async def release(self, session_id: str) -> None: ...

    async def check_health(self) -> None: ...


@dataclass(frozen=True, slots=True)
class MemoryWrite:
    """One thing to remember: a response, a user message, a background result, or a keyframe (`image`)."""

    kind: str
    text: str
    stream_time: float
    image: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class MemoryLinkSettings:
    top_k: int = 8
    timeout_s: float = 0.5
    refresh_s: float = 30.0
    # After a failed or late fetch, ticks take the last lines without asking for this long: while a lost replica
    # is replaced (seconds), each tick would otherwise wait `timeout_s` for nothing.
    retry_after_s: float = 5.0
    queue: int = 256
    write_timeout_s: float = 5.0
    # A lost memory replica's replacement takes its writes once it has started and restored the session: 12-25 s
    # on a loaded 2-core node (a write given up after 20 s was lost there). Writes queue behind it meanwhile.
    retry_for_s: float = 120.0


class SessionMemoryLink:
    """Owns one session's memory writer task; `close()` drains what is queued (bounded) and cancels it."""

    def __init__(
        self,
        session_id: str,
        client: MemoryClient,
        metrics: VigilMetrics,
        settings: MemoryLinkSettings | None = None,
    ) -> None:
        self.session_id = session_id
        self.client = client
        self.metrics = metrics
        self.settings = settings or MemoryLinkSettings()
        self._queue: asyncio.Queue[MemoryWrite] = asyncio.Queue(maxsize=self.settings.queue)
        self._writer: asyncio.Task[None] | None = None
        self._context = MemoryContext()
        self._query: str | None = None
        self._fetched_at = float("-inf")
        self._ask_again_at = float("-inf")  # time.monotonic() before which a failed memory is not asked again
        self.written = 0

    def start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain(), name=f"memory-writer-{self.session_id}")

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        """Give queued writes `drain_timeout_s` to land, then stop the writer."""
        if self._writer is None:
            return
        if not self._queue.empty():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), drain_timeout_s)
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        left = self._queue.qsize()
        if left:
            self.metrics.memory_writes_total.labels(result="dropped").inc(left)
            log.warning("session %s: %d memory writes not delivered at close", self.session_id, left)

    # -- writing ---------------------------------------------------------------------------------------------

    def remember(self, write: MemoryWrite) -> bool:
        """Queue a write without waiting; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(write)
        except asyncio.QueueFull:
            self.metrics.memory_writes_total.labels(result="dropped").inc()
            return False
        return True

    async def _drain(self) -> None:
        while True:
            write = await self._queue.get()
            try:
                result = await self._deliver(write)
                self.metrics.memory_writes_total.labels(result=result).inc()
                if result == "ok":
                    self.written += 1
            finally:
                self._queue.task_done()

    async def _deliver(self, write: MemoryWrite) -> str:
        deadline = time.monotonic() + self.settings.retry_for_s
        pause = 0.2
        while True:
            try:
                await asyncio.wait_for(self._send(write), self.settings.write_timeout_s)
                return "ok"
            except asyncio.CancelledError:
                raise
            except ValueError as exc:  # refused by memory (too large, malformed): retrying cannot help
                log.warning("session %s: memory refused a %s: %s", self.session_id, write.kind, exc)
                return "refused"
            except Exception as exc:
                # A lost or stuck replica, or Redis away for a moment: Serve routes the retry to a survivor or
                # to the replacement, which restores the session from Redis first.
                if time.monotonic() + pause > deadline:
                    log.warning("session %s: memory write lost after retries: %r", self.session_id, exc)
                    return "failed"
                log.debug("session %s: memory write retried: %r", self.session_id, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _send(self, write: MemoryWrite) -> None:
        if write.image is not None:
            await self.client.add_keyframe(self.session_id, write.stream_time, write.image, write.text)
        else:
            await self.client.add(self.session_id, write.kind, write.text, write.stream_time)

    # -- reading ---------------------------------------------------------------------------------------------

    async def context(self, query: str | None, fresh: bool = False) -> MemoryContext:
        """The memory of a tick's prompt for `query`; cached for `refresh_s` unless `fresh` or the query
        changed. On a memory failure the tick goes on with what it had, and so do the ticks of the next
        `retry_after_s`."""
        now = time.monotonic()
        if not fresh and query == self._query and now - self._fetched_at < self.settings.refresh_s:
            return self._context
        if now < self._ask_again_at:
            return self._context
        try:
            context = await asyncio.wait_for(
                self.client.context(self.session_id, query, self.settings.top_k), self.settings.timeout_s
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.metrics.memory_errors_total.labels(call="context").inc()
            log.debug("session %s: no fresh memory this tick: %r", self.session_id, exc)
            self._ask_again_at = time.monotonic() + self.settings.retry_after_s
            return self._context
        self._context, self._query, self._fetched_at = context, query, now
        return context

    async def recall(self, question: str, k: int = 5, timeout_s: float = 5.0) -> tuple[str, ...]:
        """What memory holds on `question`, with times; raises on failure (the caller tells the user)."""
        try:
            return tuple(await asyncio.wait_for(self.client.recall(self.session_id, question, k), timeout_s))
        except Exception:
            self.metrics.memory_errors_total.labels(call="recall").inc()
            raise
