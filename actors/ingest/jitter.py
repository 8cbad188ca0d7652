"""A video frame goes to the decoder as soon as its last packet is in, not when the next frame begins.

aiortc's jitter buffer hands a frame on when a packet of the following frame arrives (a new RTP timestamp), so at
5 fps every frame waits 200 ms for the next one before it is decoded: 200 ms more between what the camera sees
and what the model is shown. A sender marks the last packet of each video frame (the RTP marker bit, RFC 3550;
browsers and aiortc set it), so `MarkerJitterBuffer` hands a frame on at that packet when every packet before it
is in; a frame whose marked packet was lost still goes on at the next frame's first packet, as before. Audio
(whose marker means something else) is left as aiortc buffers it.

`hand_frames_on_at_their_last_packet` puts it in `aiortc.rtcrtpreceiver` for the whole process, as
`actors/ingest/video_layers.py` does its depayloader and decoder.
"""

from __future__ import annotations

import aiortc.rtcrtpreceiver as rtp_receiver
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket


class MarkerJitterBuffer(JitterBuffer):
    """aiortc's jitter buffer; a video frame leaves it at its marked last packet."""

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        if not self._is_video:
            return super()._remove_frame(sequence_number)
        assert self._origin is not None
        packets: list[RtpPacket] = []
        for count in range(self._capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:
                return None  # a packet of the oldest frame is still missing
            if packets and packet.timestamp != packets[0].timestamp:
                return self._take(packets)  # the next frame began: its marked packet never came
            packets.append(packet)
            if packet.marker:
                return self._take(packets)
        return None

    def _take(self, packets: list[RtpPacket]) -> JitterFrame:
        frame = JitterFrame(data=b"".join(p._data for p in packets), timestamp=packets[0].timestamp)  # type: ignore[attr-defined]
        self.remove(len(packets))
        return frame


def hand_frames_on_at_their_last_packet() -> None:
    """Make the peer connections this process creates from now on buffer their video with `MarkerJitterBuffer`."""
    if not hasattr(rtp_receiver, "JitterBuffer"):
        raise RuntimeError("this aiortc has no rtcrtpreceiver.JitterBuffer to replace")
    rtp_receiver.JitterBuffer = MarkerJitterBuffer  # type: ignore[attr-defined,misc]
