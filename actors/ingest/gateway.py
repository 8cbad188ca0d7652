"""The gateway: Vigil's HTTP API (sessions, WebRTC offers, events, health, metrics) and its peer connections."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiortc import RTCPeerConnection
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.common.client_text import ClientTextError, check_client_text
from actors.common.config import VigilConfig
from actors.common.loop_lag import LoopLag
from actors.common.messages import EngineInfo, SessionRecord, from_dict, to_dict
from actors.common.replicas import ReplicaFailed
from actors.common.session_store import SessionStore, UnknownSession, new_session_id
from actors.ingest.api_error import ApiError
from actors.ingest.channel import model_payload, tick_payload
from actors.ingest.delegation_api import delegation_routes
from actors.ingest.joyai_api import joyai_routes
from actors.ingest.peer import InvalidOffer, PeerSession, check_offer
from actors.ingest.quotas import QuotaExceeded, SessionQuotas, client_address, key_id
from actors.ingest.redis_bound import quietly_within, ready_within, redis_unavailable, redis_within
from actors.ingest.session_loop import TickServices
from actors.ingest.source_api import source_routes
from actors.ingest.turn import client_ice_servers

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
WEB_FILES = {"/": "index.html", "/app.js": "app.js", "/style.css": "style.css"}


class CreateSessionBody(BaseModel):
    instructions: list[str] = Field(default_factory=list)
    speak_threshold: float | None = Field(default=None, ge=0.0, le=1.0)


class SessionSettingsBody(BaseModel):
    """What a client may change in a live session: how sure the model must be before it speaks."""

    model_config = {"extra": "forbid"}

    speak_threshold: float = Field(ge=0.0, le=1.0)


class OfferBody(BaseModel):
    type: str
    sdp: str


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class Gateway:
    """Sessions and their peer connections in this replica; session state itself lives in Redis."""

    def __init__(
        self, config: VigilConfig, store: SessionStore, services: TickServices, engine: Any, replica: str = "local"
    ) -> None:
        self.config = config
        self.replica = replica  # this ingest replica's name, in each peer's claim on its session
        self.store = store
        self.services = services
        self.engine = engine  # anything with async info() and check_health()
        self.engine_info = EngineInfo(engine="unknown", model="unknown")
        self.peers: dict[str, PeerSession] = {}
        self.draining = False  # shutting down: sessions move to other replicas, none start here
        self._closers: set[asyncio.Task[None]] = set()
        # Every peer connection made here, while it lives: one that no session holds but is still open is a leak.
        self._peer_connections: weakref.WeakSet[RTCPeerConnection] = weakref.WeakSet()
        limits = config.limits
        self.quotas = SessionQuotas(store.client, limits.max_sessions_per_key, limits.max_sessions_per_address)
        self.loop_lag = LoopLag()  # what the Redis bounds of requests discount (redis_bound.py)

    async def start(self, engine_info: EngineInfo | None = None) -> None:
        """`engine_info`: the engine's, when the caller asked it already."""
        self.engine_info = engine_info or await self.engine.info()
        self.services.metrics.watch_event_loop(asyncio.get_running_loop(), self.open_peer_connections)

    def open_peer_connections(self) -> int:
        """Peer connections made here and not closed yet (also read from the metrics port's thread)."""
        for _ in range(2):
            with contextlib.suppress(RuntimeError):  # the set changed while another thread read it
                return sum(pc.connectionState != "closed" for pc in list(self._peer_connections))
        return sum(pc.connectionState != "closed" for pc in list(self._peer_connections))

    async def shutdown(self, grace_s: float = 1.0) -> None:
        """Drain: every client is told to reconnect (it resumes on another replica), then its peer closes."""
        self.draining = True
        peers = list(self.peers.values())
        if peers:
            log.info("draining %d sessions: their clients are told to reconnect", len(peers))
        await asyncio.gather(*(peer.drain(grace_s) for peer in peers), return_exceptions=True)
        await self.loop_lag.stop()
        await self.store.close()

    # -- sessions ------------------------------------------------------------------------------------------

    def check_api_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = bearer(request) or ""
        if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
            raise ApiError(401, "unauthorized", "session creation needs a valid API key (Authorization: Bearer)")

    def _check_instructions(self, instructions: list[str]) -> tuple[str, ...]:
        limits = self.config.limits
        if len(instructions) > limits.max_instructions:
            raise ApiError(422, "invalid_request", f"at most {limits.max_instructions} instructions")
        try:  # blank entries (an empty form field) are left out, the rest must pass as client text
            return tuple(check_client_text(text, limits.max_text_chars, f"instructions[{index}]")
                         for index, text in enumerate(instructions) if text.strip())
        except ClientTextError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None

    async def create_session(self, body: CreateSessionBody, address: str, api_key: str | None) -> dict[str, Any]:
        """A new session, counted against the client's address and API key (`None`: Vigil runs without one)
        until its unconnected TTL passes or its offer is accepted."""
        if len(self.peers) >= self.config.limits.max_sessions:
            raise ApiError(503, "too_many_sessions", f"this replica holds {len(self.peers)} sessions, the limit")
        threshold = self.config.speak_threshold if body.speak_threshold is None else body.speak_threshold
        instructions = self._check_instructions(body.instructions)
        session_id, ttl_s = new_session_id(), self.config.unconnected_session_ttl_s
        async with self.redis_within("session not created"):
            await self._admit(session_id, address, api_key, ttl_s)
        try:
            async with self.redis_within("session not created"):
                record, token = await self.store.create(instructions, threshold, session_id=session_id,
                                                        ttl_s=ttl_s)
        except BaseException:
            await quietly_within(self.config.redis_http_timeout_s, self.quotas.release(session_id))
            raise
        self.services.metrics.sessions_created_total.inc()
        limits = self.config.limits
        return {
            "session_id": record.session_id,
            "token": token,
            "expires_in": ttl_s,  # the offer must come within this; once accepted, session_ttl_s
            "tick_interval_s": self.config.tick_interval_s,
            "speak_threshold": record.speak_threshold,
            "model": model_payload(self.engine_info),
            "limits": {
                "max_message_bytes": limits.max_message_bytes,
                "max_sdp_bytes": limits.max_sdp_bytes,
                "max_tracks": limits.max_tracks,
            },
            # TURN credentials for the client's peer connection, before it gathers candidates.
            **client_ice_servers(self.config, record.session_id),
        }

    async def _admit(self, session_id: str, address: str, api_key: str | None, ttl_s: int) -> None:
        key = None if api_key is None else key_id(api_key)
        await self._counted(self.quotas.admit(session_id, address, key, time.time() + ttl_s), ttl_s)

    async def _counted(self, admission: Awaitable[None], ttl_s: int) -> None:
        """Await a quota admission; a full quota is the 429 that says which, its limit, and when to retry."""
        try:
            await admission
        except QuotaExceeded as exc:
            self.services.metrics.quota_refusals_total.labels(quota=exc.quota).inc()
            holder, setting = {"key": ("this API key", "max_sessions_per_key"),
                               "address": ("this client address", "max_sessions_per_address")}[exc.quota]
            raise ApiError(
                429, "quota_exceeded",
                f"{holder} already holds {exc.limit} sessions, its limit (limits.{setting}): end one "
                f"(DELETE /v1/sessions/{{id}}) or retry in {exc.retry_after_s} s (a session never connected "
                f"frees its slot {ttl_s} s after it was created)",
                headers={"Retry-After": str(exc.retry_after_s)},
            ) from None

    def redis_within(self, what: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Bound a request's Redis calls: out of time or out of reach, it is refused with 503 redis_unavailable."""
        return redis_within(self.config.redis_http_timeout_s, what, self.loop_lag)

    async def authorize(self, session_id: str, request: Request) -> SessionRecord:
        try:
            async with self.redis_within("session not checked"):
                record = await self.store.authenticate(session_id, bearer(request))
        except UnknownSession:
            raise ApiError(404, "unknown_session", f"no session {session_id!r} (ended or expired?)") from None
        if record is None:
            raise ApiError(401, "unauthorized", "missing or wrong session token (Authorization: Bearer)")
        return record

    async def offer(self, record: SessionRecord, body: OfferBody) -> dict[str, Any]:
        if body.type != "offer":
            raise ApiError(400, "invalid_sdp", f"expected an SDP of type 'offer', got {body.type!r}")
        if record.state == "ended":
            raise ApiError(404, "unknown_session", f"session {record.session_id} has ended")
        if self.draining:
            raise ApiError(503, "draining", "this replica is shutting down: connect again to reach another")
        limits = self.config.limits
        try:
            check_offer(body.sdp, limits.max_sdp_bytes, limits.max_tracks)
        except InvalidOffer as exc:
            raise ApiError(413 if exc.code == "sdp_too_large" else 400, exc.code, str(exc)) from None
        replaced = self.peers.pop(record.session_id, None)
        if replaced is not None:
            # The same client connecting again (its network changed, or it saw the connection fail first).
            log.info("session %s: a new offer replaces its peer on this replica", record.session_id)
            await replaced.close()
        if len(self.peers) >= limits.max_sessions:
            raise ApiError(503, "too_many_sessions", "this replica is full")
        # A session whose peer closed left its quotas: connecting again counts it again, if there is room.
        unconnected_ttl_s = self.config.unconnected_session_ttl_s
        owner = f"{self.replica}/{uuid.uuid4().hex[:12]}"
        async with self.redis_within("offer not taken"):
            await self._counted(self.quotas.readmit(record.session_id, time.time() + unconnected_ttl_s),
                                unconnected_ttl_s)
            # From here on only this peer's ticks are recorded: a peer elsewhere that still runs stops at its next.
            resumed = await self.store.claim(record.session_id, owner)
        if resumed is not None:
            log.info("session %s resumes after tick %d at stream time %.1f s", record.session_id, resumed.tick,
                     resumed.stream_time)
        peer = PeerSession(
            record.session_id, self.config, self.services, self.engine_info, record.instructions,
            on_instructions=lambda items: self._own(self._save_instructions(record.session_id, items)),
            speak_threshold=record.speak_threshold,
            on_speak_threshold=lambda value: self._own(self._save_settings(record.session_id, value)),
            owner=owner, resumed=resumed,
        )
        self._peer_connections.add(peer.pc)
        self.peers[record.session_id] = peer
        try:
            answer = await peer.accept(body.sdp)
        except InvalidOffer as exc:
            self.peers.pop(record.session_id, None)
            status = 413 if exc.code == "sdp_too_large" else 400
            raise ApiError(status, exc.code, str(exc)) from None
        except BaseException:
            self.peers.pop(record.session_id, None)
            await peer.close()
            raise
        try:
            # Live: the record gets the full session TTL (it was created with the unconnected one), and so does
            # its place in its quotas.
            async with self.redis_within("offer not taken"):
                await self.store.update(from_dict(SessionRecord, to_dict(record) | {"state": "live"}))
                await self.quotas.hold(record.session_id, time.time() + self.config.session_ttl_s)
        except ApiError:
            self.peers.pop(record.session_id, None)
            self._own(peer.close())  # in the background: its journal waits a little for Redis
            raise
        self.services.metrics.active_sessions.set(len(self.peers))
        self._own(self._forget_when_closed(peer))
        # Fresh TURN credentials for the client's next peer connection (a reconnect), valid from now.
        return {"type": "answer", "sdp": answer} | client_ice_servers(self.config, record.session_id)

    async def settings(self, record: SessionRecord, body: SessionSettingsBody) -> dict[str, Any]:
        """Change a session's settings, live from its next tick when its peer is on this replica."""
        if record.state == "ended":
            raise ApiError(404, "unknown_session", f"session {record.session_id} has ended")
        peer = self.peers.get(record.session_id)
        async with self.redis_within("settings not changed"):
            if peer is None:
                # Its peer runs on another replica (or none yet): that replica takes the change at its next tick.
                await self.store.push_control(record.session_id, {"speak_threshold": body.speak_threshold})
            await self._save_settings(record.session_id, body.speak_threshold)
        if peer is not None:
            peer.loop.set_speak_threshold(body.speak_threshold)
        return {"ok": True, "session_id": record.session_id, "speak_threshold": body.speak_threshold}

    async def end(self, record: SessionRecord) -> dict[str, Any]:
        peer = self.peers.pop(record.session_id, None)
        if peer is not None:
            await peer.close()
        self.services.metrics.active_sessions.set(len(self.peers))
        async with self.redis_within("session not ended"):
            await self.store.end(record.session_id)
            await self.quotas.release(record.session_id)
        await self._release_memory(record.session_id)
        await self._cancel_delegations(record.session_id)
        return {"ok": True, "session_id": record.session_id}

    async def recall(self, record: SessionRecord, query: str, k: int) -> dict[str, Any]:
        memory = self.services.memory
        if memory is None:
            raise ApiError(501, "memory_off", "this Vigil runs without memory (VIGIL_MEMORY=false)")
        if not query.strip():
            raise ApiError(422, "invalid_request", "q: a question is required, e.g. q=what happened at 10:30")
        try:
            query = check_client_text(query, self.config.limits.max_text_chars, "q")
        except ClientTextError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
        if not 1 <= k <= 50:
            raise ApiError(422, "invalid_request", "k: from 1 to 50")
        try:
            lines = await asyncio.wait_for(memory.recall(record.session_id, query, k), 10.0)
        except (TimeoutError, ReplicaFailed) as exc:
            raise ApiError(503, "memory_unavailable", f"memory did not answer ({type(exc).__name__}); retry") from None
        return {"query": query, "lines": list(lines)}

    async def _cancel_delegations(self, session_id: str) -> None:
        """An ended session's delegations stop at the brain (a peer that merely closes keeps them: its session
        may resume and take their results from the inbox)."""
        if self.services.brain is None:
            return
        try:
            cancelled = await asyncio.wait_for(self.services.brain.cancel_session(session_id), 5.0)
        except Exception as exc:
            log.info("session %s: delegations not cancelled (%r); they end by their timeout", session_id, exc)
        else:
            if cancelled:
                log.info("session %s: ended with %d delegations cancelled", session_id, cancelled)

    async def _release_memory(self, session_id: str) -> None:
        """Free the memory replica's copy; the memory stays in Redis for a session that comes back."""
        if self.services.memory is None:
            return
        try:
            await asyncio.wait_for(self.services.memory.release(session_id), 5.0)
        except Exception as exc:
            log.info("session %s: memory not released (%r); it expires with the session", session_id, exc)

    async def events(self, record: SessionRecord, after: int, limit: int) -> dict[str, Any]:
        limit = max(1, min(limit, 1000))
        async with self.redis_within("event log not read"):
            outcomes = await self.store.outcomes(record.session_id, after=after, limit=limit)
        return {"events": [tick_payload(o, o.stages_ms.get("total", 0.0))
                           | {"replica": o.replica, "through": max(o.tick, o.through)} for o in outcomes]}

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Each dependency checked at once, all together, each bounded (redis_bound.READY_CHECK_TIMEOUT_S): a
        stalled one makes readiness 503 within that, not hang it."""
        checks: dict[str, Callable[[], Awaitable[object]]] = {
            "redis": self.store.ping, "engine": self.engine.check_health}
        if self.services.memory is not None:
            checks["memory"] = self.services.memory.check_health
        results = await asyncio.gather(*(ready_within(check) for check in checks.values()))
        status: dict[str, Any] = dict(zip(checks, results, strict=True))
        ok = all(value is True for value in status.values())
        return ok, status | {"ok": ok}

    # -- owned tasks ---------------------------------------------------------------------------------------

    def _own(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def _forget_when_closed(self, peer: PeerSession) -> None:
        await peer.loop.closed.wait()
        await peer.close()
        if self.peers.get(peer.session_id) is peer:
            del self.peers[peer.session_id]
            if not (peer.loop.lost or self.draining):  # a session that goes on elsewhere still uses its memory
                await self._release_memory(peer.session_id)
                await self.quotas.release(peer.session_id)  # a new offer for it counts it again
        self.services.metrics.active_sessions.set(len(self.peers))

    async def _save_settings(self, session_id: str, speak_threshold: float) -> None:
        record = await self.store.get(session_id)
        await self.store.update(from_dict(SessionRecord, to_dict(record) | {"speak_threshold": speak_threshold}))

    async def _save_instructions(self, session_id: str, instructions: tuple[str, ...]) -> None:
        record = await self.store.get(session_id)
        await self.store.update(from_dict(SessionRecord, to_dict(record) | {"instructions": instructions}))


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def read_json(request: Request, model: type[BaseModel], max_bytes: int, required: bool = True) -> Any:
    """Read a JSON body with a size limit, before parsing it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "body_too_large", f"request body over the {max_bytes}-byte limit")
    body = await request.body()
    if len(body) > max_bytes:
        raise ApiError(413, "body_too_large", f"request body over the {max_bytes}-byte limit")
    if not body and not required:
        return model()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "body"
        raise ApiError(422, "invalid_request", f"{where}: {first.get('msg')}") from None


