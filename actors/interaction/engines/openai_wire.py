"""The chat-completions wire format as the openai engine uses it: frames as JPEG data URLs, tick prompts as
OpenAI messages, replies parsed into text and per-token log-probabilities, and P(speak) read off them.

Pure functions and small dataclasses, no I/O: the engine (`openai.py`) owns the HTTP calls.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

from actors.common.decisions import RESPONSE, SILENCE
from actors.common.messages import Sample

# What the deciding call may answer; constrained servers pick exactly one of these.
DECISION_CHOICES: tuple[str, str] = (SILENCE, RESPONSE)

Lean = Literal["speak", "silent", "both"]


class WireError(ValueError):
    """A reply that is not a chat completion (its message is a short reason, safe to show)."""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token with its log-probability, and the server's top alternatives at that position."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ChatReply:
    """The parts of a chat completion the engine uses."""

    text: str
    finish_reason: str
    tokens: tuple[TokenLogprob, ...] = ()
    # What the server says its model took, when it says (JoyAI's adapter does); else None.
    server_ms: float | None = None
    # The prompt's tokens and those its prefix cache served (`usage.prompt_tokens_details.cached_tokens`, which
    # vLLM and OpenAI report); 0 when the server does not say.
    prompt_tokens: int = 0
    cached_tokens: int = 0


def sample_jpeg(sample: Sample, quality: int = 85) -> bytes:
    """A sample's raw RGB bytes as a JPEG file."""
    expected = sample.width * sample.height * 3
    if len(sample.rgb) != expected:
        raise ValueError(
            f"sample has {len(sample.rgb)} bytes, expected {expected} for {sample.width}x{sample.height} RGB"
        )
    image = Image.frombytes("RGB", (sample.width, sample.height), sample.rgb)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


class FrameUrls:
    """JPEG data URLs of samples, with a bounded cache: a sliding window sends each frame several ticks running,
    and encoding it once saves the CPU. Thread-safe, because encoding runs in worker threads."""

    def __init__(self, quality: int = 85, capacity: int = 512) -> None:
        self.quality = quality
        self.capacity = capacity
        self._cache: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    def urls(self, samples: Sequence[Sample]) -> list[str]:
        """One `data:image/jpeg;base64,...` URL per sample, in order (blocking: call it in a thread)."""
        return [self._url(sample) for sample in samples]

    def _url(self, sample: Sample) -> str:
        key = hashlib.blake2b(sample.rgb, digest_size=16, person=b"vigil-frame").digest()
        key += sample.width.to_bytes(4, "little") + sample.height.to_bytes(4, "little")
        with self._lock:
            url = self._cache.get(key)
            if url is not None:
                self._cache.move_to_end(key)
                return url
        url = "data:image/jpeg;base64," + base64.b64encode(sample_jpeg(sample, self.quality)).decode("ascii")
        with self._lock:
            self._cache[key] = url
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return url


