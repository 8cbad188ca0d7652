"""Session state in a real Redis, the sampler's keep/drop and resize, the prompt layout, and the frame buffer."""

from __future__ import annotations

import numpy as np
import pytest

from actors.common.messages import (
    MessageTooLarge,
    Sample,
    SessionRecord,
    TickOutcome,
    TickRequest,
    Turn,
    decode,
    encode,
)
from actors.common.session_store import SessionStore, UnknownSession
from actors.common.stream_time import clock
from actors.ingest.frames import LatestFrameBuffer
from actors.interaction.prompt import build_prompt, time_tag
from actors.sampler.frame_sampler import FrameSampler

pytestmark = pytest.mark.unit


def _sample(t: float) -> Sample:
    return Sample(stream_time=t, width=2, height=1, rgb=b"\x00" * 6)


# -- session store ----------------------------------------------------------------------------------------------

async def test_session_token_is_checked_and_never_stored(store: SessionStore) -> None:
    record, token = await store.create(("watch the door",))
    assert token not in encode(record).decode("latin-1")
    assert (await store.authenticate(record.session_id, token)) == record
    assert await store.authenticate(record.session_id, "wrong") is None
    assert await store.authenticate(record.session_id, None) is None
    with pytest.raises(UnknownSession):
        await store.authenticate("s_missing", token)


async def test_event_log_keeps_order_and_filters(store: SessionStore) -> None:
    record, _ = await store.create()
    for tick in range(1, 11):
        await store.append_outcome(TickOutcome(session_id=record.session_id, tick=tick, stream_time=tick,
                                               outcome="silent", stages_ms={"total": 1.0}))
    after = await store.outcomes(record.session_id, after=7)
    assert [o.tick for o in after] == [8, 9, 10]
    assert [o.tick for o in await store.outcomes(record.session_id, limit=2)] == [1, 2]


async def test_keys_expire_with_the_session_ttl(store: SessionStore, redis_server) -> None:
    import redis

    record, _ = await store.create()
    await store.push_inbox(record.session_id, {"text": "result"})
    client = redis.Redis.from_url(redis_server.url)
    for key in (f"vigil:session:{record.session_id}", f"vigil:session:{record.session_id}:inbox"):
        assert 0 < client.ttl(key) <= 600
    assert await store.pop_inbox(record.session_id) == [{"text": "result"}]
    assert await store.pop_inbox(record.session_id) == []


async def test_ended_session_is_marked(store: SessionStore) -> None:
    record, _ = await store.create()
    await store.end(record.session_id)
    assert (await store.get(record.session_id)).state == "ended"


def test_msgpack_codec_round_trips_and_limits() -> None:
    request = TickRequest(session_id="s", tick=1, stream_time=1.0, samples=(_sample(1.0),),
                          dialog=(Turn(role="user", text="hi", stream_time=0.5),))
    assert decode(TickRequest, encode(request)) == request
    with pytest.raises(MessageTooLarge):
        encode(request, limit=10)
    with pytest.raises(ValueError, match="unknown fields"):
        decode(SessionRecord, encode(TickOutcome(session_id="s", tick=1, stream_time=0, outcome="silent")))


# -- sampler ----------------------------------------------------------------------------------------------------

def test_sampler_resizes_to_budget_and_scores_change() -> None:
    sampler = FrameSampler(longest_side=64, change_threshold=0.1, max_pixels=10**6)
    dark = np.zeros((120, 160, 3), np.uint8)
    first = sampler.sample(dark, 0.0, None)
    assert first.keep and first.sample is not None
    assert (first.sample.width, first.sample.height) == (64, 48)
    assert len(first.sample.rgb) == 64 * 48 * 3
    same = sampler.sample(dark, 0.5, first.signature, due=False)
    assert not same.keep and same.change_score == 0.0 and same.sample is None
    bright = sampler.sample(np.full_like(dark, 255), 0.6, first.signature, due=False)
    assert bright.keep and bright.change_score > 0.9


def test_sampler_refuses_bad_frames() -> None:
    sampler = FrameSampler(longest_side=64, change_threshold=0.1, max_pixels=100)
    with pytest.raises(ValueError, match="pixel limit"):
        sampler.sample(np.zeros((20, 20, 3), np.uint8), 0.0, None)
    with pytest.raises(ValueError, match="HxWx3"):
        sampler.sample(np.zeros((5, 5), np.uint8), 0.0, None)


# -- prompt -----------------------------------------------------------------------------------------------------

def test_prompt_layout_is_prefix_stable() -> None:
    dialog = (Turn(role="assistant", text="</response> A dog.", stream_time=1.0),
              Turn(role="user", text="what colour?", stream_time=1.5))
    request = TickRequest(session_id="s", tick=3, stream_time=2.0, samples=(_sample(0.0), _sample(1.0),
                          _sample(2.0)), instructions=("tell me about dogs",), dialog=dialog, inbox=("It is red.",))
    prompt = build_prompt(request)
    roles = [m["role"] for m in prompt.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "tell me about dogs" in prompt.messages[0]["content"][0]["text"]
    assert prompt.messages[2]["content"][0]["text"] == "</silence>"
    assert prompt.messages[4]["content"][0]["text"] == "</response> A dog."
    last = [part.get("text") for part in prompt.messages[5]["content"]]
    assert last == [time_tag(2.0), None, "what colour?", "Background result: It is red."]
    assert len(prompt.images) == 3
    # The next tick's prompt extends this one: everything before the newest turn is unchanged.
    later = build_prompt(TickRequest(session_id="s", tick=4, stream_time=3.0,
                                     samples=(*request.samples, _sample(3.0)), instructions=request.instructions,
                                     dialog=dialog))
    assert later.messages[:5] == prompt.messages[:5]


def test_memory_lines_and_recalled_keyframes_take_their_places() -> None:
    request = TickRequest(session_id="s", tick=9, stream_time=900.0, samples=(_sample(899.0), _sample(900.0)),
                          instructions=("watch the door",), memories=("at 00:10:00 you said: The door opened.",),
                          lookback=(_sample(610.0),), dialog=(Turn(role="user", text="what was at 00:10:10?",
                                                                   stream_time=899.5),))
    prompt = build_prompt(request)
    system = prompt.messages[0]["content"][0]["text"]
    assert system.index("watch the door") < system.index("Memory:\nat 00:10:00 you said: The door opened.")
    last = [part.get("text") for part in prompt.messages[-1]["content"]]
    assert last == ["Recalled from memory, the scene at 00:10:10:", None, time_tag(900.0), None,
                    "what was at 00:10:10?"]
    # Images in the order of their placeholders: the window's older frames, the recalled one, the current one.
    assert [s.stream_time for s in prompt.images] == [899.0, 610.0, 900.0]


def test_time_formats() -> None:
    assert time_tag(12.04) == "<12.0 seconds>"
    assert clock(3 * 3600 + 14 * 60 + 7.9) == "03:14:07"


# -- frames -----------------------------------------------------------------------------------------------------

def test_newest_frame_wins() -> None:
    buffer = LatestFrameBuffer()
    assert buffer.take() is None
    for index in range(5):
        buffer.put(index, arrival=10.0 + index)
    newest = buffer.take()
    assert newest is not None and newest.frame == 4 and buffer.replaced == 4
    assert buffer.take() is None
    assert buffer.stream_time(12.5) == 2.5
