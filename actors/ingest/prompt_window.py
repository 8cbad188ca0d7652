"""What a session's next prompt holds: its frames, its dialog turns and its memory lines, in one of two layouts.

- `window`: the newest `short_term_frames` frames and the last turns. Every tick's prompt differs from the last
  near its start (the oldest frame left), so an engine with a prefix cache recomputes the whole window each tick;
  for an engine without one (transformers) it is the cheapest prompt.
- `append`: everything since the segment began, growing by a frame a tick, so each tick's prompt extends the
  last and a prefix cache (vLLM's keys blocks by everything before them, images included) serves all but the new
  end. A segment ends when it holds `segment_frames` frames, or when the memory lines change (a question, a
  refresh): the next one starts from the newest frame, the earlier ones now in memory's summaries. Each
  session's first segment is shorter by an offset drawn from its id, so the resets of many sessions, each a full
  recompute, are spread over time instead of all landing in the same second.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Literal

from actors.common.messages import Sample, Turn

PromptLayout = Literal["window", "append"]


def stagger(session_id: str, span: int) -> int:
    """A stable offset in [0, span) from the session id, the same in every replica."""
    if span <= 1:
        return 0
    return int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "big") % span


class PromptWindow:
    """The frames, turns and memory lines of a session's next prompt (see the module for the two layouts)."""

    def __init__(
        self, session_id: str, layout: PromptLayout, short_term_frames: int, dialog_turns: int,
        segment_frames: int,
    ) -> None:
        self.layout = layout
        self.short_term_frames = max(1, short_term_frames)
        self.segment_frames = max(self.short_term_frames, segment_frames)
        self._dialog_max = max(2, dialog_turns * 2)
        # Turns beyond this many in one segment start a new one (a client that talks a lot stays bounded).
        self._segment_turns = 4 * self.segment_frames
        self._frames: deque[Sample] = deque()
        self._turns: deque[Turn] = deque()
        self._memories: tuple[str, ...] | None = None
        span = self.segment_frames - self.short_term_frames
        self._limit = self.segment_frames - stagger(session_id, span)
        self.segments = 1

    def add_frame(self, sample: Sample) -> None:
        self._frames.append(sample)
        if self.layout == "window":
            while len(self._frames) > self.short_term_frames:
                self._frames.popleft()
        elif len(self._frames) > self._limit:
            self._new_segment()

    def add_turn(self, turn: Turn) -> None:
        self._turns.append(turn)
        if self.layout == "window":
            while len(self._turns) > self._dialog_max:
                self._turns.popleft()
        elif len(self._turns) > self._segment_turns:
            self._new_segment()

    def drop_turn(self, turn: Turn) -> bool:
        """Take a turn back out of the prompt (one the engine cannot take); False when it has already left."""
        try:
            self._turns.remove(turn)
        except ValueError:
            return False
        return True

    def hold_memories(self, lines: tuple[str, ...]) -> tuple[str, ...]:
        """The memory lines for this tick's prompt; in the append layout, new lines start a new segment."""
        if self.layout == "append" and self._memories is not None and lines != self._memories:
            self._new_segment()
        self._memories = lines
        return lines

    @property
    def frames(self) -> tuple[Sample, ...]:
        return tuple(self._frames)

    @property
    def turns(self) -> tuple[Turn, ...]:
        return tuple(self._turns)

    def _new_segment(self) -> None:
        newest = self._frames[-1] if self._frames else None
        self._frames.clear()
        if newest is not None:
            self._frames.append(newest)
            while self._turns and self._turns[0].stream_time < newest.stream_time:
                self._turns.popleft()
        else:
            self._turns.clear()
        self._limit = self.segment_frames
        self.segments += 1
