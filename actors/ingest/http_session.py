"""Sessions of the streaming API (docs/api.md): each chat-completions request is one tick of its session, decided by
the SessionLoop a WebRTC session runs, on the frames the request brought.

- A client names its session (`x-streaming-session`, ...). Behind the name is a Vigil session of its own
  (`j_<hex>`: a session record, tick log, memory, quotas and delegations like any other), found through
  `vigil:joyai:<name>` in Redis, so every ingest replica finds the same one. The name lasts `http_session_ttl_s`
  (3600 s) after its last request; once it has lapsed, or after a reset, the name starts a new session.
- Requests of one session are decided one at a time (a lock per session on this replica); one more may wait for
  its turn, at most `decide_timeout_s`; a request beyond that is refused (429 `session_busy`).
- The replica that serves a request holds the session's claim (SessionStore.claim): tick numbers go on from the
  last recorded one, whichever replica recorded it. A replica whose claim another took drops its copy and claims
  the session again; a tick it decided meanwhile is not recorded, and the request is decided once more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.common.config import VigilConfig
from actors.common.messages import Decision, SessionRecord, TickRequest
from actors.common.session_store import KEY_PREFIX, SessionClock, UnknownSession
from actors.ingest.api_error import ApiError
from actors.ingest.frames import LatestFrameBuffer
from actors.ingest.joyai_wire import ChatRequest, FrameTime
from actors.ingest.quotas import QuotaExceeded, key_id
from actors.ingest.session_loop import SessionLoop, TickServices
from actors.memory.link import MemoryWrite

if TYPE_CHECKING:
    from actors.ingest.gateway import Gateway

log = logging.getLogger(__name__)

NAME_PREFIX = "vigil:joyai:"
MAX_WAITING = 1  # requests of one session that may wait behind the one being decided
QUOTA_HOLD_EVERY_S = 60.0
OUTBOX_MAX = 64
RELEASE_TIMEOUT_S = 5.0

# Points a name at a new session only where it points at none, or still at `stale` (one that ended or lapsed);
# returns the session the name points at afterwards.
_CLAIM_NAME = """
local current = redis.call('get', KEYS[1])
if current and current ~= ARGV[2] then return current end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[3])
return ARGV[1]
"""
_FORGET_NAME = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Refused(ApiError):
    """A request this replica will not decide: `status` and `code` as the API answers them."""


class SessionMoved(Exception):
    """Another replica took the session over while this one decided a tick; the tick was not recorded."""


@dataclass(frozen=True, slots=True)
class Client:
    """Who sends a request, as its quotas count it: its address, and its API key when Vigil has one."""

    address: str
    api_key: str | None = None


@dataclass(frozen=True, slots=True)
class TickResult:
    """One request's tick: its recorded outcome as its tick message (actors/ingest/channel.py), what the model
    wrote (empty when it was not called), the memory lines its prompt held, the request's frame times
    (normalised), and what else the session said since the previous request (delegation results, ...)."""

    session_id: str
    tick: dict[str, Any]
    raw: str
    memories: tuple[str, ...]
    frame_times: tuple[str, ...]
    messages: tuple[dict[str, Any], ...]


class RequestFrames(LatestFrameBuffer):
    """The frame buffer of a session whose frames come with requests: its stream time is the newest frame's
    time as the client gave it, not the wall clock since the first frame."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def stream_time(self, arrival: float) -> float:
        return self.now


def _name_key(name: str) -> str:
    return NAME_PREFIX + name