def build_api(gateway: Gateway) -> FastAPI:
    """The HTTP API of docs/protocol.md over a Gateway."""
    app = FastAPI(title="Vigil", docs_url=None, redoc_url=None)
    max_body = gateway.config.limits.max_body_bytes
    metrics = gateway.services.metrics

    @app.middleware("http")
    async def _replica_header(request: Request, call_next: Any) -> Response:
        # Which ingest replica answered: a client (or a test) sees that a session's calls reach one replica.
        response: Response = await call_next(request)
        response.headers["x-vigil-replica"] = gateway.replica
        return response

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        metrics.http_rejected_total.labels(code=exc.code).inc()
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_unreachable(_: Request, exc: Exception) -> JSONResponse:
        # A Redis call no route bounded (redis_bound.py) that failed all the same: a 503 too, not a 500.
        refusal = redis_unavailable("request not served", exc)
        metrics.http_rejected_total.labels(code=refusal.code).inc()
        return error_response(refusal.status, refusal.code, refusal.message, refusal.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.http_rejected_total.labels(code="invalid_request").inc()
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())) or "request"
        return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    @app.post("/v1/sessions", status_code=201)
    async def create_session(request: Request) -> dict[str, Any]:
        gateway.check_api_key(request)
        body = await read_json(request, CreateSessionBody, max_body, required=False)
        peer = request.client.host if request.client else None
        forwarded_for = ", ".join(request.headers.getlist("x-forwarded-for"))
        address = client_address(peer, forwarded_for, gateway.config.trust_forwarded_for)
        api_key = bearer(request) if gateway.config.api_key is not None else None  # checked above
        return await gateway.create_session(body, address, api_key)

    @app.post("/v1/sessions/{session_id}/offer")
    async def offer(session_id: str, request: Request) -> dict[str, Any]:
        record = await gateway.authorize(session_id, request)
        body = await read_json(request, OfferBody, max_body)
        return await gateway.offer(record, body)

    @app.get("/v1/sessions/{session_id}/events")
    async def events(session_id: str, request: Request, after: int = 0, limit: int = 100) -> dict[str, Any]:
        record = await gateway.authorize(session_id, request)
        return await gateway.events(record, after, limit)

    @app.get("/v1/sessions/{session_id}/memory")
    async def memory(session_id: str, request: Request, q: str = "", k: int = 5) -> dict[str, Any]:
        record = await gateway.authorize(session_id, request)
        return await gateway.recall(record, q, k)

    @app.patch("/v1/sessions/{session_id}")
    async def settings(session_id: str, request: Request) -> dict[str, Any]:
        record = await gateway.authorize(session_id, request)
        body = await read_json(request, SessionSettingsBody, max_body)
        return await gateway.settings(record, body)

    @app.delete("/v1/sessions/{session_id}")
    async def end(session_id: str, request: Request) -> dict[str, Any]:
        record = await gateway.authorize(session_id, request)
        return await gateway.end(record)

    app.include_router(delegation_routes(gateway))
    app.include_router(joyai_routes(gateway))  # the JoyAI-compatible streaming API (docs/api.md)
    app.include_router(source_routes(gateway))  # video from a URL, a file or an upload

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        return {"model": model_payload(gateway.engine_info), "tick_interval_s": gateway.config.tick_interval_s}

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ok, status = await gateway.readiness()
        return JSONResponse(status, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    for route, name in WEB_FILES.items():
        app.add_api_route(route, _static(WEB_DIR / name), methods=["GET"], include_in_schema=False)
    return app


def _static(path: Path) -> Any:
    async def serve_file() -> FileResponse:
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    return serve_file
