"""A replayed clip streamed over a real aiortc loopback peer connection, and the frames the receiver decoded."""

from __future__ import annotations

import asyncio
import time

from aiortc import RTCPeerConnection
from aiortc.mediastreams import VIDEO_CLOCK_RATE, MediaStreamError, MediaStreamTrack

from load_tests.replay import PacketReplayTrack


async def received_frames(track: PacketReplayTrack, seconds: float) -> list[tuple[int, float]]:
    """Send `track` for `seconds`; each decoded frame as (its index in the stream, from its pts; when it came)."""
    sender, receiver = RTCPeerConnection(), RTCPeerConnection()
    sender.addTransceiver(track, direction="sendonly")
    received: list[tuple[int, float]] = []
    readers: list[asyncio.Task[None]] = []
    fps = track.clip.spec.fps

    async def read(remote: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await remote.recv()
            except MediaStreamError:
                return
            assert frame.pts is not None
            received.append((round(frame.pts * fps / VIDEO_CLOCK_RATE), time.monotonic()))

    receiver.on("track", lambda remote: readers.append(asyncio.ensure_future(read(remote))))
    try:
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(receiver.localDescription)
        await asyncio.sleep(seconds)
    finally:
        await sender.close()
        await receiver.close()
        await asyncio.gather(*readers, return_exceptions=True)
    return received