def _text(value: object) -> str | None:
    """A Redis reply as text (None stays None)."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class HttpSession:
    """One session's SessionLoop (not scheduled: `run` ticks it once per request) and what the requests need
    beside it: the standing query, the frame numbering, the lock."""

    def __init__(self, name: str, session_id: str, owner: str, config: VigilConfig, services: TickServices,
                 record: SessionRecord, resumed: SessionClock | None) -> None:
        self.name = name
        self.session_id = session_id
        self.owner = owner
        self.config = config
        self.frames = RequestFrames()
        self._outbox: deque[str] = deque(maxlen=OUTBOX_MAX)
        self._decide = services.decide
        self._request: TickRequest | None = None
        self._decision: Decision | None = None
        self.loop = SessionLoop(session_id, config, dataclasses.replace(services, decide=self._deciding), self.frames,
                                self._outbox.append, record.instructions, record.speak_threshold, owner, resumed)
        # The last query the client gave; one the loop withdrew (it kept failing) is not put back by a repeat.
        self.query = record.instructions[0] if record.instructions else ""
        interval = max(config.tick_interval_s, 1e-3)
        self.newest = 0.0 if resumed is None else resumed.stream_time
        self.frames_seen = 0 if resumed is None else math.floor(resumed.stream_time / interval) + 1
        self.lock = asyncio.Lock()
        self.waiting = 0
        self.closed = False
        self.last_used = time.monotonic()
        self.held_at = float("-inf")
        if self.loop.memory is not None:
            self.loop.memory.start()

    async def _deciding(self, request: TickRequest) -> Decision:
        self._request = request
        self._decision = await self._decide(request)
        return self._decision

    async def run(self, frames: Sequence[np.ndarray], times: Sequence[FrameTime | None], prompt: str,
                  arrival: float) -> TickResult:
        """One tick on these frames (RGB at the model's size, oldest first; `times` None where the client gave
        none): the ones before the last enter the prompt, the last is the tick's. Raises SessionMoved."""
        self.last_used = time.monotonic()
        interval = self.config.tick_interval_s
        given = [found or FrameTime(round((self.frames_seen + index) * interval, 3))
                 for index, found in enumerate(times)]
        self.frames_seen += len(given)
        stream_times = []
        for frame_time in given:  # stream time never goes back, whatever a client says
            self.newest = max(self.newest, frame_time.start)
            stream_times.append(self.newest)
        if prompt and prompt != self.query:
            await self._ask(prompt, stream_times[0])
        for rgb, stream_time in zip(frames[:-1], stream_times[:-1], strict=True):
            try:
                await self.loop.add_frame(rgb, stream_time)
            except Exception:  # the tick goes on with the frames that made it
                log.warning("session %s: a frame was left out of the prompt", self.session_id, exc_info=True)
        self.frames.now = stream_times[-1]
        self.frames.put(frames[-1], arrival)
        self._request = self._decision = None
        await self.loop.tick_now()
        sent = [json.loads(text) for text in self._outbox]
        self._outbox.clear()
        tick = next((m for m in sent if m.get("type") == "tick" and m.get("tick") == self.loop.tick), None)
        if self.loop.lost or tick is None:
            raise SessionMoved(self.session_id)
        others = [m for m in sent if m is not tick]
        if str(tick.get("outcome", "")).startswith("skipped:"):
            # Its answer is an error, which carries no messages: they come with the next answer instead.
            self._outbox.extend(json.dumps(m, ensure_ascii=False) for m in others)
            others = []
        decision, request = self._decision, self._request
        return TickResult(
            session_id=self.session_id, tick=tick, raw="" if decision is None else decision.raw,
            memories=() if request is None else request.memories,
            frame_times=tuple(frame_time.text for frame_time in given), messages=tuple(others),
        )

    async def _ask(self, prompt: str, stream_time: float) -> None:
        """A new query: the session's standing instruction from now on; the old one stays in memory."""
        self.query = prompt
        self.loop.set_instructions((prompt,))
        if self.loop.memory is not None:
            self.loop.memory.remember(MemoryWrite("user", prompt, stream_time))
        store = self.loop.services.store
        try:  # kept in the record: a replica that takes the session over has it
            record = await store.get(self.session_id)
            await store.update(dataclasses.replace(record, instructions=(prompt,)))
        except Exception as exc:
            log.warning("session %s: its query was not saved: %r", self.session_id, exc)

    @property
    def pending_delegations(self) -> tuple[str, ...]:
        return tuple(self.loop.delegations.pending)

    async def close(self) -> None:
        self.closed = True
        await self.loop.stop()


