"""The brain's runner: every delegation, accepted or refused, ends in exactly one result — done, failed with its
reason, timed out or cancelled; a session's share is bounded, slots go first come first served across sessions,
so one session's flood does not starve another; shutdown cancels what is in flight and says so."""

from __future__ import annotations

from typing import Any

import pytest

from actors.brain.answer import SPOKEN_MAX_CHARS
from actors.brain.backend import BackendError, BackendTimeout, BrainAnswer
from actors.brain.runner import Brain
from actors.common.messages import RichPart
from actors.common.metrics import VigilMetrics
from tests.brain.helpers import GatedBackend, Results, delegation, settle, until

pytestmark = pytest.mark.unit


def make_brain(backend: GatedBackend, results: Results, **options: Any) -> Brain:
    defaults: dict[str, Any] = {"timeout_s": 5.0, "max_in_flight": 4, "max_in_flight_per_session": 2,
                                "max_queued": 8}
    return Brain(backend, results, **(defaults | options))


async def test_an_answer_is_delivered_once_condensed_with_its_whole_text_and_rich_part() -> None:
    backend, results = GatedBackend(), Results()
    brain = make_brain(backend, results)
    long = "The receipt lists four items. " + "Bread costs two euros and milk one euro fifty. " * 20
    table = RichPart(kind="table", content="| item | price |\n| --- | --- |\n| bread | 2.00 |")
    backend.answers["s_a/d1"] = BrainAnswer(text=long, rich=table)
    receipt = brain.delegate(delegation())
    assert receipt.accepted and receipt.reason == "" and receipt.deadline > 0
    backend.release("s_a/d1")
    [result] = await results.wait(1)
    assert result.status == "done" and result.reason == ""
    assert len(result.text) <= SPOKEN_MAX_CHARS and result.text.startswith("The receipt lists four items.")
    assert result.full_text == long.strip() and result.rich == table
    assert result.question == "what do the prices add up to?" and result.stream_time == 12.0
    assert result.prompt_line().startswith('about "what do the prices add up to?": The receipt lists')
    await settle()
    assert len(results.items) == 1 and brain.in_flight() == 0
    await brain.close()


async def test_a_failing_backend_gives_a_failed_result_with_its_reason() -> None:
    backend, results = GatedBackend(), Results()
    brain = make_brain(backend, results)
    backend.fail["s_a/d1"] = BackendError("the agent failed: the page did not load")
    backend.fail["s_a/d2"] = ZeroDivisionError("oops")
    backend.fail["s_b/d1"] = BackendTimeout("the agent ran out of time")
    for request in (delegation(), delegation(delegation_id="d2"), delegation(session_id="s_b")):
        assert brain.delegate(request).accepted
    backend.release("s_a/d1", "s_a/d2", "s_b/d1")
    await results.wait(3)
    assert results.of("d1").status == "failed"
    assert results.of("d1").reason == "the agent failed: the page did not load"
    assert results.of("d2").reason == "the brain failed (ZeroDivisionError)"
    assert results.of("d1", "s_b").status == "timed_out"
    assert results.of("d1").prompt_line() == (
        'about "what do the prices add up to?": no answer (the agent failed: the page did not load)'
    )
    results.assert_one_each()
    await brain.close()


async def test_a_delegation_past_its_timeout_is_cancelled_and_times_out() -> None:
    backend, results = GatedBackend(), Results()
    brain = make_brain(backend, results, timeout_s=0.2, max_in_flight=1)
    brain.delegate(delegation())
    brain.delegate(delegation(session_id="s_b"))  # waits for the one slot
    await results.wait(2, timeout=2.0)
    first, second = results.of("d1"), results.of("d1", "s_b")
    assert first.status == "timed_out" and first.reason == "no answer within 0.2 s"
    assert 0.2 <= first.duration_s < 0.5
    assert backend.cancelled[0] == "s_a/d1"  # the call was abandoned
    assert second.status == "timed_out"  # it waited for the slot, then ran out of time
    assert brain.running == 0 and brain.in_flight() == 0
    await brain.close()


