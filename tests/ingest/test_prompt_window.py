"""A session's prompt in the append layout grows by a frame a tick (each prompt extends the last, so a prefix
cache serves it) and starts a new segment when full or when its memory lines change, at points staggered across
sessions; the window layout keeps the newest frames and turns."""

from __future__ import annotations

from itertools import pairwise

import pytest

from actors.common.messages import Sample, Turn
from actors.ingest.prompt_window import PromptWindow, stagger

pytestmark = pytest.mark.unit


def _sample(t: float) -> Sample:
    return Sample(stream_time=t, width=1, height=1, rgb=b"\x00\x00\x00")


def _times(window: PromptWindow) -> list[float]:
    return [s.stream_time for s in window.frames]


def test_the_window_layout_keeps_the_newest_frames_and_turns() -> None:
    window = PromptWindow("s_a", "window", short_term_frames=4, dialog_turns=2, segment_frames=32)
    for t in range(10):
        window.add_frame(_sample(float(t)))
        window.add_turn(Turn("assistant", "</silence>", float(t)))
    assert _times(window) == [6.0, 7.0, 8.0, 9.0]
    assert [turn.stream_time for turn in window.turns] == [6.0, 7.0, 8.0, 9.0]


def test_append_prompts_extend_each_other_until_a_segment_is_full() -> None:
    window = PromptWindow("s_b", "append", short_term_frames=4, dialog_turns=2, segment_frames=12)
    first_limit = 12 - stagger("s_b", 12 - 4)
    previous: list[float] = []
    resets = []
    for t in range(40):
        window.add_frame(_sample(float(t)))
        window.add_turn(Turn("assistant", "</silence>", float(t)))
        now = _times(window)
        if now[: len(previous)] != previous:
            resets.append(t)
            assert now == [float(t)], "a new segment starts from the newest frame"
            assert [turn.stream_time for turn in window.turns] == [float(t)]
        previous = now
    assert resets[0] == first_limit  # the first segment is shorter by the session's offset
    assert [b - a for a, b in pairwise(resets)] == [12] * (len(resets) - 1)
    assert window.segments == len(resets) + 1


def test_new_memory_lines_start_a_new_segment() -> None:
    window = PromptWindow("s_c", "append", short_term_frames=4, dialog_turns=2, segment_frames=32)
    for t in range(3):
        window.add_frame(_sample(float(t)))
        assert window.hold_memories(("at 00:00:00 the door opened",)) == ("at 00:00:00 the door opened",)
    assert _times(window) == [0.0, 1.0, 2.0]
    window.hold_memories(("at 00:00:02 you asked about the keys",))
    assert _times(window) == [2.0] and window.segments == 2


def test_resets_of_many_sessions_are_spread_out() -> None:
    offsets = [stagger(f"s_{i:04d}", 28) for i in range(200)]
    assert offsets == [stagger(f"s_{i:04d}", 28) for i in range(200)], "stable per session"
    assert len(set(offsets)) >= 20 and max(offsets) < 28
