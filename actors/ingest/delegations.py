"""A session's delegations, seen from its ticks: hand each `delegate` decision to the brain, show each result
to the client as it arrives, and make sure every delegation ends in exactly one result.

The brain records a delegation's one result in Redis (the session's delegation log) and puts it in the
session's inbox, from which the next tick's prompt carries it. Two things the brain cannot do are done here:
a delegation the brain never took (no brain configured, the call failed) gets its failed result from this
session, and one taken by a brain replica that was lost before answering gets its failed result from here too:
at once when the call that follows it on that replica fails (`Brain.follow`), else once the receipt's deadline
has passed (plus a grace), so that no delegation is left without an outcome.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from actors.common.messages import (
    DelegationFrame,
    DelegationReceipt,
    DelegationRequest,
    DelegationResult,
    from_dict,
    to_dict,
)
from actors.common.metrics import VigilMetrics
from actors.common.replicas import ReplicaFailed
from actors.common.session_store import SessionStore

log = logging.getLogger(__name__)

DelegateFn = Callable[[DelegationRequest], Awaitable[DelegationReceipt]]
CancelFn = Callable[[str, str], Awaitable[bool]]
CancelSessionFn = Callable[[str], Awaitable[int]]
FollowFn = Callable[[str, str], Awaitable[bool]]
SendFn = Callable[[str], None]

LOST_GRACE_S = 10.0  # after a receipt's deadline, how long a result may still be on its way
BRAIN_LOST = "the brain replica was lost before it answered"
JPEG_QUALITY = 85


@dataclass(frozen=True, slots=True)
class Brain:
    """What a session calls on the brain (`actors.brain.deployment.RemoteBrain`, or a runner in tests)."""

    delegate: DelegateFn
    cancel: CancelFn
    cancel_session: CancelSessionFn  # a session that ends takes its delegations with it
    # Held on the replica that runs a delegation: True while it is still in flight there; `ReplicaFailed` when
    # that replica was lost. None: a lost replica shows only at the receipt's deadline.
    follow: FollowFn | None = None


def delegation_message(result: DelegationResult) -> str:
    """The data-channel message of a delegation's result (docs/protocol.md)."""
    payload: dict[str, Any] = {
        "type": "delegation", "id": result.delegation_id, "status": result.status, "question": result.question,
        "text": result.text, "full_text": result.full_text, "reason": result.reason,
        "duration_s": round(result.duration_s, 3), "stream_time": round(result.stream_time, 3),
        "rich": None if result.rich is None else {"kind": result.rich.kind, "content": result.rich.content},
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def _jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class SessionDelegations:
    """Owns one session's delegation calls; `close()` cancels and awaits them."""

    def __init__(
        self, session_id: str, brain: Brain | None, store: SessionStore, metrics: VigilMetrics, send: SendFn,
    ) -> None:
        self.session_id = session_id
        self.brain = brain
        self.store = store
        self.metrics = metrics
        self.send = send
        # Delegations without a result yet: id -> (question, stream time, when (time.time()) it is overdue).
        self.pending: dict[str, tuple[str, float, float]] = {}
        self._calls: set[asyncio.Task[None]] = set()
        self._given_up: set[str] = set()  # failed here as lost: a late answer from the brain is not shown

    def start(self, delegation_id: str, question: str, note: str, stream_time: float,
              frame: np.ndarray | None, memories: tuple[str, ...]) -> None:
        """Hand a delegation to the brain in the background: the tick that decided it does not wait."""
        task = asyncio.get_running_loop().create_task(
            self._delegate(delegation_id, question, note, stream_time, frame, memories),
            name=f"delegate-{self.session_id}-{delegation_id}")
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _delegate(self, delegation_id: str, question: str, note: str, stream_time: float,
                        frame: np.ndarray | None, memories: tuple[str, ...]) -> None:
        self.pending[delegation_id] = (question, stream_time, float("inf"))  # until the receipt says when
        if self.brain is None:
            await self._fail(delegation_id, question, stream_time, "no background brain is configured here "
                             "(VIGIL_BRAIN_BACKEND)")
            return
        frames = () if frame is None else (DelegationFrame(stream_time, await asyncio.to_thread(_jpeg, frame)),)
        request = DelegationRequest(session_id=self.session_id, delegation_id=delegation_id, question=question,
                                    note=note, frames=frames, memories=memories, stream_time=stream_time)
        try:
            receipt = await self.brain.delegate(request)
        except Exception as exc:
            log.warning("session %s: delegation %s not taken: %r", self.session_id, delegation_id, exc)
            reason = f"the brain could not be reached ({type(exc).__name__})"
            await self._fail(delegation_id, question, stream_time, reason)
            return
        if delegation_id in self.pending:  # its result may have come already
            # A refused delegation's failed result comes from the brain all the same.
            deadline = receipt.deadline if receipt.accepted else time.time()
            self.pending[delegation_id] = (question, stream_time, deadline + LOST_GRACE_S)
        if receipt.accepted:
            await self._follow(delegation_id, question, stream_time)

    async def _follow(self, delegation_id: str, question: str, stream_time: float) -> None:
        """Hold a call on the brain replica that runs the delegation until it has answered: when that replica
        is lost, the delegation fails now rather than at its receipt's deadline."""
        if self.brain is None or self.brain.follow is None:
            return
        while delegation_id in self.pending:
            try:
                if not await self.brain.follow(self.session_id, delegation_id):
                    return  # answered (its result is on its way), or another replica runs it
            except ReplicaFailed:
                log.warning("session %s: the brain replica running delegation %s was lost", self.session_id,
                            delegation_id)
                await self._lost(delegation_id, question, stream_time)
                return
            except Exception as exc:  # not followed any more: the receipt's deadline still stands
                log.info("session %s: delegation %s not followed: %r", self.session_id, delegation_id, exc)
                return

    async def _lost(self, delegation_id: str, question: str, stream_time: float) -> None:
        """Fail, once, a delegation whose brain replica died, unless its result was recorded before it did."""
        try:
            recorded = any(result.delegation_id == delegation_id
                           for result in await self.store.delegations(self.session_id))
        except Exception as exc:
            log.warning("session %s: delegation log unreadable (%r); delegation %s failed as lost", self.session_id,
                        exc, delegation_id)
            recorded = False
        if recorded or delegation_id not in self.pending or delegation_id in self._given_up:
            return
        self.pending[delegation_id] = (question, stream_time, float("inf"))
        self._given_up.add(delegation_id)
        await self._fail(delegation_id, question, stream_time, BRAIN_LOST)

    async def _fail(self, delegation_id: str, question: str, stream_time: float, reason: str) -> None:
        """Record a failed result the brain could not record itself; it reaches the client with the next tick."""
        result = DelegationResult(session_id=self.session_id, delegation_id=delegation_id, status="failed",
                                  question=question, reason=reason, stream_time=stream_time)
        try:
            await self.store.push_delegation_result(result)
        except Exception:
            log.exception("session %s: delegation %s failed and could not be recorded", self.session_id,
                          delegation_id)
            self.pending.pop(delegation_id, None)
            self.metrics.observe_delegation("failed", 0.0)
            self.send(delegation_message(result))

    async def overdue(self) -> None:
        """Fail, once, each delegation whose brain replica was lost before it answered."""
        now = time.time()
        for delegation_id, (question, stream_time, due) in list(self.pending.items()):
            if now > due:
                # Its failed result is on its way to the inbox; it is not failed twice.
                self.pending[delegation_id] = (question, stream_time, float("inf"))
                self._given_up.add(delegation_id)
                await self._fail(delegation_id, question, stream_time, BRAIN_LOST)

    def arrived(self, items: list[dict[str, Any]]) -> None:
        """Inbox items a tick took: each delegation result is shown to the client, once."""
        for item in items:
            if item.get("kind") != "delegation" or not isinstance(item.get("result"), dict):
                continue
            try:
                result = from_dict(DelegationResult, item["result"])
            except (TypeError, ValueError, KeyError):
                log.warning("session %s: an unreadable delegation result in the inbox", self.session_id)
                continue
            if result.session_id != self.session_id:
                continue
            if result.delegation_id in self._given_up and result.delegation_id not in self.pending:
                log.info("session %s: delegation %s answered after it was given up", self.session_id,
                         result.delegation_id)
                continue
            self.pending.pop(result.delegation_id, None)
            self.metrics.observe_delegation(result.status, result.duration_s)
            self.send(delegation_message(result))

    async def cancel(self, delegation_id: str) -> bool:
        """The user's cancel: True when the brain had it in flight (its `cancelled` result follows)."""
        if self.brain is None:
            return False
        return await self.brain.cancel(self.session_id, delegation_id)

    async def close(self) -> None:
        for task in list(self._calls):
            task.cancel()
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)


def result_payload(result: DelegationResult) -> dict[str, Any]:
    """A recorded delegation result as the HTTP API shows it."""
    return to_dict(result)