class HttpSessions:
    """This replica's sessions of the streaming API, by name; see the module for how names, turns and claims go."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.store = gateway.store
        self.by_name: dict[str, HttpSession] = {}
        self._claim_name = self.store.client.register_script(_CLAIM_NAME)
        self._forget_name = self.store.client.register_script(_FORGET_NAME)
        self._opening = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None

    async def complete(self, chat: ChatRequest, frames: Sequence[np.ndarray], client: Client,
                       arrival: float) -> TickResult:
        """Decide the request's tick in its session (opened if needed). Raises Refused."""
        self._start_sweeper()
        for _ in range(2):
            session = await self._session(chat.session, client)
            async with self._turn(session):
                if session.closed or not await self._refresh(session):
                    continue  # reset, lapsed or taken over while this request waited: open it again
                try:
                    return await session.run(frames, chat.times, chat.prompt, arrival)
                except SessionMoved:
                    log.info("session %s: taken over by another replica mid-tick; claimed again", session.session_id)
                    await self._close(session)
        raise Refused(409, "session_moved", "another ingest replica keeps taking this session over: send its "
                      "requests to one (the x-session-id header routes them)")

    async def session_id(self, name: str) -> str | None:
        """The Vigil session behind a name now, if any."""
        return _text(await self.store.client.get(_name_key(name)))

    async def reset(self, name: str) -> bool:
        """End the named session: its pending delegations are cancelled, its memory released, its quotas freed,
        and the name starts a new session at its next request. False when the name had none."""
        session = self.by_name.get(name)
        if session is not None:
            acquired = False
            with contextlib.suppress(TimeoutError):  # a request in flight finishes first
                async with asyncio.timeout(self.config.decide_timeout_s):
                    await session.lock.acquire()
                    acquired = True
            try:
                await self._cancel_delegations(session)
                await self._close(session)
            finally:
                if acquired:
                    session.lock.release()
        session_id = await self.session_id(name)
        if session_id is None:
            return False
        await self._forget_name(keys=[_name_key(name)], args=[session_id])
        with contextlib.suppress(UnknownSession):
            await self.store.end(session_id)  # whichever replica runs it stops recording
        await self.gateway.quotas.release(session_id)
        await self._release_memory(session_id)
        return True

    async def sweep(self) -> int:
        """Close the sessions idle for `http_session_ttl_s` here (their names have lapsed in Redis too)."""
        cutoff = time.monotonic() - self.config.http_session_ttl_s
        idle = [s for s in self.by_name.values() if s.last_used < cutoff and not s.lock.locked() and not s.waiting]
        for session in idle:
            log.info("session %s (%s): idle, dropped", session.session_id, session.name)
            await self._close(session)
        return len(idle)

    async def close(self) -> None:
        """Stop the sweeper and close every session (their queued memory writes land first)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for session in list(self.by_name.values()):
            with contextlib.suppress(Exception):
                await self._close(session)

    # -- opening -----------------------------------------------------------------------------------------------

    async def _session(self, name: str, client: Client) -> HttpSession:
        session = self.by_name.get(name)
        if session is not None and not session.closed:
            return session
        async with self._opening:
            session = self.by_name.get(name)
            if session is None or session.closed:
                session = await self._open(name, client)
                self.by_name[name] = session
            return session

    async def _open(self, name: str, client: Client) -> HttpSession:
        gateway = self.gateway
        if gateway.draining:
            raise Refused(503, "draining", "this replica is shutting down: send the request again to reach another")
        if len(gateway.peers) + len(self.by_name) >= self.config.limits.max_sessions:
            raise Refused(503, "too_many_sessions", "this replica holds as many sessions as it may "
                          "(limits.max_sessions)")
        record = None
        for _ in range(3):
            current = await self.session_id(name)
            record = await self._live_record(current)
            if record is not None:
                await self._admit(record.session_id, client)  # counts nothing twice for a session counted already
                break
            record = await self._create(name, client, current)
            if record is not None:
                break
        if record is None:
            raise Refused(409, "session_moved", "the session's name kept changing hands; send the request again")
        owner = f"{gateway.replica}/{uuid.uuid4().hex[:12]}"
        resumed = await self.store.claim(record.session_id, owner)
        if resumed is not None:
            log.info("session %s (%s) goes on after tick %d", record.session_id, name, resumed.tick)
        return HttpSession(name, record.session_id, owner, self.config, gateway.services, record, resumed)

    async def _live_record(self, session_id: str | None) -> SessionRecord | None:
        if session_id is None:
            return None
        try:
            record = await self.store.get(session_id)
        except UnknownSession:
            return None
        return None if record.state == "ended" else record

    async def _create(self, name: str, client: Client, stale: str | None) -> SessionRecord | None:
        """A new session for the name; None when another request gave the name one first."""
        session_id = "j_" + secrets.token_hex(12)
        ttl_s = self.config.http_session_ttl_s
        await self._admit(session_id, client)
        try:
            holder = await self._claim_name(keys=[_name_key(name)], args=[session_id, stale or "", ttl_s])
            if _text(holder) != session_id:
                await self.gateway.quotas.release(session_id)
                return None
            record, _ = await self.store.create((), self.config.speak_threshold, session_id=session_id, ttl_s=ttl_s)
            record = dataclasses.replace(record, state="live")
            await self.store.update(record)
        except BaseException:
            await self.gateway.quotas.release(session_id)
            raise
        self.gateway.services.metrics.sessions_created_total.inc()
        log.info("session %s: opened for the name %r", session_id, name)
        return record

    async def _admit(self, session_id: str, client: Client) -> None:
        ttl_s = self.config.http_session_ttl_s
        key = None if client.api_key is None else key_id(client.api_key)
        try:
            await self.gateway.quotas.admit(session_id, client.address, key, time.time() + ttl_s)
        except QuotaExceeded as exc:
            self.gateway.services.metrics.quota_refusals_total.labels(quota=exc.quota).inc()
            holder, setting = {"key": ("this API key", "max_sessions_per_key"),
                               "address": ("this client address", "max_sessions_per_address")}[exc.quota]
            raise Refused(
                429, "quota_exceeded",
                f"{holder} already holds {exc.limit} sessions, its limit (limits.{setting}): reset one "
                f"(POST /v1/streaming/reset) or retry in {exc.retry_after_s} s (a session frees its slot "
                f"{ttl_s} s after its last request)",
                headers={"Retry-After": str(exc.retry_after_s)},
            ) from None

    # -- each request --------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _turn(self, session: HttpSession) -> AsyncIterator[None]:
        """The session's lock for one request, waited for at most `decide_timeout_s`, by at most MAX_WAITING."""
        busy = Refused(429, "session_busy", "this session is deciding another request: its requests are decided "
                       "one at a time; send the next when the previous is answered", headers={"Retry-After": "1"})
        if session.lock.locked() and session.waiting >= MAX_WAITING:
            raise busy
        session.waiting += 1
        try:
            async with asyncio.timeout(self.config.decide_timeout_s):
                await session.lock.acquire()
        except TimeoutError:
            raise busy from None
        finally:
            session.waiting -= 1
        try:
            yield
        finally:
            session.lock.release()
            session.last_used = time.monotonic()

    async def _refresh(self, session: HttpSession) -> bool:
        """Keep the name and the record alive for another TTL; False (and the copy closed) when the name now
        means another session (a reset, a lapse) or another replica holds the claim."""
        ttl_s = self.config.http_session_ttl_s
        async with self.store.client.pipeline(transaction=False) as pipe:
            pipe.get(_name_key(session.name))
            pipe.expire(_name_key(session.name), ttl_s)
            pipe.expire(KEY_PREFIX + session.session_id, ttl_s)
            current, _, _ = await pipe.execute()
        owner = await self.store.owner(session.session_id)
        if _text(current) != session.session_id or owner != session.owner:
            await self._close(session)
            return False
        now = time.monotonic()
        if now - session.held_at >= QUOTA_HOLD_EVERY_S:
            session.held_at = now
            await self.gateway.quotas.hold(session.session_id, time.time() + ttl_s)
        return True

    # -- closing -------------------------------------------------------------------------------------------------

    async def _close(self, session: HttpSession) -> None:
        """Forget this replica's copy; give up the claim and the memory replica's copy if it still holds them."""
        session.closed = True
        if self.by_name.get(session.name) is session:
            del self.by_name[session.name]
        held = False
        if not session.loop.lost:
            with contextlib.suppress(Exception):
                held = await self.store.owner(session.session_id) == session.owner
        await session.close()
        if held:
            with contextlib.suppress(Exception):
                await self.store.release(session.session_id, session.owner)
            await self._release_memory(session.session_id)

    async def _cancel_delegations(self, session: HttpSession) -> None:
        brain = self.gateway.services.brain
        if brain is None:
            return
        for delegation_id in session.pending_delegations:
            try:
                await asyncio.wait_for(brain.cancel(session.session_id, delegation_id), RELEASE_TIMEOUT_S)
            except Exception as exc:
                log.info("session %s: delegation %s not cancelled: %r", session.session_id, delegation_id, exc)

    async def _release_memory(self, session_id: str) -> None:
        memory = self.gateway.services.memory
        if memory is None:
            return
        try:
            await asyncio.wait_for(memory.release(session_id), RELEASE_TIMEOUT_S)
        except Exception as exc:
            log.info("session %s: memory not released (%r); it expires with the session", session_id, exc)

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="http-session-sweeper")

    async def _sweep_forever(self) -> None:
        every = min(60.0, max(0.5, self.config.http_session_ttl_s / 4))
        while True:
            await asyncio.sleep(every)
            try:
                await self.sweep()
            except Exception:
                log.exception("sweeping idle sessions failed")
