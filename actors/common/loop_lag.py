"""How far behind its schedule an event loop runs: a garbage collection, a busy core or a slow callback holds
every task back, and a time bound on a call to another service should not blame that service for it.

While some code is `watching()`, a task sleeps a short period over and over and adds up how late each wake-up
came; `behind_s()` is the lag counted so far, including the wake-up that is due now but has not run yet. Nobody
watching, nothing runs: the loop pays only while a bound needs the count."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

PERIOD_S = 0.05  # how often the loop is looked at: a lag shorter than this is not worth counting


class LoopLag:
    """The running loop's accumulated lag while anyone watches it, from an owned task (ended by `stop()`)."""

    def __init__(self, period_s: float = PERIOD_S) -> None:
        self.period_s = period_s
        self._late_s = 0.0
        self._wake_at = 0.0
        self._watchers = 0
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Count the loop's lag for as long as the block lasts (the count is shared by every block at once)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            # Counting starts now: a loop held before the watching task first runs is behind all the same.
            self._watchers, self._wake_at = 0, loop.time() + self.period_s
            self._task = loop.create_task(self._watch(loop), name="vigil-loop-lag")
        self._watchers += 1
        try:
            yield
        finally:
            self._watchers -= 1  # the last one out: the task ends at its next wake-up

    def behind_s(self) -> float:
        """Seconds the loop has run behind while watched (a growing count)."""
        if self._task is None or self._task.done():
            return self._late_s
        return self._late_s + max(0.0, self._task.get_loop().time() - self._wake_at)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            await asyncio.sleep(max(0.0, self._wake_at - loop.time()))
            now = loop.time()
            self._late_s += max(0.0, now - self._wake_at)
            self._wake_at = now + self.period_s
            if self._watchers == 0:
                return
