"""The Redis bound of HTTP requests counts time Redis had to answer: a call that never answers is refused with the
503 at the bound; a loop that ran behind (a collection, a busy core) while a healthy call was waiting moves the
bound on by that long instead of turning the call into a false 503; and a loop that is always behind still gets
its 503, at most a few bounds later."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors.common.loop_lag import LoopLag
from actors.ingest.api_error import ApiError
from actors.ingest.redis_bound import MAX_LAG_FACTOR, redis_within

pytestmark = pytest.mark.unit

BOUND_S = 0.3


def hold_the_loop(seconds: float) -> None:
    """What a garbage collection or a busy core does to the loop: nothing else runs on it meanwhile."""
    time.sleep(seconds)


async def answered_in(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "OK"


async def test_a_call_that_never_answers_is_refused_at_the_bound() -> None:
    lag = LoopLag()
    lag.behind_s()
    started = time.monotonic()
    with pytest.raises(ApiError) as refused:
        async with redis_within(BOUND_S, "session not ended", lag):
            await answered_in(30)
    elapsed = time.monotonic() - started
    assert (refused.value.status, refused.value.code) == (503, "redis_unavailable")
    assert refused.value.headers == {"Retry-After": "2"}
    assert BOUND_S <= elapsed < BOUND_S + 0.15, elapsed
    await lag.stop()


async def test_the_loops_own_lag_is_not_blamed_on_redis() -> None:
    lag = LoopLag()
    lag.behind_s()
    await asyncio.sleep(0.1)
    started = time.monotonic()
    async with redis_within(BOUND_S, "session not ended", lag):
        reply = asyncio.ensure_future(answered_in(0.05))
        hold_the_loop(BOUND_S + 0.2)  # the loop is held past the bound while the (quick) reply waits to be read
        assert await reply == "OK"
    assert time.monotonic() - started >= BOUND_S + 0.2
    # Without the lag counted, the same call is a 503.
    with pytest.raises(ApiError):
        async with redis_within(BOUND_S, "session not ended"):
            reply = asyncio.ensure_future(answered_in(0.05))
            hold_the_loop(BOUND_S + 0.2)
            await reply
    await lag.stop()


async def test_a_stalled_call_on_a_loop_that_ran_behind_is_refused_that_much_later() -> None:
    lag = LoopLag()
    lag.behind_s()
    await asyncio.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(ApiError):
        async with redis_within(BOUND_S, "event log not read", lag):
            stalled = asyncio.ensure_future(answered_in(30))
            hold_the_loop(0.2)
            await stalled
    elapsed = time.monotonic() - started
    assert BOUND_S + 0.15 <= elapsed < BOUND_S + 0.2 + 0.2, elapsed
    await lag.stop()


async def test_a_loop_always_behind_still_gets_its_503() -> None:
    lag = LoopLag(period_s=0.01)
    lag.behind_s()

    async def hog() -> None:
        while True:
            hold_the_loop(0.05)  # every turn of the loop runs late
            await asyncio.sleep(0)

    hogging = asyncio.ensure_future(hog())
    started = time.monotonic()
    try:
        with pytest.raises(ApiError):
            async with redis_within(BOUND_S, "session not checked", lag):
                await answered_in(30)
    finally:
        hogging.cancel()
    elapsed = time.monotonic() - started
    # The bound, the most lag it may add, and the few late turns of the loop the refusal itself takes.
    assert BOUND_S * 2 < elapsed < BOUND_S * (1 + MAX_LAG_FACTOR) + 0.6, elapsed
    await lag.stop()


async def test_lag_counts_only_the_time_the_loop_was_held() -> None:
    lag = LoopLag()
    assert lag.behind_s() == 0.0
    await asyncio.sleep(0.3)
    assert lag.behind_s() < 0.05
    hold_the_loop(0.25)
    assert 0.2 <= lag.behind_s() < 0.3 + 0.05
    await asyncio.sleep(0.1)
    assert 0.2 <= lag.behind_s() < 0.3 + 0.05
    await lag.stop()
