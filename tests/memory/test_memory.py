"""Session memory over a 12-hour stream: distinctive events are found again hours later by paraphrased
questions (real MiniLM embeddings), "what happened at …?" and "when did I last see …?" get answers with times,
nothing outlives the horizon, summaries land in order without holding up a single add, keyframes come back,
a replica loss in a real Redis loses nothing acknowledged, and bad input gets a clear error."""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from collections.abc import Sequence

import numpy as np
import pytest
import redis
from PIL import Image

from actors.common.embedded_redis import EmbeddedRedis
from actors.common.stream_time import clock
from actors.memory.api import MemoryApi
from actors.memory.embedder import CachingEmbedder, EmbedderBusy, EmbeddingBatcher, HashingEmbedder
from actors.memory.service import MemoryService
from actors.memory.session import (
    BadItem,
    BadQuery,
    ItemTooLarge,
    MemoryConfig,
    MemoryRequestError,
    SessionMemory,
    UnknownSession,
    parse_clock,
)
from actors.memory.store import MemoryStore, MemoryUnavailable, encode_snapshot
from actors.memory.tiers import MemoryItem, Summarizer, extract_summary
from bench.memory_bench import KEYS_CAPTION, KEYS_QUESTION, NEEDLES, Stream, synthetic_stream, workload_texts

pytestmark = pytest.mark.unit

TWELVE_HOURS = 43_200


@pytest.fixture(scope="module")
def twelve_hours(minilm: CachingEmbedder) -> tuple[SessionMemory, Stream, float]:
    """One caption a second for 12 hours through the service, with the default tiers and summary task.

    Captions come from a template vocabulary, so their vectors are embedded once (batched) and cached; the
    needles, the questions and every summary go through MiniLM for real.
    """
    stream = synthetic_stream(TWELVE_HOURS, seed=7)
    minilm.warm(workload_texts())

    async def feed() -> tuple[SessionMemory, float]:
        service = MemoryService(minilm)
        memory = await service.create("twelve-hours")
        slowest = 0.0
        for second, caption in enumerate(stream.captions):
            if second % 1000 == 0:
                # The stream runs thousands of times faster than real time; the summary task gets the time
                # that five chunks of real stream would give it.
                async with asyncio.timeout(60):
                    await service.wait_summaries("twelve-hours")
            started = time.perf_counter()
            await service.add("twelve-hours", "caption", caption, float(second))
            slowest = max(slowest, time.perf_counter() - started)
        async with asyncio.timeout(180):
            await service.wait_summaries("twelve-hours")
        await service.close()
        return memory, slowest

    memory, slowest = asyncio.run(feed())
    return memory, stream, slowest


def needle_hit(memory: SessionMemory, question: str, needle: str, second: int, k: int = 5) -> bool:
    hits = memory.search(question, k=k)
    return any(hit.item.text == needle and hit.item.stream_time == second for hit in hits)


def test_needles_are_found_hours_later_by_paraphrased_questions(twelve_hours) -> None:
    memory, stream, _ = twelve_hours
    found = [
        needle_hit(memory, NEEDLES[index][1], NEEDLES[index][0], second)
        for index, second in stream.needle_times.items()
    ]
    missed = [NEEDLES[i][1] for i, ok in zip(stream.needle_times, found, strict=True) if not ok]
    assert sum(found) / len(found) >= 0.95, f"recall@5 {sum(found)}/{len(found)}; missed {missed}"


def test_twelve_hours_are_all_held_with_their_tiers(twelve_hours) -> None:
    memory, _, slowest = twelve_hours
    stats = memory.stats()
    assert stats.evicted == 0 and stats.newest_time == TWELVE_HOURS - 1
    captions = [item for item in memory.items() if item.kind == "caption"]
    assert len(captions) == TWELVE_HOURS
    # 216 chunks of 200 s; the last one is still open. Every five summaries became one block.
    assert stats.owed_summaries == 0 and stats.merged_summaries == 0
    assert stats.blocks == 43 and stats.mid_term == 0
    assert stats.index_bytes < 64 * 2**20
    assert len(memory.tier_lines()) == 43 and memory.tier_lines()[0].startswith("from 00:00:00 to 00:16:40: ")
    assert slowest < 1.0, f"one add took {slowest:.2f} s"


