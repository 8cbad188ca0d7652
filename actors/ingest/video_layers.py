"""Decode only the lower temporal layers of a VP8 stream: the frames a tick can use, at a fraction of the decoding.

A sender with temporal scalability marks each packet's layer in its VP8 payload descriptor (TID, RFC 7741), and
no frame of a layer refers to a frame of a higher one. The page sends two layers (`L1T2`: 5 frames a second,
every other one in layer 1), and a tick takes one frame a second, so with `video_decode_layers` 1 the ingest
decodes layer 0 only, 2.5 frames a second, and drops the others before the decoder. Decoding is the largest part
of the ingest's CPU per stream (`docs/benchmarks.md`). A stream whose packets carry no layer is decoded whole.

aiortc has no setting for this, so `decode_layers` replaces two functions of `aiortc.rtcrtpreceiver` for the
whole process: the depayloader, which empties the payload of a packet above the kept layers, and the decoder
factory, whose VP8 decoder passes over an empty frame instead of decoding it. The jitter buffer still gets every
packet, so losses, retransmission requests and keyframe requests work as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiortc.rtcrtpreceiver as rtp_receiver
from aiortc.codecs import depayload, get_decoder
from aiortc.codecs.base import Decoder
from aiortc.codecs.vpx import Vp8Decoder, VpxPayloadDescriptor
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av.frame import Frame

log = logging.getLogger(__name__)

# What counts the frames: called with "decoded" or "dropped" from the decoder's thread.
FrameCount = Callable[[str], None]


def kept_payload(payload: bytes, layers: int) -> bytes:
    """A VP8 packet's payload without its descriptor, or nothing when the packet is above the `layers` kept."""
    descriptor, data = VpxPayloadDescriptor.parse(payload)
    if descriptor.tid is not None and descriptor.tid[0] >= layers:
        return b""
    return data


class LayeredVp8Decoder(Vp8Decoder):
    """aiortc's VP8 decoder, passing over the frames whose layer was dropped (their payloads came empty)."""

    def __init__(self, count: FrameCount) -> None:
        super().__init__()
        self._count = count

    def decode(self, encoded_frame: JitterFrame) -> list[Frame]:
        if not encoded_frame.data:
            self._count("dropped")
            return []
        self._count("decoded")
        return super().decode(encoded_frame)


def decode_layers(layers: int, count: FrameCount = lambda result: None) -> None:
    """Decode the lowest `layers` temporal layers of every VP8 stream this process receives from now on (0: all)."""
    if layers < 0:
        raise ValueError(f"video_decode_layers must be 0 (all) or more, not {layers}")
    if not (hasattr(rtp_receiver, "depayload") and hasattr(rtp_receiver, "get_decoder")):
        raise RuntimeError("this aiortc has no rtcrtpreceiver.depayload/get_decoder to filter temporal layers by")
    if layers == 0:
        rtp_receiver.depayload, rtp_receiver.get_decoder = depayload, get_decoder  # type: ignore[attr-defined]
        return

    def layered_depayload(codec: RTCRtpCodecParameters, payload: bytes) -> bytes:
        if codec.name == "VP8":
            return kept_payload(payload, layers)
        return depayload(codec, payload)

    def layered_decoder(codec: RTCRtpCodecParameters) -> Decoder:
        if codec.name == "VP8":
            return LayeredVp8Decoder(count)
        return get_decoder(codec)

    rtp_receiver.depayload = layered_depayload  # type: ignore[attr-defined]
    rtp_receiver.get_decoder = layered_decoder  # type: ignore[attr-defined]
    log.info("VP8 streams with temporal layers: the lowest %d decoded, the others dropped", layers)
