"""Memory persistence in Redis: a log of every acknowledged item plus periodic snapshots.

Per session, two keys hold everything (plus a third for the snapshot's offset):

- `<prefix><session>:log`: a Redis stream whose entry ids are the item ids (`<id>-0`), each entry the msgpack
  of one item with its embedding (restore never re-embeds) and, for keyframes, the JPEG. An item is
  acknowledged only after its entry is written (while Redis is out of reach: once the session's
  `item_log.ItemLog` holds it, to write it in order when Redis is back). Explicit ids also fence a stale
  owner: Redis refuses an id that is not above the stream's top.
- `<prefix><session>:snapshot` and `…:snapshot_id`: the FAISS index (`serialize_index`), the item table and
  the tier state, as of item `snapshot_id`. A Lua script writes both and trims the log below that id in one
  step, and refuses a snapshot older than the stored one.

Restore = load the snapshot, then replay the log entries above its id. A snapshot older than the log (a trim
that never ran) costs replay time, never an item.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from actors.memory.session import MemoryConfig
from actors.memory.tiers import KINDS, MemoryItem

log = logging.getLogger(__name__)

SNAPSHOT_VERSION = 1
REPLAY_PAGE = 2000

_WRITE_SNAPSHOT = """
local current = tonumber(redis.call('GET', KEYS[2]) or '-1')
local last_id = tonumber(ARGV[1])
if last_id <= current then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
redis.call('XTRIM', KEYS[3], 'MINID', last_id + 1)
redis.call('EXPIRE', KEYS[3], ARGV[3])
return 1
"""


class MemoryUnavailable(RuntimeError):
    """The memory log could not be written or read; the item was not acknowledged."""


class MemoryUnreachable(MemoryUnavailable):
    """Redis did not answer (stalled, restarting, gone), rather than refused: the same write may be sent again
    once it is back."""


def _failure(message: str, exc: Exception) -> MemoryUnavailable:
    """A refusal by Redis (a stale owner's log entry) or, for anything else, Redis out of reach."""
    kind = MemoryUnavailable if isinstance(exc, ResponseError) else MemoryUnreachable
    return kind(f"{message}: {str(exc) or type(exc).__name__}")


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One replayable item: the item, its embedding, and its JPEG for keyframes."""

    item: MemoryItem
    vector: np.ndarray
    jpeg: bytes | None = None


def encode_entry(item: MemoryItem, vector: np.ndarray, jpeg: bytes | None = None) -> bytes:
    data = {
        "i": item.id,
        "t": item.stream_time,
        "k": item.kind,
        "x": item.text,
        "p": item.span_s,
        "q": item.seq,
        "v": np.ascontiguousarray(vector, dtype=np.float32).tobytes(),
        "j": jpeg,
    }
    return msgpack.packb(data, use_bin_type=True)


def decode_entry(session_id: str, data: bytes) -> LogEntry:
    raw = msgpack.unpackb(data, raw=False)
    if raw["k"] not in KINDS:
        raise ValueError(f"log entry {raw['i']}: unknown kind {raw['k']!r}")
    item = MemoryItem(
        id=int(raw["i"]),
        session_id=session_id,
        stream_time=float(raw["t"]),
        kind=raw["k"],
        text=raw["x"],
        span_s=float(raw["p"]),
        seq=int(raw["q"]),
    )
    return LogEntry(item, np.frombuffer(raw["v"], dtype=np.float32), raw["j"])


def encode_snapshot(state: dict[str, Any]) -> bytes:
    return msgpack.packb({"version": SNAPSHOT_VERSION, **state}, use_bin_type=True)


def decode_snapshot(data: bytes) -> dict[str, Any]:
    state = msgpack.unpackb(data, raw=False)
    if state.get("version") != SNAPSHOT_VERSION:
        raise ValueError(f"memory snapshot version {state.get('version')!r}, expected {SNAPSHOT_VERSION}")
    return state


class MemoryStore:
    """The Redis side of memory: append, snapshot, load, forget. Every call has a timeout."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "vigil:memory:",
        ttl_s: int = 13 * 3600,
        timeout_s: float = 5.0,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._write_snapshot = client.register_script(_WRITE_SNAPSHOT)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> MemoryStore:
        client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        return cls(client, **kwargs)

    @classmethod
    def from_config(cls, url: str, config: MemoryConfig) -> MemoryStore:
        """A store with the key prefix, TTL and timeout of `config`."""
        return cls.from_url(
            url, prefix=config.key_prefix, ttl_s=config.ttl_s, timeout_s=config.redis_timeout_s
        )

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> bool:
        return bool(await asyncio.wait_for(self._redis.ping(), self._timeout_s))

    def key(self, session_id: str, part: str) -> str:
        """The Redis key of one part (`log`, `snapshot`, `snapshot_id`) of a session's memory."""
        return f"{self._prefix}{session_id}:{part}"

    async def append(
        self, item: MemoryItem, vector: np.ndarray, jpeg: bytes | None = None, timeout_s: float | None = None,
    ) -> None:
        """Write one item to its session's log; returns once Redis has it. Raises MemoryUnreachable when Redis
        does not answer within `timeout_s` (default: the store's), MemoryUnavailable when it refuses the entry."""
        key = self.key(item.session_id, "log")
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(key, {"e": encode_entry(item, vector, jpeg)}, id=f"{item.id}-0")
                pipe.expire(key, self._ttl_s)
                await asyncio.wait_for(pipe.execute(), timeout_s or self._timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            raise _failure(f"session {item.session_id}: item {item.id} not logged", exc) from exc

    async def append_again(self, item: MemoryItem, vector: np.ndarray, jpeg: bytes | None = None) -> None:
        """`append`, for an item whose earlier write may have landed unanswered (Redis stalled mid-call): an
        entry of its id already in the log is that write, and counts as written."""
        try:
            await self.append(item, vector, jpeg)
        except MemoryUnreachable:
            raise
        except MemoryUnavailable:
            if not await self.logged(item.session_id, item.id):
                raise

    async def logged(self, session_id: str, item_id: int) -> bool:
        """Whether the session's log holds an entry of this item id."""
        entry = f"{item_id}-0"
        try:
            found = await asyncio.wait_for(
                self._redis.xrange(self.key(session_id, "log"), min=entry, max=entry, count=1), self._timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            raise _failure(f"session {session_id}: item {item_id} not found", exc) from exc
        return bool(found)

    async def write_snapshot(self, session_id: str, last_id: int, data: bytes) -> bool:
        """Store a snapshot as of item `last_id` and trim the log below it; False if a newer one is stored."""
        keys = [
            self.key(session_id, "snapshot"),
            self.key(session_id, "snapshot_id"),
            self.key(session_id, "log"),
        ]
        try:
            # Writing megabytes takes longer than one item: give it a few timeouts' worth.
            written = await asyncio.wait_for(
                self._write_snapshot(keys=keys, args=[last_id, data, self._ttl_s]), 4 * self._timeout_s
            )
        except (RedisError, OSError, TimeoutError) as exc:
            raise _failure(f"session {session_id}: snapshot at item {last_id} not written", exc) from exc
        return bool(written)

    async def exists(self, session_id: str) -> bool:
        """Whether Redis holds memory of this session."""
        keys = [self.key(session_id, "snapshot_id"), self.key(session_id, "log")]
        try:
            return bool(await asyncio.wait_for(self._redis.exists(*keys), self._timeout_s))
        except (RedisError, OSError, TimeoutError) as exc:
            raise _failure(f"session {session_id}: memory not reachable", exc) from exc

    async def load(self, session_id: str) -> tuple[bytes | None, int, list[LogEntry]]:
        """The snapshot (or None), its item id (0 without one), and the log entries above that id."""
        log_key = self.key(session_id, "log")
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(self.key(session_id, "snapshot_id"))
                pipe.get(self.key(session_id, "snapshot"))
                snapshot_id_raw, snapshot = await asyncio.wait_for(pipe.execute(), 4 * self._timeout_s)
            if (snapshot_id_raw is None) != (snapshot is None):
                # Written together with one TTL: one without the other means the log below it is gone too.
                raise MemoryUnavailable(
                    f"session {session_id}: snapshot and its offset disagree; not restored"
                )
            snapshot_id = int(snapshot_id_raw) if snapshot_id_raw is not None else 0
            entries: list[LogEntry] = []
            start = f"{snapshot_id + 1}-0"
            while True:
                page: list[tuple[bytes, dict[bytes, bytes]]] = await asyncio.wait_for(
                    self._redis.xrange(log_key, min=start, count=REPLAY_PAGE),  # type: ignore[arg-type]
                    self._timeout_s,
                )
                entries.extend(decode_entry(session_id, fields[b"e"]) for _, fields in page)
                if len(page) < REPLAY_PAGE:
                    break
                start = "(" + page[-1][0].decode()
        except (RedisError, OSError, TimeoutError) as exc:
            raise _failure(f"session {session_id}: memory not loaded", exc) from exc
        return snapshot, snapshot_id, entries

    async def forget(self, session_id: str) -> None:
        """Delete everything stored of this session's memory."""
        keys = [self.key(session_id, part) for part in ("log", "snapshot", "snapshot_id")]
        try:
            await asyncio.wait_for(self._redis.delete(*keys), self._timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            raise _failure(f"session {session_id}: memory not deleted", exc) from exc
