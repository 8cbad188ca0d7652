"""The tick log's write-behind buffer: outcomes land at once while Redis answers; while it does not they are
held, in order and bounded, and land oldest first when it is back; what the buffer could not hold is counted
and marked by one outcome; a write replayed after its reply was lost appends nothing; a session taken over
elsewhere keeps this replica's held outcomes out of its log; and a retried pending read loses nothing."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis

from actors.common.messages import TickOutcome
from actors.common.metrics import VigilMetrics
from actors.common.session_store import SessionStore, unrecorded_runs
from actors.ingest.outcome_journal import UNLOGGED, JournalSettings, OutcomeJournal, unlogged

pytestmark = pytest.mark.unit

FAST = JournalSettings(capacity=50, wait_s=0.1, attempt_timeout_s=0.2, backoff_s=0.02, backoff_max_s=0.05)
HELD_AT_ONCE_S = 0.05  # once Redis is known to be out, a tick does not wait for it at all
LANDS_WITHIN_S = 2.0  # after Redis is back, held outcomes are in the log within this


def _outcome(tick: int, session_id: str = "s_journal") -> TickOutcome:
    return TickOutcome(session_id=session_id, tick=tick, stream_time=float(tick), outcome="silent",
                       wall_time=time.time())


class FakeLog:
    """An event log behind a Redis that can stall (no answer) or refuse connections, and that knows ownership."""

    def __init__(self) -> None:
        self.entries: list[TickOutcome] = []
        self._answering = asyncio.Event()
        self._answering.set()
        self.refusing = False
        self.owned = True

    @property
    def stalled(self) -> bool:
        return not self._answering.is_set()

    @stalled.setter
    def stalled(self, stalled: bool) -> None:
        if stalled:
            self._answering.clear()
        else:
            self._answering.set()

    async def write(self, outcome: TickOutcome) -> bool:
        await self._answering.wait()  # a stalled Redis: no answer, for as long as it lasts
        if self.refusing:
            raise redis.ConnectionError("Connection refused")
        if not self.owned:
            return False
        self.entries.append(outcome)
        return True


async def _until(predicate, timeout: float = LANDS_WITHIN_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _count(metrics: VigilMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def test_outcomes_land_at_once_while_redis_answers() -> None:
    fake, metrics = FakeLog(), VigilMetrics()
    journal = OutcomeJournal("s_journal", fake.write, metrics, FAST)
    assert [await journal.record(_outcome(tick)) for tick in (1, 2, 3)] == ["recorded"] * 3
    assert [entry.tick for entry in fake.entries] == [1, 2, 3]
    assert journal.held == 0 and _count(metrics, "vigil_outcomes_held_total") == 0
    await journal.close()


@pytest.mark.parametrize("fault", ["stalled", "refusing"])
async def test_outcomes_held_while_redis_is_out_land_in_order_when_it_is_back(fault: str) -> None:
    fake, metrics = FakeLog(), VigilMetrics()
    journal = OutcomeJournal("s_journal", fake.write, metrics, FAST)
    assert await journal.record(_outcome(1)) == "recorded"
    setattr(fake, fault, True)
    started = time.monotonic()
    assert await journal.record(_outcome(2)) == "held"
    assert time.monotonic() - started < FAST.wait_s + 0.1, "the first tick waits at most wait_s"
    for tick in range(3, 11):
        started = time.monotonic()
        assert await journal.record(_outcome(tick)) == "held"
        assert time.monotonic() - started < HELD_AT_ONCE_S
    assert journal.pending == 9 and _count(metrics, "vigil_outcomes_pending") == 9
    setattr(fake, fault, False)
    await _until(lambda: journal.pending == 0)
    assert [entry.tick for entry in fake.entries] == list(range(1, 11))
    assert journal.held == journal.landed_late == 9
    assert _count(metrics, "vigil_outcomes_held_total") == 9 and _count(metrics, "vigil_outcomes_pending") == 0
    assert await journal.record(_outcome(11)) == "recorded", "once drained, ticks wait for their write again"
    await journal.close()


async def test_a_full_buffer_drops_the_overflow_counts_it_and_marks_it_once_redis_is_back() -> None:
    fake, metrics = FakeLog(), VigilMetrics()
    settings = JournalSettings(capacity=3, wait_s=0.05, attempt_timeout_s=0.2, backoff_s=0.02, backoff_max_s=0.05)
    journal = OutcomeJournal("s_journal", fake.write, metrics, settings)
    fake.stalled = True
    landings = [await journal.record(_outcome(tick)) for tick in range(1, 9)]
    assert landings == ["held"] * 3 + ["dropped"] * 5
    assert journal.dropped == 5 and _count(metrics, "vigil_outcomes_dropped_total") == 5
    fake.stalled = False
    await _until(lambda: len(fake.entries) == 4)
    assert await journal.record(_outcome(9)) == "recorded"
    assert [(entry.tick, entry.outcome) for entry in fake.entries] == [
        (1, "silent"), (2, "silent"), (3, "silent"), (4, UNLOGGED), (9, "silent")]
    assert "5 outcomes not logged (ticks 4-8)" in fake.entries[3].text and fake.entries[3].through == 8
    await journal.close()


async def test_an_outcome_redis_refuses_is_dropped_and_the_next_still_land() -> None:
    fake, metrics = FakeLog(), VigilMetrics()

    async def write(outcome: TickOutcome) -> bool:
        if outcome.tick == 2:
            raise redis.ResponseError("ERR an outcome this Redis will never take")
        return await fake.write(outcome)

    journal = OutcomeJournal("s_journal", write, metrics, FAST)
    assert [await journal.record(_outcome(tick)) for tick in (1, 2, 3)] == ["recorded", "dropped", "recorded"]
    assert [entry.tick for entry in fake.entries] == [1, 3]
    assert _count(metrics, "vigil_outcomes_dropped_total") == 1
    await journal.close()


async def test_closing_counts_what_could_not_land() -> None:
    fake, metrics = FakeLog(), VigilMetrics()
    journal = OutcomeJournal("s_journal", fake.write, metrics, FAST)
    fake.stalled = True
    for tick in (1, 2):
        await journal.record(_outcome(tick))
    started = time.monotonic()
    await journal.close(timeout_s=0.2)
    assert time.monotonic() - started < 1.0
    assert journal.dropped == 2 and _count(metrics, "vigil_outcomes_dropped_total") == 2
    assert _count(metrics, "vigil_outcomes_pending") == 0
    assert await journal.record(_outcome(3)) == "dropped"


# -- against a real Redis ----------------------------------------------------------------------------------------

async def test_recording_a_tick_again_appends_nothing(store: SessionStore) -> None:
    record, _ = await store.create()
    await store.claim(record.session_id, "replica-a/1")
    for _ in range(3):
        assert await store.record_outcome(_outcome(1, record.session_id), "replica-a/1")
    assert await store.record_outcome(_outcome(2, record.session_id), "replica-a/1")
    assert [o.tick for o in await store.outcomes(record.session_id)] == [1, 2]


async def test_a_write_whose_reply_was_lost_is_replayed_and_logged_once(store: SessionStore) -> None:
    record, _ = await store.create()
    owner = "replica-a/1"
    await store.claim(record.session_id, owner)
    lost_replies = {2, 3}

    async def write(outcome: TickOutcome) -> bool:
        landed = await store.record_outcome(outcome, owner)
        if outcome.tick in lost_replies:  # Redis applied it, then the connection broke before the reply came
            lost_replies.discard(outcome.tick)
            raise redis.ConnectionError("Connection reset by peer")
        return landed

    journal = OutcomeJournal(record.session_id, write, VigilMetrics(), FAST)
    for tick in range(1, 6):
        await journal.record(_outcome(tick, record.session_id))
    await _until(lambda: journal.pending == 0)
    assert [o.tick for o in await store.outcomes(record.session_id)] == [1, 2, 3, 4, 5]
    await journal.close()


async def test_held_outcomes_of_a_session_taken_over_meanwhile_stay_out_of_its_log(store: SessionStore) -> None:
    record, _ = await store.create()
    await store.claim(record.session_id, "replica-a/1")
    gate = asyncio.Event()

    async def stalled_write(outcome: TickOutcome) -> bool:
        await gate.wait()
        return await store.record_outcome(outcome, "replica-a/1")

    refused: list[int] = []
    journal = OutcomeJournal(record.session_id, stalled_write, VigilMetrics(),
                             JournalSettings(wait_s=0.05, attempt_timeout_s=5.0), on_refused=refused.append)
    assert [await journal.record(_outcome(tick, record.session_id)) for tick in (1, 2, 3)] == ["held"] * 3
    await store.claim(record.session_id, "replica-b/1")  # the client reconnected through another replica
    assert await store.record_outcome(_outcome(4, record.session_id), "replica-b/1")
    gate.set()
    await _until(lambda: refused == [1])
    assert [o.tick for o in await store.outcomes(record.session_id)] == [4]
    assert await journal.record(_outcome(5, record.session_id)) == "refused"
    await journal.close()


async def test_a_pending_read_asked_again_gets_what_it_took(store: SessionStore) -> None:
    record, _ = await store.create()
    session_id = record.session_id
    await store.push_inbox(session_id, {"text": "the parcel arrived"})
    await store.push_control(session_id, {"speak_threshold": 0.8})
    taken = await store.pop_pending(session_id, "read-1")  # its reply lost, say: the reader asks again
    await store.push_inbox(session_id, {"text": "the door is open"})
    assert await store.pop_pending(session_id, "read-1") == taken == (
        [{"text": "the parcel arrived"}], [{"speak_threshold": 0.8}])
    assert await store.pop_pending(session_id, "read-2") == ([{"text": "the door is open"}], [])
    assert await store.pop_pending(session_id, "read-3") == ([], [])


async def test_a_claim_names_the_ticks_numbered_before_it_that_were_never_recorded(store: SessionStore) -> None:
    record, _ = await store.create()
    await store.claim(record.session_id, "replica-a/1")
    for tick in (1, 2, 4, 5, 9):  # 3: in flight when replica A died; 6-8: held for Redis there
        assert await store.record_outcome(_outcome(tick, record.session_id), "replica-a/1")
    clock = await store.claim(record.session_id, "replica-b/1")
    assert clock is not None and clock.tick == 9
    assert clock.unrecorded == ((3, 3), (6, 8))
    marker = unlogged(record.session_id, 6, 8, 6.0, "held for Redis when replica A died")
    assert await store.record_outcome(marker, "replica-b/1")
    clock = await store.claim(record.session_id, "replica-b/2")
    assert clock is not None and clock.unrecorded == ((3, 3),), "a marker stands for every tick it names"


async def test_a_marker_for_ticks_past_the_newest_moves_the_clock_past_them(store: SessionStore) -> None:
    record, _ = await store.create()
    await store.claim(record.session_id, "replica-a/1")
    assert await store.record_outcome(_outcome(1, record.session_id), "replica-a/1")
    assert await store.record_outcome(unlogged(record.session_id, 2, 40, 2.0, "buffer full"), "replica-a/1")
    clock = await store.claim(record.session_id, "replica-b/1")
    assert clock is not None and (clock.tick, clock.unrecorded) == (40, ()), "a resumed session numbers from 41"


def test_unrecorded_runs_read_redis_bit_order() -> None:
    assert unrecorded_runs(b"", 3) == ((1, 3),)
    assert unrecorded_runs(bytes([0b0110_0000]), 2) == ()
    assert unrecorded_runs(bytes([0b0101_0000]), 5) == ((2, 2), (4, 5))
    assert unrecorded_runs(bytes([0b0111_1111, 0b1000_0000]), 8) == ()