async def test_cancelling_a_running_or_waiting_delegation_gives_cancelled() -> None:
    backend, results = GatedBackend(), Results()
    brain = make_brain(backend, results, max_in_flight=1)
    brain.delegate(delegation())
    brain.delegate(delegation(session_id="s_b"))
    await settle()
    assert backend.started == ["s_a/d1"]
    assert brain.cancel("s_b", "d1")  # still waiting for a slot
    assert brain.cancel("s_a", "d1")  # running
    assert not brain.cancel("s_a", "d1") and not brain.cancel("s_a", "unknown")
    await results.wait(2)
    assert {r.status for r in results.items} == {"cancelled"}
    assert {r.reason for r in results.items} == {"cancelled by the user"}
    assert backend.started == ["s_a/d1"] and backend.cancelled == ["s_a/d1"]  # s_b never reached the backend
    assert results.of("d1").prompt_line() == 'about "what do the prices add up to?": cancelled (cancelled by the user)'
    # The freed slot serves the next delegation.
    brain.delegate(delegation(delegation_id="d2"))
    await settle()
    backend.release("s_a/d2")
    await results.wait(3)
    assert results.of("d2").status == "done"
    assert not brain.cancel("s_a", "d2")  # finished
    results.assert_one_each()
    await brain.close()


async def test_a_session_beyond_its_share_is_refused_with_a_failed_result() -> None:
    backend, results = GatedBackend(), Results()
    brain = make_brain(backend, results, max_in_flight_per_session=2)
    receipts = [brain.delegate(delegation(delegation_id=f"d{n}")) for n in range(1, 5)]
    assert [r.accepted for r in receipts] == [True, True, False, False]
    assert receipts[2].reason == "too many delegations in flight for this session (at most 2)"
    await results.wait(2)
    assert [(r.delegation_id, r.status) for r in results.items] == [("d3", "failed"), ("d4", "failed")]
    assert results.of("d3").reason == receipts[2].reason
    assert brain.delegate(delegation(session_id="s_b")).accepted  # another session's share is its own
    backend.release("s_a/d1", "s_a/d2", "s_b/d1")
    await results.wait(5)
    results.assert_one_each()
    assert brain.delegate(delegation(delegation_id="d5")).accepted  # the share is free again
    await brain.close()


async def test_beyond_the_global_limit_and_queue_delegations_are_refused() -> None:
    backend, results = GatedBackend(), Results()
    brain = make_brain(backend, results, max_in_flight=1, max_queued=1, max_in_flight_per_session=1)
    assert brain.delegate(delegation(session_id="s_1")).accepted
    assert brain.delegate(delegation(session_id="s_2")).accepted
    refused = brain.delegate(delegation(session_id="s_3"))
    assert not refused.accepted and refused.reason == "too many delegations in flight"
    [result] = await results.wait(1)
    assert (result.session_id, result.status, result.reason) == ("s_3", "failed", "too many delegations in flight")
    await brain.close()


async def test_slots_go_first_come_first_served_across_sessions() -> None:
    backend, results = GatedBackend(), Results()
    brain = make_brain(backend, results, max_in_flight=1, max_in_flight_per_session=2)
    brain.delegate(delegation(session_id="s_a", delegation_id="d1"))
    brain.delegate(delegation(session_id="s_a", delegation_id="d2"))
    brain.delegate(delegation(session_id="s_b", delegation_id="d1"))
    await settle()
    backend.release("s_a/d1")
    await results.wait(1)
    # s_a asks again the moment it has an answer: it queues behind s_b, which asked before it.
    brain.delegate(delegation(session_id="s_a", delegation_id="d3"))
    backend.release("s_a/d2", "s_b/d1", "s_a/d3")
    await results.wait(4)
    assert backend.started == ["s_a/d1", "s_a/d2", "s_b/d1", "s_a/d3"]
    results.assert_one_each()
    await brain.close()


async def test_a_flooding_session_does_not_starve_another() -> None:
    backend, results = GatedBackend(), Results()
    brain = make_brain(backend, results, max_in_flight=2, max_in_flight_per_session=2, max_queued=4)
    flood = [brain.delegate(delegation(session_id="s_flood", delegation_id=f"d{n}")) for n in range(50)]
    assert sum(r.accepted for r in flood) == 2
    assert brain.delegate(delegation(session_id="s_quiet")).accepted
    await settle()
    assert backend.started == ["s_flood/d0", "s_flood/d1"]  # both slots taken by the flood
    # The flood asks again as fast as it can; the quiet session's question is served next all the same.
    backend.release("s_flood/d0")
    await until(lambda: any(r.delegation_id == "d0" for r in results.items))
    later = [brain.delegate(delegation(session_id="s_flood", delegation_id=f"d{n}")) for n in range(50, 60)]
    assert sum(r.accepted for r in later) == 1
    await settle()
    assert backend.started == ["s_flood/d0", "s_flood/d1", "s_quiet/d1"]
    backend.release("s_quiet/d1")
    await until(lambda: any(r.session_id == "s_quiet" for r in results.items))
    assert results.of("d1", "s_quiet").status == "done"
    await until(lambda: sum(r.reason.startswith("too many") for r in results.items) == 57)
    await brain.close()
    results.assert_one_each()


