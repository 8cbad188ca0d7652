"""Every tick ends as exactly one recorded outcome: decided, skipped for no frame, busy, errors or close."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from actors.common.config import VigilConfig
from actors.common.messages import Decision, TickRequest
from actors.common.metrics import VigilMetrics
from actors.common.replicas import Overloaded, ReplicaFailed
from actors.common.session_store import SessionStore
from actors.ingest.frames import LatestFrameBuffer
from actors.ingest.session_loop import SessionLoop, TickServices
from actors.sampler.frame_sampler import FrameSampler
from tests.fakes import LocalEngineHandle, RecordingMemory, ScriptedEngine, red_pixels, threaded_sample

pytestmark = pytest.mark.unit

INTERVAL = 0.05


def _config(**overrides: object) -> VigilConfig:
    return VigilConfig(**({"redis_url": "unused", "tick_interval_s": INTERVAL, "image_size": 32} | overrides))


def _loop(
    store: SessionStore, decide, instructions=("watch",), memory=None, **config
) -> tuple[SessionLoop, list[dict]]:
    sampler = FrameSampler(32, 0.1, 10**6)

    sent: list[dict] = []
    services = TickServices(sample=threaded_sample(sampler), decide=decide, store=store, metrics=VigilMetrics(),
                            memory=memory)
    loop = SessionLoop("s_test", _config(**config), services, LatestFrameBuffer(),
                       lambda text: sent.append(json.loads(text)), instructions)
    loop.session_id = "s_" + uuid.uuid4().hex
    return loop, sent


async def _feed(loop: SessionLoop, frames: int, red_from: int | None = None) -> None:
    for index in range(frames):
        image = np.full((24, 32, 3), 40, np.uint8)
        if red_from is not None and index >= red_from:
            image[4:20, 8:24] = (230, 10, 10)
        loop.frames.put(image)
        await asyncio.sleep(INTERVAL / 2)


def _ticks(sent: list[dict]) -> list[dict]:
    return [m for m in sent if m["type"] == "tick"]


def _assert_one_outcome_per_tick(sent: list[dict], logged: list) -> None:
    # A busy tick is recorded while the one before it still runs, so outcomes may arrive out of order.
    ticks = sorted(m["tick"] for m in _ticks(sent))
    assert ticks == list(range(1, len(ticks) + 1)), "every tick has one outcome, none twice, none missing"
    assert sorted(o.tick for o in logged) == ticks, "the Redis log must hold the same outcomes"


async def test_decisions_follow_the_frames(store: SessionStore) -> None:
    engine = ScriptedEngine(lambda r: Decision(kind="respond", text="red") if red_pixels(r) else Decision("silent"))
    loop, sent = _loop(store, LocalEngineHandle(engine).decide)
    loop.start()
    await _feed(loop, 20, red_from=10)
    await loop.stop()
    outcomes = [m["outcome"] for m in _ticks(sent)]
    assert "respond" in outcomes and "silent" in outcomes
    first_respond = outcomes.index("respond")
    # Before the red frames: silence, or no tick decided at all (a 50 ms tick that ran long on a loaded machine).
    assert all(o in ("silent", "skipped:no_frame", "skipped:busy") for o in outcomes[:first_respond]), outcomes
    _assert_one_outcome_per_tick(sent, await store.outcomes(loop.session_id, limit=1000))


async def test_no_frame_and_silence_without_instruction(store: SessionStore) -> None:
    engine = ScriptedEngine()
    loop, sent = _loop(store, LocalEngineHandle(engine).decide, instructions=())
    loop.start()
    await asyncio.sleep(INTERVAL * 3.5)
    await _feed(loop, 6)
    await loop.stop()
    outcomes = Counter(m["outcome"] for m in _ticks(sent))
    assert outcomes["skipped:no_frame"] >= 2
    assert outcomes["silent"] >= 1
    assert engine.requests == [], "no instruction and no question: the model is not called"
    _assert_one_outcome_per_tick(sent, await store.outcomes(loop.session_id, limit=1000))


async def test_a_question_calls_the_model_once(store: SessionStore) -> None:
    engine = ScriptedEngine(lambda r: Decision(kind="respond", text="It is grey."))
    loop, sent = _loop(store, LocalEngineHandle(engine).decide, instructions=())
    loop.start()
    loop.frames.put(np.zeros((24, 32, 3), np.uint8))
    loop.add_question("what colour is it?")
    await _feed(loop, 8)
    await loop.stop()
    assert len(engine.requests) == 1
    assert any(t.text == "what colour is it?" for t in engine.requests[0].dialog)
    assert [m["text"] for m in _ticks(sent) if m["outcome"] == "respond"] == ["It is grey."]


async def test_slow_engine_gives_busy_ticks_not_a_queue(store: SessionStore) -> None:
    engine = ScriptedEngine(delay_s=INTERVAL * 3.5)
    loop, sent = _loop(store, LocalEngineHandle(engine).decide)
    loop.start()
    await _feed(loop, 24)
    await loop.stop()
    outcomes = Counter(m["outcome"] for m in _ticks(sent))
    assert outcomes["skipped:busy"] >= 4
    assert outcomes["silent"] >= 1
    _assert_one_outcome_per_tick(sent, await store.outcomes(loop.session_id, limit=1000))


@pytest.mark.parametrize(("error", "reason"), [(RuntimeError("boom"), "engine_error"),
                                               (ReplicaFailed("gone"), "replica_failed"),
                                               (Overloaded("queue full"), "overload")])
async def test_engine_failures_are_recorded(store: SessionStore, error: Exception, reason: str) -> None:
    async def decide(request: TickRequest) -> Decision:
        raise error

    loop, sent = _loop(store, decide)
    loop.start()
    await _feed(loop, 8)
    await loop.stop()
    outcomes = Counter(m["outcome"] for m in _ticks(sent))
    assert outcomes[f"skipped:{reason}"] >= 2
    _assert_one_outcome_per_tick(sent, await store.outcomes(loop.session_id, limit=1000))


async def test_closing_mid_tick_records_closed(store: SessionStore) -> None:
    started = asyncio.Event()

    async def decide(request: TickRequest) -> Decision:
        started.set()
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    loop, sent = _loop(store, decide)
    loop.start()
    loop.frames.put(np.zeros((24, 32, 3), np.uint8))
    await asyncio.wait_for(started.wait(), 5)
    await loop.stop()
    assert _ticks(sent)[-1]["outcome"] == "skipped:closed"
    _assert_one_outcome_per_tick(sent, await store.outcomes(loop.session_id, limit=1000))


async def test_decide_timeout_is_recorded(store: SessionStore) -> None:
    engine = ScriptedEngine(delay_s=1.0)
    loop, sent = _loop(store, LocalEngineHandle(engine).decide, decide_timeout_s=INTERVAL)
    loop.start()
    await _feed(loop, 6)
    await loop.stop()
    assert "skipped:timeout" in {m["outcome"] for m in _ticks(sent)}


async def test_heartbeat_timeout_closes_the_session(store: SessionStore) -> None:
    loop, _ = _loop(store, LocalEngineHandle(ScriptedEngine()).decide, heartbeat_timeout_s=INTERVAL * 3)
    loop.start()
    await asyncio.wait_for(loop.closed.wait(), 5)
    await loop.stop()


async def test_what_is_said_and_seen_is_remembered_and_comes_back_in_the_prompt(store: SessionStore) -> None:
    memory = RecordingMemory()
    engine = ScriptedEngine(lambda r: Decision(kind="respond", text="red") if red_pixels(r) else Decision("silent"))
    loop, sent = _loop(store, LocalEngineHandle(engine).decide, memory=memory)
    loop.start()
    await _feed(loop, 6)
    loop.add_question("where did I leave my keys?")
    await _feed(loop, 6, red_from=3)
    await loop.stop()
    kinds = [(kind, text) for _, kind, text, _ in memory.items]
    assert ("user", "where did I leave my keys?") in kinds
    assert ("response", "red") in kinds, "what the assistant said is remembered"
    assert memory.keyframes, "the first scene (and the red one) are kept as keyframes"
    assert memory.queries[0] == "watch", "the standing instruction selects memories"
    assert "where did I leave my keys?" in memory.queries, "a question selects memories at once"
    asked = [r for r in engine.requests if any("where did I leave my keys?" in line for line in r.memories)]
    assert asked, "the memory lines reach the engine's request"
    assert all("memory" in m["stages_ms"] for m in _ticks(sent) if m["outcome"] in ("silent", "respond"))
    _assert_one_outcome_per_tick(sent, await store.outcomes(loop.session_id, limit=1000))


async def test_a_delegated_question_selects_the_next_ticks_memories(store: SessionStore) -> None:
    memory = RecordingMemory()
    decisions = iter([Decision(kind="delegate", text="Let me check.", question="how many cups were on the table?")])
    engine = ScriptedEngine(lambda r: next(decisions, Decision(kind="silent")))
    loop, _ = _loop(store, LocalEngineHandle(engine).decide, memory=memory, memory_refresh_s=60.0)
    loop.start()
    await _feed(loop, 10)
    await loop.stop()
    assert memory.queries[:2] == ["watch", "how many cups were on the table?"]
    assert set(memory.queries[2:]) <= {"watch"}, "afterwards the instructions' memories again"
    assert ("response", "Let me check. (asked the background assistant: how many cups were on the table?)") in [
        (kind, text) for _, kind, text, _ in memory.items]


async def test_a_recalled_keyframe_reaches_the_engine_as_an_image(store: SessionStore) -> None:
    frame = Image.new("RGB", (40, 30), (10, 200, 10))
    jpeg = io.BytesIO()
    frame.save(jpeg, format="JPEG")
    memory = RecordingMemory()
    memory.lookback = ((61.0, jpeg.getvalue()), (62.0, b"not a jpeg"))
    engine = ScriptedEngine()
    loop, _ = _loop(store, LocalEngineHandle(engine).decide, memory=memory)
    loop.start()
    await _feed(loop, 6)
    await loop.stop()
    assert engine.requests and all(len(r.lookback) == 1 for r in engine.requests), "the broken one is left out"
    old = engine.requests[-1].lookback[0]
    assert (old.stream_time, old.width, old.height) == (61.0, 40, 30)
    rgb = np.frombuffer(old.rgb, np.uint8).reshape(30, 40, 3)
    assert rgb[15, 20, 1] > 150 and rgb[15, 20, 0] < 60


async def test_ticks_go_on_while_memory_is_lost(store: SessionStore) -> None:
    memory = RecordingMemory()
    memory.fail_next = 10**6
    loop, sent = _loop(store, LocalEngineHandle(ScriptedEngine()).decide, memory=memory)
    loop.start()
    await _feed(loop, 24)
    await loop.stop()
    assert Counter(m["outcome"] for m in _ticks(sent))["silent"] >= 5
    _assert_one_outcome_per_tick(sent, await store.outcomes(loop.session_id, limit=1000))


async def test_keyframes_are_rationed_when_every_frame_is_a_new_scene(store: SessionStore) -> None:
    memory = RecordingMemory()
    loop, _ = _loop(store, LocalEngineHandle(ScriptedEngine()).decide, memory=memory, keyframe_every_s=10.0)
    loop.start()
    for index in range(16):  # black and white in turn: every sample is a scene change
        loop.frames.put(np.full((24, 32, 3), 255 * (index % 2), np.uint8))
        await asyncio.sleep(INTERVAL)
    await loop.stop()
    assert len(memory.keyframes) == 1, memory.keyframes


async def test_each_tick_asks_for_its_decision_by_a_deadline(store: SessionStore) -> None:
    engine = ScriptedEngine()
    loop, _sent = _loop(store, LocalEngineHandle(engine).decide, decide_timeout_s=2.5)
    loop.start()
    before = time.time()
    await _feed(loop, 6)
    await loop.stop()
    assert engine.requests
    for request in engine.requests:
        assert before + 2.5 <= request.deadline <= time.time() + 2.5


@pytest.mark.parametrize("frame_wait_s", [0.45, 0.0])
async def test_a_scheduled_tick_decides_on_a_frame_that_has_just_arrived(store: SessionStore,
                                                                         frame_wait_s: float) -> None:
    # Ticks every 0.2 s, frames every 0.08 s: at its due time a tick's newest frame is 0-80 ms old.
    engine = ScriptedEngine()
    loop, sent = _loop(store, LocalEngineHandle(engine).decide, tick_interval_s=0.2, tick_frame_wait_s=frame_wait_s)
    loop.start()
    for _ in range(30):
        loop.frames.put(np.full((24, 32, 3), 40, np.uint8))
        await asyncio.sleep(0.08)
    await loop.stop()
    decided = [m for m in _ticks(sent) if m["outcome"] == "silent"][2:]  # once the frame interval is known
    assert len(decided) >= 6, _ticks(sent)
    waits = [m["stages_ms"]["wait"] for m in decided]
    if frame_wait_s:
        # A frame older than a quarter of the interval (20 ms) is not decided on: the tick waits for the next
        # (one tick may miss it, on a loaded machine, when a frame comes later than expected).
        assert sorted(waits)[-2] < 35, waits
        assert any(m["stages_ms"].get("align", 0) > 0 for m in decided)
    else:
        assert max(waits) > 38, waits  # every other tick falls at least 40 ms after its frame
        assert not any("align" in m["stages_ms"] for m in decided)
    _assert_one_outcome_per_tick(sent, await store.outcomes(loop.session_id, limit=1000))


async def test_no_tick_waits_for_a_frame_while_the_one_before_still_runs(store: SessionStore) -> None:
    engine = ScriptedEngine(delay_s=INTERVAL * 2.5)
    loop, sent = _loop(store, LocalEngineHandle(engine).decide)
    asked_while_running: list[bool] = []
    aligned = loop.frames.aligned

    async def watched(max_wait_s: float) -> float:
        asked_while_running.append(loop._inflight is not None and not loop._inflight.done())
        return await aligned(max_wait_s)

    loop.frames.aligned = watched  # type: ignore[method-assign]
    loop.start()
    await _feed(loop, 24)
    await loop.stop()
    outcomes = Counter(m["outcome"] for m in _ticks(sent))
    assert outcomes["skipped:busy"] >= 3 and asked_while_running, outcomes
    assert not any(asked_while_running)
    _assert_one_outcome_per_tick(sent, await store.outcomes(loop.session_id, limit=1000))
