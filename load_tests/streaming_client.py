"""A client of Vigil's JoyAI-compatible streaming API (docs/api.md): one `POST /v1/chat/completions` per step of
frames, `POST /v1/streaming/reset` at the end, `GET /health` to find the server first.

Plain `http.client` over one kept-alive connection, blocking (the replay sends one request at a time), with a
timeout on every call. The API key goes only into the `Authorization` header: never into a message, a repr or
a file. What the answer decided is read as a JoyAI client reads it: the normalised `content` (`</silence>` or
`</response> …`), and a delegation from `</delegation>` in it or in `streamingharness.raw_content`.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SILENCE = "</silence>"
RESPONSE = "</response>"
# What marks a delegation: Vigil's and JoyAI's marker, the older one, and the background-call form.
DELEGATION_MARKS = ("</delegation>", "<delegation>", "<|background_call|>")
USER_AGENT = "vigil-replay/1"
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class CallFailed(Exception):
    """A call that brought no usable answer. `status` is None when no HTTP answer came at all (refused, reset,
    timed out); `code` is the error body's `code`; `retry_after_s` the server's `Retry-After`."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        """Worth sending again: no answer, a 5xx, or the session still busy with the previous request."""
        return self.status is None or self.status >= 500 or (self.status == 429 and self.code == "session_busy")


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame to send: the JPEG and its time range in stream seconds."""

    jpeg: bytes
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Answer:
    """One step's answer: the decision (`silent`, `respond`, `delegate`), what was said, and Vigil's figures
    where the answer has them (`tick`, `stream_time`, `server_ms`); `latency_ms` is the round trip."""

    decision: str
    text: str
    content: str
    raw: str
    latency_ms: float
    tick: int | None = None
    stream_time: float | None = None
    server_ms: float | None = None


def decision_of(content: str, raw: str = "") -> tuple[str, str]:
    """`(decision, text)` from an answer's `content` and `raw_content`, by JoyAI's rules: the earliest of
    `</response>` and `</silence>` wins, no marker is a response; a delegation mark after the response (in the
    content, or in the raw output of a response), with a question after it, makes it a delegation whose spoken
    note is the text before it."""
    text = content.strip()
    found = [(text.find(marker), marker) for marker in (RESPONSE, SILENCE) if marker in text]
    if found:
        at, marker = min(found)
        if marker == SILENCE:
            return "silent", ""
        text = text[at + len(RESPONSE):]
    cuts = [text.find(mark) for mark in DELEGATION_MARKS if mark in text]
    delegated = _asks(text) or _asks(raw)
    note = " ".join(text[:min(cuts)].split() if cuts else text.split())
    if delegated:
        return "delegate", note
    return ("respond", note) if note else ("silent", "")


def _asks(text: str) -> bool:
    """Whether a delegation mark with a question after it is in `text` (a bare mark delegates nothing)."""
    return any(mark in text and text.split(mark, 1)[1].strip() for mark in DELEGATION_MARKS)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _seconds(value: float) -> str:
    return f"{round(value, 3)} seconds"


