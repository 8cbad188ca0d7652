"""Decoding only a VP8 stream's lower temporal layers: the right packets dropped, the kept frames unchanged."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import aiortc.rtcrtpreceiver as rtp_receiver
import aiortc.rtcrtpsender as rtp_sender
import av
import numpy as np
import pytest
from aiortc.codecs.vpx import VpxPayloadDescriptor
from aiortc.jitterbuffer import JitterFrame

from actors.ingest.video_layers import LayeredVp8Decoder, decode_layers, kept_payload
from load_tests.clip import ClipSpec
from load_tests.packets import EncodedClip, cached_clip
from load_tests.replay import PacketReplayTrack, send_temporal_layers
from tests.loopback import received_frames

pytestmark = pytest.mark.unit

SPEC = ClipSpec(width=320, height=240, fps=5, seconds=4.0, triggers=(1.0,), trigger_s=1.0, keyframe_s=2.0)


@pytest.fixture(scope="module")
def layered_clip(tmp_path_factory: pytest.TempPathFactory) -> EncodedClip:
    return cached_clip(SPEC, tmp_path_factory.mktemp("layered-clip"))


@pytest.fixture
def patched_aiortc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test installs into aiortc is undone after it."""
    for module, name in ((rtp_receiver, "depayload"), (rtp_receiver, "get_decoder"), (rtp_sender, "get_encoder")):
        monkeypatch.setattr(module, name, getattr(module, name))


def _payload(tid: tuple[int, int] | None) -> bytes:
    descriptor = VpxPayloadDescriptor(partition_start=1, partition_id=0, picture_id=7,
                                      tl0picidx=3 if tid else None, tid=tid)
    return bytes(descriptor) + b"frame"


def test_a_packet_above_the_kept_layers_comes_out_empty() -> None:
    assert kept_payload(_payload((1, 1)), layers=1) == b""
    assert kept_payload(_payload((0, 0)), layers=1) == b"frame"
    assert kept_payload(_payload((1, 0)), layers=2) == b"frame"
    assert kept_payload(_payload(None), layers=1) == b"frame"  # a sender without layers: all of it is kept


def test_a_negative_layer_count_is_refused() -> None:
    with pytest.raises(ValueError, match="video_decode_layers"):
        decode_layers(-1)


def test_the_layer_0_frames_decode_to_the_same_pixels_as_when_every_frame_is_decoded(
    layered_clip: EncodedClip,
) -> None:
    layers = layered_clip.layers
    assert layers[0] == 0 and all(layers[i] == 0 for i in layered_clip.keyframes)
    assert 0.3 <= sum(layers) / len(layers) <= 0.5, layers  # about every other frame is in layer 1
    every = av.CodecContext.create("libvpx", "r")
    full = [every.decode(av.Packet(data))[0].to_ndarray(format="rgb24") for data in layered_clip.packets]
    counts: collections.Counter[str] = collections.Counter()
    layered = LayeredVp8Decoder(lambda result: counts.update([result]))
    kept = {}
    for index, (data, layer) in enumerate(zip(layered_clip.packets, layers, strict=True)):
        frames = layered.decode(JitterFrame(data=b"" if layer else data, timestamp=index * 18_000))
        if frames:
            kept[index] = frames[0].to_ndarray(format="rgb24")
    assert sorted(kept) == [i for i, layer in enumerate(layers) if layer == 0]
    assert counts == {"decoded": len(kept), "dropped": len(layers) - len(kept)}
    for index, rgb in kept.items():
        np.testing.assert_array_equal(rgb, full[index])


async def _receive(clip: EncodedClip, seconds: float) -> list[int]:
    """Stream the clip over a real loopback peer connection; the index of every frame decoded."""
    return [index for index, _ in await received_frames(PacketReplayTrack(clip), seconds)]


async def test_a_receiver_decodes_layer_0_of_a_layered_stream_and_every_frame_of_another(
    layered_clip: EncodedClip, tmp_path: Path, patched_aiortc: None,
) -> None:
    counts: collections.Counter[str] = collections.Counter()
    send_temporal_layers(layered_clip)
    decode_layers(1, lambda result: counts.update([result]))
    received = await _receive(layered_clip, seconds=3.0)
    count = len(layered_clip.packets)
    assert len(received) >= 6, received
    # The timestamp mapper starts pts at 0 with the first frame: the first frame sent is packet 0.
    assert all(layered_clip.layers[pts % count] == 0 for pts in received), received
    assert counts["dropped"] >= 4 and counts["decoded"] >= len(received), counts

    # One layer in the clip: nothing to drop, every frame is decoded.
    single = cached_clip(dataclasses.replace(SPEC, temporal_layers=1), tmp_path)
    send_temporal_layers(single)
    counts.clear()
    received = await _receive(single, seconds=3.0)
    assert counts["dropped"] == 0 and counts["decoded"] >= 10, counts
    assert received == list(range(len(received))), received


async def test_with_0_layers_every_frame_of_a_layered_stream_is_decoded(
    layered_clip: EncodedClip, patched_aiortc: None,
) -> None:
    send_temporal_layers(layered_clip)
    decode_layers(1)
    decode_layers(0)  # undone: aiortc's own depayloader and decoder again
    received = await _receive(layered_clip, seconds=3.0)
    assert len(received) >= 10 and received == list(range(len(received))), received
