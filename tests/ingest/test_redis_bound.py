"""The Redis bound of HTTP requests counts time Redis had to answer: a call that never answers is refused with the
503 at the bound; a loop that ran behind (a collection, a busy core) while a healthy call was waiting moves the
bound on by that long instead of turning the call into a false 503; and a loop that is always behind still gets
its 503, at most a few bounds later. The loop is watched only while a bound runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

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


async def answered_behind_a_held_loop(answer_s: float, hold_s: float) -> str:
    """A call that answers in `answer_s` while the loop is held for `hold_s` before it can read the answer."""
    reply = asyncio.ensure_future(answered_in(answer_s))
    hold_the_loop(hold_s)
    return await reply


@pytest.fixture
async def lag() -> AsyncIterator[LoopLag]:
    watched = LoopLag()
    yield watched
    await watched.stop()


async def test_a_call_that_never_answers_is_refused_at_the_bound(lag: LoopLag) -> None:
    started = time.monotonic()
    with pytest.raises(ApiError) as refused:
        async with redis_within(BOUND_S, "session not ended", lag):
            await answered_in(30)
    elapsed = time.monotonic() - started
    assert (refused.value.status, refused.value.code) == (503, "redis_unavailable")
    assert refused.value.headers == {"Retry-After": "2"}
    assert BOUND_S <= elapsed < BOUND_S + 0.15, elapsed


async def test_the_loops_own_lag_is_not_blamed_on_redis(lag: LoopLag) -> None:
    started = time.monotonic()
    async with redis_within(BOUND_S, "session not ended", lag):
        # The loop is held past the bound while the (quick) reply waits to be read.
        assert await answered_behind_a_held_loop(0.05, BOUND_S + 0.2) == "OK"
    assert time.monotonic() - started >= BOUND_S + 0.2
    # Without the lag counted, the same call is a 503.
    with pytest.raises(ApiError):
        async with redis_within(BOUND_S, "session not ended"):
            await answered_behind_a_held_loop(0.05, BOUND_S + 0.2)


async def test_a_stalled_call_on_a_loop_that_ran_behind_is_refused_that_much_later(lag: LoopLag) -> None:
    started = time.monotonic()
    with pytest.raises(ApiError):
        async with redis_within(BOUND_S, "event log not read", lag):
            await answered_behind_a_held_loop(30, 0.2)
    elapsed = time.monotonic() - started
    assert BOUND_S + 0.15 <= elapsed < BOUND_S + 0.2 + 0.2, elapsed


async def test_a_loop_always_behind_still_gets_its_503(lag: LoopLag) -> None:
    lag.period_s = 0.01
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


async def test_lag_counts_only_the_time_the_loop_was_held_while_watched(lag: LoopLag) -> None:
    hold_the_loop(0.25)  # nobody watching: not counted
    with lag.watching():
        assert lag.behind_s() == 0.0
        await asyncio.sleep(0.3)
        assert lag.behind_s() < 0.05
        hold_the_loop(0.25)
        assert 0.2 <= lag.behind_s() < 0.3 + 0.05
        await asyncio.sleep(0.1)
        assert 0.2 <= lag.behind_s() < 0.3 + 0.05
    await asyncio.sleep(0.1)
    assert lag._task is not None and lag._task.done(), "the watching task ends with the last watcher"
    await lag.stop()
