"""Session state in Redis (msgpack): the session record, the tick event log and the inbox, all with TTLs."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from typing import Any, cast

import msgpack
import redis.asyncio as redis

from actors.common.messages import SessionRecord, TickOutcome, decode, encode, from_dict, to_dict

log = logging.getLogger(__name__)

KEY_PREFIX = "vigil:session:"
INBOX_MAX = 64


class UnknownSession(KeyError):
    """No live session has this id."""


def new_session_id() -> str:
    return "s_" + secrets.token_hex(12)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    """Redis-backed session state shared by every ingest replica.

    Keys: `vigil:session:<id>` (record), `…:events` (tick outcomes, a list), `…:inbox` (pending results).
    Every key carries the session TTL, refreshed on writes.
    """

    def __init__(self, client: redis.Redis, ttl_s: int, event_log_max: int) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._event_log_max = event_log_max

    @classmethod
    def from_url(cls, url: str, ttl_s: int, event_log_max: int) -> SessionStore:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        return cls(client, ttl_s, event_log_max)

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    @staticmethod
    def _key(session_id: str, part: str = "") -> str:
        return KEY_PREFIX + session_id + (":" + part if part else "")

    async def create(
        self, instructions: tuple[str, ...] = (), speak_threshold: float = 0.5
    ) -> tuple[SessionRecord, str]:
        """Create a session; returns its record and the bearer token (only its hash is stored)."""
        token = secrets.token_urlsafe(32)
        record = SessionRecord(
            session_id=new_session_id(),
            token_hash=hash_token(token),
            created_at=time.time(),
            instructions=instructions,
            speak_threshold=speak_threshold,
        )
        await self._redis.set(self._key(record.session_id), encode(record), ex=self._ttl_s, nx=True)
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
        await self._redis.set(self._key(record.session_id), encode(record), ex=self._ttl_s, xx=True)

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
        key = self._key(session_id, "inbox")
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, msgpack.packb(item, use_bin_type=True))
            pipe.ltrim(key, -INBOX_MAX, -1)
            pipe.expire(key, self._ttl_s)
            await pipe.execute()

    async def pop_inbox(self, session_id: str) -> list[dict[str, Any]]:
        """Take every pending inbox item, atomically."""
        key = self._key(session_id, "inbox")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lrange(key, 0, -1)
            pipe.delete(key)
            items, _ = await pipe.execute()
        return [msgpack.unpackb(item, raw=False) for item in items]

    async def end(self, session_id: str) -> None:
        record = await self.get(session_id)
        fields = to_dict(record) | {"state": "ended"}
        await self.update(from_dict(SessionRecord, fields))