class StreamingClient:
    """Calls on one named session of a Vigil (or any JoyAI-compatible server) at `url`."""

    def __init__(self, url: str, session: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        self.url = url.rstrip("/")
        self.session = session
        self.timeout_s = timeout_s
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        path = parts.path.rstrip("/")
        self._root = path[:-3] if path.endswith("/v1") else path  # `http://host/v1`, as OpenAI clients write it
        self._api_key = api_key
        self._connection: http.client.HTTPConnection | None = None
        self._used = False

    def __repr__(self) -> str:
        return f"StreamingClient({self.url!r}, session={self.session!r})"

    # -- the calls ---------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """`GET /health`: the server answers and says its model."""
        answer = self._call("GET", "/health", None)
        return answer if isinstance(answer, dict) else {}

    def complete(self, frames: Sequence[Frame], instruction: str, model: str = "vigil") -> Answer:
        """One step: its frames as JPEG data URLs with a time range each, the instruction as the user text."""
        content: list[dict[str, Any]] = [{"type": "text", "text": instruction}]
        content += [{"type": "image_url",
                     "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(f.jpeg).decode()}}
                    for f in frames]
        body = {"model": model, "messages": [{"role": "user", "content": content}],
                "frame_time_ranges": [f"{_seconds(f.start)} ~ {_seconds(f.end)}" for f in frames]}
        began = time.monotonic()
        answer = self._call("POST", "/v1/chat/completions", body)
        latency_ms = (time.monotonic() - began) * 1000
        try:
            message = answer["choices"][0]["message"]["content"]
            if not isinstance(message, str):
                raise TypeError("content is not a string")
        except (KeyError, IndexError, TypeError) as exc:
            raise CallFailed(f"POST /v1/chat/completions: an answer without choices[0].message.content ({exc})",
                             status=200) from None
        extension = _object(answer.get("streamingharness"))
        raw = extension.get("raw_content")
        raw = raw if isinstance(raw, str) else ""
        own = _object(extension.get("vigil"))
        timing = _object(extension.get("timing"))
        tick = own.get("tick")
        decision, text = decision_of(message, raw)
        return Answer(decision=decision, text=text, content=message, raw=raw, latency_ms=latency_ms,
                      tick=tick if isinstance(tick, int) and not isinstance(tick, bool) else None,
                      stream_time=_number(own.get("stream_time")), server_ms=_number(timing.get("adapter_total_ms")))

    def reset(self) -> dict[str, Any]:
        """`POST /v1/streaming/reset`: the session ends on the server (memory, pending delegations)."""
        answer = self._call("POST", "/v1/streaming/reset", {})
        return answer if isinstance(answer, dict) else {}

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection, self._used = None, False

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _headers(self, has_body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT,
                   "x-streaming-session": self.session, "x-session-id": self.session}
        if has_body:
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _open(self) -> http.client.HTTPConnection:
        if self._connection is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._connection = kind(self._host, self._port, timeout=self.timeout_s)
            self._used = False
        return self._connection

    def _exchange(self, method: str, path: str, data: bytes | None) -> tuple[int, http.client.HTTPMessage, bytes]:
        for attempt in range(2):
            connection = self._open()
            reused = self._used
            try:
                connection.request(method, self._root + path, body=data, headers=self._headers(data is not None))
                response = connection.getresponse()
                payload = response.read()
            except STALE as exc:
                self.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle kept-alive connection: it never saw this request
                raise CallFailed(f"{method} {path}: the connection dropped ({exc.__class__.__name__})") from None
            except TimeoutError:
                self.close()
                raise CallFailed(f"{method} {path}: no answer within {self.timeout_s:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise CallFailed(f"{method} {path}: cannot reach {self.url} ({exc.__class__.__name__}: {exc})") \
                    from None
            self._used = True
            if response.will_close:
                self.close()
            return response.status, response.headers, payload
        raise AssertionError("unreachable")

    def _call(self, method: str, path: str, body: object | None) -> Any:
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        status, headers, payload = self._exchange(method, path, data)
        try:
            answer = json.loads(payload) if payload else None
        except ValueError:
            answer = None
        if status == 200 and answer is not None:
            return answer
        if status == 200:
            raise CallFailed(f"{method} {path}: the answer is not JSON", status=status)
        error = _object(_object(answer).get("error"))
        detail = error.get("message") or _object(answer).get("detail")
        message = " ".join(str(detail or payload[:200].decode("utf-8", "replace") or "no body").split())
        code = error.get("code") if isinstance(error.get("code"), str) else None
        retry_after = headers.get("Retry-After")
        raise CallFailed(f"{method} {path}: {status}{' ' + code if code else ''}: {message}", status=status,
                         code=code, retry_after_s=float(retry_after) if retry_after and retry_after.isdigit()
                         else None)
