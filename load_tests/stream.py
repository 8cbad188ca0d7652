"""One load stream: a Vigil session fed by a replay track, negotiated as VP8, recording every tick it hears.

It is `bench.webrtc_client.VigilClient` (the protocol's reference client) with two changes: the offer is
send-only and offers VP8 alone, since the replayed packets are VP8; and ticks are kept as `ReceivedTick`s
with the time they arrived, for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCRtpSender
from aiortc.mediastreams import MediaStreamTrack

from bench.webrtc_client import VigilClient
from load_tests.replay import PacketReplayTrack

PING_EVERY_S = 5.0
MAX_TICKS = 100_000  # a stream's record is bounded even if a run were not


@dataclass(frozen=True, slots=True)
class ReceivedTick:
    """A `tick` message as heard: `frame_time` is the stream second (our clock) of the frame it decided."""

    tick: int
    outcome: str
    stream_time: float
    received_at: float
    frame_time: float
    stages_ms: dict[str, float] = field(default_factory=dict)
    text: str = ""

    @property
    def decided(self) -> bool:
        return not self.outcome.startswith("skipped:")

    @property
    def spoke(self) -> bool:
        return self.outcome in ("respond", "delegate")


def vp8_preferences() -> list[Any]:
    """VP8 and its retransmission format, nothing else: the packets are VP8, so the answer must be too."""
    return [codec for codec in RTCRtpSender.getCapabilities("video").codecs
            if codec.mimeType.lower() in ("video/vp8", "video/rtx")]


class LoadStream(VigilClient):
    """A session streaming `track`; `received` holds its ticks in order of arrival."""

    def __init__(self, index: int, base_url: str, track: PacketReplayTrack, api_key: str | None = None) -> None:
        super().__init__(base_url, api_key=api_key)
        self.index = index
        self.track = track
        self.received: list[ReceivedTick] = []
        self.codec: str | None = None
        self.error: str | None = None
        # Monotonic times around connecting and closing: the session ticked for a time between them.
        self.connect_began: float | None = None
        self.connected_at: float | None = None
        self.closing_at: float | None = None
        self.closed_at: float | None = None
        self._pinger: asyncio.Task[None] | None = None

    async def connect(self, track: MediaStreamTrack | None = None, instructions: list[str] | None = None,
                      speak_threshold: float | None = None) -> None:
        """Create the session, offer the replay track (send-only, VP8 only) and wait for its `hello`."""
        self.connect_began = time.monotonic()
        await super().connect(track or self.track, instructions, speak_threshold)
        self.connected_at = time.monotonic()
        self._pinger = asyncio.get_running_loop().create_task(self._ping(), name=f"load-ping-{self.index}")

    def _add_track(self, track: MediaStreamTrack) -> None:
        assert self.pc is not None
        transceiver = self.pc.addTransceiver(track, direction="sendonly")
        transceiver.setCodecPreferences(vp8_preferences())

    def _check_answer(self, sdp: str) -> None:
        self.codec = negotiated_video_codec(sdp)
        if self.codec != "VP8":
            raise RuntimeError(f"Vigil answered with video codec {self.codec!r}, not VP8")

    def _on_message(self, data: str | bytes) -> None:
        received_at = time.monotonic()
        message = json.loads(data)
        if message.get("type") == "hello":
            self.greeted.set()
        if message.get("type") != "tick" or len(self.received) >= MAX_TICKS:
            return
        stages = {str(k): float(v) for k, v in (message.get("stages_ms") or {}).items()}
        total_s = stages.get("total", float(message.get("latency_ms") or 0.0)) / 1000
        frame_time = self.track.stream_time(received_at - total_s)
        self.received.append(ReceivedTick(
            tick=int(message["tick"]), outcome=str(message["outcome"]), stream_time=float(message["stream_time"]),
            received_at=received_at, frame_time=frame_time if frame_time is not None else float("nan"),
            stages_ms=stages, text=str(message.get("text") or ""),
        ))

    async def _ping(self) -> None:
        count = 0
        while True:
            await asyncio.sleep(PING_EVERY_S)
            count += 1
            with contextlib.suppress(Exception):  # a closing channel; the video keeps the session alive too
                self.send({"type": "ping", "id": count})

    async def close(self, end_session: bool = True) -> None:
        self.closing_at = time.monotonic()
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
        self.track.stop()
        await super().close(end_session)
        self.closed_at = time.monotonic()


def negotiated_video_codec(sdp: str) -> str | None:
    """The codec of the first payload type of the answer's video section (the one the sender uses)."""
    payload_types: list[str] = []
    names: dict[str, str] = {}
    in_video = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            in_video = line.startswith("m=video")
            if in_video:
                payload_types = line.split()[3:]
        elif in_video and line.startswith("a=rtpmap:"):
            payload_type, _, encoding = line[len("a=rtpmap:"):].partition(" ")
            names[payload_type] = encoding.split("/")[0]
    for payload_type in payload_types:
        name = names.get(payload_type)
        if name and name.lower() != "rtx":
            return name
    return None
