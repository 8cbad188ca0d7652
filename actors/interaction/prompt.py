"""The prefix-stable prompt layout of one tick.

Order, most stable first, so that an engine's prefix cache keeps hitting:

1. system: the static protocol text, then the standing instructions;
2. memory blocks (long-term, mid-term, retrieved), each line stamped with stream time;
3. the short-term window: one user turn per second holding `<t seconds>` and one image (plus any user message
   that arrived in that second), each followed by the assistant's decision at that second;
4. in the newest user turn, before its frame: old keyframes memory brought back (a question named their time);
   after it, the pending inbox (results of delegated questions).

Between summary boundaries only parts 3 and 4 change, and they change at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.common.decisions import SILENCE
from actors.common.messages import Sample, TickRequest
from actors.common.stream_time import clock

SYSTEM_PROMPT = (
    "You watch a live video stream, one frame per second. Every second, decide on your own whether to speak. "
    "Answer with exactly one of: `</silence>` when nothing needs saying; `</response> one short sentence` to "
    "speak to the user now; `</response> a short spoken note </delegation> a question` to hand a hard question "
    "to a background assistant whose answer comes later. Follow the user's standing instructions."
)


@dataclass(frozen=True, slots=True)
class Prompt:
    """Chat messages in the Hugging Face content-list format, and the images they refer to, in order."""

    messages: list[dict[str, Any]]
    images: list[Sample]


def time_tag(stream_time: float) -> str:
    """The per-frame time tag, e.g. `<12.0 seconds>`."""
    return f"<{stream_time:.1f} seconds>"


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def system_text(instructions: tuple[str, ...], memories: tuple[str, ...] = ()) -> str:
    parts = [SYSTEM_PROMPT]
    if instructions:
        parts.append("Standing instructions:\n" + "\n".join(f"- {line}" for line in instructions))
    if memories:
        parts.append("Memory:\n" + "\n".join(memories))
    return "\n\n".join(parts)


def build_prompt(request: TickRequest) -> Prompt:
    """Lay out one tick's prompt. The last sample is the current second; earlier ones carry their decisions."""
    if not request.samples:
        raise ValueError("a tick prompt needs at least one sample")
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": [_text(system_text(request.instructions, request.memories))]}
    ]
    replies = {round(t.stream_time, 3): t.text for t in request.dialog if t.role == "assistant"}
    user_turns = sorted((t for t in request.dialog if t.role == "user"), key=lambda t: t.stream_time)
    previous = float("-inf")
    last = len(request.samples) - 1
    for index, sample in enumerate(request.samples):
        content: list[dict[str, Any]] = []
        if index == last:
            for old in request.lookback:
                recalled = f"Recalled from memory, the scene at {clock(old.stream_time)}:"
                content.extend([_text(recalled), {"type": "image"}])
        content.extend([_text(time_tag(sample.stream_time)), {"type": "image"}])
        for turn in user_turns:
            if previous < turn.stream_time <= sample.stream_time or (index == last and turn.stream_time > previous):
                content.append(_text(turn.text))
        if index == last:
            content.extend(_text(f"Background result: {item}") for item in request.inbox)
        messages.append({"role": "user", "content": content})
        if index != last:
            reply = replies.get(round(sample.stream_time, 3), SILENCE)
            messages.append({"role": "assistant", "content": [_text(reply)]})
        previous = sample.stream_time
    images = [*request.samples[:-1], *request.lookback, request.samples[-1]]
    return Prompt(messages=messages, images=images)
