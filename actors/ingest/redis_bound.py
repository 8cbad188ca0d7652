"""Redis calls of HTTP requests, bounded: when Redis stalls or restarts, a request that needs it is answered
`503 redis_unavailable` with a `Retry-After` within `redis_http_timeout_s`, rather than hanging or failing with a
500, and every readiness check of a dependency answers within `READY_CHECK_TIMEOUT_S`.

The bound is time Redis had to answer: while this replica's own loop ran behind (a garbage collection, a busy
core), the reply could not have been read, so that time is added to the bound (up to `MAX_LAG_FACTOR` times it)
rather than blamed on Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from actors.common.loop_lag import LoopLag
from actors.common.session_store import REDIS_UNREACHABLE
from actors.ingest.api_error import ApiError

RETRY_AFTER_S = 2  # what a refused client is told to wait: a stall or a restart is usually seconds
READY_CHECK_TIMEOUT_S = 0.5  # each dependency's readiness check; they run together, so /readyz answers in this
MAX_LAG_FACTOR = 4.0  # a bound grows by the loop's own lag up to this many times itself, then expires all the same
LAG_SLACK_S = 0.01  # lag below this at the deadline is not worth another wait


def redis_unavailable(what: str, exc: BaseException | None = None) -> ApiError:
    """The 503 of a request whose Redis did not answer: `what` says what could not be done."""
    why = "did not answer in time" if exc is None or isinstance(exc, TimeoutError) else f"refused ({exc})"
    return ApiError(503, "redis_unavailable", f"{what}: the session store (Redis) {why}; retry in {RETRY_AFTER_S} s",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


@contextlib.asynccontextmanager
async def redis_within(timeout_s: float, what: str, lag: LoopLag | None = None) -> AsyncIterator[None]:
    """Run the block's Redis calls within `timeout_s` (plus the loop's own lag meanwhile, when `lag` watches
    it); out of time or out of reach, raise the 503."""
    try:
        async with lag_aware_timeout(timeout_s, lag):
            yield
    except REDIS_UNREACHABLE as exc:
        raise redis_unavailable(what, exc) from None


@contextlib.asynccontextmanager
async def lag_aware_timeout(timeout_s: float, lag: LoopLag | None) -> AsyncIterator[None]:
    """`asyncio.timeout(timeout_s)`, whose deadline moves on by however long the loop ran behind since the block
    began, up to `MAX_LAG_FACTOR` times `timeout_s` in all (the loop is watched only while a block runs)."""
    if lag is None:
        async with asyncio.timeout(timeout_s):
            yield
        return
    loop = asyncio.get_running_loop()
    with lag.watching():
        counted = lag.behind_s()
        extra_left = MAX_LAG_FACTOR * timeout_s
        handles: list[asyncio.TimerHandle] = []
        async with asyncio.timeout(None) as bound:

            def expire() -> None:
                nonlocal counted, extra_left
                owed = min(lag.behind_s() - counted, extra_left)
                if owed < LAG_SLACK_S:
                    bound.reschedule(loop.time())
                    return
                counted += owed
                extra_left -= owed
                handles[0] = loop.call_later(owed, expire)

            handles.append(loop.call_later(timeout_s, expire))
            try:
                yield
            finally:
                handles[0].cancel()


async def quietly_within(timeout_s: float, call: Awaitable[object]) -> None:
    """A best-effort Redis call (undoing a half-done request): bounded, its failure ignored."""
    with contextlib.suppress(*REDIS_UNREACHABLE):
        async with asyncio.timeout(timeout_s):
            await call


async def ready_within(check: Callable[[], Awaitable[object]], timeout_s: float = READY_CHECK_TIMEOUT_S) -> bool | str:
    """One dependency's readiness: True, or what is wrong (it did not answer within `timeout_s`, or failed)."""
    try:
        async with asyncio.timeout(timeout_s):
            answer = await check()
    except TimeoutError:
        return f"unavailable: no answer within {timeout_s:g} s"
    except Exception as exc:
        return f"unavailable: {exc}"
    return True if answer is None or answer is True else f"unavailable: answered {answer!r}"
