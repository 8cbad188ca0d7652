"""Session state in Redis (msgpack): the session record, the tick event log and the inbox, all with TTLs."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import numpy as np
import redis.asyncio as redis

from actors.common.messages import (
    DelegationResult,
    SessionRecord,
    TickOutcome,
    decode,
    encode,
    from_dict,
    to_dict,
)

log = logging.getLogger(__name__)

KEY_PREFIX = "vigil:session:"
INBOX_MAX = 64
POOL_CONNECTIONS = 64
POOL_WAIT_S = 5.0
DELEGATION_LOG_MAX = 256


class UnknownSession(KeyError):
    """No live session has this id."""


# What a call to Redis raises when Redis is out of reach: stalled (no answer in time), restarting (connection
# refused or reset), or gone. The call may be tried again once it is back.
REDIS_UNREACHABLE: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class SessionClock:
    """Where a session's ticks stopped: its newest recorded tick, that tick's stream time, and when (wall time).

    A session that resumes on another replica continues from here: its next tick is `tick + 1`, and its stream
    time goes on from `stream_time` plus the seconds that went by since `wall_time`.
    """

    tick: int
    stream_time: float
    wall_time: float
    # Runs of ticks (first, last) up to `tick` that were numbered and never recorded: in flight, or held for
    # Redis, when the replica that ran them was lost or the session was taken over from it.
    unrecorded: tuple[tuple[int, int], ...] = ()


def unrecorded_runs(bitmap: bytes, newest: int) -> tuple[tuple[int, int], ...]:
    """The runs of ticks 1..`newest` whose bit is clear in a `…:recorded` bitmap (Redis numbers a byte's bits from
    its most significant one)."""
    bits = np.unpackbits(np.frombuffer(bitmap, np.uint8))[: newest + 1]
    clear = np.ones(newest + 1, bool)
    clear[: bits.size] = bits == 0
    clear[0] = False  # ticks number from 1
    edges = np.flatnonzero(np.diff(np.concatenate(([0], clear.astype(np.int8), [0]))))
    return tuple((int(first), int(end) - 1) for first, end in zip(edges[::2], edges[1::2], strict=True))


# Appends an outcome only while `owner` still holds the session, once per tick, and moves the session's clock
# forward (ticks can be recorded out of order: a busy tick is logged while the tick before it still runs).
# Returns 1 if recorded, 2 if this tick was recorded before (a write replayed after its reply was lost: the
# `…:recorded` bitmap, one bit per tick, is its idempotency key), 0 if another replica has taken the session
# over. An empty owner (a loop run without a claim, as in a one-process tool) records unconditionally. An outcome
# that stands for the ticks up to ARGV[8] (a `skipped:unlogged` one) marks them all recorded.
_RECORD_OUTCOME = """
if ARGV[1] ~= '' and redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
local seen = redis.call('setbit', KEYS[4], ARGV[3], 1)
redis.call('expire', KEYS[4], ARGV[7])
if seen == 1 then return 2 end
for covered = tonumber(ARGV[3]) + 1, tonumber(ARGV[8]) do redis.call('setbit', KEYS[4], covered, 1) end
redis.call('rpush', KEYS[2], ARGV[2])
redis.call('ltrim', KEYS[2], -tonumber(ARGV[6]), -1)
redis.call('expire', KEYS[2], ARGV[7])
local newest = tonumber(redis.call('hget', KEYS[3], 'tick') or '-1')
if tonumber(ARGV[8]) > newest then
  redis.call('hset', KEYS[3], 'tick', ARGV[8], 'stream_time', ARGV[4], 'wall_time', ARGV[5])
end
redis.call('expire', KEYS[3], ARGV[7])
if ARGV[1] ~= '' then redis.call('expire', KEYS[1], ARGV[7]) end
return 1
"""

# Takes every pending inbox item and control change, and keeps what it took under the read's id: the same read
# asked again (its reply was lost: Redis stalled, or the reader gave up waiting) gets the same items instead of
# nothing. A read with a new id forgets the previous one's. KEYS: inbox, control, taken id, taken inbox, taken
# control; ARGV: the read's id, the TTL.
_TAKE_PENDING = """
if redis.call('get', KEYS[3]) == ARGV[1] then
  return {redis.call('lrange', KEYS[4], 0, -1), redis.call('lrange', KEYS[5], 0, -1)}
