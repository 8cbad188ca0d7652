"""What a session added since its last decided tick: the suspects when the engine fails on the session's prompt.

A message the engine cannot take would otherwise fail every later tick of its session: the turn stays in the
prompt window, and with no tick decided nothing pushes it out. The edge checks every client text first
(actors/common/client_text.py); this is the second line. Once `FAILURES_TO_TAKE_BACK` ticks in a row fail
with an engine error on prompts that held an addition, the session loop takes it back: the user turns not yet
decided on first, the newest instruction change next. One failure alone takes nothing back: the engine may
just have stumbled, and the user's words are worth a retry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.common.messages import TickRequest, Turn

FAILURES_TO_TAKE_BACK = 2


@dataclass(slots=True)
class Untried:
    """User turns and an instruction change that no decided tick's prompt has held yet."""

    turns: list[Turn] = field(default_factory=list)
    # The instructions of the last decided tick, and the ones that replaced them, while undecided.
    instructions_before: tuple[str, ...] | None = None
    instructions_after: tuple[str, ...] = ()
    failures: int = 0

    def add_turn(self, turn: Turn) -> None:
        self.turns.append(turn)

    def change_instructions(self, before: tuple[str, ...], after: tuple[str, ...]) -> None:
        """Instructions changed; clearing them can break no prompt, so it leaves nothing to take back."""
        if after == before:
            return
        if not after:
            self.instructions_before = None
        elif self.instructions_before is None:
            self.instructions_before = before
        self.instructions_after = after

    def decided(self, request: TickRequest) -> None:
        """A tick decided on this prompt: what it held is tried. Turns it did not hold stay untried only when
        newer than its frame (they came while it ran); older ones have left the prompt window."""
        self.turns = [t for t in self.turns if t not in request.dialog and t.stream_time > request.stream_time]
        if request.instructions == self.instructions_after:
            self.instructions_before = None
        self.failures = 0

    def failed(self, request: TickRequest) -> bool:
        """The engine failed on this prompt; True when that makes it time to `take_back` what the prompt held."""
        if not self._held_turns(request) and not self._held_instructions(request):
            return False
        self.failures += 1
        return self.failures >= FAILURES_TO_TAKE_BACK

    def take_back(self, request: TickRequest) -> tuple[list[Turn], tuple[str, ...] | None]:
        """`(turns, instructions)`: the untried user turns the prompt held, to drop; or, when it held none, the
        instructions to go back to (None: nothing to go back to)."""
        self.failures = 0
        turns = self._held_turns(request)
        if turns:
            self.turns = [turn for turn in self.turns if turn not in turns]
            return turns, None
        if not self._held_instructions(request):
            return [], None
        before, self.instructions_before = self.instructions_before, None
        return [], before

    def _held_turns(self, request: TickRequest) -> list[Turn]:
        return [turn for turn in self.turns if turn in request.dialog]

    def _held_instructions(self, request: TickRequest) -> bool:
        return self.instructions_before is not None and request.instructions == self.instructions_after
