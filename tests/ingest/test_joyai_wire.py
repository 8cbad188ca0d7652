"""The JoyAI streaming API's wire rules (docs/api.md), one by one: the session's name and its sanitising, the
frames and their order, every time field and its priority, time values and their normal form, the prompt and its
markers, the normalised `content`, data URLs and their limits, and the answer's shapes."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from actors.ingest.joyai_wire import (
    FrameTime,
    WireError,
    completion_body,
    decode_data_url,
    error_body,
    find_time_marker,
    frame_times,
    image_urls,
    memory_payload,
    normalise_content,
    parse_chat,
    parse_time,
    prompt_text,
    sanitize_session_id,
    session_name,
    strip_time_markers,
)

pytestmark = pytest.mark.unit

MB = 1024 * 1024


def _data_url(size: tuple[int, int] = (64, 48), fmt: str = "JPEG", colour=(200, 30, 30), mode: str = "RGB") -> str:
    out = io.BytesIO()
    Image.new(mode, size, colour).save(out, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(out.getvalue()).decode()


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# -- the session ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("cam-1", "cam-1"),
    ("Session_01.a", "Session_01.a"),
    ("a b/c", "a_b_c"),                   # every character outside A-Za-z0-9_.- becomes _
    ("a  b", "a__b"),
    ("..__x__..", "x"),                   # leading and trailing . and _ stripped
    ("_.", "default"),                    # nothing left
    ("", "default"),
    ("ü🙂", "default"),
    ("x" * 130, "x" * 120),               # at most 120 characters
    ("x" * 119 + ".y", "x" * 119),        # and none trailing after the cut
    ("../../etc/passwd", "etc_passwd"),
    ("<script>alert(1)</script>", "script_alert_1___script"),
])
def test_session_ids_are_sanitised(raw: str, expected: str) -> None:
    assert sanitize_session_id(raw) == expected


def test_the_session_is_the_first_found() -> None:
    both = {"x-streaming-session": "one", "x-session-id": "two"}
    assert session_name(both, {"user": "three"}) == "one"
    assert session_name({"x-session-id": "two"}, {"user": "three"}) == "two"
    assert session_name({}, {"user": "three"}) == "three"
    assert session_name({}, {}) == "default"
    assert session_name({"x-streaming-session": ""}, {"user": "three"}) == "three"  # empty is not found
    assert session_name({}, {"user": 42}) == "default"  # only a string names a session
    assert session_name({"x-streaming-session": "###"}, {"user": "three"}) == "default"  # found, then sanitised


# -- time ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "text", "start"), [
    ("12s", "12.0 seconds", 12.0),
    ("12.0 seconds", "12.0 seconds", 12.0),
    ("12 second", "12.0 seconds", 12.0),
    ("  3.25s ", "3.3 seconds", 3.25),
    ("10.0 seconds ~ 12.0 seconds", "10.0 seconds ~ 12.0 seconds", 10.0),
    ("10-12s", "10.0 seconds ~ 12.0 seconds", 10.0),
    ("10s-12s", "10.0 seconds ~ 12.0 seconds", 10.0),
    ("10 s ~ 12", "10.0 seconds ~ 12.0 seconds", 10.0),
    ("0.04 SECONDS", "0.0 seconds", 0.04),
])
def test_time_values_need_a_unit_and_are_normalised(value: str, text: str, start: float) -> None:
    parsed = parse_time(value)
    assert parsed is not None and parsed.text == text and parsed.start == start


@pytest.mark.parametrize("value", ["12", "10-12", "12 minutes", "s", "-3s", "1e3s", "12s!", "", "twelve seconds",
                                   "99999999999s", None, 12, ["12s"]])
def test_what_is_not_a_time_value(value: object) -> None:
    assert parse_time(value) is None


def test_markers_in_the_prompt() -> None:
    assert find_time_marker("look <10.0 seconds ~ 12.0 seconds> here") == FrameTime(10.0, 12.0)
    assert find_time_marker("<nope> then <7s>") == FrameTime(7.0)
    assert find_time_marker("10.0 seconds ~ 12.0 seconds") is None  # a marker is in angle brackets
    prompt = "<10.0 seconds ~ 12.0 seconds>\nWho is there?\n  <11s>  \nsee <12s> here"
    assert strip_time_markers(prompt) == "Who is there?\nsee <12s> here"  # only lines that are only a marker go


def test_frame_times_first_found() -> None:
    marker = "<30s>\nwatch"
    ranges = {"frame_time_ranges": ["10.0 seconds ~ 11.0 seconds", "bad", "12s"],
              "x_frame_time_range": "20s", "frame_time_range": "21s"}
    headers = {"x-frame-time-range": "22s", "x-streaming-time-range": "23s"}
    # The list, one per image, in order; a bad entry and a missing one are numbered by the session.
    assert frame_times(ranges, headers, marker, 4) == (FrameTime(10.0, 11.0), None, FrameTime(12.0), None)
    assert frame_times({**ranges, "frame_time_ranges": ["bad"]}, headers, marker, 2) == (FrameTime(22.0), None)
    # One value, for the first image: the headers, then the body fields, then a marker.
    assert frame_times({}, {"x-streaming-time-range": "23s"}, marker, 2) == (FrameTime(23.0), None)
    assert frame_times({"x_frame_time_range": "20s", "frame_time_range": "21s"}, {}, marker, 1) == (FrameTime(20.0),)
    assert frame_times({"frame_time_range": "21s"}, {"x-frame-time-range": "nope"}, marker, 1) == (FrameTime(21.0),)
    assert frame_times({}, {}, marker, 1) == (FrameTime(30.0),)
    assert frame_times({"frame_time_ranges": "10s"}, {}, "", 2) == (None, None)  # not a list: not that field
    assert frame_times({}, {}, "", 0) == ()


# -- the request --------------------------------------------------------------------------------------------


def test_frames_are_the_image_parts_of_the_last_message_that_has_any() -> None:
    messages = [
        {"role": "user", "content": [_image("data:old")]},
        {"role": "user", "content": [_image("data:a"), {"type": "text", "text": "x"},
                                     {"type": "image_url", "image_url": "data:b"}, {"type": "image_url"}, 7]},
        {"role": "assistant", "content": "</silence>"},
    ]
    assert image_urls(messages, 16) == ("data:a", "data:b")
    with pytest.raises(WireError, match="at most 1 images"):
        image_urls(messages, 1)
    assert image_urls([{"role": "user", "content": "text only"}], 16) == ()


def test_the_prompt_is_the_last_user_messages_text() -> None:
    parts = [{"type": "text", "text": " first "}, _image("data:a"), {"type": "text", "text": "second"},
             {"type": "text", "text": {"not": "text"}}]
    messages = [{"role": "user", "content": "older"}, {"role": "user", "content": parts},
                {"role": "assistant", "content": "ignored"}]
    assert prompt_text(messages) == "first\nsecond"
    assert prompt_text([{"role": "user", "content": "older"}, {"role": "user", "content": None}]) == "older"
    assert prompt_text([{"role": "system", "content": "x"}]) == ""


def test_parse_chat() -> None:
    body = {"user": "u1", "frame_time_ranges": ["4s", "5s"], "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "<4s>\nSay when red"}, _image("data:a"),
                                     _image("data:b")]},
    ]}
    chat = parse_chat(body, {}, 16)
    assert (chat.session, chat.images, chat.times, chat.prompt) == (
        "u1", ("data:a", "data:b"), (FrameTime(4.0), FrameTime(5.0)), "Say when red")
    assert parse_chat({}, {}, 16).images == ()  # no messages is an empty list
    for bad, code in (([], "invalid_json"), ("x", "invalid_json"), ({"messages": {"a": 1}}, "invalid_messages"),
                      ({"messages": "hi"}, "invalid_messages"), ({"messages": [1]}, "invalid_messages")):
        with pytest.raises(WireError) as caught:
            parse_chat(bad, {}, 16)
        assert caught.value.code == code


# -- images -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_data_urls_decode_to_rgb_at_the_model_size(fmt: str) -> None:
    rgb = decode_data_url(_data_url((640, 480), fmt), MB, 10**6, 64)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    assert rgb[..., 0].mean() > 150  # still red
    small = decode_data_url(_data_url((32, 20), "PNG", colour=(0, 0, 0, 0), mode="RGBA"), MB, 10**6, 64)
    assert small.shape == (20, 32, 3)  # never scaled up; transparency dropped


def test_bad_data_urls_are_refused() -> None:
    good = _data_url()
    payload = good.split(",", 1)[1]
    big = _data_url((2000, 1000), "PNG")
    cases = {
        "https://example.com/a.jpg": "invalid_image",
        "file:///etc/passwd": "invalid_image",
        "data:text/plain;base64,aGk=": "invalid_image",
        "data:image/jpeg,rawbytes": "invalid_image",
        "data:image/jpeg;base64,@@@@": "invalid_image",
        "data:image/jpeg;base64," + base64.b64encode(b"not an image at all").decode(): "invalid_image",
        "data:image/jpeg;base64," + payload[: len(payload) // 2]: "invalid_image",  # cut short
        "data:image/tiff;base64," + base64.b64encode(_tiff()).decode(): "invalid_image",  # not a format we take
        big: "image_too_large",  # over the pixel limit, refused from its header
        "data:image/png;base64," + "A" * 3_000_000: "image_too_large",  # over the byte limit before decoding
    }
    for url, code in cases.items():
        with pytest.raises(WireError) as caught:
            decode_data_url(url, MB, 10**6, 64)
        assert caught.value.code == code, url[:60]
    unpadded = good.rstrip("=")
    assert decode_data_url(unpadded, MB, 10**6, 64).shape == (48, 64, 3)  # padding may be left out
    wrapped = "data:image/jpeg;base64," + "\n".join(payload[i:i + 76] for i in range(0, len(payload), 76))
    assert decode_data_url(wrapped, MB, 10**6, 64).shape == (48, 64, 3)  # MIME line breaks are fine


def _tiff() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="TIFF")
    return out.getvalue()


# -- the answer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "content"), [
    ("</silence>", "</silence>"),
    ("", "</silence>"),
    ("  \n ", "</silence>"),
    ("</response> A man is   working\ton a laptop.\nSecond line", "</response> A man is working on a laptop."),
    ("</response>\n\nHello there", "</response> Hello there"),
    ("</response>", "</response>"),
    ("</silence> </response> late", "</silence>"),                # the earliest marker wins
    ("thinking </response> hi </silence>", "</response> hi </silence>"),
    ("A cat.\nmore", "</response> A cat."),                         # no marker: the first line is a response
    ("\r\n  spaced  out \r\nx", "</response> spaced out"),
    ("</response> note </delegation> what brand is it?", "</response> note </delegation> what brand is it?"),
])
def test_content_is_normalised(raw: str, content: str) -> None:
    assert normalise_content(raw) == content


def test_memory_lines_in_joyais_shape() -> None:
    lines = ("from 00:00:00 to 00:01:39: a quiet room", "from 00:01:40 to 01:00:00: people came in",
             "at 00:02:00 the user said: watch the door", "at 00:03:00 you said: someone is at the door")
    assert memory_payload(lines) == {
        "mid_term_summaries": [
            {"chunk_index": 1, "frame_range": "0.0 seconds ~ 99.0 seconds", "summary_text": "a quiet room"},
            {"chunk_index": 2, "frame_range": "100.0 seconds ~ 3600.0 seconds", "summary_text": "people came in"},
        ],
        "long_term_memory": "at 00:02:00 the user said: watch the door\nat 00:03:00 you said: someone is at the door",
    }
    assert memory_payload(()) == {"mid_term_summaries": [], "long_term_memory": ""}


def test_answer_shapes() -> None:
    body = completion_body("chatcmpl-1", 7, "m", "</silence>", 12, {"raw_content": ""})
    assert body == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "</silence>"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 0, "total_tokens": 12},
        "streamingharness": {"raw_content": ""},
    }
    assert error_body("it broke", "model_error") == {
        "error": {"message": "it broke", "type": "model_error", "param": None, "code": None}}
