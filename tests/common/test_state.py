"""Session state in a real Redis (tokens, event log, TTLs), the msgpack codec's limits, and the stream clock."""

from __future__ import annotations

import asyncio

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
from actors.common.session_store import POOL_CONNECTIONS, SessionStore, UnknownSession
from actors.common.stream_time import clock

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
    await store.push_control(record.session_id, {"speak_threshold": 0.9})
    assert await store.pop_pending(record.session_id) == ([{"text": "result"}], [{"speak_threshold": 0.9}])
    assert await store.pop_pending(record.session_id) == ([], [])


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


def test_clock_reads_hours_minutes_seconds() -> None:
    assert clock(3 * 3600 + 14 * 60 + 7.9) == "03:14:07"
    assert clock(59.99) == "00:00:59"


async def test_a_burst_past_the_pool_waits_for_connections_rather_than_failing(redis_server) -> None:  # type: ignore[no-untyped-def]
    """More concurrent calls than the store's connections (as 64 sessions ticking at once): each waits its turn."""
    store = SessionStore.from_url(redis_server.url, 60, 100)
    try:
        results = await asyncio.gather(*(store.pop_pending(f"s_{i}") for i in range(3 * POOL_CONNECTIONS)))
        assert all(result == ([], []) for result in results)
    finally:
        await store.close()