def openai_messages(messages: Sequence[dict[str, Any]], image_urls: Sequence[str] | None) -> list[dict[str, Any]]:
    """Hugging Face content-list messages in the OpenAI format: each `{"type": "image"}` placeholder becomes
    the next `image_url` part (or, with `image_urls` None, for a text-only model, is left out: the frame's time
    tag stays); system and assistant turns, which hold only text, become plain strings (which every server
    accepts)."""
    urls = iter(image_urls or ())
    converted: list[dict[str, Any]] = []
    used = 0
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            converted.append({"role": message["role"], "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if part.get("type") == "image":
                if image_urls is None:
                    continue
                url = next(urls, None)
                if url is None:
                    raise ValueError("the prompt has more image placeholders than images")
                used += 1
                parts.append({"type": "image_url", "image_url": {"url": url}})
            elif part.get("type") == "text":
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise ValueError(f"unknown content part {part.get('type')!r}")
        if message["role"] != "user" and all(part["type"] == "text" for part in parts):
            converted.append({"role": message["role"], "content": "".join(part["text"] for part in parts)})
        else:
            converted.append({"role": message["role"], "content": parts})
    if image_urls is not None and used != len(image_urls):
        raise ValueError(f"the prompt has {used} image placeholders for {len(image_urls)} images")
    return converted


def parse_reply(body: bytes) -> ChatReply:
    """The first choice of a chat-completion body; WireError with a short reason when it is not one."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WireError(f"the reply is not JSON ({_preview(body)})") from None
    if not isinstance(data, dict):
        raise WireError("the reply is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise WireError("the reply has no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise WireError("the reply's first choice has no message")
    content = message.get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise WireError("the reply's message content is not text")
    return ChatReply(
        text=content,
        finish_reason=str(choice.get("finish_reason") or ""),
        tokens=_token_logprobs(choice.get("logprobs")),
        server_ms=_server_ms(data),
        **_prompt_usage(data.get("usage")),
    )


def _prompt_usage(usage: Any) -> dict[str, int]:
    # Counters only inform metrics: a server that sends them malformed is treated as sending none.
    if not isinstance(usage, dict):
        return {}
    details = usage.get("prompt_tokens_details")
    prompt, cached = usage.get("prompt_tokens"), details.get("cached_tokens") if isinstance(details, dict) else 0
    if not isinstance(prompt, int) or isinstance(prompt, bool) or not isinstance(cached, int | None):
        return {}
    return {"prompt_tokens": max(0, prompt), "cached_tokens": max(0, min(cached or 0, prompt))}


def _token_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    # Log-probabilities only refine a decision; a server that sends them malformed is treated as sending none.
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        return ()
    tokens = []
    try:
        for entry in logprobs["content"]:
            top = tuple((str(alt["token"]), float(alt["logprob"])) for alt in entry.get("top_logprobs") or ())
            tokens.append(TokenLogprob(str(entry["token"]), float(entry["logprob"]), top))
    except (KeyError, TypeError, ValueError, AttributeError):
        return ()
    return tuple(tokens)


def _server_ms(data: dict[str, Any]) -> float | None:
    harness = data.get("streamingharness")
    timing = harness.get("timing") if isinstance(harness, dict) else None
    if not isinstance(timing, dict):
        return None
    for key in ("vllm_inference_ms", "adapter_total_ms"):
        value = timing.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
    return None


def _preview(body: bytes, limit: int = 60) -> str:
    text = body[:limit].decode("utf-8", errors="replace").replace("\n", " ")
    return repr(text + ("..." if len(body) > limit else ""))


def lean(text: str) -> Lean | None:
    """Which decision `text` (the start of a reply) is spelling: "speak", "silent", "both" while it is still a
    prefix of both choices, None when it is neither."""
    text = text.lstrip()
    silent = SILENCE.startswith(text) or text.startswith(SILENCE)
    speak = RESPONSE.startswith(text) or text.startswith(RESPONSE)
    if silent and speak:
        return "both"
    if silent:
        return "silent"
    if speak:
        return "speak"
    return None


def speak_probability(tokens: Sequence[TokenLogprob]) -> float | None:
    """P(speak) from a reply's log-probabilities, renormalised over the two decisions.

    The decision is made at the first token where the two choices part (in Qwen2's tokenizer both start with
    `</`, so it is the second); there the top alternatives that continue `</response>` are summed against those
    that continue `</silence>`. None when the reply never reaches that point or spells neither.
    """
    prefix = ""
    for token in tokens:
        chosen = lean(prefix + token.token)
        if chosen is None:
            return None
        if chosen == "both":
            prefix += token.token
            continue
        speak = silent = 0.0
        seen: set[str] = set()
        # The generated token is counted too: a server may leave it out of its own top list.
        for text, logprob in ((token.token, token.logprob), *token.top):
            if text in seen or not math.isfinite(logprob):
                continue
            seen.add(text)
            side = lean(prefix + text)
            if side == "speak":
                speak += math.exp(logprob)
            elif side == "silent":
                silent += math.exp(logprob)
        total = speak + silent
        return speak / total if total > 0 else None
    return None


__all__ = [
    "DECISION_CHOICES",
    "ChatReply",
    "FrameUrls",
    "TokenLogprob",
    "WireError",
    "lean",
    "openai_messages",
    "parse_reply",
    "sample_jpeg",
    "speak_probability",
]
