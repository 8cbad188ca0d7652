"""The newest-frame-wins buffer between a video track and the session's ticks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ArrivedFrame:
    """A decoded frame and when it arrived (monotonic seconds)."""

    frame: Any
    arrival: float
    seq: int


class LatestFrameBuffer:
    """Holds one frame: a new frame replaces the old one, so video never piles up behind a slow model."""

    def __init__(self, stream_time_offset: float = 0.0) -> None:
        # A resumed session's stream time goes on from where it was (plus the time it missed).
        self.stream_time_offset = stream_time_offset
        self._latest: ArrivedFrame | None = None
        self._seq = 0
        self.first_arrival: float | None = None
        self.replaced = 0

    def put(self, frame: Any, arrival: float | None = None) -> None:
        arrival = time.monotonic() if arrival is None else arrival
        if self.first_arrival is None:
            self.first_arrival = arrival
        if self._latest is not None:
            self.replaced += 1
        self._seq += 1
        self._latest = ArrivedFrame(frame=frame, arrival=arrival, seq=self._seq)

    def take(self) -> ArrivedFrame | None:
        """The newest frame, which the buffer then forgets (each frame is decided at most once)."""
        latest, self._latest = self._latest, None
        return latest

    def stream_time(self, arrival: float) -> float:
        """Seconds since the first frame of the stream (of its first connection, for a resumed session)."""
        since_first = 0.0 if self.first_arrival is None else arrival - self.first_arrival
        return self.stream_time_offset + since_first
