"""The wire format of JoyAI-VL-Interaction's streaming API (docs/api.md): requests read the way its clients send
them — the session's name, the frames as data URLs, their times, the prompt — and answers in the shapes they
parse. Pure functions and small dataclasses, no I/O: `joyai_api.py` serves them, `http_session.py` turns a
request into a tick.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from actors.common.decisions import RESPONSE, SILENCE
from actors.common.frame_size import fit_within

DEFAULT_SESSION = "default"
MAX_SESSION_CHARS = 120
SESSION_HEADERS = ("x-streaming-session", "x-session-id")
TIME_HEADERS = ("x-frame-time-range", "x-streaming-time-range")
TIME_FIELDS = ("x_frame_time_range", "frame_time_range")
# A time beyond this (115 days) is no stream time: it is refused like a value without a unit.
MAX_STREAM_S = 1e7
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_NUMBER = r"(\d{1,12}(?:\.\d{1,9})?)"
_UNIT = r"(\s*(?:seconds?|s))?"
_TIME = re.compile(rf"{_NUMBER}{_UNIT}(?:\s*[~-]\s*{_NUMBER}{_UNIT})?", re.IGNORECASE)
_MARKER = re.compile(r"<([^<>\n]{1,80})>")
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]{1,32};base64,", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
# A memory line that covers a span: a mid-term summary or a long-term block (actors/memory/tiers.py writes them).
_SPAN_LINE = re.compile(r"from (\d+):(\d\d):(\d\d) to (\d+):(\d\d):(\d\d): (.*)", re.DOTALL)


class WireError(ValueError):
    """A request that breaks the wire format: a 400 whose message says what to change; `param` names the field."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


# -- the session ------------------------------------------------------------------------------------------


def sanitize_session_id(raw: str) -> str:
    """JoyAI's rule: characters outside `A-Za-z0-9_.-` become `_`, leading and trailing `.`/`_` are stripped, at
    most 120 characters; what is left empty is `default`."""
    safe = _UNSAFE.sub("_", raw).strip("._")[:MAX_SESSION_CHARS].strip("._")
    return safe or DEFAULT_SESSION


def session_name(headers: Mapping[str, str], body: Mapping[str, Any]) -> str:
    """The session a request is about, first found: header `x-streaming-session`, header `x-session-id`, body
    `user`, else `default`; sanitised."""
    for header in SESSION_HEADERS:
        value = headers.get(header)
        if value:
            return sanitize_session_id(value)
    user = body.get("user")
    if isinstance(user, str) and user:
        return sanitize_session_id(user)
    return DEFAULT_SESSION


# -- time ---------------------------------------------------------------------------------------------------


def _tenths(value: float) -> float:
    return math.floor(value * 10 + 0.5) / 10


@dataclass(frozen=True, slots=True)
class FrameTime:
    """A frame's time as the client gave it: a moment, or a range (`end`), in stream seconds."""

    start: float
    end: float | None = None

    @property
    def text(self) -> str:
        """Normalised: `12.0 seconds` or `10.0 seconds ~ 12.0 seconds`."""
        start = f"{_tenths(self.start):.1f} seconds"
        return start if self.end is None else f"{start} ~ {_tenths(self.end):.1f} seconds"


def parse_time(value: object) -> FrameTime | None:
    """A time value (`12s`, `12.0 seconds`, `10.0 seconds ~ 12.0 seconds`, `10-12s`), or None when it is not one:
    a value needs a unit, on either end of a range."""
    if not isinstance(value, str):
        return None
    match = _TIME.fullmatch(value.strip())
    if match is None:
        return None
    start, start_unit, end, end_unit = match.groups()
    if not (start_unit or end_unit):
        return None
    first = float(start)
    last = None if end is None else float(end)
    if first > MAX_STREAM_S or (last is not None and last > MAX_STREAM_S):
        return None
    return FrameTime(first, last)


def find_time_marker(text: str) -> FrameTime | None:
    """The first `<X seconds ~ Y seconds>` (or `<12s>`) marker in a prompt."""
    for match in _MARKER.finditer(text):
        found = parse_time(match.group(1))
        if found is not None:
            return found
    return None


def strip_time_markers(text: str) -> str:
    """The prompt without its lines that are only a time marker."""
    kept = []
    for line in text.splitlines():
        marker = _MARKER.fullmatch(line.strip())
        if marker is None or parse_time(marker.group(1)) is None:
            kept.append(line)
    return "\n".join(kept).strip()


def frame_times(
    body: Mapping[str, Any], headers: Mapping[str, str], raw_prompt: str, images: int
) -> tuple[FrameTime | None, ...]:
    """Each image's time, first found: body `frame_time_ranges` (one per image, in order), else one value from
    header `x-frame-time-range` / `x-streaming-time-range` or body `x_frame_time_range` / `frame_time_range`,
    else a marker in the prompt — one value being the first image's time. None: the session numbers it
    (its frame index times the frame interval)."""
    ranges = body.get("frame_time_ranges")
    if isinstance(ranges, list):
        given = [parse_time(value) for value in ranges[:images]]
        if any(time is not None for time in given):
            return (*given, *([None] * (images - len(given))))
    single = next((time for time in (*(parse_time(headers.get(name)) for name in TIME_HEADERS),
                                     *(parse_time(body.get(name)) for name in TIME_FIELDS)) if time is not None),
                  None) or find_time_marker(raw_prompt)
    if single is None or images == 0:
        return (None,) * images
    return (single, *([None] * (images - 1)))


