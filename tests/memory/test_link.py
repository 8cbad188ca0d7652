"""A session's link to memory: writes land in order and survive a lost replica, a full queue drops and counts
rather than blocking a tick, refused items are not retried, prompt lines are cached between refreshes and a
memory failure never stops a tick; and the session loop writes what was said and seen, and puts memory
lines in the prompt."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from actors.common.messages import MemoryContext
from actors.common.metrics import VigilMetrics
from actors.memory.link import MemoryLinkSettings, MemoryWrite, SessionMemoryLink
from tests.fakes import RecordingMemory

pytestmark = pytest.mark.unit


def _count(metrics: VigilMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def _link(memory: RecordingMemory, **settings: float) -> tuple[SessionMemoryLink, VigilMetrics]:
    metrics = VigilMetrics()
    defaults = {"retry_for_s": 5.0, "timeout_s": 0.5} | settings
    return SessionMemoryLink("s1", memory, metrics, MemoryLinkSettings(**defaults)), metrics  # type: ignore[arg-type]


async def test_writes_land_in_order_across_a_lost_replica() -> None:
    memory = RecordingMemory()
    link, metrics = _link(memory)
    link.start()
    memory.fail_next = 3  # the replica dies; the next calls fail until a replacement answers
    for second in range(6):
        assert link.remember(MemoryWrite("user", f"note {second}", float(second)))
    await link.close()
    assert [text for _, _, text, _ in memory.items] == [f"note {s}" for s in range(6)]
    assert _count(metrics, "vigil_memory_writes_total", result="ok") == 6


async def test_a_full_queue_drops_and_counts_instead_of_blocking() -> None:
    memory = RecordingMemory()
    link, metrics = _link(memory, queue=3)
    # Not started: nothing drains, as when memory is slower than the stream.
    accepted = [link.remember(MemoryWrite("user", f"n{i}", float(i))) for i in range(5)]
    assert accepted == [True, True, True, False, False]
    assert _count(metrics, "vigil_memory_writes_total", result="dropped") == 2


async def test_refused_items_are_not_retried() -> None:
    memory = RecordingMemory()
    memory.refuse = {"bad"}
    link, metrics = _link(memory)
    link.start()
    link.remember(MemoryWrite("user", "bad", 1.0))
    link.remember(MemoryWrite("user", "good", 2.0))
    await link.close()
    assert [text for _, _, text, _ in memory.items] == ["good"]
    assert _count(metrics, "vigil_memory_writes_total", result="refused") == 1


async def test_writes_give_up_after_the_retry_window() -> None:
    memory = RecordingMemory()
    memory.fail_next = 10**6
    link, metrics = _link(memory, retry_for_s=0.5)
    link.start()
    link.remember(MemoryWrite("user", "lost", 1.0))
    await link.close(drain_timeout_s=3.0)
    assert memory.items == []
    assert _count(metrics, "vigil_memory_writes_total", result="failed") == 1


async def test_keyframes_carry_their_image() -> None:
    memory = RecordingMemory()
    link, _ = _link(memory)
    link.start()
    link.remember(MemoryWrite("keyframe", "a new scene", 3.0, np.zeros((24, 32, 3), np.uint8)))
    await link.close()
    assert memory.keyframes == [("s1", 3.0, (24, 32, 3))]


async def test_prompt_lines_are_cached_until_refresh_or_a_new_query() -> None:
    memory = RecordingMemory()
    memory.items.append(("s1", "user", "my keys are on the shelf", 5.0))
    link, _ = _link(memory, refresh_s=60.0)
    first = await link.context("watch the door")
    assert first.lines == ("at 5 s user: my keys are on the shelf",)
    memory.items.append(("s1", "user", "the cat came in", 6.0))
    assert await link.context("watch the door") is first, "cached: the prompt's memory block stays stable"
    assert len((await link.context("watch the door", fresh=True)).lines) == 2
    assert len((await link.context("where are my keys?")).lines) == 2
    assert memory.queries == ["watch the door", "watch the door", "where are my keys?"]


async def test_a_failing_memory_keeps_the_last_lines_and_counts() -> None:
    memory = RecordingMemory()
    memory.items.append(("s1", "user", "hello", 1.0))
    link, metrics = _link(memory, refresh_s=0.0)
    context = await link.context("q")
    memory.fail_next = 1
    assert await link.context("q") is context
    assert _count(metrics, "vigil_memory_errors_total", call="context") == 1


async def test_a_failed_memory_is_not_asked_again_for_a_while() -> None:
    """While a lost replica is replaced, the ticks after a failed fetch take the last lines at once (fresh or not)
    instead of each waiting for a memory that is not there; once the pause is over it is asked again."""
    memory = RecordingMemory()
    memory.items.append(("s1", "user", "hello", 1.0))
    link, metrics = _link(memory, refresh_s=0.0, retry_after_s=0.2)
    context = await link.context("q")
    memory.fail_next = 1
    assert await link.context("q") is context
    assert await link.context("another question", fresh=True) is context
    assert memory.queries == ["q"] and _count(metrics, "vigil_memory_errors_total", call="context") == 1
    await asyncio.sleep(0.25)
    assert (await link.context("another question")).lines == context.lines
    assert memory.queries == ["q", "another question"]


async def test_a_slow_memory_does_not_hold_the_tick() -> None:
    class Slow(RecordingMemory):
        async def context(self, session_id: str, query: str | None, k: int) -> MemoryContext:
            await asyncio.sleep(5)
            return MemoryContext()

    link, metrics = _link(Slow(), timeout_s=0.05)
    started = asyncio.get_running_loop().time()
    assert await link.context("q") == MemoryContext()
    assert asyncio.get_running_loop().time() - started < 1.0
    assert _count(metrics, "vigil_memory_errors_total", call="context") == 1
