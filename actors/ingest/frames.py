"""The newest-frame-wins buffer between a video track and the session's ticks.

A tick is due on the clock, once a second, but frames come on their own clock (2.5 or 5 a second), so the
newest frame at a tick's due time is up to a frame interval old. `aligned` lets a tick that holds a frame older
than a quarter of the interval wait for the next one, when that one is expected soon enough: the tick then
decides on a frame that has just arrived, and its answer reaches the client that much sooner after the frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

MAX_FRAME_GAP_S = 2.0  # a longer gap is a pause in the video, not its frame rate
INTERVAL_WEIGHT = 0.2  # of each new gap in the moving average of the frame interval


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
        self.interval: float | None = None  # seconds between frames, a moving average
        self._last_arrival: float | None = None
        self._arrived = asyncio.Event()

    def put(self, frame: Any, arrival: float | None = None) -> None:
        arrival = time.monotonic() if arrival is None else arrival
        if self.first_arrival is None:
            self.first_arrival = arrival
        if self._latest is not None:
            self.replaced += 1
        self._seq += 1
        self._latest = ArrivedFrame(frame=frame, arrival=arrival, seq=self._seq)
        if self._last_arrival is not None and 0.0 < arrival - self._last_arrival < MAX_FRAME_GAP_S:
            gap = arrival - self._last_arrival
            if self.interval is None:
                self.interval = gap
            else:  # a pause counts as two intervals at most: a lower frame rate shows within a few frames
                self.interval += INTERVAL_WEIGHT * (min(gap, 2 * self.interval) - self.interval)
        self._last_arrival = arrival
        self._arrived.set()

    async def aligned(self, max_wait_s: float) -> float:
        """Wait (at most `max_wait_s`) for the next frame when the newest is older than a quarter of the frame
        interval and the next is expected within `max_wait_s`; returns the seconds waited."""
        if self._last_arrival is None or self.interval is None or max_wait_s <= 0:
            return 0.0
        now = time.monotonic()
        slack = self.interval / 4
        until_next = self._last_arrival + self.interval - now
        if now - self._last_arrival <= slack or not -slack < until_next <= max_wait_s:
            return 0.0  # fresh enough; or the next frame is too far off, or late (the video paused)
        self._arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), min(max_wait_s, max(0.0, until_next) + slack))
        return time.monotonic() - now

    def take(self) -> ArrivedFrame | None:
        """The newest frame, which the buffer then forgets (each frame is decided at most once)."""
        latest, self._latest = self._latest, None
        return latest

    def stream_time(self, arrival: float) -> float:
        """Seconds since the first frame of the stream (of its first connection, for a resumed session)."""
        since_first = 0.0 if self.first_arrival is None else arrival - self.first_arrival
        return self.stream_time_offset + since_first
