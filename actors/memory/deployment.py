"""The memory on Ray Serve, routed by session id, and its handle-side client for the ingest."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.common.config import VigilConfig
from actors.common.messages import MemoryContext
from actors.common.replicas import call_replica, session_affinity
from actors.memory.api import MemoryApi
from actors.memory.service import MemoryService
from actors.memory.session import MemoryConfig
from actors.memory.store import MemoryStore


# Each session's memory calls land on the replica its id hashes to, which holds (or restores) that memory.
@serve.deployment(max_ongoing_requests=512, graceful_shutdown_timeout_s=10, request_router_config=session_affinity())
class Memory(MemoryApi):
    """Session memories, MiniLM embeddings, persistence in Redis (see `actors.memory.api`)."""

    async def __init__(self, config: VigilConfig) -> None:
        from actors.memory.embedder import MiniLMEmbedder

        logging.basicConfig(level=logging.INFO)
        memory_config = MemoryConfig(ttl_s=config.session_ttl_s)
        embedder = await asyncio.to_thread(MiniLMEmbedder)
        self.summarizer = None
        if config.summary_model:
            from actors.memory.summary_model import ModelSummarizer

            self.summarizer = await asyncio.to_thread(ModelSummarizer, config.summary_model, config.summary_device)
        store = MemoryStore.from_config(config.redis_url or "", memory_config)
        super().__init__(MemoryService(embedder, memory_config, store, self.summarizer), store)

    async def ready(self) -> None:
        """Readiness: Redis answers (the ingest's /readyz asks, through `RemoteMemory.check_health`)."""
        await MemoryApi.check_health(self)

    async def check_health(self) -> None:
        """Liveness: the replica runs. Redis out of reach does not restart it (that would drop the items it holds
        for Redis, and every session's memory with them); `ready` reports it."""

    async def __del__(self) -> None:
        await self.close()
        if self.summarizer is not None:
            self.summarizer.close()


class RemoteMemory:
    """The memory deployment seen from the ingest: each call routed by session id; a lost replica is
    reported as ReplicaFailed so the caller retries (the replacement restores the session from Redis)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def _call(self, method: str, session_id: str, *args: Any) -> Any:
        routed = self.handle.options(session_id=session_id)
        return await call_replica(getattr(routed, method).remote(session_id, *args))

    async def add(self, session_id: str, kind: str, text: str, stream_time: float) -> None:
        await self._call("add", session_id, kind, text, stream_time)

    async def add_keyframe(self, session_id: str, stream_time: float, image: np.ndarray, caption: str) -> None:
        await self._call("add_keyframe", session_id, stream_time, image, caption)

    async def context(self, session_id: str, query: str | None, k: int) -> MemoryContext:
        return cast(MemoryContext, await self._call("context", session_id, query, k))

    async def recall(self, session_id: str, question: str, k: int) -> tuple[str, ...]:
        return tuple(await self._call("recall", session_id, question, k))

    async def release(self, session_id: str) -> None:
        await self._call("release", session_id)

    async def check_health(self) -> None:
        """Whether memory can serve: its replica answers and its Redis too (`Memory.ready`)."""
        await self.handle.ready.remote()
