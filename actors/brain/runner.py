"""The brain's runner: delegations taken at once and answered in the background, each ending in exactly one
result delivered to a sink.

Every delegation is two owned tasks: its work (wait for a slot, then the backend's `solve`) and its supervisor,
which waits for the work at most `timeout_s` from acceptance, decides the one outcome (done, failed, timed_out,
cancelled) and delivers it. Nothing else delivers, so no delegation has two results, and every accepted or
refused one has one. Fairness: a session holds at most `max_in_flight_per_session` delegations (running or
waiting), at most `max_in_flight` run at once, and the rest wait for a slot first come first served across
sessions (at most `max_queued` of them), so a session that floods is refused beyond its own share while the
others' delegations go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from actors.brain.answer import SPOKEN_MAX_CHARS, bound_answer
from actors.brain.backend import BackendError, BackendTimeout, BrainAnswer, BrainBackend
from actors.common.config import BrainConfig
from actors.common.messages import DelegationReceipt, DelegationRequest, DelegationResult, DelegationStatus
from actors.common.metrics import VigilMetrics

log = logging.getLogger(__name__)

Sink = Callable[[DelegationResult], Awaitable[None]]

# How long a cancelled or timed-out call may take to let go before its result is delivered anyway.
CANCEL_GRACE_S = 5.0
DELIVERY_TIMEOUT_S = 5.0
DELIVERY_ATTEMPTS = 3
# A `follow` is held this long at most, so that a replica that drains is not held up by the calls following it.
FOLLOW_WAIT_S = 2.0
QUESTION_MAX_CHARS = 1000

CANCELLED_BY_USER = "cancelled by the user"
SHUT_DOWN = "the brain shut down"
TOO_MANY = "too many delegations in flight"
DUPLICATE = "a delegation with this id is already in flight"


@dataclass(eq=False)
class _Delegation:
    request: DelegationRequest
    accepted_at: float  # loop time
    work: asyncio.Task[BrainAnswer]
    cancel_reason: str = ""
    settled: bool = False  # the supervisor has decided its outcome
    delivered: asyncio.Event = field(default_factory=asyncio.Event)  # its result has been handed to the sink


class Brain:
    """Runs delegations on a backend and hands each one's result to `sink` (in the deployment: the session's
    inbox in Redis). Call `delegate` and `cancel` from the event loop that runs it; `close` on shutdown."""

    def __init__(
        self,
        backend: BrainBackend,
        sink: Sink,
        *,
        timeout_s: float = 120.0,
        max_in_flight: int = 16,
        max_in_flight_per_session: int = 2,
        max_queued: int = 64,
        spoken_chars: int = SPOKEN_MAX_CHARS,
        metrics: VigilMetrics | None = None,
        delivery_timeout_s: float = DELIVERY_TIMEOUT_S,
    ) -> None:
        self.backend = backend
        self._sink = sink
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.max_in_flight_per_session = max_in_flight_per_session
        self.max_queued = max_queued
        self.spoken_chars = spoken_chars
        self.metrics = metrics or VigilMetrics()
        self.delivery_timeout_s = delivery_timeout_s
        self._delegations: dict[tuple[str, str], _Delegation] = {}
        self._per_session: Counter[str] = Counter()
        self._running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @classmethod
    def from_config(
        cls, config: BrainConfig, backend: BrainBackend, sink: Sink, metrics: VigilMetrics | None = None
    ) -> Brain:
        return cls(
            backend, sink, timeout_s=config.timeout_s, max_in_flight=config.max_in_flight,
            max_in_flight_per_session=config.max_in_flight_per_session, max_queued=config.max_queued,
            spoken_chars=config.spoken_chars, metrics=metrics,
        )

    # -- what callers do

    def delegate(self, request: DelegationRequest) -> DelegationReceipt:
        """Take a delegation (it runs in the background) or refuse it; either way its one result reaches the
        sink later. A delegation whose id is already in flight is refused with no result of its own."""
        key = (request.session_id, request.delegation_id)
        if key in self._delegations:
            return DelegationReceipt(accepted=False, reason=DUPLICATE)
        reason = self._refusal(request)
        if reason:
            log.info("delegation %s of %s refused: %s", request.delegation_id, request.session_id, reason)
            self._own(self._deliver(self._result(request, "failed", reason=reason)))
            return DelegationReceipt(accepted=False, reason=reason)
        loop = asyncio.get_running_loop()
        delegation = _Delegation(request, loop.time(), self._own(self._work(request)))
        self._delegations[key] = delegation
        self._per_session[request.session_id] += 1
        self._own(self._supervise(delegation))
        self.metrics.delegations_in_flight.set(len(self._delegations))
        deadline = time.time() + self.timeout_s + CANCEL_GRACE_S + self.delivery_timeout_s * DELIVERY_ATTEMPTS
        return DelegationReceipt(accepted=True, deadline=deadline)

    def cancel(self, session_id: str, delegation_id: str, reason: str = CANCELLED_BY_USER) -> bool:
        """Cancel a delegation in flight (its result: cancelled); False when none by that id is in flight."""
        delegation = self._delegations.get((session_id, delegation_id))
        if delegation is None or delegation.settled or delegation.cancel_reason or delegation.work.done():
            return False  # unknown, decided, already being cancelled, or answered
        delegation.cancel_reason = reason
        return delegation.work.cancel()

    def cancel_session(self, session_id: str, reason: str = CANCELLED_BY_USER) -> int:
        """Cancel every delegation of a session (it ended); how many were cancelled."""
        ids = [delegation_id for sid, delegation_id in self._delegations if sid == session_id]
        return sum(self.cancel(session_id, delegation_id, reason) for delegation_id in ids)

    async def follow(self, session_id: str, delegation_id: str, wait_s: float) -> bool:
        """Wait up to `wait_s` for a delegation in flight here to have its result delivered: True when it is
        still in flight after that (ask again), False once delivered or when none by that id is in flight here.
        A caller that holds this call learns of the replica's loss from the call failing."""
        delegation = self._delegations.get((session_id, delegation_id))
        if delegation is None:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(delegation.delivered.wait(), wait_s)
        return not delegation.delivered.is_set()

    def in_flight(self, session_id: str | None = None) -> int:
        """Delegations running or waiting for a slot (of one session, or of all)."""
        return self._per_session[session_id] if session_id is not None else len(self._delegations)

    @property
    def running(self) -> int:
        """Delegations holding a slot now."""
        return self._running

    async def check_health(self) -> None:
        """Raise BackendError unless the backend can answer now."""
        if self._closed:
            raise BackendError("the brain is shutting down")
        await self.backend.check_health()

    async def close(self, grace_s: float = CANCEL_GRACE_S + DELIVERY_TIMEOUT_S) -> None:
        """Refuse new delegations, cancel those in flight (each delivered as cancelled), wait up to `grace_s`
        for the deliveries, then close the backend."""
        self._closed = True
        for session_id, delegation_id in list(self._delegations):
            self.cancel(session_id, delegation_id, SHUT_DOWN)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        try:
            await self.backend.close()
        except Exception as exc:  # a backend that cannot close its pool must not stop the shutdown
            log.warning("brain backend %s did not close: %s", self.backend.name, exc)

    # -- admission and slots

    def _refusal(self, request: DelegationRequest) -> str:
        if self._closed:
            return "the brain is shutting down"
        if not request.session_id or not request.delegation_id:
            return "the delegation has no session or delegation id"
        if not request.question.strip():
            return "the delegation has no question"
        if self._per_session[request.session_id] >= self.max_in_flight_per_session:
            return f"{TOO_MANY} for this session (at most {self.max_in_flight_per_session})"
        if len(self._delegations) >= self.max_in_flight + self.max_queued:
            return TOO_MANY
        return ""

    async def _acquire(self) -> None:
        """A slot, first come first served: a free one at once, else the one a finishing delegation hands on."""
        if self._running < self.max_in_flight and not self._waiting:
            self._running += 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # handed a slot as it was cancelled: hand it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(turn)
            raise

    def _release(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes to the longest waiting; the count stays
                return
        self._running -= 1

    async def _work(self, request: DelegationRequest) -> BrainAnswer:
        await self._acquire()
        try:
            return await self.backend.solve(request)
        finally:
            self._release()

    # -- the one outcome

    async def _supervise(self, delegation: _Delegation) -> None:
        work = delegation.work
        done, _ = await asyncio.wait({work}, timeout=self.timeout_s)
        delegation.settled = True
        if not done and work.cancel():
            await asyncio.wait({work}, timeout=CANCEL_GRACE_S)
            result = self._result(delegation.request, "timed_out", delegation.accepted_at,
                                  reason=f"no answer within {self.timeout_s:g} s")
        else:
            result = self._outcome(delegation)
        key = (delegation.request.session_id, delegation.request.delegation_id)
        del self._delegations[key]
        self._per_session[key[0]] -= 1
        if self._per_session[key[0]] <= 0:
            del self._per_session[key[0]]
        self.metrics.delegations_in_flight.set(len(self._delegations))
        try:
            await self._deliver(result)
        finally:
            delegation.delivered.set()

    def _outcome(self, delegation: _Delegation) -> DelegationResult:
        work, request, accepted_at = delegation.work, delegation.request, delegation.accepted_at
        if work.cancelled():
            return self._result(request, "cancelled", accepted_at, reason=delegation.cancel_reason or SHUT_DOWN)
        error = work.exception()
        if isinstance(error, BackendTimeout):
            return self._result(request, "timed_out", accepted_at, reason=str(error))
        if isinstance(error, BackendError):
            return self._result(request, "failed", accepted_at, reason=str(error) or "the backend failed")
        if error is not None:
            log.error("brain backend %s raised on delegation %s", self.backend.name, request.delegation_id,
                      exc_info=error)
            return self._result(request, "failed", accepted_at, reason=f"the brain failed ({type(error).__name__})")
        answer = bound_answer(work.result(), self.spoken_chars)
        if not answer.text and answer.rich is None:
            return self._result(request, "failed", accepted_at, reason="the background brain gave an empty answer")
        return self._result(request, "done", accepted_at, text=answer.text, full_text=answer.full_text,
                            rich=answer.rich)

    def _result(
        self, request: DelegationRequest, status: DelegationStatus, accepted_at: float | None = None, **fields: Any
    ) -> DelegationResult:
        duration = asyncio.get_running_loop().time() - accepted_at if accepted_at is not None else 0.0
        return DelegationResult(
            session_id=request.session_id, delegation_id=request.delegation_id, status=status,
            question=request.question[:QUESTION_MAX_CHARS], duration_s=round(duration, 3),
            stream_time=request.stream_time, **fields,
        )

    async def _deliver(self, result: DelegationResult) -> None:
        self.metrics.observe_delegation(result.status, result.duration_s)
        log.info("delegation %s of %s: %s after %.1f s%s", result.delegation_id, result.session_id, result.status,
                 result.duration_s, f" ({result.reason})" if result.reason else "")
        for attempt in range(DELIVERY_ATTEMPTS):
            try:
                async with asyncio.timeout(self.delivery_timeout_s):
                    await self._sink(result)
                return
            except TimeoutError:
                break  # it may have landed: a second try could deliver it twice
            except Exception as exc:
                log.warning("delivering delegation %s of %s failed (%s: %s)", result.delegation_id,
                            result.session_id, type(exc).__name__, exc)
                await asyncio.sleep(0.1 * 2**attempt)
        self.metrics.delegation_deliveries_failed_total.inc()
        log.error("the result of delegation %s of %s was not delivered", result.delegation_id, result.session_id)

    def _own(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
