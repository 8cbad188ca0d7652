"""The decision wire format: what a model writes parses into one decision, and a decision formats back to it."""

from __future__ import annotations

import pytest

from actors.common.decisions import format_decision, parse_decision
from actors.common.messages import Decision

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "kind", "text", "question"),
    [
        ("</silence>", "silent", "", ""),
        ("  </silence> trailing words", "silent", "", ""),
        ("</response> A hand is raised.", "respond", "A hand is raised.", ""),
        ("</response>   spaced\n  out  ", "respond", "spaced out", ""),
        ("</response> Let me check. </delegation> What model is this car?", "delegate", "Let me check.",
         "What model is this car?"),
        ("</response> Done. </delegation>  ", "respond", "Done.", ""),
        ("</response> first </response> second", "respond", "first", ""),
        ("</response>", "silent", "", ""),
        ("I think there is a cat", "silent", "", ""),
        ("", "silent", "", ""),
    ],
)
def test_parse_decision(raw: str, kind: str, text: str, question: str) -> None:
    decision = parse_decision(raw)
    assert (decision.kind, decision.text, decision.question) == (kind, text, question)
    assert decision.raw == raw


@pytest.mark.parametrize(
    "decision",
    [Decision(kind="silent"), Decision(kind="respond", text="Hi."),
     Decision(kind="delegate", text="One moment.", question="Why?")],
)
def test_format_round_trips(decision: Decision) -> None:
    again = parse_decision(format_decision(decision))
    assert (again.kind, again.text, again.question) == (decision.kind, decision.text, decision.question)

