"""How far behind its schedule an event loop runs: a garbage collection, a busy core or a slow callback holds
every task back, and a time bound on a call to another service should not blame that service for it.

`LoopLag` sleeps a short period over and over and adds up how late each wake-up came; `behind_s()` is the lag
so far, including the wake-up that is due now but has not run yet. It watches the loop it is first asked from
(and a new one, should that loop be replaced)."""

from __future__ import annotations

import asyncio
import contextlib

PERIOD_S = 0.05  # how often the loop is looked at: a lag shorter than this is not worth counting


class LoopLag:
    """The running loop's accumulated lag, from an owned task started by `behind_s()` and ended by `stop()`."""

    def __init__(self, period_s: float = PERIOD_S) -> None:
        self.period_s = period_s
        self._late_s = 0.0
        self._wake_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def _watch_running_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._task is None or self._task.done():
            # Counting starts now: a loop held before the watching task first runs is behind all the same.
            self._loop, self._late_s, self._wake_at = loop, 0.0, loop.time() + self.period_s
            self._task = loop.create_task(self._watch(loop), name="vigil-loop-lag")
        return loop

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def behind_s(self) -> float:
        """Seconds the running loop has run behind since it was first asked about (a growing count)."""
        loop = self._watch_running_loop()
        return self._late_s + max(0.0, loop.time() - self._wake_at)

    async def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            await asyncio.sleep(max(0.0, self._wake_at - loop.time()))
            now = loop.time()
            self._late_s += max(0.0, now - self._wake_at)
            self._wake_at = now + self.period_s