def test_summaries_and_blocks_landed_in_stream_order(twelve_hours) -> None:
    memory, _, _ = twelve_hours
    summaries = [item for item in memory.items() if item.kind == "summary"]
    blocks = [item for item in memory.items() if item.kind == "block"]
    assert [s.seq for s in summaries] == list(range(215))
    assert [(s.stream_time, s.end_time) for s in summaries] == [
        (200.0 * i, 200.0 * (i + 1)) for i in range(215)
    ]
    assert [b.seq for b in blocks] == list(range(4, 215, 5))
    assert [(b.stream_time, b.end_time) for b in blocks] == [
        (1000.0 * i, 1000.0 * (i + 1)) for i in range(43)
    ]
    # Each block was written after the five summaries it folds, and before the next one.
    for block in blocks:
        folded = [s for s in summaries if block.stream_time <= s.stream_time < block.end_time]
        assert len(folded) == 5 and all(s.id < block.id for s in folded)


def test_when_did_i_last_see_my_keys(twelve_hours) -> None:
    memory, stream, _ = twelve_hours
    hits = [hit for hit in memory.search(KEYS_QUESTION, k=5) if hit.item.text == KEYS_CAPTION]
    assert hits, "the keys caption is not among the top 5"
    last, first = max(stream.keys_times), min(stream.keys_times)
    assert hits[0].item.stream_time == last and hits[0].count == 3 and hits[0].first_time == first
    line = f"at {clock(last)} you saw {KEYS_CAPTION} (3 times since {clock(first)})"
    assert line in memory.prompt_lines(KEYS_QUESTION, k=5)


def test_what_happened_at_a_time(twelve_hours) -> None:
    memory, stream, _ = twelve_hours
    index, second = next(iter(stream.needle_times.items()))
    lines = memory.prompt_lines(f"what happened at {clock(second)}?")
    assert f"at {clock(second)} you saw {NEEDLES[index][0]}" in lines
    covering = [line for line in lines if line.startswith("from ")]
    assert covering, "no summary covers the moment"
    around = memory.at(float(second), window=5.0)
    assert [i.stream_time for i in around if i.kind == "caption"] == [
        float(t) for t in range(second - 5, second + 6)
    ]


def test_retrieved_lines_carry_their_times_in_stream_order(twelve_hours) -> None:
    memory, stream, _ = twelve_hours
    index, second = list(stream.needle_times.items())[3]
    lines = memory.prompt_lines(NEEDLES[index][1], k=5)
    assert f"at {clock(second)} you saw {NEEDLES[index][0]}" in lines
    times = [parse_clock(line) for line in lines]
    assert times == sorted(times) and all(t is not None for t in times)


def test_parse_clock() -> None:
    assert parse_clock("what happened at 10:30?") == 10 * 3600 + 30 * 60
    assert parse_clock("at 02:14:07 you saw a dog") == 2 * 3600 + 14 * 60 + 7
    assert parse_clock("what happened at 10:30?", newest_time=3000.0) == 630.0  # a short stream: mm:ss
    assert parse_clock("anything unusual at the door?") is None


# -- eviction ------------------------------------------------------------------------------------------------


