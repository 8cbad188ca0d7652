"""The most video a client is asked to send, written into the SDP answer.

`b=AS` (RFC 4566, kbit/s) and `b=TIAS` (RFC 3890, bit/s) on a video section cap the sender's encoder: browsers
honour them as the ceiling of their own bandwidth estimate. The model sees one frame a second at its image size,
and the ingest's CPU per stream grows with the bitrate it decodes (packets to decrypt and parse, bits to
decode), so Vigil asks for what the model can use and no more.
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
