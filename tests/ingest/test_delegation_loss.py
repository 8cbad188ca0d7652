"""A delegation whose brain replica is lost mid-answer ends failed, once, at once (not at its receipt's deadline),
saying the replica was lost; one answered before the loss keeps its answer and gets no second result; one on a
replica that lives is followed to its answer. The session's delegations against the brain's real runner and a
real Redis; the replica's loss is the `follow` call failing, as it does when Ray reports the replica dead."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors.brain.runner import Brain as BrainRunner
from actors.common.messages import DelegationResult
from actors.common.metrics import VigilMetrics
from actors.common.replicas import ReplicaFailed
from actors.common.session_store import SessionStore
from actors.ingest.delegations import BRAIN_LOST, Brain, SessionDelegations
from tests.brain.helpers import GatedBackend, until

pytestmark = pytest.mark.unit

SESSION = "s_lost"
NOTICED_WITHIN_S = 0.5  # from the replica's loss to the failed result in the session's log


class LosableReplica:
    """The brain runner as one replica the test can lose: its `follow` calls fail with ReplicaFailed from then
    on, as Serve's calls to a dead replica do, and it delivers nothing more."""

    def __init__(self, store: SessionStore) -> None:
        self.backend = GatedBackend()
        self.runner = BrainRunner(self.backend, store.push_delegation_result, timeout_s=120.0)
        self.lost = asyncio.Event()
        self.follows = 0

    def lose(self) -> None:
        self.lost.set()

    async def follow(self, session_id: str, delegation_id: str) -> bool:
        self.follows += 1
        if self.lost.is_set():
            raise ReplicaFailed("the actor died unexpectedly")
        following = asyncio.ensure_future(self.runner.follow(session_id, delegation_id, 0.2))
        lost = asyncio.ensure_future(self.lost.wait())
        await asyncio.wait({following, lost}, return_when=asyncio.FIRST_COMPLETED)
        lost.cancel()
        if following.done():
            return following.result()
        following.cancel()
        raise ReplicaFailed("the actor died unexpectedly")

    def brain(self) -> Brain:
        async def delegate(request):  # type: ignore[no-untyped-def]
            return self.runner.delegate(request)

        async def cancel(session_id: str, delegation_id: str) -> bool:
            return self.runner.cancel(session_id, delegation_id)

        async def cancel_session(session_id: str) -> int:
            return self.runner.cancel_session(session_id)

        return Brain(delegate=delegate, cancel=cancel, cancel_session=cancel_session, follow=self.follow)


async def _recorded(store: SessionStore, session_id: str, timeout: float = 2.0) -> list[DelegationResult]:
    """The session's delegation log once it holds a result."""
    async with asyncio.timeout(timeout):
        while not (recorded := await store.delegations(session_id)):  # noqa: ASYNC110 (Redis, polled)
            await asyncio.sleep(0.01)
    return recorded


async def test_a_lost_replica_fails_its_delegation_once_at_once(store: SessionStore) -> None:
    replica = LosableReplica(store)
    session = SessionDelegations(SESSION + "_1", replica.brain(), store, VigilMetrics(), lambda message: None)
    session.start("7", "what do the prices add up to?", "Let me check.", 3.0, None, ())
    await until(lambda: replica.backend.started == [f"{SESSION}_1/7"])
    await until(lambda: replica.follows >= 1)
    replica.lose()
    lost_at = time.monotonic()
    await until(lambda: "7" in session._given_up)
    [result] = await _recorded(store, SESSION + "_1")
    noticed = time.monotonic() - lost_at
    assert (result.delegation_id, result.status, result.reason) == ("7", "failed", BRAIN_LOST)
    assert noticed < NOTICED_WITHIN_S, f"noticed {noticed:.2f} s after the loss"
    await session.overdue()  # the receipt's deadline path does not fail it a second time
    await asyncio.sleep(0.1)
    assert len(await store.delegations(SESSION + "_1")) == 1
    await session.close()
    await replica.runner.close(grace_s=1.0)


async def test_an_answer_recorded_before_the_loss_is_the_only_result(store: SessionStore) -> None:
    replica = LosableReplica(store)
    session = SessionDelegations(SESSION + "_2", replica.brain(), store, VigilMetrics(), lambda message: None)
    session.start("9", "which bus stops here?", "Let me look.", 5.0, None, ())
    await until(lambda: replica.follows >= 1)
    replica.backend.release(f"{SESSION}_2/9")
    await _recorded(store, SESSION + "_2")
    # Lost just as it delivered: the follow that was held fails, but the answer is in the log already.
    await session._lost("9", "which bus stops here?", 5.0)
    [result] = await store.delegations(SESSION + "_2")
    assert result.status == "done"
    await session.close()
    await replica.runner.close(grace_s=1.0)


async def test_a_delegation_on_a_live_replica_is_followed_to_its_answer(store: SessionStore) -> None:
    replica = LosableReplica(store)
    session = SessionDelegations(SESSION + "_3", replica.brain(), store, VigilMetrics(), lambda message: None)
    session.start("4", "how far is the station?", "Let me check.", 2.0, None, ())
    await until(lambda: replica.follows >= 3, timeout=2.0)  # asked again while it runs
    replica.backend.release(f"{SESSION}_3/4")
    await until(lambda: not session._calls, timeout=2.0)  # the follow ended with the answer
    [result] = await store.delegations(SESSION + "_3")
    assert result.status == "done" and "4" not in session._given_up
    await session.close()
    await replica.runner.close(grace_s=1.0)
