"""Memory while its Redis is out of reach: items are still acknowledged and searchable, held in order (bounded)
and logged once Redis is back, so a restore elsewhere then has each of them once; a write that landed without
its reply is not logged twice; a full hold refuses the write (the ingest retries it); no snapshot trims the log
past items not logged yet."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from actors.common.embedded_redis import EmbeddedRedis
from actors.memory.embedder import HashingEmbedder
from actors.memory.service import MemoryService
from actors.memory.session import MemoryConfig
from actors.memory.store import MemoryStore, MemoryUnreachable
from actors.memory.tiers import MemoryItem

pytestmark = pytest.mark.unit

LOGGED_WITHIN_S = 5.0  # held items are in the log this soon after Redis is back (the backoff is at most 2 s)


class FlakyStore(MemoryStore):
    """A real store whose Redis can be out of reach (`down`), or apply a write and lose its reply."""

    down = False
    lost_replies = 0

    async def append(self, item: MemoryItem, vector: np.ndarray, jpeg: bytes | None = None,
                     timeout_s: float | None = None) -> None:
        if self.down:
            raise MemoryUnreachable(f"item {item.id} not logged: Redis out of reach")
        await super().append(item, vector, jpeg, timeout_s)
        if self.lost_replies:
            self.lost_replies -= 1
            raise MemoryUnreachable(f"item {item.id}: connection reset before the reply")


@pytest.fixture
async def flaky(redis_server: EmbeddedRedis, request: pytest.FixtureRequest):
    store = FlakyStore.from_url(redis_server.url, prefix=f"test:outage:{request.node.name}:", ttl_s=600)
    yield store
    await store.close()


async def _logged(store: MemoryStore, session_id: str) -> list[str]:
    _, _, entries = await store.load(session_id)
    return [entry.item.text for entry in entries]


async def _until_logged(store: MemoryStore, session_id: str, count: int) -> list[str]:
    deadline = time.monotonic() + LOGGED_WITHIN_S
    while len(texts := await _logged(store, session_id)) < count:
        assert time.monotonic() < deadline, f"only {len(texts)} of {count} items logged"
        await asyncio.sleep(0.05)
    return texts


async def test_items_taken_while_redis_is_out_are_logged_in_order_once_it_is_back(flaky: FlakyStore) -> None:
    embedder = HashingEmbedder()
    said = ["the van is blue", "a man carries a ladder", "the ladder leans on the wall", "the van drives off"]
    async with MemoryService(embedder, MemoryConfig(), flaky) as service:
        await service.create("out")
        await service.add("out", "caption", said[0], 1.0)
        flaky.down = True
        for second, text in enumerate(said[1:], start=2):
            await service.add("out", "caption", text, float(second))  # acknowledged all the same
        hits = await service.search("out", said[1], k=1)
        assert hits[0].item.text == said[1], "held items are searchable at once"
        assert await service.snapshot("out") is False, "no snapshot while items wait for the log"
        assert await _logged(flaky, "out") == said[:1]
        flaky.down = False
        assert await _until_logged(flaky, "out", len(said)) == said
    async with MemoryService(embedder, MemoryConfig(), flaky) as elsewhere:
        restored = await elsewhere.restore("out")
        assert [item.text for item in restored.items()] == said


async def test_a_write_that_landed_without_its_reply_is_logged_once(flaky: FlakyStore) -> None:
    embedder = HashingEmbedder()
    async with MemoryService(embedder, MemoryConfig(), flaky) as service:
        await service.create("replayed")
        flaky.lost_replies = 1
        await service.add("replayed", "user", "my keys are in the blue bowl", 3.0)
        await service.add("replayed", "caption", "a cat sits by the door", 4.0)
        texts = await _until_logged(flaky, "replayed", 2)
        await asyncio.sleep(0.3)
        assert await _logged(flaky, "replayed") == texts == ["my keys are in the blue bowl", "a cat sits by the door"]


async def test_a_full_hold_refuses_the_write(flaky: FlakyStore) -> None:
    async with MemoryService(HashingEmbedder(), MemoryConfig(unlogged_max=3), flaky) as service:
        await service.create("full")
        flaky.down = True
        for second in range(3):
            await service.add("full", "caption", f"frame {second}", float(second))
        with pytest.raises(MemoryUnreachable, match="3 items already held"):
            await service.add("full", "caption", "one too many", 3.0)
        flaky.down = False
        assert await _until_logged(flaky, "full", 3) == ["frame 0", "frame 1", "frame 2"]