async def test_nothing_outlives_the_horizon() -> None:
    config = MemoryConfig(
        horizon_s=1000, chunk_s=50, summaries_per_block=3, evict_slack_s=20, max_keyframes=50
    )
    async with MemoryService(HashingEmbedder(), config) as service:
        memory = await service.create("evict")
        frame = np.zeros((48, 64, 3), np.uint8)
        early = await service.add_keyframe("evict", 10.0, frame, "a red door opens")
        for second in range(4000):
            await service.add("evict", "caption", f"a person walks past door {second % 7}", float(second))
        await service.add("evict", "user", "is the red door open?", 3999.5)
        await service.wait_summaries("evict")
        cutoff = memory.newest_time - config.horizon_s
        held = memory.items()
        assert min(i.end_time for i in held) >= cutoff - config.evict_slack_s
        assert len(held) < 1000 + 20 + 2 * (1000 // 50) + 10
        assert memory.get(early.id) is None and memory.keyframe(early.id) is None
        assert memory.keyframe_at(100.0) is None
        # Between batches, items past the horizon are already invisible to every query.
        for hit in memory.search("a person walks past door 3", k=20):
            assert hit.item.end_time >= cutoff
            assert hit.first_time >= cutoff or hit.item.kind in ("summary", "block")  # spans may start before
        assert memory.at(500.0, window=100.0) == []
        assert await service.search("evict", "door", time_range=(0.0, 2000.0)) == []
        assert all(line.startswith("from ") for line in memory.tier_lines())
        assert memory.stats().blocks <= 8 and memory.stats().evicted > 2900
        assert memory.evict_before(memory.newest_time) > 0
        assert memory.search("door", k=5, kinds=["caption", "keyframe"]) == []


# -- summaries -----------------------------------------------------------------------------------------------


class GatedSummarizer(Summarizer):
    """Holds every summary until the gate opens; records what it was asked, in order."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[tuple[str, float, float]] = []

    async def summarize(self, items: Sequence[MemoryItem]) -> str:
        await self.gate.wait()
        self.calls.append((items[0].kind, items[0].stream_time, items[-1].end_time))
        return f"{len(items)} things from {clock(items[0].stream_time)}"


async def test_summaries_land_in_order_and_never_hold_up_adds() -> None:
    config = MemoryConfig(chunk_s=10, summaries_per_block=3, summary_queue=4)
    summarizer = GatedSummarizer()
    async with MemoryService(HashingEmbedder(), config, summarizer=summarizer) as service:
        memory = await service.create("order")
        slowest = 0.0
        for second in range(200):
            started = time.perf_counter()
            await service.add("order", "caption", f"scene {second // 10}", float(second))
            slowest = max(slowest, time.perf_counter() - started)
        # The summarizer is stuck, the adds were not; what is owed stays bounded and nothing is dropped.
        assert slowest < 0.5 and summarizer.calls == []
        assert memory.owed_summaries <= config.summary_queue and memory.stats().merged_summaries > 0
        summarizer.gate.set()
        async with asyncio.timeout(10):
            await service.wait_summaries("order")
    summaries = [i for i in memory.items() if i.kind == "summary"]
    blocks = [i for i in memory.items() if i.kind == "block"]
    assert [s.seq for s in summaries] == sorted(s.seq for s in summaries)
    spans = [(s.stream_time, s.end_time) for s in summaries]
    assert spans[0][0] == 0.0 and spans[-1][1] == 190.0  # the open chunk (190-200 s) is not summarised yet
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), spans
    summary_calls = [c for c in summarizer.calls if c[0] == "caption"]
    assert [c[1] for c in summary_calls] == [s[0] for s in spans]
    assert blocks and blocks[0].stream_time == 0.0 and blocks[0].end_time == spans[2][1]
    assert all(s.id < blocks[0].id for s in summaries[:3])


class BrokenSummarizer(Summarizer):
    async def summarize(self, items: Sequence[MemoryItem]) -> str:
        raise RuntimeError("summary engine is down")


async def test_a_failing_summarizer_falls_back_to_extracts() -> None:
    config = MemoryConfig(chunk_s=10, summaries_per_block=2)
    async with MemoryService(HashingEmbedder(), config, summarizer=BrokenSummarizer()) as service:
        memory = await service.create("fallback")
        for second in range(45):
            await service.add("fallback", "caption", f"a cat sleeps on chair {second // 10}", float(second))
        await service.add("fallback", "user", "is the cat still asleep?", 45.0)
        await service.wait_summaries("fallback")
    summaries = [i for i in memory.items() if i.kind == "summary"]
    assert [s.text for s in summaries] == [f"a cat sleeps on chair {n}" for n in range(4)]
    assert len(memory.tier_lines()) == 2  # two blocks of two summaries each, written from extracts too
    assert extract_summary(memory.at(45.0, 0.1)) == 'the user said "is the cat still asleep?"'


# -- keyframes -----------------------------------------------------------------------------------------------


def _jpeg_size(data: bytes) -> tuple[int, int]:
    picture = Image.open(io.BytesIO(data))
    assert picture.format == "JPEG"
    return picture.size


async def test_keyframes_come_back_small_by_time_and_by_search() -> None:
    config = MemoryConfig(max_keyframes=2)
    async with MemoryService(HashingEmbedder(), config) as service:
        await service.create("frames")
        frame = np.zeros((480, 640, 3), np.uint8)
        frame[:, :320] = (200, 30, 30)
        first = await service.add_keyframe("frames", 5.0, frame, "a red wall on the left")
        png = io.BytesIO()
        Image.fromarray(frame[:, ::-1].copy()).save(png, format="PNG")
        second = await service.add_keyframe("frames", 65.0, png.getvalue(), "a red wall on the right")
        jpeg = await service.keyframe("frames", first.id)
        assert jpeg is not None and _jpeg_size(jpeg) == (160, 120) and len(jpeg) < 10_000
        scene = await service.keyframe_at("frames", 60.0)
        assert scene is not None and scene[0].id == first.id and scene[1] == jpeg
        hits = await service.search("frames", "red wall on the right", k=1, kinds=["keyframe"])
        assert hits[0].item.id == second.id and hits[0].item.keyframe == second.id
        third = await service.add_keyframe("frames", 125.0, frame, "a red wall again")
        # Bounded: the oldest JPEG went; its caption is still a memory.
        assert await service.keyframe("frames", first.id) is None
        assert service.get("frames").get(first.id).keyframe is None
        assert await service.keyframe("frames", third.id) is not None


# -- persistence ---------------------------------------------------------------------------------------------


@pytest.fixture
async def store(redis_server: EmbeddedRedis, request: pytest.FixtureRequest):
    prefix = f"test:memory:{request.node.name}:"
    memory_store = MemoryStore.from_url(redis_server.url, prefix=prefix, ttl_s=600)
    yield memory_store
    await memory_store.close()


async def _feed(service: MemoryService, session_id: str, seconds: range) -> list[MemoryItem]:
    acknowledged = []
    for second in seconds:
        acknowledged.append(await service.add(session_id, "caption", f"shelf {second % 13} is empty", second))
        if second % 50 == 7:
            acknowledged.append(
                await service.add(session_id, "user", f"anything on shelf {second % 13}?", second)
            )
            acknowledged.append(
                await service.add(session_id, "response", f"shelf {second % 13} is bare", second)
            )
        if second % 120 == 0:
            frame = np.full((60, 80, 3), second % 255, np.uint8)
            acknowledged.append(await service.add_keyframe(session_id, second, frame, f"aisle {second}"))
    return acknowledged


QUERIES = ("is shelf 4 empty?", "what did the user ask about shelf 9?", "aisle")


async def _answers(service: MemoryService, session_id: str) -> list:
    memory = service.get(session_id)
    results = [await service.search(session_id, query, k=10) for query in QUERIES]
    return [
        memory.items(),
        results,
        memory.tier_lines(),
        [memory.keyframe(i) for i in range(1, memory.last_id + 1)],
    ]


async def test_restore_after_replica_loss_answers_identically(
    store: MemoryStore, redis_server: EmbeddedRedis
) -> None:
    config = MemoryConfig(chunk_s=20, summaries_per_block=3, snapshot_every=10**6)
    embedder = HashingEmbedder()
    lost = MemoryService(embedder, config, store)
    await lost.create("shop")
    await _feed(lost, "shop", range(300))
    assert await lost.snapshot("shop")
    await _feed(lost, "shop", range(300, 600))
    await lost.wait_summaries("shop")
    assert await lost.snapshot("shop")
    await _feed(lost, "shop", range(600, 700))  # the log tail past the last snapshot
    await lost.wait_summaries("shop")
    before = await _answers(lost, "shop")
    # The lost replica never says goodbye: the survivor restores while it is still "running".
    async with MemoryService(embedder, config, store) as survivor:
        started = time.perf_counter()
        await survivor.restore("shop")
        assert time.perf_counter() - started < 3.0
        assert await _answers(survivor, "shop") == before
    client = redis.Redis.from_url(redis_server.url)
    assert 0 < client.xlen(store.key("shop", "log")) < 150, "the snapshot did not trim the log"
    assert 0 < client.ttl(store.key("shop", "snapshot")) <= 600
    await lost.close()


async def test_snapshots_are_taken_in_the_background(store: MemoryStore) -> None:
    config = MemoryConfig(snapshot_every=50)
    async with MemoryService(HashingEmbedder(), config, store) as service:
        await service.create("auto")
        await _feed(service, "auto", range(120))
        for _ in range(100):
            if (await store.load("auto"))[1] >= 100:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("no snapshot within 5 s")


async def test_nothing_acknowledged_is_lost_when_the_snapshot_is_older_than_the_log(
    store: MemoryStore, redis_server: EmbeddedRedis
) -> None:
    config = MemoryConfig(chunk_s=30, snapshot_every=10**6)
    embedder = HashingEmbedder()
    lost = MemoryService(embedder, config, store)
    memory = await lost.create("aisle")
    acknowledged = await _feed(lost, "aisle", range(200))
    old_state = memory.export_state()
    acknowledged += await _feed(lost, "aisle", range(200, 420))
    await lost.wait_summaries("aisle")
    before = await _answers(lost, "aisle")
    # A snapshot written but never followed by its trim: the log still holds everything before it too.
    client = redis.Redis.from_url(redis_server.url)
    client.set(store.key("aisle", "snapshot"), encode_snapshot(old_state))
    client.set(store.key("aisle", "snapshot_id"), old_state["last_id"])
    async with MemoryService(embedder, config, store) as survivor:
        restored = await survivor.restore("aisle")
        held = {item.id for item in restored.items()}
        assert {item.id for item in acknowledged} <= held
        assert await _answers(survivor, "aisle") == before
    await lost.close()


async def test_summaries_owed_by_a_lost_replica_are_written_by_the_next(store: MemoryStore) -> None:
    config = MemoryConfig(chunk_s=10, summaries_per_block=5)
    embedder = HashingEmbedder()
    stuck = GatedSummarizer()
    lost = MemoryService(embedder, config, store, summarizer=stuck)
    await lost.create("owed")
    for second in range(35):
        await lost.add("owed", "caption", f"a van is parked in bay {second // 10}", float(second))
    assert lost.get("owed").owed_summaries == 3
    await lost.close()
    async with MemoryService(embedder, config, store) as survivor:
        memory = await survivor.restore("owed")
        await survivor.wait_summaries("owed")
        summaries = [i for i in memory.items() if i.kind == "summary"]
        assert [(s.seq, s.text) for s in summaries] == [(n, f"a van is parked in bay {n}") for n in range(3)]


async def test_a_stale_owner_cannot_write_after_the_session_moved(store: MemoryStore) -> None:
    embedder = HashingEmbedder()
    stale = MemoryService(embedder, MemoryConfig(), store)
    await stale.create("moved")
    await stale.add("moved", "caption", "a bike leans on the wall", 1.0)
    async with MemoryService(embedder, MemoryConfig(), store) as owner:
        await owner.open("moved")
        await owner.add("moved", "caption", "the bike is gone", 2.0)
        with pytest.raises(MemoryUnavailable, match="not logged"):
            await stale.add("moved", "caption", "a bike leans on the wall", 3.0)
        assert [i.text for i in owner.get("moved").items()] == [
            "a bike leans on the wall",
            "the bike is gone",
        ]
    await stale.close()


async def test_restore_refuses_another_embedding_space(store: MemoryStore) -> None:
    async with MemoryService(HashingEmbedder(384), MemoryConfig(), store) as first:
        await first.create("space")
        await first.add("space", "caption", "a lamp is on", 1.0)
        await first.snapshot("space")
    async with MemoryService(HashingEmbedder(128), MemoryConfig(), store) as other:
        with pytest.raises(ValueError, match="HashingEmbedder-384"):
            await other.restore("space")


# -- bad input -----------------------------------------------------------------------------------------------


async def test_unknown_sessions_are_refused(store: MemoryStore) -> None:
    async with MemoryService(HashingEmbedder(), MemoryConfig(), store) as service:
        with pytest.raises(UnknownSession, match="nowhere"):
            await service.search("nowhere", "anything?")
        with pytest.raises(UnknownSession):
            await service.add("nowhere", "caption", "a dog", 1.0)
        with pytest.raises(UnknownSession, match="no stored memory"):
            await service.restore("nowhere")
        await service.create("here")
        with pytest.raises(MemoryRequestError, match="already has memory"):
            await service.create("here")
        await service.forget("here")
        with pytest.raises(UnknownSession):
            await service.at("here", 1.0)


async def test_oversized_and_malformed_items_are_refused() -> None:
    config = MemoryConfig(max_text_chars=100, max_image_bytes=50_000)
    async with MemoryService(HashingEmbedder(), config) as service:
        await service.create("strict")
        with pytest.raises(ItemTooLarge, match="101 characters, over the 100 limit"):
            await service.add("strict", "caption", "x" * 101, 1.0)
        with pytest.raises(ItemTooLarge, match="bytes, over the 50000-byte limit"):
            await service.add_keyframe("strict", 1.0, np.zeros((200, 200, 3), np.uint8))
        with pytest.raises(BadItem, match="keyframe image not usable"):
            await service.add_keyframe("strict", 1.0, b"not an image")
        with pytest.raises(BadItem, match="cannot be added"):
            await service.add("strict", "summary", "a forged summary", 1.0)
        with pytest.raises(BadItem, match="empty"):
            await service.add("strict", "caption", "   ", 1.0)
        for bad_time in (float("nan"), -1.0, float("inf"), "10"):
            with pytest.raises(BadItem, match="stream time"):
                await service.add("strict", "caption", "a dog", bad_time)  # type: ignore[arg-type]
        with pytest.raises(BadQuery, match="session id"):
            await service.add("../etc", "caption", "a dog", 1.0)
        assert len(service.get("strict")) == 0
    memory = SessionMemory("plain", HashingEmbedder())
    with pytest.raises(BadItem, match="not above"):
        memory.add_many([MemoryItem(0, "plain", 1.0, "caption", "a dog")])
    with pytest.raises(BadItem, match="unknown kind"):
        memory.add(MemoryItem(1, "plain", 1.0, "gossip", "a dog"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("query", "k", "kinds", "time_range", "message"),
    [
        ("", 5, None, None, "query is empty"),
        ("   ", 5, None, None, "query is empty"),
        ("q" * 1001, 5, None, None, "1001 characters"),
        ("a dog?", 0, None, None, "k must be"),
        ("a dog?", 101, None, None, "k must be"),
        ("a dog?", "5", None, None, "k must be"),
        ("a dog?", 5, ["gossip"], None, "unknown kinds"),
        ("a dog?", 5, "caption", None, "kinds must be"),
        ("a dog?", 5, [], None, "kinds must be"),
        ("a dog?", 5, None, (10.0, 1.0), "starts after it ends"),
        ("a dog?", 5, None, (float("nan"), 1.0), "two numbers"),
        ("a dog?", 5, None, (1.0,), "two numbers"),
    ],
)
async def test_malformed_queries_are_refused(query, k, kinds, time_range, message) -> None:
    async with MemoryService(HashingEmbedder()) as service:
        await service.create("asks")
        await service.add("asks", "caption", "a dog runs", 1.0)
        with pytest.raises(BadQuery, match=message):
            await service.search("asks", query, k=k, kinds=kinds, time_range=time_range)


async def test_malformed_time_questions_are_refused() -> None:
    async with MemoryService(HashingEmbedder()) as service:
        await service.create("when")
        for stream_time, window in ((float("nan"), 10.0), (5.0, 0.0), (5.0, 10**9)):
            with pytest.raises(BadQuery):
                await service.at("when", stream_time, window)


# -- embedders -----------------------------------------------------------------------------------------------


def test_minilm_embeds_offline_to_unit_vectors_by_meaning(minilm: CachingEmbedder) -> None:
    texts = ["a dog runs across the yard", "a puppy sprints over the lawn", "the stock market fell sharply"]
    vectors = minilm.inner.embed(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
    # Batching (and its padding) does not change a text's vector.
    assert np.allclose(minilm.inner.embed(texts[2:]), vectors[2:], atol=1e-5)


def test_hashing_embedder_is_deterministic_and_caching_counts() -> None:
    first, second = HashingEmbedder(), HashingEmbedder()
    vectors = first.embed(["a red car", "", "a red car"])
    assert np.array_equal(vectors, second.embed(["a red car", "", "a red car"]))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    cached = CachingEmbedder(first, max_entries=2)
    cached.embed(["a", "b", "a"])
    cached.embed(["a", "c", "b"])
    assert (cached.hits, cached.misses) == (2, 3)


class CountingEmbedder(HashingEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        if "boom" in texts:
            raise RuntimeError("the model fell over")
        time.sleep(0.01)  # a model call takes a while: others queue up behind it
        return super().embed(texts)


async def test_concurrent_embeddings_share_model_calls_and_the_queue_is_bounded() -> None:
    inner = CountingEmbedder()
    batcher = EmbeddingBatcher(inner, max_batch=16, max_queue=40)
    try:
        texts = [f"caption {i}" for i in range(40)]
        vectors = await asyncio.gather(*(batcher.embed(text) for text in texts))
        assert np.array_equal(np.stack(vectors), HashingEmbedder().embed(texts))
        assert sum(inner.calls) == 40 and len(inner.calls) < 10 and max(inner.calls) <= 16
        with pytest.raises(RuntimeError, match="fell over"):
            await batcher.embed("boom")
        waiting = [asyncio.ensure_future(batcher.embed(f"more {i}")) for i in range(41)]
        await asyncio.sleep(0)
        assert isinstance(waiting[-1].exception(), EmbedderBusy)
        await asyncio.gather(*waiting[:-1])
    finally:
        await batcher.close()


async def test_a_question_naming_an_old_moment_brings_its_keyframe_back() -> None:
    async with MemoryService(HashingEmbedder(), MemoryConfig(lookback_after_s=30)) as service:
        await service.create("lookback")
        red = np.zeros((90, 120, 3), np.uint8)
        red[..., 0] = 220
        blue = np.zeros((90, 120, 3), np.uint8)
        blue[..., 2] = 220
        await service.add_keyframe("lookback", 10.0, red, "a new scene")
        await service.add_keyframe("lookback", 100.0, blue, "a new scene")
        await service.add("lookback", "user", "is the door open?", 200.0)
        context = await service.context("lookback", "what was there at 00:00:12?", k=5)
        assert [t for t, _ in context.keyframes] == [10.0], "the scene at that moment: the newest keyframe before"
        pixel = np.asarray(Image.open(io.BytesIO(context.keyframes[0][1])).convert("RGB"))[40, 60]
        assert pixel[0] > 180 and pixel[2] < 60, "the red scene came back"
        assert any(line.startswith("at 00:00:10 you saw a new scene") for line in context.lines)
        assert (await service.context("lookback", "what was at 00:03:10?", k=5)).keyframes == (), "too recent"
        assert (await service.context("lookback", "is the door open?", k=5)).keyframes == (), "no time named"
        assert (await service.context("lookback", None, k=5)).keyframes == ()


async def test_two_replicas_writing_one_session_converge(store: MemoryStore) -> None:
    """A call that goes to the fallback replica makes it hold a second copy; the owner's next write is refused
    by the log, so it restores the newer memory first and answers with everything acknowledged."""
    owner = MemoryApi(MemoryService(HashingEmbedder(), MemoryConfig(), store), store)
    fallback = MemoryApi(MemoryService(HashingEmbedder(), MemoryConfig(), store), store)
    try:
        await owner.add("split", "user", "the kettle is on the stove", 1.0)
        await fallback.add("split", "user", "the toaster is unplugged", 2.0)  # restored there, then written
        await owner.add("split", "user", "the window is open", 3.0)  # refused, restored, written again
        await fallback.add_keyframe("split", 4.0, np.zeros((30, 40, 3), np.uint8), "a new scene")
        await owner.add_keyframe("split", 5.0, np.zeros((30, 40, 3), np.uint8), "a new scene")
        texts = [item.text for item in owner.service.get("split").items()]
        assert texts == ["the kettle is on the stove", "the toaster is unplugged", "the window is open",
                         "a new scene", "a new scene"]
        assert any("toaster" in line for line in await owner.recall("split", "is the toaster plugged in?", 3))
    finally:
        await owner.service.close()
        await fallback.service.close()
