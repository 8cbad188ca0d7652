"""One session's writes to its memory log in Redis, held while Redis is out of reach.

An item is logged before it is acknowledged. While Redis answers, that is one write, bounded by
`accept_timeout_s`. When it does not (stalled, restarting), the item is held instead, in id order, at most
`limit` of them, and acknowledged: the memory replica has it and it is searchable at once. One task writes the
held items, oldest first, with backoff, once Redis is back; new items queue behind them, so the log keeps id
order. A held item whose earlier write landed unanswered counts as written (`MemoryStore.append_again`), so none
is logged twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from actors.memory.store import LogEntry, MemoryStore, MemoryUnavailable, MemoryUnreachable

log = logging.getLogger(__name__)

BACKOFF_S = (0.2, 2.0)  # the first pause between attempts, and the longest


class ItemLog:
    """Owns one session's task that writes held items; `close` gives them a bounded time to land."""

    def __init__(self, session_id: str, store: MemoryStore, limit: int, accept_timeout_s: float) -> None:
        self.session_id = session_id
        self.store = store
        self.limit = limit
        self.accept_timeout_s = accept_timeout_s
        self._held: deque[LogEntry] = deque()
        self._writer: asyncio.Task[None] | None = None

    @property
    def held(self) -> int:
        """Items acknowledged whose log entry Redis has not taken yet."""
        return len(self._held)

    async def write(self, entry: LogEntry) -> None:
        """Log `entry`, or hold it while Redis is out of reach. Raises MemoryUnreachable when `limit` items are
        held already, MemoryUnavailable when Redis refuses it (another replica wrote this session's log since)."""
        if not self._held:
            try:
                await self.store.append(entry.item, entry.vector, entry.jpeg, timeout_s=self.accept_timeout_s)
                return
            except MemoryUnreachable as exc:
                log.warning("session %s: Redis out of reach (%s); items held from %d on", self.session_id, exc,
                            entry.item.id)
        if len(self._held) >= self.limit:
            raise MemoryUnreachable(f"session {self.session_id}: item {entry.item.id} not logged: Redis out of "
                                    f"reach and {len(self._held)} items already held")
        self._held.append(entry)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_held(), name=f"memory-log-{self.session_id}")

    async def _write_held(self) -> None:
        pause, started, landed = BACKOFF_S[0], time.monotonic(), 0
        while self._held:
            entry = self._held[0]
            try:
                await self.store.append_again(entry.item, entry.vector, entry.jpeg)
            except MemoryUnreachable:
                await asyncio.sleep(pause)
                pause = min(pause * 2, BACKOFF_S[1])
                continue
            except MemoryUnavailable as exc:
                # Another replica wrote this session's memory since (it moved): its log is the session's now.
                log.warning("session %s: %d held items not logged, the log moved on elsewhere: %s", self.session_id,
                            len(self._held), exc)
                self._held.clear()
                return
            self._held.popleft()
            landed += 1
            pause = BACKOFF_S[0]
        log.info("session %s: %d held items logged, %.1f s after the first was held", self.session_id, landed,
                 time.monotonic() - started)

    async def close(self, timeout_s: float) -> None:
        """Give held items `timeout_s` to land, then stop writing; what is left is lost (and logged)."""
        if self._writer is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._writer), timeout_s)
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        if self._held:
            log.warning("session %s: released with %d items Redis never took (out of reach); the next owner "
                        "restores without them", self.session_id, len(self._held))
