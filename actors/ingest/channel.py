"""Data-channel messages (JSON, both directions), parsed with limits. See docs/protocol.md."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from actors.common.client_text import ClientTextError, check_client_text
from actors.common.messages import EngineInfo, TickOutcome

ClientKind = Literal["instruction", "clear_instructions", "question", "recall", "ping", "settings", "cancel"]
CLIENT_KINDS: tuple[str, ...] = ("instruction", "clear_instructions", "question", "recall", "ping", "settings",
                                 "cancel")
MAX_DELEGATION_ID_CHARS = 32


class ChannelError(ValueError):
    """A client message was rejected; `reason` labels the metric, the message goes back to the client."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ClientMessage:
    kind: ClientKind
    text: str = ""
    ping_id: str | int | float | None = None
    speak_threshold: float | None = None
    delegation_id: str = ""


def parse_client_message(data: str | bytes, max_bytes: int, max_text_chars: int) -> ClientMessage:
    """Parse one data-channel message from a client, or raise ChannelError."""
    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    if size > max_bytes:
        raise ChannelError("too_large", f"message of {size} bytes is over the {max_bytes}-byte limit")
    try:
        payload = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChannelError("malformed", f"message is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ChannelError("malformed", "message must be a JSON object")
    kind = payload.get("type")
    if kind not in CLIENT_KINDS:
        raise ChannelError("unknown_type", f"unknown message type {kind!r}; expected one of {list(CLIENT_KINDS)}")
    if kind in ("instruction", "question", "recall"):
        try:
            text = check_client_text(payload.get("text"), max_text_chars, f"{kind} 'text'")
        except ClientTextError as exc:
            raise ChannelError("bad_field", str(exc)) from None
        return ClientMessage(kind=kind, text=text)
    if kind == "ping":
        ping_id = payload.get("id")
        if ping_id is not None and not isinstance(ping_id, str | int | float):
            raise ChannelError("bad_field", "ping 'id' must be a number or a string")
        try:
            _dumps({"id": ping_id}).encode()  # it is sent back
        except UnicodeEncodeError:
            raise ChannelError("bad_field", "ping 'id' must be valid Unicode") from None
        return ClientMessage(kind="ping", ping_id=ping_id)
    if kind == "cancel":
        return ClientMessage(kind="cancel", delegation_id=parse_delegation_id(payload.get("delegation")))
    if kind == "settings":
        return ClientMessage(kind="settings", speak_threshold=parse_speak_threshold(payload.get("speak_threshold")))
    return ClientMessage(kind=kind)


def parse_speak_threshold(value: object) -> float:
    """A session's proactivity threshold: a number from 0 (speak at any hint) to 1 (only when certain)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ChannelError("bad_field", "'speak_threshold' must be a number from 0 to 1")
    return float(value)


def parse_delegation_id(value: object) -> str:
    """A delegation's id as a client names it to cancel it: the id its `delegation` message carried."""
    if not isinstance(value, str) or not value or len(value) > MAX_DELEGATION_ID_CHARS \
            or not value.replace("-", "").replace("_", "").isalnum() or not value.isascii():
        raise ChannelError("bad_field", f"cancel 'delegation' must be a delegation's id (letters, digits, - and _, "
                           f"at most {MAX_DELEGATION_ID_CHARS})")
    return value


def settings_message(speak_threshold: float) -> str:
    return _dumps({"type": "settings", "speak_threshold": speak_threshold})


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def model_payload(info: EngineInfo) -> dict[str, Any]:
    return {"engine": info.engine, "model": info.model, "demo": info.demo, "note": info.note}


def hello_message(
    session_id: str,
    info: EngineInfo,
    tick_interval_s: float,
    instructions: tuple[str, ...],
    speak_threshold: float,
    resumed: dict[str, Any] | None = None,
) -> str:
    """The first message of a connection; `resumed` (tick, stream_time, missed_s) when it continues a session."""
    return _dumps(
        {
            "type": "hello",
            "session_id": session_id,
            "model": model_payload(info),
            "tick_interval_s": tick_interval_s,
            "instructions": list(instructions),
            "speak_threshold": speak_threshold,
            "resumed": resumed,
        }
    )


def reconnect_message(reason: str, message: str) -> str:
    """This replica is going away (drain): connect again, with the same session and token, to be resumed."""
    return _dumps({"type": "reconnect", "reason": reason, "message": message})


def instructions_message(instructions: tuple[str, ...]) -> str:
    return _dumps({"type": "instructions", "items": list(instructions)})


def tick_key(session_id: str, tick: int) -> str:
    """A tick's idempotency key: the same for the message, its `/events` entry and any replay of either."""
    return f"{session_id}:{tick}"


def tick_payload(outcome: TickOutcome, latency_ms: float) -> dict[str, Any]:
    return {
        "type": "tick",
        "tick": outcome.tick,
        "key": tick_key(outcome.session_id, outcome.tick),
        "stream_time": round(outcome.stream_time, 3),
        "outcome": outcome.outcome,
        "text": outcome.text,
        "question": outcome.question,
        "probability": round(outcome.probability, 4),
        "prompt_tokens": outcome.prompt_tokens,
        "cached_tokens": outcome.cached_tokens,
        "latency_ms": round(latency_ms, 2),
        "stages_ms": {name: round(ms, 2) for name, ms in outcome.stages_ms.items()},
    }


def tick_message(outcome: TickOutcome, latency_ms: float) -> str:
    return _dumps(tick_payload(outcome, latency_ms))


def recall_message(query: str, lines: tuple[str, ...]) -> str:
    return _dumps({"type": "recall", "query": query, "lines": list(lines)})


def error_message(code: str, message: str) -> str:
    return _dumps({"type": "error", "code": code, "message": message})


def source_message(status: dict[str, Any]) -> str:
    """The session's video source changed state (actors/ingest/sources.py `SourceStatus.payload`)."""
    return _dumps({"type": "source", **status})


def pong_message(ping_id: str | int | float | None) -> str:
    return _dumps({"type": "pong", "id": ping_id})