end
local inbox = redis.call('lrange', KEYS[1], 0, -1)
local control = redis.call('lrange', KEYS[2], 0, -1)
redis.call('del', KEYS[4], KEYS[5])
if #inbox > 0 then redis.call('rename', KEYS[1], KEYS[4]); redis.call('expire', KEYS[4], ARGV[2]) end
if #control > 0 then redis.call('rename', KEYS[2], KEYS[5]); redis.call('expire', KEYS[5], ARGV[2]) end
redis.call('set', KEYS[3], ARGV[1], 'EX', ARGV[2])
return {inbox, control}
"""

# Gives the session up only if `owner` still holds it.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def new_session_id() -> str:
    return "s_" + secrets.token_hex(12)


def new_read_id() -> str:
    """A fresh id for `SessionStore.pop_pending`."""
    return secrets.token_hex(8)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    """Redis-backed session state shared by every ingest replica.

    Keys: `vigil:session:<id>` (record), `…:events` (tick outcomes, a list), `…:inbox` (pending results),
    `…:control` (settings changed on another replica), `…:owner` (the peer that runs its ticks: replica and
    connection), `…:clock` (where its ticks stopped), `…:recorded` (a bit per tick recorded: each tick is logged
    once) and `…:taken*` (what the latest pending read took, for that read asked again). Every key carries the
    session TTL, refreshed on writes.
    """

    def __init__(self, client: redis.Redis, ttl_s: int, event_log_max: int) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._event_log_max = event_log_max
        self._record_outcome = client.register_script(_RECORD_OUTCOME)
        self._take_pending = client.register_script(_TAKE_PENDING)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, ttl_s: int, event_log_max: int) -> SessionStore:
        # A replica's sessions share one pool. When all its connections are busy (a burst of ticks), a call
        # waits up to POOL_WAIT_S for one instead of failing at once, as the default pool does past 100.
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=POOL_CONNECTIONS, timeout=POOL_WAIT_S,
                                                     socket_timeout=5, socket_connect_timeout=5)
        return cls(redis.Redis.from_pool(pool), ttl_s, event_log_max)  # closing the client closes its pool

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    @property
    def client(self) -> redis.Redis:
        """The Redis client, for other state kept beside the sessions' (their quotas)."""
        return self._redis

    @staticmethod
    def _key(session_id: str, part: str = "") -> str:
        return KEY_PREFIX + session_id + (":" + part if part else "")

    async def create(
        self, instructions: tuple[str, ...] = (), speak_threshold: float = 0.5, *,
        session_id: str | None = None, ttl_s: int | None = None,
    ) -> tuple[SessionRecord, str]:
        """Create a session; returns its record and the bearer token (only its hash is stored).

        `ttl_s`: how long the record lives until it is first updated as connected (default: the session TTL).
        """
        token = secrets.token_urlsafe(32)
        record = SessionRecord(
            session_id=session_id or new_session_id(),
            token_hash=hash_token(token),
            created_at=time.time(),
            instructions=instructions,
            speak_threshold=speak_threshold,
        )
        await self._redis.set(self._key(record.session_id), encode(record), ex=ttl_s or self._ttl_s, nx=True)
        return record, token

    async def get(self, session_id: str) -> SessionRecord:
        data = await self._redis.get(self._key(session_id))
        if data is None:
            raise UnknownSession(session_id)
        return decode(SessionRecord, cast(bytes, data))

    async def authenticate(self, session_id: str, token: str | None) -> SessionRecord | None:
        """The record if `token` is this session's token, else None. Raises UnknownSession."""
        record = await self.get(session_id)
        if not token or not hmac.compare_digest(record.token_hash, hash_token(token)):
            return None
        return record

    async def update(self, record: SessionRecord) -> None:
        """Rewrite an existing record. A session that has connected (live or ended) gets the full session TTL
        from now; one never connected (`created`) keeps the TTL it was created with, so it still expires soon."""
        unconnected = record.state == "created"
        await self._redis.set(self._key(record.session_id), encode(record), xx=True,
                              ex=None if unconnected else self._ttl_s, keepttl=unconnected)

    async def append_outcome(self, outcome: TickOutcome) -> None:
        """Append one tick outcome to the session's event log (bounded, TTL refreshed)."""
        key = self._key(outcome.session_id, "events")
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, encode(outcome))
            pipe.ltrim(key, -self._event_log_max, -1)
            pipe.expire(key, self._ttl_s)
            await pipe.execute()

    async def outcomes(self, session_id: str, after: int = 0, limit: int = 100) -> list[TickOutcome]:
        """Recorded outcomes with tick > `after`, oldest first, at most `limit`."""
        raw = await self._redis.lrange(self._key(session_id, "events"), -self._event_log_max, -1)
        result: list[TickOutcome] = []
        for item in raw:
            outcome = decode(TickOutcome, cast(bytes, item))
            if outcome.tick > after:
                result.append(outcome)
                if len(result) >= limit:
                    break
        return result

    async def push_inbox(self, session_id: str, item: dict[str, Any]) -> None:
        """A result for the session's next prompt."""
        await self._push(session_id, "inbox", item)

    async def push_delegation_result(self, result: DelegationResult) -> None:
        """A delegation's one result, into the session's inbox as
        `{"kind": "delegation", "text": result.prompt_line(), "result": <the DelegationResult as a dict>}`:
        `text` is what the next prompts carry, `result` what the page shows (status, reason, rich part).
        The same step appends it to the session's delegation log, where it is recorded once."""
        item = {"kind": "delegation", "text": result.prompt_line(), "result": to_dict(result)}
        packed = msgpack.packb(item, use_bin_type=True)
        async with self._redis.pipeline(transaction=True) as pipe:
            for part, keep in (("inbox", INBOX_MAX), ("delegations", DELEGATION_LOG_MAX)):
                key = self._key(result.session_id, part)
                pipe.rpush(key, packed)
                pipe.ltrim(key, -keep, -1)
                pipe.expire(key, self._ttl_s)
            await pipe.execute()

    async def delegations(self, session_id: str) -> list[DelegationResult]:
        """The session's recorded delegation results, oldest first (the newest DELEGATION_LOG_MAX)."""
        raw = await self._redis.lrange(self._key(session_id, "delegations"), 0, -1)
        return [from_dict(DelegationResult, msgpack.unpackb(item, raw=False)["result"]) for item in raw]

    async def push_control(self, session_id: str, item: dict[str, Any]) -> None:
        """A change for the replica that runs the session (it takes it at its next tick)."""
        await self._push(session_id, "control", item)

    async def _push(self, session_id: str, part: str, item: dict[str, Any]) -> None:
        key = self._key(session_id, part)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, msgpack.packb(item, use_bin_type=True))
            pipe.ltrim(key, -INBOX_MAX, -1)
            pipe.expire(key, self._ttl_s)
            await pipe.execute()

    async def end(self, session_id: str) -> None:
        record = await self.get(session_id)
        fields = to_dict(record) | {"state": "ended"}
        await self.update(from_dict(SessionRecord, fields))
        await self._redis.delete(self._key(session_id, "owner"))  # whichever replica runs it stops recording

    # -- who runs the ticks ------------------------------------------------------------------------------------

    async def claim(self, session_id: str, owner: str) -> SessionClock | None:
        """Make `owner` (one peer connection on one replica) the only one whose ticks are recorded, taking the
        session over from whoever held it; returns where its ticks stopped (None: it never ticked), with the ticks
        before that which no one can record any more."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(session_id, "owner"), owner, ex=self._ttl_s)
            pipe.hgetall(self._key(session_id, "clock"))
            pipe.get(self._key(session_id, "recorded"))
            _, clock, recorded = await pipe.execute()
        if not clock:
            return None
        fields = {key.decode(): value.decode() for key, value in cast(dict[bytes, bytes], clock).items()}
        tick = int(fields["tick"])
        return SessionClock(tick, float(fields["stream_time"]), float(fields["wall_time"]),
                            unrecorded_runs(cast(bytes, recorded or b""), tick))

    async def owner(self, session_id: str) -> str | None:
        value = await self._redis.get(self._key(session_id, "owner"))
        return None if value is None else cast(bytes, value).decode()

    async def release(self, session_id: str, owner: str) -> None:
        """Give the session up, if `owner` still holds it (a replica that lost it leaves the new owner be)."""
        await self._release(keys=[self._key(session_id, "owner")], args=[owner])

    async def record_outcome(self, outcome: TickOutcome, owner: str) -> bool:
        """Append one outcome to the event log if `owner` still holds the session; False if it does not.

        Idempotent per session and tick: a tick recorded before is not appended again (True all the same), so a
        write whose reply was lost can be sent again."""
        keys = [self._key(outcome.session_id, part) for part in ("owner", "events", "clock", "recorded")]
        args: list[bytes | str | int] = [
            owner, encode(outcome), outcome.tick, repr(outcome.stream_time), repr(outcome.wall_time),
            self._event_log_max, self._ttl_s, max(outcome.tick, outcome.through),
        ]
        return bool(await self._record_outcome(keys=keys, args=args))

    async def pop_pending(
        self, session_id: str, read_id: str | None = None,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Take every pending inbox item and control change, atomically, in one round trip.

        `read_id` names the read: asked again with the same id (the reply was lost, or the caller stopped
        waiting for it), Redis answers with what that read took, which is then not lost. Use a new id for each
        read once one has answered (default: a new one)."""
        keys = [self._key(session_id, part) for part in
                ("inbox", "control", "taken", "taken_inbox", "taken_control")]
        results, changes = await self._take_pending(keys=keys, args=[read_id or new_read_id(), self._ttl_s])
        return ([msgpack.unpackb(item, raw=False) for item in results],
                [msgpack.unpackb(item, raw=False) for item in changes])
