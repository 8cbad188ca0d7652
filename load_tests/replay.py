"""A video track that replays a shared, pre-encoded clip: aiortc sends its packets without encoding them.

`RTCRtpSender` packetizes an `av.Packet` from `recv()` as it is (aiortc's `Vp8Encoder.pack`), so a stream
costs the RTP and SRTP work only. Each track has its own clock and timestamps and loops over the clip's
packets, which all tracks share.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import Awaitable, Callable

import av
from aiortc.mediastreams import VIDEO_CLOCK_RATE, MediaStreamError, MediaStreamTrack

from load_tests.packets import EncodedClip

VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)


class PacketReplayTrack(MediaStreamTrack):
    """Sends packet i of the clip (looping) at `started + i / fps`; stream time 0 is the first packet."""

    kind = "video"

    def __init__(
        self,
        clip: EncodedClip,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__()
        self.clip = clip
        self._clock = clock
        self._sleep = sleep
        self.started: float | None = None
        self.sent = 0

    def stream_time(self, at: float) -> float | None:
        """Seconds of stream at clock time `at` (None before the first packet)."""
        return None if self.started is None else at - self.started

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self.started is None:
            self.started = self._clock()
        fps = self.clip.spec.fps
        delay = self.started + self.sent / fps - self._clock()
        if delay > 0:
            await self._sleep(delay)
        packets = self.clip.packets
        packet = av.Packet(packets[self.sent % len(packets)])
        packet.pts = self.sent * VIDEO_CLOCK_RATE // fps
        packet.time_base = VIDEO_TIME_BASE
        self.sent += 1
        return packet
