"""The answer asks the client for at most `video_max_kbps` of video: a b=AS and b=TIAS on every video section,
in the place RFC 4566 gives them, replacing the answer's own, and nowhere else. The receiver's bandwidth
estimate (REMB over abs-send-time) is left out of the offer before it is answered, so neither side uses it."""

from __future__ import annotations

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from actors.ingest.bitrate import ABS_SEND_TIME, cap_video_bitrate, without_receiver_estimate
from actors.ingest.ice import rtc_configuration

pytestmark = pytest.mark.unit

ANSWER = "\r\n".join([
    "v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111", "c=IN IP4 0.0.0.0", "b=AS:64", "a=mid:0",
    "m=video 9 UDP/TLS/RTP/SAVPF 96", "i=camera", "c=IN IP4 0.0.0.0", "b=AS:2500", "a=mid:1",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "c=IN IP4 0.0.0.0", "a=mid:2",
]) + "\r\n"


def _section(sdp: str, kind: str) -> list[str]:
    sections = sdp.split("m=")
    (section,) = [s for s in sections if s.startswith(kind)]
    return section.splitlines()


def test_every_video_section_is_capped_after_its_connection_line() -> None:
    capped = cap_video_bitrate(ANSWER, 400)
    video = _section(capped, "video")
    assert video[1:5] == ["i=camera", "c=IN IP4 0.0.0.0", "b=AS:400", "b=TIAS:400000"]
    assert "b=AS:2500" not in capped
    assert "b=AS:64" in _section(capped, "audio"), "audio keeps its own"
    assert not any(line.startswith("b=") for line in _section(capped, "application"))
    assert capped.endswith("\r\n") and "\n\n" not in capped.replace("\r\n", "\n")


def test_a_section_without_connection_line_is_capped_after_its_media_line() -> None:
    sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\nm=video 9 UDP/TLS/RTP/SAVPF 97\r\nb=TIAS:9\r\n"
    capped = cap_video_bitrate(sdp, 300).splitlines()
    assert capped == ["v=0", "m=video 9 UDP/TLS/RTP/SAVPF 96", "b=AS:300", "b=TIAS:300000", "a=mid:0",
                      "m=video 9 UDP/TLS/RTP/SAVPF 97", "b=AS:300", "b=TIAS:300000"]


def test_a_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        cap_video_bitrate(ANSWER, 0)


async def test_a_real_answer_stays_one_a_peer_accepts() -> None:
    """aiortc's own answer, capped, is applied by an aiortc offerer without complaint."""
    # No ICE servers: gathering stays on this machine.
    offerer, answerer = RTCPeerConnection(rtc_configuration([])), RTCPeerConnection(rtc_configuration([]))
    try:
        offerer.addTransceiver("video", direction="sendonly")
        offerer.createDataChannel("vigil")
        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        capped = cap_video_bitrate(answerer.localDescription.sdp, 400)
        assert "b=AS:400" in _section(capped, "video")
        await offerer.setRemoteDescription(RTCSessionDescription(sdp=capped, type="answer"))
        assert offerer.signalingState == "stable"
    finally:
        await offerer.close()
        await answerer.close()


def test_the_receiver_estimate_leaves_the_video_sections_and_nothing_else() -> None:
    offer = "\r\n".join([
        "v=0", "m=audio 9 UDP/TLS/RTP/SAVPF 111", f"a=extmap:2 {ABS_SEND_TIME}", "a=rtcp-fb:111 goog-remb",
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97", "a=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid",
        f"a=extmap:3/recvonly {ABS_SEND_TIME}", "a=rtcp-fb:96 nack", "a=rtcp-fb:96 goog-remb", "a=rtcp-fb:97 goog-remb",
        "a=rtcp-fb:96 nack pli",
    ]) + "\r\n"
    video = _section(without_receiver_estimate(offer), "video")
    assert video[1:] == ["a=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid", "a=rtcp-fb:96 nack", "a=rtcp-fb:96 nack pli"]
    assert f"a=extmap:2 {ABS_SEND_TIME}" in _section(without_receiver_estimate(offer), "audio")


async def test_an_offer_without_the_estimate_is_answered_without_it() -> None:
    offerer, answerer = RTCPeerConnection(rtc_configuration([])), RTCPeerConnection(rtc_configuration([]))
    try:
        offerer.addTransceiver("video", direction="sendonly")
        await offerer.setLocalDescription(await offerer.createOffer())
        assert ABS_SEND_TIME in offerer.localDescription.sdp and "goog-remb" in offerer.localDescription.sdp
        offer = without_receiver_estimate(offerer.localDescription.sdp)
        await answerer.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await answerer.setLocalDescription(await answerer.createAnswer())
        answer = answerer.localDescription.sdp
        assert ABS_SEND_TIME not in answer and "goog-remb" not in answer
        assert "nack pli" in answer, "loss feedback stays"
        await offerer.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        assert offerer.signalingState == "stable"
    finally:
        await offerer.close()
        await answerer.close()
