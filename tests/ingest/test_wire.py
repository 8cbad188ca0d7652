"""The ingest's wire formats: data-channel messages, SDP offer checks and ICE candidate filters."""

from __future__ import annotations

import json

import pytest

from actors.common.messages import TickOutcome
from actors.ingest.channel import ChannelError, parse_client_message, tick_message
from actors.ingest.ice import filter_remote_candidates
from actors.ingest.peer import InvalidOffer, check_offer

pytestmark = pytest.mark.unit






def test_client_messages_parse() -> None:
    assert parse_client_message('{"type":"instruction","text":" raise hand "}', 4096, 100).text == "raise hand"
    assert parse_client_message('{"type":"ping","id":7}', 4096, 100).ping_id == 7
    assert parse_client_message(b'{"type":"clear_instructions"}', 4096, 100).kind == "clear_instructions"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("x" * 5000, "too_large"),
        ("{not json", "malformed"),
        (b"\xff\xfe", "malformed"),
        ("[1, 2]", "malformed"),
        ('{"type": "shell", "cmd": "rm -rf /"}', "unknown_type"),
        ('{"type": "question"}', "bad_field"),
        ('{"type": "question", "text": 5}', "bad_field"),
        ('{"type": "instruction", "text": "' + "a" * 101 + '"}', "bad_field"),
        ('{"type": "ping", "id": {"x": 1}}', "bad_field"),
    ],
)
def test_bad_client_messages_are_rejected(data: str | bytes, reason: str) -> None:
    with pytest.raises(ChannelError) as caught:
        parse_client_message(data, 4096, 100)
    assert caught.value.reason == reason


def test_tick_message_carries_the_outcome() -> None:
    outcome = TickOutcome(session_id="s", tick=3, stream_time=2.5, outcome="respond", text="Hi",
                          stages_ms={"decide": 12.3456}, probability=0.87654)
    message = json.loads(tick_message(outcome, 40.0))
    assert message == {"type": "tick", "tick": 3, "key": "s:3", "stream_time": 2.5, "outcome": "respond", "text": "Hi",
                       "question": "", "probability": 0.8765, "prompt_tokens": 0, "cached_tokens": 0,
                       "latency_ms": 40.0, "stages_ms": {"decide": 12.35}}


OFFER = "\r\n".join([
    "v=0", "o=- 1 2 IN IP4 127.0.0.1", "s=-", "t=0 0",
    "m=video 9 UDP/TLS/RTP/SAVPF 96", "a=candidate:1 1 udp 2122260223 192.0.2.7 50000 typ host",
    "a=candidate:2 1 udp 2122260223 127.0.0.1 50001 typ host",
    "a=candidate:3 1 udp 2122260223 abc.local 50002 typ host",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "",
])


def test_a_well_formed_offer_passes() -> None:
    check_offer(OFFER, 32768, 2)


@pytest.mark.parametrize(
    ("sdp", "code"),
    [
        ("v=0\r\n" + "a=x\r\n" * 10000, "sdp_too_large"),
        ("hello", "invalid_sdp"),
        (OFFER.replace("m=video", "m=text"), "invalid_sdp"),
        (OFFER.replace("m=application 9 UDP/DTLS/SCTP webrtc-datachannel", ""), "invalid_sdp"),
        (OFFER.replace("m=video 9 UDP/TLS/RTP/SAVPF 96", "m=audio 9 UDP/TLS/RTP/SAVPF 111"), "invalid_sdp"),
        (OFFER + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "invalid_sdp"),
        (OFFER + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "invalid_sdp"),
    ],
)
def test_bad_offers_are_refused(sdp: str, code: str) -> None:
    with pytest.raises(InvalidOffer) as caught:
        check_offer(sdp, 32768, 2)
    assert caught.value.code == code


def test_candidates_outside_allowed_networks_are_dropped() -> None:
    kept = filter_remote_candidates(OFFER, ["127.0.0.0/8"])
    assert "127.0.0.1 50001" in kept
    assert "192.0.2.7" not in kept and "abc.local" not in kept
    assert filter_remote_candidates(OFFER, []) == OFFER


def test_settings_messages_carry_a_threshold_from_zero_to_one() -> None:
    assert parse_client_message('{"type":"settings","speak_threshold":0.75}', 4096, 100).speak_threshold == 0.75
    assert parse_client_message('{"type":"settings","speak_threshold":1}', 4096, 100).speak_threshold == 1.0
    for bad in ('{"type":"settings"}', '{"type":"settings","speak_threshold":true}',
                '{"type":"settings","speak_threshold":1.01}', '{"type":"settings","speak_threshold":"0.5"}'):
        with pytest.raises(ChannelError) as refused:
            parse_client_message(bad, 4096, 100)
        assert refused.value.reason == "bad_field"
