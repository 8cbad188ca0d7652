"""What a result carries: a table, page or chart taken out of the answer as its own part, the spoken part
condensed to whole sentences within its limit, oversized parts bounded; and the messages survive msgpack."""

from __future__ import annotations

import pytest

from actors.brain.answer import FULL_TEXT_MAX_CHARS, RICH_MAX_CHARS, bound_answer, condense, split_answer
from actors.brain.backend import BrainAnswer
from actors.common.messages import (
    DelegationReceipt,
    DelegationRequest,
    DelegationResult,
    MessageTooLarge,
    RichPart,
    decode,
    encode,
)
from tests.brain.helpers import delegation

pytestmark = pytest.mark.unit


def test_a_fenced_block_of_a_known_kind_becomes_the_rich_part() -> None:
    raw = "The totals are below.\n\n```html\n<table><tr><td>42</td></tr></table>\n```\nAsk me more."
    answer = split_answer(raw)
    assert answer.rich == RichPart(kind="html", content="<table><tr><td>42</td></tr></table>")
    assert answer.text == "The totals are below.\n\nAsk me more."
    chart = split_answer('```vega-lite\n{"mark": "bar"}\n```')
    assert chart.rich == RichPart(kind="chart", content='{"mark": "bar"}')
    assert chart.text == "The chart is on the page."
    code = split_answer("Run this:\n```python\nprint(1)\n```")
    assert code.rich is None and "print(1)" in code.text  # not a kind the page shows: it stays text


def test_a_markdown_table_becomes_a_table_part() -> None:
    raw = "Two items:\n| item | price |\n| --- | ---: |\n| bread | 2.00 |\n| milk | 1.50 |\nTotal 3.50."
    answer = split_answer(raw)
    assert answer.rich == RichPart(kind="table", content="| item | price |\n| --- | ---: |\n| bread | 2.00 |\n"
                                                         "| milk | 1.50 |")
    assert answer.text == "Two items:\nTotal 3.50."
    assert split_answer("a | b but no table").rich is None


def test_the_spoken_part_is_whole_sentences_within_the_limit() -> None:
    text = "First sentence here. Second one follows.   Third is long " + "and longer " * 40
    assert condense(text, 60) == "First sentence here. Second one follows."
    words = condense("word " * 100, 50)
    assert len(words) <= 50 and words.endswith("…") and " wor…" not in words
    assert condense("  short\n answer ") == "short answer"


def test_long_and_oversized_parts_are_bounded() -> None:
    long = "A sentence. " * 10_000
    bounded = bound_answer(BrainAnswer(text=long), spoken_chars=100)
    assert len(bounded.text) <= 100 and len(bounded.full_text) == FULL_TEXT_MAX_CHARS
    huge = bound_answer(BrainAnswer(text="See the page.", rich=RichPart("html", "x" * (RICH_MAX_CHARS + 1))))
    assert huge.rich is None and huge.text == "See the page." and huge.full_text == ""
    odd = bound_answer(BrainAnswer(text="ok", rich=RichPart("script", "alert(1)")))
    assert odd.rich is None


def test_delegation_messages_round_trip_through_msgpack() -> None:
    request = delegation(memories=("at 00:00:05 the user said: keep the receipt",))
    assert decode(DelegationRequest, encode(request)) == request
    result = DelegationResult(session_id="s_a", delegation_id="d1", status="done", question="q", text="t",
                              full_text="t t", rich=RichPart("table", "| a |\n| --- |"), duration_s=1.5)
    assert decode(DelegationResult, encode(result)) == result
    plain = DelegationResult(session_id="s_a", delegation_id="d2", status="timed_out", reason="no answer")
    assert decode(DelegationResult, encode(plain)) == plain
    assert decode(DelegationReceipt, encode(DelegationReceipt(accepted=True, deadline=5.0))).accepted
    with pytest.raises(MessageTooLarge):
        encode(delegation(frames=3), limit=1000)
