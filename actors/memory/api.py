"""The memory deployment's calls, as a plain class: each opens the session's memory on this replica first
(restoring it from Redis when this replica does not hold it yet), then reads or writes it.

`actors.memory.deployment.Memory` is this class on Ray Serve, with sessions routed to replicas by id; tests use it in
process as the `MemoryClient` of the ingest.
"""

from __future__ import annotations

import numpy as np

from actors.common.messages import MemoryContext
from actors.memory.service import MemoryService
from actors.memory.store import MemoryStore


class MemoryApi:
    def __init__(self, service: MemoryService, store: MemoryStore | None) -> None:
        self.service = service
        self.store = store

    async def add(self, session_id: str, kind: str, text: str, stream_time: float) -> None:
        await self.service.hold(session_id)
        await self.service.healing(session_id, lambda: self.service.add(session_id, kind, text, stream_time))

    async def add_keyframe(self, session_id: str, stream_time: float, image: np.ndarray, caption: str) -> None:
        await self.service.hold(session_id)
        await self.service.healing(
            session_id, lambda: self.service.add_keyframe(session_id, stream_time, image, caption)
        )

    async def context(self, session_id: str, query: str | None, k: int) -> MemoryContext:
        await self.service.hold(session_id)
        return await self.service.context(session_id, query, k)

    async def recall(self, session_id: str, question: str, k: int) -> tuple[str, ...]:
        await self.service.hold(session_id)
        return await self.service.recall(session_id, question, k)

    async def release(self, session_id: str) -> None:
        await self.service.release(session_id)

    async def check_health(self) -> None:
        if self.store is not None:
            await self.store.ping()

    async def close(self) -> None:
        """Stop the service's tasks and close the store (acknowledged items are already in Redis)."""
        await self.service.close()
        if self.store is not None:
            await self.store.close()
