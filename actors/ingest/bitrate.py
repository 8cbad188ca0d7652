"""The most video a client is asked to send, written into the SDP answer.

`b=AS` (RFC 4566, kbit/s) and `b=TIAS` (RFC 3890, bit/s) on a video section cap the sender's encoder: browsers
honour them as the ceiling of their own bandwidth estimate. The model sees one frame a second at its image size,
and the ingest's CPU per stream grows with the bitrate it decodes (packets to decrypt and parse, bits to
decode), so Vigil asks for what the model can use and no more.

The receiver's own bandwidth estimate (REMB over the abs-send-time header extension) is left out of the
negotiation unless asked for: it costs the ingest a computation per packet and, under load, an RTCP packet for
many of them (the estimator reads a busy replica's late packets as congestion). Without it a browser adapts its
bitrate to the losses the receiver reports (RTCP receiver reports), under the same cap.
"""

from __future__ import annotations


def cap_video_bitrate(sdp: str, kbps: int) -> str:
    """`sdp` with every video section's bandwidth lines replaced by a cap of `kbps`."""
    if kbps <= 0:
        raise ValueError(f"a bitrate cap must be positive, not {kbps}")
    lines = sdp.splitlines()
    out: list[str] = []
    in_video = False
    capped = False
    for index, line in enumerate(lines):
        if line.startswith("m="):
            in_video, capped = line.startswith("m=video"), False
        elif in_video and line.startswith("b="):
            continue  # the answer's own bandwidth lines give way to the cap
        out.append(line)
        following = lines[index + 1] if index + 1 < len(lines) else ""
        # The b= lines follow m= and its optional i= and c= lines (RFC 4566, 5).
        if in_video and not capped and not following.startswith(("i=", "c=")):
            out += [f"b=AS:{kbps}", f"b=TIAS:{kbps * 1000}"]
            capped = True
    return "\r\n".join(out) + "\r\n"


ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"


def without_receiver_estimate(sdp: str) -> str:
    """`sdp` (an offer) without what the receiver's bandwidth estimate needs in its video sections: the
    abs-send-time header extension and `goog-remb` feedback."""
    out: list[str] = []
    in_video = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            in_video = line.startswith("m=video")
        elif in_video and ((line.startswith("a=extmap:") and line.split()[1:2] == [ABS_SEND_TIME])
                           or (line.startswith("a=rtcp-fb:") and line.split()[1:2] == ["goog-remb"])):
            continue
        out.append(line)
    return "\r\n".join(out) + "\r\n"
