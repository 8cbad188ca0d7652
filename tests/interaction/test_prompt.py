"""The prompt layout: prefix-stable between ticks, with memory lines and recalled keyframes in their places."""

from __future__ import annotations

import pytest

from actors.common.messages import Sample, TickRequest, Turn
from actors.interaction.prompt import build_prompt, time_tag

pytestmark = pytest.mark.unit


def _sample(t: float) -> Sample:
    return Sample(stream_time=t, width=2, height=1, rgb=b"\x00" * 6)


def test_prompt_layout_is_prefix_stable() -> None:
    dialog = (Turn(role="assistant", text="</response> A dog.", stream_time=1.0),
              Turn(role="user", text="what colour?", stream_time=1.5))
    request = TickRequest(session_id="s", tick=3, stream_time=2.0, samples=(_sample(0.0), _sample(1.0),
                          _sample(2.0)), instructions=("tell me about dogs",), dialog=dialog, inbox=("It is red.",))
    prompt = build_prompt(request)
    roles = [m["role"] for m in prompt.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "tell me about dogs" in prompt.messages[0]["content"][0]["text"]
    assert prompt.messages[2]["content"][0]["text"] == "</silence>"
    assert prompt.messages[4]["content"][0]["text"] == "</response> A dog."
    last = [part.get("text") for part in prompt.messages[5]["content"]]
    assert last == [time_tag(2.0), None, "what colour?", "Background result: It is red."]
    assert len(prompt.images) == 3
    # The next tick's prompt extends this one: everything before the newest turn is unchanged.
    later = build_prompt(TickRequest(session_id="s", tick=4, stream_time=3.0,
                                     samples=(*request.samples, _sample(3.0)), instructions=request.instructions,
                                     dialog=dialog))
    assert later.messages[:5] == prompt.messages[:5]


def test_memory_lines_and_recalled_keyframes_take_their_places() -> None:
    request = TickRequest(session_id="s", tick=9, stream_time=900.0, samples=(_sample(899.0), _sample(900.0)),
                          instructions=("watch the door",), memories=("at 00:10:00 you said: The door opened.",),
                          lookback=(_sample(610.0),), dialog=(Turn(role="user", text="what was at 00:10:10?",
                                                                   stream_time=899.5),))
    prompt = build_prompt(request)
    system = prompt.messages[0]["content"][0]["text"]
    assert system.index("watch the door") < system.index("Memory:\nat 00:10:00 you said: The door opened.")
    last = [part.get("text") for part in prompt.messages[-1]["content"]]
    assert last == ["Recalled from memory, the scene at 00:10:10:", None, time_tag(900.0), None,
                    "what was at 00:10:10?"]
    # Images in the order of their placeholders: the window's older frames, the recalled one, the current one.
    assert [s.stream_time for s in prompt.images] == [899.0, 610.0, 900.0]


def test_time_tag_has_one_decimal() -> None:
    assert time_tag(12.04) == "<12.0 seconds>"

