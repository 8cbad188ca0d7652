"""The decision wire format of JoyAI-VL-Interaction, so that its model runs natively.

    </silence>
    </response> text
    </response> spoken note </delegation> question for the background brain
"""

from __future__ import annotations

import re

from actors.common.messages import Decision

SILENCE = "</silence>"
RESPONSE = "</response>"
DELEGATION = "</delegation>"
DECISION_PREFIXES: tuple[str, ...] = (SILENCE, RESPONSE)

_SPACES = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def parse_decision(raw: str, model_ms: float = 0.0) -> Decision:
    """Parse model output into a Decision.

    Output that follows no form is silence: an assistant that cannot say what it decided stays quiet.
    Text after `</silence>` is dropped; a `</delegation>` with no question is a plain response.
    """
    text = raw.strip()
    if not text.startswith(RESPONSE):
        return Decision(kind="silent", raw=raw, model_ms=model_ms)
    body = text[len(RESPONSE) :]
    for stop in (SILENCE, RESPONSE):
        # A model that runs on past its turn starts a new decision; the first one counts.
        cut = body.find(stop)
        if cut >= 0:
            body = body[:cut]
    note, _, question = body.partition(DELEGATION)
    note, question = _clean(note), _clean(question)
    if question:
        return Decision(kind="delegate", text=note, question=question, raw=raw, model_ms=model_ms)
    if not note:
        return Decision(kind="silent", raw=raw, model_ms=model_ms)
    return Decision(kind="respond", text=note, raw=raw, model_ms=model_ms)


def format_decision(decision: Decision) -> str:
    """The wire form of a decision, as the model would have written it (used for past turns in the prompt)."""
    if decision.kind == "silent":
        return SILENCE
    if decision.kind == "delegate":
        return f"{RESPONSE} {decision.text} {DELEGATION} {decision.question}".replace("  ", " ")
    return f"{RESPONSE} {decision.text}"
