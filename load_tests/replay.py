"""A video track that replays a shared, pre-encoded clip: aiortc sends its packets without encoding them.

`RTCRtpSender` packetizes an `av.Packet` from `recv()` as it is (aiortc's `Vp8Encoder.pack`), so a stream
costs the RTP and SRTP work only. Each track has its own clock and timestamps and loops over the clip's
packets, which all tracks share.

A clip with temporal layers is sent as a browser sends them: each packet's VP8 payload descriptor carries its
frame's layer (TID) and the index of the last layer-0 frame (TL0PICIDX, RFC 7741). aiortc's packetizer writes
neither, so `send_temporal_layers` gives this process's senders one that does.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import Awaitable, Callable

import aiortc.rtcrtpsender as rtp_sender
import av
from aiortc.codecs import get_encoder
from aiortc.codecs.base import Encoder
from aiortc.codecs.vpx import Vp8Encoder, VpxPayloadDescriptor
from aiortc.mediastreams import VIDEO_CLOCK_RATE, MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from load_tests.packets import EncodedClip

VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)


class PacketReplayTrack(MediaStreamTrack):
    """Sends packet i of the clip (looping) at `started + i / fps`; stream time 0 is the first packet, sent
    `start_delay_s` after the sender first asks (streams started at random moments, as users start theirs, so that
    their frames and triggers fall at any moment of Vigil's tick seconds)."""

    kind = "video"

    def __init__(
        self,
        clip: EncodedClip,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        start_delay_s: float = 0.0,
    ) -> None:
        super().__init__()
        self.clip = clip
        self._clock = clock
        self._sleep = sleep
        self.start_delay_s = start_delay_s
        self.started: float | None = None
        self.sent = 0

    def stream_time(self, at: float) -> float | None:
        """Seconds of stream at clock time `at` (None before the first packet)."""
        return None if self.started is None else at - self.started

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self.started is None:
            if self.start_delay_s > 0:
                await self._sleep(self.start_delay_s)
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


class LayeredVp8Packer(Vp8Encoder):
    """aiortc's VP8 packetizer with the temporal layer of each of the clip's frames in its descriptors; a packet's
    place in the clip is its timestamp, as `PacketReplayTrack` stamps it."""

    def __init__(self, clip: EncodedClip) -> None:
        super().__init__()
        self.clip = clip
        self.tl0_index = 0

    def pack(self, packet: av.Packet) -> tuple[list[bytes], int]:
        assert packet.pts is not None and packet.time_base is not None
        sent = round(packet.pts * packet.time_base * self.clip.spec.fps)
        layer = self.clip.layers[sent % len(self.clip.layers)]
        if layer == 0:
            self.tl0_index = (self.tl0_index + 1) % 256
        payloads, timestamp = super().pack(packet)
        return [self._with_layer(payload, layer) for payload in payloads], timestamp

    def _with_layer(self, payload: bytes, layer: int) -> bytes:
        descriptor, data = VpxPayloadDescriptor.parse(payload)
        descriptor.tl0picidx = self.tl0_index
        # Layer sync (Y): a layer-1 frame refers to layer-0 frames only (layer-1 frames update no reference).
        descriptor.tid = (layer, 1 if layer else 0)
        return bytes(descriptor) + data


def send_temporal_layers(clip: EncodedClip) -> None:
    """Make this process's VP8 senders, which all replay `clip`, write each frame's layer into its descriptors."""

    def layered_encoder(codec: RTCRtpCodecParameters) -> Encoder:
        return LayeredVp8Packer(clip) if codec.name == "VP8" else get_encoder(codec)

    rtp_sender.get_encoder = layered_encoder  # type: ignore[attr-defined]
