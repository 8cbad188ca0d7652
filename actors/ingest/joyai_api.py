"""The streaming API compatible with JoyAI-VL-Interaction's (docs/api.md), so that its clients work against Vigil
unchanged: `POST /v1/chat/completions` (one tick of the named session per request), `POST /v1/streaming/reset`,
`GET /v1/models`, `GET /health`; and `GET /v1/streaming/events`, a session's timeline.

Errors take the OpenAI shape JoyAI answers with, `{"error": {"message", "type", "param", "code"}}`: 400 for a
body that is not JSON, `messages` that is not a list, an image that is not a decodable data URL, or a prompt that
breaks a rule of client text; 502 (`code` null) when the model failed on the tick, which is recorded all the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import redis.asyncio as redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from actors.common.client_text import ClientTextError, check_client_text
from actors.common.config import Limits
from actors.common.decisions import format_decision
from actors.common.messages import Decision, DecisionKind
from actors.common.session_store import UnknownSession
from actors.ingest.api_error import ApiError
from actors.ingest.http_session import Client, HttpSessions, Refused, TickResult
from actors.ingest.joyai_wire import (
    WireError,
    completion_body,
    decode_data_url,
    error_body,
    memory_payload,
    normalise_content,
    parse_chat,
    session_name,
)
from actors.ingest.quotas import client_address

if TYPE_CHECKING:
    from actors.ingest.gateway import Gateway

PARSE_INLINE_BYTES = 256 * 1024  # larger bodies are parsed off the event loop
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error", 502: "model_error",
               503: "service_unavailable_error"}


async def read_json(request: Request, max_bytes: int, empty_is_object: bool = False) -> Any:
    """The request's JSON body, read with a size limit (a 413 before it is all in memory); WireError if not JSON."""
    declared = request.headers.get("content-length")
    too_large = Refused(413, "body_too_large", f"request body over the {max_bytes}-byte limit")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    if empty_is_object and not raw.strip():
        return {}
    try:
        return json.loads(raw) if len(raw) <= PARSE_INLINE_BYTES else await asyncio.to_thread(json.loads, raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WireError("invalid_json", f"the body is not JSON ({type(exc).__name__})") from None


def decode_frames(urls: Sequence[str], limits: Limits, longest_side: int) -> list[np.ndarray]:
    """Every image of a request at the model's size (blocking: call it in a thread)."""
    frames = []
    for index, url in enumerate(urls):
        try:
            frames.append(decode_data_url(url, limits.max_image_bytes, limits.max_frame_pixels, longest_side))
        except WireError as exc:
            raise WireError(exc.code, f"image {index + 1}: {exc.message}", exc.param) from None
    return frames


def _r1(ms: float) -> float:
    return round(ms, 1)


def harness(result: TickResult, model: str, total_ms: float) -> dict[str, Any]:
    """The `streamingharness` extension of an answer: JoyAI's fields, and Vigil's own under `vigil`."""
    tick = result.tick
    stages: dict[str, float] = tick["stages_ms"]
    before = stages.get("wait", 0.0) + stages.get("sample", 0.0)
    building, deciding = stages.get("memory", 0.0), stages.get("decide", 0.0)
    return {
        "main_model": model,
        "raw_content": result.raw,
        "timing": {"adapter_total_ms": _r1(total_ms), "pre_inference_ms": _r1(before),
                   "prompt_build_ms": _r1(building), "vllm_inference_ms": _r1(deciding),
                   "post_process_ms": _r1(max(0.0, total_ms - before - building - deciding))},
        "summarizer_timing": {},
        "memory": memory_payload(result.memories),
        "vigil": {"session_id": result.session_id, "tick": tick["tick"], "stream_time": tick["stream_time"],
                  "outcome": tick["outcome"], "probability": tick["probability"],
                  "frame_time_ranges": list(result.frame_times), "messages": list(result.messages)},
    }


def joyai_routes(gateway: Gateway) -> APIRouter:
    """The streaming API over a Gateway: its sessions share the gateway's store, quotas, services and metrics."""
    from actors.ingest.gateway import bearer

    sessions = HttpSessions(gateway)
    router = APIRouter(on_shutdown=[sessions.close])
    config, limits = gateway.config, gateway.config.limits
    metrics = gateway.services.metrics
    created = int(time.time())

    def failed(status: int, message: str, code: str | None, param: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.http_rejected_total.labels(code=code or "model_error").inc()
        return JSONResponse(error_body(message, ERROR_TYPES.get(status, "invalid_request_error"), code, param),
                            status_code=status, headers=headers)

    async def answering(work: Callable[[], Awaitable[dict[str, Any] | JSONResponse]]) -> JSONResponse:
        try:
            answer = await work()
        except WireError as exc:
            return failed(400, exc.message, exc.code, exc.param)
        except ApiError as exc:  # refused here, or by the API key rule
            return failed(exc.status, exc.message, exc.code, headers=exc.headers)
        except redis.RedisError:
            return failed(503, "the session store (Redis) did not answer; retry", "store_unavailable",
                          headers={"Retry-After": "1"})
        return answer if isinstance(answer, JSONResponse) else JSONResponse(answer)

    def client_of(request: Request) -> Client:
        peer = request.client.host if request.client else None
        forwarded_for = ", ".join(request.headers.getlist("x-forwarded-for"))
        address = client_address(peer, forwarded_for, config.trust_forwarded_for)
        return Client(address, bearer(request) if config.api_key is not None else None)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        arrival = time.monotonic()

        async def work() -> dict[str, Any] | JSONResponse:
            gateway.check_api_key(request)
            chat = parse_chat(await read_json(request, limits.max_chat_body_bytes), request.headers,
                              limits.max_images_per_request)
            if not chat.images:
                raise WireError("no_frames", "Vigil decides on frames: send at least one image_url part "
                                "(data:image/jpeg;base64,...) in the last message that has images", "messages")
            if chat.prompt:
                try:
                    chat = dataclasses.replace(chat, prompt=check_client_text(chat.prompt, limits.max_text_chars,
                                                                              "the prompt"))
                except ClientTextError as exc:
                    raise WireError("invalid_text", str(exc), "messages") from None
            frames = await asyncio.to_thread(decode_frames, chat.images, limits, config.image_size)
            result = await sessions.complete(chat, frames, client_of(request), arrival)
            return completed(chat.session, result, (time.monotonic() - arrival) * 1000)

        return await answering(work)

    def completed(name: str, result: TickResult, total_ms: float) -> dict[str, Any] | JSONResponse:
        tick, model = result.tick, gateway.engine_info.model
        outcome: str = tick["outcome"]
        if outcome.startswith("skipped:"):
            return failed(502, f"the model failed on tick {tick['tick']} of session {name!r} ({outcome}); "
                          "the session goes on with the next request", None)
        decision = Decision(kind=cast(DecisionKind, outcome), text=tick["text"], question=tick["question"])
        return completion_body(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model,
                               normalise_content(format_decision(decision)), int(tick["prompt_tokens"]),
                               harness(result, model, total_ms))

    @router.post("/v1/streaming/reset")
    async def reset(request: Request) -> JSONResponse:
        async def work() -> dict[str, Any]:
            gateway.check_api_key(request)
            body = await read_json(request, limits.max_body_bytes, empty_is_object=True)
            if not isinstance(body, dict):
                raise WireError("invalid_json", "the body must be a JSON object ({} will do)")
            name = session_name(request.headers, body)
            return {"ok": True, "session_id": name, "removed": await sessions.reset(name)}

        return await answering(work)

    @router.get("/v1/streaming/events")
    async def events(request: Request) -> JSONResponse:
        async def work() -> dict[str, Any]:
            gateway.check_api_key(request)
            query = request.query_params
            try:
                after, limit = int(query.get("after", "0")), int(query.get("limit", "100"))
            except ValueError:
                raise WireError("invalid_request", "after and limit must be integers") from None
            name = session_name(request.headers, {"user": query.get("session_id", "")})
            session_id = await sessions.session_id(name)
            try:
                record = None if session_id is None else await gateway.store.get(session_id)
            except UnknownSession:
                record = None
            if record is None or session_id is None:
                raise Refused(404, "unknown_session", f"no session is named {name!r} (reset, or idle too long?)")
            return {"session_id": name, "vigil_session_id": session_id,
                    **await gateway.events(record, after, limit)}

        return await answering(work)

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = gateway.engine_info.model
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "vigil"}]}

    @router.get("/health")
    async def health() -> dict[str, Any]:
        """JoyAI's health: the process answers (readiness of Redis, engine and memory is /readyz)."""
        model = gateway.engine_info.model
        return {"ok": True, "model": model, "backends": [model],
                "summarizer_enabled": gateway.services.memory is not None, "sessions": len(sessions.by_name)}

    return router