# -- the request --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What Vigil takes from a chat-completions request: its session's name, its frames (data URLs) with their
    times (None: to be numbered), and its prompt (the last user message's text without time-marker lines; not
    yet checked as client text)."""

    session: str
    images: tuple[str, ...]
    times: tuple[FrameTime | None, ...]
    prompt: str


def image_urls(messages: Sequence[Mapping[str, Any]], max_images: int) -> tuple[str, ...]:
    """The `image_url` URLs of the last message that has any, in order."""
    for message in reversed(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        urls: list[str] = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if isinstance(url, str) and url:
                if len(urls) == max_images:
                    raise WireError("too_many_images", f"at most {max_images} images per request "
                                    "(limits.max_images_per_request)", "messages")
                urls.append(url)
        if urls:
            return tuple(urls)
    return ()


def prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the last user message (its text parts, one per line)."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content.strip()
        if isinstance(content, list):
            parts = [part["text"].strip() for part in content
                     if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)]
            return "\n".join(part for part in parts if part).strip()
    return ""


def parse_chat(body: object, headers: Mapping[str, str], max_images: int) -> ChatRequest:
    """A parsed JSON body as a ChatRequest; WireError for a body that is not an object, `messages` that is not a
    list of objects, or too many images."""
    if not isinstance(body, dict):
        raise WireError("invalid_json", "the body must be a JSON object")
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise WireError("invalid_messages", "messages must be a list", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise WireError("invalid_messages", f"messages[{index}] must be an object", "messages")
    images = image_urls(messages, max_images)
    raw_prompt = prompt_text(messages)
    return ChatRequest(
        session=session_name(headers, body), images=images,
        times=frame_times(body, headers, raw_prompt, len(images)), prompt=strip_time_markers(raw_prompt),
    )


def decode_data_url(url: str, max_bytes: int, max_pixels: int, longest_side: int) -> np.ndarray:
    """A `data:image/<fmt>;base64,...` frame as an RGB uint8 array at the model's size (longest side at most
    `longest_side`). WireError for anything else: another kind of URL, bad base64, a file over `max_bytes`,
    a picture over `max_pixels` (refused from its header, before it is decoded) or one that does not decode.
    CPU-bound: call it in a thread."""
    prefix = _DATA_URL.match(url)
    if prefix is None:
        raise WireError("invalid_image", "an image must be a data URL: data:image/<format>;base64,<data>", "image_url")
    payload = url[prefix.end():]
    if len(payload) > (max_bytes + 2) // 3 * 4 + 1024:  # base64's size before decoding it, whitespace allowed
        raise WireError("image_too_large", f"an image is over the {max_bytes}-byte limit (limits.max_image_bytes)",
                        "image_url")
    payload = _SPACE.sub("", payload)
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise WireError("invalid_image", "an image's data is not valid base64", "image_url") from None
    if len(data) > max_bytes:
        raise WireError("image_too_large", f"an image is over the {max_bytes}-byte limit (limits.max_image_bytes)",
                        "image_url")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise WireError("image_too_large", f"an image of {width}x{height} is over the {max_pixels}-pixel "
                                "limit (limits.max_frame_pixels)", "image_url")
            size = fit_within(width, height, longest_side)
            image.draft("RGB", size)  # JPEG: decode at a fraction of the size when that is enough
            rgb = image.convert("RGB")
    except WireError:
        raise
    except Exception as exc:  # Pillow raises many kinds on a hostile file; every one is a bad image
        raise WireError("invalid_image", f"an image could not be decoded ({type(exc).__name__})",
                        "image_url") from None
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


# -- the answer ---------------------------------------------------------------------------------------------


def normalise_content(raw: str) -> str:
    """JoyAI's `content`: the earliest of `</response>` and `</silence>` wins; a response is `</response> ` plus
    the first line after it, whitespace collapsed; no marker: the first line is a response; empty: silence."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        return SILENCE
    found = [(text.find(marker), marker) for marker in (RESPONSE, SILENCE) if marker in text]
    if found:
        _, marker = min(found)
        if marker == SILENCE:
            return SILENCE
        text = text.split(marker, 1)[1].strip()
        if not text:
            return RESPONSE
    line = " ".join(text.splitlines()[0].split())
    if line:
        return f"{RESPONSE} {line}"
    return RESPONSE if found else SILENCE


def memory_payload(lines: Sequence[str]) -> dict[str, Any]:
    """The memory lines a tick's prompt held, in JoyAI's `streamingharness.memory` shape: the lines that cover a
    span (summaries) as `mid_term_summaries`, the others (what memory retrieved, each with its time) as
    `long_term_memory`, one per line."""
    summaries: list[dict[str, Any]] = []
    others: list[str] = []
    for line in lines:
        span = _SPAN_LINE.fullmatch(line)
        if span is None:
            others.append(line)
            continue
        h1, m1, s1, h2, m2, s2 = (int(part) for part in span.groups()[:6])
        covered = FrameTime(h1 * 3600 + m1 * 60 + s1, h2 * 3600 + m2 * 60 + s2)
        summaries.append({"chunk_index": len(summaries) + 1, "frame_range": covered.text,
                          "summary_text": span.group(7)})
    return {"mid_term_summaries": summaries, "long_term_memory": "\n".join(others)}


def completion_body(
    completion_id: str, created: int, model: str, content: str, prompt_tokens: int, harness: dict[str, Any]
) -> dict[str, Any]:
    """A chat completion in the OpenAI shape, with JoyAI's `streamingharness` extension."""
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        # Vigil's engines report the prompt's tokens; the decision's own tokens are not counted.
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens},
        "streamingharness": harness,
    }


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """An error in the OpenAI shape JoyAI answers with: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