async def test_a_duplicate_id_is_refused_without_a_second_result() -> None:
    backend, results = GatedBackend(), Results()
    brain = make_brain(backend, results)
    assert brain.delegate(delegation()).accepted
    duplicate = brain.delegate(delegation())
    assert not duplicate.accepted and "already in flight" in duplicate.reason
    backend.release("s_a/d1")
    await results.wait(1)
    await settle()
    assert [r.status for r in results.items] == ["done"]
    await brain.close()


async def test_closing_cancels_what_is_in_flight_and_refuses_the_rest() -> None:
    backend, results = GatedBackend(), Results()
    brain = make_brain(backend, results, max_in_flight=1)
    brain.delegate(delegation())
    brain.delegate(delegation(session_id="s_b"))
    await settle()
    await brain.close()
    assert sorted((r.session_id, r.status, r.reason) for r in results.items) == [
        ("s_a", "cancelled", "the brain shut down"), ("s_b", "cancelled", "the brain shut down"),
    ]
    assert backend.closed
    refused = brain.delegate(delegation(delegation_id="late"))
    assert not refused.accepted and refused.reason == "the brain is shutting down"
    await results.wait(3)
    with pytest.raises(BackendError):
        await brain.check_health()


async def test_an_empty_question_or_answer_fails() -> None:
    backend, results = GatedBackend(), Results()
    brain = make_brain(backend, results)
    assert not brain.delegate(delegation(question="  ")).accepted
    backend.answers["s_a/d2"] = BrainAnswer(text="   ")
    brain.delegate(delegation(delegation_id="d2"))
    backend.release("s_a/d2")
    await results.wait(2)
    assert results.of("d1").reason == "the delegation has no question"
    assert results.of("d2").reason == "the background brain gave an empty answer"
    await brain.close()


async def test_a_sink_that_fails_once_is_retried_and_one_that_keeps_failing_is_counted() -> None:
    backend, metrics = GatedBackend(), VigilMetrics()
    delivered: list[str] = []
    failures = {"d1": 1, "d2": 10}

    async def flaky(result):  # type: ignore[no-untyped-def]
        if failures.get(result.delegation_id, 0) > 0:
            failures[result.delegation_id] -= 1
            raise ConnectionError("redis went away")
        delivered.append(result.delegation_id)

    brain = Brain(backend, flaky, metrics=metrics, max_in_flight_per_session=4)
    brain.delegate(delegation(delegation_id="d1"))
    brain.delegate(delegation(delegation_id="d2"))
    backend.release("s_a/d1", "s_a/d2")
    await until(lambda: brain.in_flight() == 0)
    await brain.close()
    assert delivered == ["d1"]
    assert metrics.delegation_deliveries_failed_total._value.get() == 1


async def test_outcomes_are_counted_once_each() -> None:
    backend, results, metrics = GatedBackend(), Results(), VigilMetrics()
    brain = Brain(backend, results, metrics=metrics, timeout_s=0.1, max_in_flight_per_session=1)
    backend.fail["s_b/d1"] = BackendError("no")
    for session in ("s_a", "s_b", "s_c", "s_d"):
        brain.delegate(delegation(session_id=session))
    brain.delegate(delegation(session_id="s_a", delegation_id="d2"))  # refused: failed
    brain.cancel("s_c", "d1")
    backend.release("s_a/d1", "s_b/d1")
    await results.wait(5)
    counted = {s.labels["outcome"]: s.value for m in metrics.delegations_total.collect() for s in m.samples
               if s.name == "vigil_delegations_total"}
    assert counted == {"done": 1.0, "failed": 2.0, "cancelled": 1.0, "timed_out": 1.0}
    assert metrics.delegations_in_flight._value.get() == 0
    assert b"vigil_delegation_seconds_bucket" in metrics.render()
    await brain.close()
