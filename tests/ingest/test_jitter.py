"""A video frame leaves the jitter buffer at its marked last packet; audio and lost markers as aiortc does it."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import aiortc.rtcrtpreceiver as rtp_receiver
import pytest
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from actors.ingest.jitter import MarkerJitterBuffer, hand_frames_on_at_their_last_packet
from load_tests.clip import ClipSpec
from load_tests.packets import cached_clip
from load_tests.replay import PacketReplayTrack
from tests.loopback import received_frames

pytestmark = pytest.mark.unit


def _packet(seq: int, timestamp: int, data: bytes, marker: bool = False) -> RtpPacket:
    packet = RtpPacket(payload_type=96, marker=int(marker), sequence_number=seq, timestamp=timestamp)
    packet._data = data  # type: ignore[attr-defined]
    return packet


def test_a_frame_leaves_at_its_marked_packet_once_every_packet_before_it_is_in() -> None:
    buffer = MarkerJitterBuffer(capacity=128, is_video=True)
    assert buffer.add(_packet(10, 3000, b"a1"))[1] is None
    assert buffer.add(_packet(12, 3000, b"a3", marker=True))[1] is None  # a2 is missing
    frame = buffer.add(_packet(11, 3000, b"a2"))[1]
    assert frame is not None and (frame.data, frame.timestamp) == (b"a1a2a3", 3000)
    frame = buffer.add(_packet(13, 6000, b"b1", marker=True))[1]
    assert frame is not None and (frame.data, frame.timestamp) == (b"b1", 6000)
    assert buffer.add(_packet(12, 3000, b"a3", marker=True))[1] is None  # a late copy is ignored


def test_a_frame_whose_marked_packet_was_lost_leaves_when_the_next_frame_begins() -> None:
    buffer = MarkerJitterBuffer(capacity=128, is_video=True)
    buffer.add(_packet(1, 3000, b"a1"))
    frame = buffer.add(_packet(3, 6000, b"b1", marker=True))[1]
    assert frame is None  # packet 2 (a's marked last one) is missing: nothing can go yet
    frame = buffer.add(_packet(2, 3000, b"a2"))[1]  # a2 came, but without its marker
    assert frame is not None and frame.data == b"a1a2"
    frame = buffer.add(_packet(4, 9000, b"c1", marker=True))[1]
    assert frame is not None and frame.data == b"b1"  # b was complete: it went at the next add


def test_audio_is_buffered_as_aiortc_buffers_it() -> None:
    ours, theirs = MarkerJitterBuffer(capacity=16, prefetch=4), JitterBuffer(capacity=16, prefetch=4)
    for seq in range(12):
        packet = _packet(seq, seq * 960, bytes([seq]), marker=seq == 0)
        got, expected = ours.add(packet)[1], theirs.add(packet)[1]
        assert (got and (got.data, got.timestamp)) == (expected and (expected.data, expected.timestamp))


async def _frame_delays(clip_dir: Path) -> list[float]:
    """Seconds from the sender taking each packet to the receiver getting its decoded frame, over loopback."""
    clip = cached_clip(ClipSpec(width=160, height=120, fps=5, seconds=2.0, triggers=(1.0,), trigger_s=0.6,
                                keyframe_s=1.0, bitrate_kbps=200), clip_dir)
    track = PacketReplayTrack(clip)
    sent: dict[int, float] = {}
    original_recv = track.recv

    async def recv() -> object:
        packet = await original_recv()
        sent[track.sent - 1] = time.monotonic()
        return packet

    track.recv = recv  # type: ignore[method-assign]
    return [arrived - sent[index] for index, arrived in await received_frames(track, 3.0)]


async def test_a_frame_is_decoded_as_soon_as_it_is_sent_not_a_frame_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rtp_receiver, "JitterBuffer", rtp_receiver.JitterBuffer)
    aiortc_delays = await _frame_delays(tmp_path)
    hand_frames_on_at_their_last_packet()
    delays = await _frame_delays(tmp_path)
    assert len(delays) >= 10 and len(aiortc_delays) >= 10
    # aiortc's buffer holds each frame until the next one begins, 200 ms later at 5 fps.
    assert statistics.median(aiortc_delays) > 0.15, aiortc_delays
    assert statistics.median(delays) < 0.1, delays
