"""The memories of many sessions: validated writes persisted before they are acknowledged, summaries written
in the background, snapshots taken in the background, and restore on whichever replica a session lands.

Nothing here blocks the event loop: embedding (batched across sessions), FAISS and snapshot encoding run in
worker threads. Each session owns one summary task; the service owns the embedding batcher, one snapshot task
and the in-flight writes; `close()` cancels and awaits them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import numbers
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.common.messages import MemoryContext
from actors.common.session_store import UnknownSession
from actors.memory.embedder import Embedder, EmbeddingBatcher
from actors.memory.heap import keep_large_buffers_off_the_heap, release_free_heap
from actors.memory.item_log import ItemLog
from actors.memory.session import (
    POINT_KINDS,
    BadItem,
    BadQuery,
    ItemTooLarge,
    MemoryConfig,
    MemoryRequestError,
    SessionMemory,
    parse_clock,
)
from actors.memory.store import (
    LogEntry,
    MemoryStore,
    MemoryUnavailable,
    MemoryUnreachable,
    decode_snapshot,
    encode_snapshot,
)
from actors.memory.tiers import (
    KINDS,
    ExtractiveSummarizer,
    Hit,
    MemoryItem,
    Summarizer,
    SummaryJob,
    encode_keyframe,
    extract_summary,
)

log = logging.getLogger(__name__)

UNLOGGED_ON_RELEASE_S = 2.0  # a released session's held items get this long to reach the log
_SESSION_ID = re.compile(r"^[A-Za-z0-9._-]{1,120}$")
# Kinds a caller adds with `add`; keyframes come through `add_keyframe`, summaries from the summarizer.
TEXT_KINDS: tuple[str, ...] = ("caption", "response", "user", "background")


@dataclass(eq=False)
class _Session:
    memory: SessionMemory
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # orders id, log append and apply
    snapshot_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Condition = field(default_factory=asyncio.Condition)  # notified as summaries land
    task: asyncio.Task[None] | None = None
    items: ItemLog | None = None  # its writes to the log in Redis, held while Redis is out of reach
    snapshot_id: int = 0
    snapshot_at: float = field(default_factory=time.monotonic)
    summarizing: bool = False
    closed: bool = False


class MemoryService:
    """Creates, holds and restores session memories; every public method is a coroutine safe to call from the
    event loop. Without a `store`, memory lives in this process only."""

    def __init__(
        self,
        embedder: Embedder,
        config: MemoryConfig | None = None,
        store: MemoryStore | None = None,
        summarizer: Summarizer | None = None,
    ) -> None:
        self.embedder = embedder
        self.config = config or MemoryConfig()
        self.store = store
        self.summarizer = summarizer or ExtractiveSummarizer(self.config.summary_chars)
        self._embedder = EmbeddingBatcher(embedder, workers=self.config.embed_workers)
        if self.config.mmap_threshold_bytes:
            keep_large_buffers_off_the_heap(self.config.mmap_threshold_bytes)
        self._sessions: dict[str, _Session] = {}
        self._writes: set[asyncio.Task[MemoryItem]] = set()
        self._snapshot_queue: asyncio.Queue[str] = asyncio.Queue(maxsize=self.config.max_sessions)
        self._snapshot_pending: set[str] = set()
        self._restore_slots = asyncio.Semaphore(self.config.restore_concurrency)
        self._opening: dict[str, asyncio.Lock] = {}
        self._snapshotter: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> MemoryService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every task this service owns. Acknowledged items are already in Redis; the store belongs to
        the caller."""
        self._closed = True
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        for session_id in list(self._sessions):
            await self.release(session_id)
        if self._snapshotter is not None:
            self._snapshotter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._snapshotter
        await self._embedder.close()

    @property
    def session_ids(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    @property
    def embedding_batches(self) -> tuple[int, int]:
        """Model calls made by the embedding batcher so far, and the texts they embedded."""
        return self._embedder.batches, self._embedder.texts

    # -- sessions --------------------------------------------------------------------------------------------

    def _check_session_id(self, session_id: str) -> None:
        if not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
            raise BadQuery(f"session id must be 1-120 letters, digits or ._- (got {session_id!r:.40})")

    def _session(self, session_id: str) -> _Session:
        self._check_session_id(session_id)
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"no memory for session {session_id!r} on this replica")
        return session

    def get(self, session_id: str) -> SessionMemory:
        """The memory held here for `session_id`; raises UnknownSession."""
        return self._session(session_id).memory

    def _hold(self, memory: SessionMemory, snapshot_id: int) -> SessionMemory:
        if self._closed:
            raise MemoryRequestError("memory service is closed")
        if len(self._sessions) >= self.config.max_sessions:
            raise MemoryRequestError(
                f"this replica already holds {self.config.max_sessions} session memories"
            )
        items = None if self.store is None else ItemLog(
            memory.session_id, self.store, self.config.unlogged_max, self.config.accept_timeout_s)
        session = _Session(memory, snapshot_id=snapshot_id, items=items)
        session.task = asyncio.create_task(
            self._summarize_loop(session), name=f"memory-summaries-{memory.session_id}"
        )
        self._sessions[memory.session_id] = session
        if memory.owed_summaries:
            session.wake.set()
        if self.store is not None and self._snapshotter is None:
            self._snapshotter = asyncio.create_task(self._snapshot_loop(), name="memory-snapshots")
        return memory

    async def create(self, session_id: str) -> SessionMemory:
        """A new, empty memory; refuses a session that has memory here or in Redis (open or restore it)."""
        self._check_session_id(session_id)
        if session_id in self._sessions or (self.store is not None and await self.store.exists(session_id)):
            raise MemoryRequestError(f"session {session_id!r} already has memory; open or restore it")
        return self._hold(SessionMemory(session_id, self.embedder, self.config), 0)

    async def restore(self, session_id: str) -> SessionMemory:
        """Rebuild a session's memory from Redis (snapshot + log tail), replacing any copy held here."""
        self._check_session_id(session_id)
        if self.store is None:
            raise UnknownSession(f"no stored memory for session {session_id!r}: no store configured")
        # Each restore holds a snapshot several times over while decoding: a few at a time bound the peak.
        async with self._restore_slots:
            started = time.perf_counter()
            snapshot, snapshot_id, entries = await self.store.load(session_id)
            if snapshot is None and not entries:
                raise UnknownSession(f"no stored memory for session {session_id!r}")
            memory = await asyncio.to_thread(self._rebuild, session_id, snapshot, entries)
            replayed = len(entries)
            del snapshot, entries
            await asyncio.to_thread(release_free_heap)
        if session_id in self._sessions:
            await self.release(session_id)
        self._hold(memory, snapshot_id)
        log.info(
            "restored memory of %s: %d items (%d replayed) in %.0f ms",
            session_id,
            len(memory),
            replayed,
            (time.perf_counter() - started) * 1e3,
        )
        return memory

    def _rebuild(self, session_id: str, snapshot: bytes | None, entries: Sequence[Any]) -> SessionMemory:
        if snapshot is not None:
            memory = SessionMemory.from_state(decode_snapshot(snapshot), self.embedder, self.config)
        else:
            memory = SessionMemory(session_id, self.embedder, self.config)
        tail = [entry for entry in entries if entry.item.id > memory.last_id]
        if tail:
            vectors = np.stack([entry.vector for entry in tail])
            memory.add_many([entry.item for entry in tail], vectors, [entry.jpeg for entry in tail])
        return memory

    async def open(self, session_id: str) -> SessionMemory:
        """The memory held here, else the one restored from Redis, else a new one."""
        self._check_session_id(session_id)
        if session_id in self._sessions:
            return self._sessions[session_id].memory
        if self.store is not None and await self.store.exists(session_id):
            return await self.restore(session_id)
        return await self.create(session_id)

    async def hold(self, session_id: str) -> SessionMemory:
        """`open`, once per session even when calls for it arrive together on a replica that lacks it."""
        session = self._sessions.get(session_id)
        if session is not None:
            return session.memory
        lock = self._opening.setdefault(session_id, asyncio.Lock())
        try:
            async with lock:
                return await self.open(session_id)
        finally:
            if not lock.locked():
                self._opening.pop(session_id, None)

    async def healing(self, session_id: str, write: Callable[[], Awaitable[MemoryItem]]) -> MemoryItem:
        """Run `write` (an `add` or `add_keyframe` of this session); when the log refuses it because another
        replica wrote to this session since (it moved away and back, or a busy owner's call went to the
        fallback replica), restore the newer memory and write again, once."""
        try:
            return await write()
        except MemoryUnreachable:
            raise  # not another replica's writes: Redis itself is out of reach
        except MemoryUnavailable:
            if self.store is None or not await self.store.exists(session_id):
                raise
            log.info("session %s: memory changed elsewhere; restoring before writing", session_id)
            await self.restore(session_id)
            return await write()

    async def release(self, session_id: str) -> None:
        """Stop holding a session here (its memory stays in Redis for the next owner)."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        session.closed = True
        if session.task is not None:
            session.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.task
        if session.items is not None:
            await session.items.close(UNLOGGED_ON_RELEASE_S)

    async def forget(self, session_id: str) -> None:
        """Release a session and delete its stored memory."""
        self._check_session_id(session_id)
        await self.release(session_id)
        if self.store is not None:
            await self.store.forget(session_id)

    # -- writing ---------------------------------------------------------------------------------------------

    def _check_text(self, text: str, what: str) -> str:
        if not isinstance(text, str):
            raise BadItem(f"{what} must be a string, got {type(text).__name__}")
        if len(text) > self.config.max_text_chars:
            raise ItemTooLarge(
                f"{what} is {len(text)} characters, over the {self.config.max_text_chars} limit"
            )
        text = text.strip()
        if not text:
            raise BadItem(f"{what} is empty")
        return text

    @staticmethod
    def _check_time(stream_time: float) -> float:
        if (
            isinstance(stream_time, bool)
            or not isinstance(stream_time, numbers.Real)
            or not math.isfinite(stream_time)
        ):
            raise BadItem(f"stream time must be a finite number of seconds, got {stream_time!r}")
        if stream_time < 0:
            raise BadItem(f"stream time must be >= 0, got {stream_time}")
        return float(stream_time)

    async def add(self, session_id: str, kind: str, text: str, stream_time: float) -> MemoryItem:
        """Remember a caption, a response, a user message or a background result. Returns once the item is
        logged (acknowledged) and searchable."""
        session = self._session(session_id)
        if kind not in TEXT_KINDS:
            raise BadItem(
                f"kind {kind!r} cannot be added; expected one of {', '.join(TEXT_KINDS)} "
                "(keyframes go through add_keyframe)"
            )
        text = self._check_text(text, "text")
        return await self._commit(session, kind, text, self._check_time(stream_time))

    async def add_keyframe(
        self, session_id: str, stream_time: float, image: bytes | np.ndarray, caption: str = "a scene change"
    ) -> MemoryItem:
        """Remember a scene change: a small JPEG of `image` (RGB array or encoded bytes) with a caption."""
        session = self._session(session_id)
        caption = self._check_text(caption, "caption")
        stream_time = self._check_time(stream_time)
        size = image.nbytes if isinstance(image, np.ndarray) else len(image)
        if size > self.config.max_image_bytes:
            raise ItemTooLarge(f"image is {size} bytes, over the {self.config.max_image_bytes}-byte limit")
        try:
            jpeg = await asyncio.to_thread(
                encode_keyframe,
                image,
                self.config.keyframe_side,
                self.config.keyframe_quality,
                self.config.max_image_pixels,
            )
        except (OSError, ValueError) as exc:  # PIL raises OSError for undecodable bytes
            raise BadItem(f"keyframe image not usable: {exc}") from exc
        return await self._commit(session, "keyframe", caption, stream_time, jpeg=jpeg)

    async def _commit(
        self,
        session: _Session,
        kind: str,
        text: str,
        stream_time: float,
        span_s: float = 0.0,
        seq: int = -1,
        jpeg: bytes | None = None,
    ) -> MemoryItem:
        vector = await self._embedder.embed(text)
        # Shielded: once an item has an id, its log append and its apply finish together even if the caller
        # goes away, so the log and the memory never disagree.
        write = asyncio.create_task(self._write(session, kind, text, stream_time, span_s, seq, vector, jpeg))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        item = await asyncio.shield(write)
        memory = session.memory
        if memory.owed_summaries:
            session.wake.set()
        if self.store is not None and memory.last_id - session.snapshot_id >= self.config.snapshot_every:
            self._request_snapshot(memory.session_id)
        return item

    async def _write(
        self,
        session: _Session,
        kind: str,
        text: str,
        stream_time: float,
        span_s: float,
        seq: int,
        vector: np.ndarray,
        jpeg: bytes | None,
    ) -> MemoryItem:
        memory = session.memory
        async with session.lock:
            if session.closed:
                raise UnknownSession(f"memory of session {memory.session_id!r} was released")
            item = memory.new_item(kind, text, stream_time, span_s, seq)
            if session.items is not None:
                await session.items.write(LogEntry(item, vector, jpeg))
            await asyncio.to_thread(memory.add, item, vector, jpeg)
            return item

    async def embed(self, text: str) -> np.ndarray:
        """The vector of `text`, computed in one model call with what other sessions are embedding."""
        return await self._embedder.embed(text)

    # -- reading ---------------------------------------------------------------------------------------------

    def _check_query(
        self, query: str, k: int, kinds: Sequence[str] | None, time_range: tuple[float, float] | None
    ) -> str:
        if not isinstance(query, str) or not query.strip():
            raise BadQuery("query is empty")
        if len(query) > self.config.max_query_chars:
            raise BadQuery(f"query is {len(query)} characters, over the {self.config.max_query_chars} limit")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.config.max_k:
            raise BadQuery(f"k must be an integer from 1 to {self.config.max_k}, got {k!r}")
        if kinds is not None:
            if isinstance(kinds, str) or not kinds:
                raise BadQuery("kinds must be a non-empty list of kinds")
            unknown = sorted(set(kinds) - set(KINDS))
            if unknown:
                raise BadQuery(f"unknown kinds {unknown}; expected some of {', '.join(KINDS)}")
        if time_range is not None:
            if len(time_range) != 2 or any(
                not isinstance(t, numbers.Real) or math.isnan(t) for t in time_range
            ):
                raise BadQuery(f"time range must be two numbers (start, end), got {time_range!r}")
            if time_range[0] > time_range[1]:
                raise BadQuery(f"time range starts after it ends: {time_range!r}")
        return query.strip()

    async def search(
        self,
        session_id: str,
        query: str,
        k: int = 10,
        kinds: Sequence[str] | None = None,
        time_range: tuple[float, float] | None = None,
    ) -> list[Hit]:
        """The top `k` memories for `query`, best first (see `SessionMemory.search`)."""
        memory = self._session(session_id).memory
        query = self._check_query(query, k, kinds, time_range)
        vector = await self._embedder.embed(query)
        return await asyncio.to_thread(memory.search, vector, k, kinds, time_range)

    async def at(self, session_id: str, stream_time: float, window: float = 30.0) -> list[MemoryItem]:
        """What happened within `window` seconds of `stream_time`, in stream order."""
        memory = self._session(session_id).memory
        if not isinstance(stream_time, numbers.Real) or not math.isfinite(stream_time):
            raise BadQuery(f"stream time must be a finite number, got {stream_time!r}")
        if not isinstance(window, numbers.Real) or not 0 < window <= self.config.max_window_s:
            raise BadQuery(f"window must be in (0, {self.config.max_window_s}] seconds, got {window!r}")
        return await asyncio.to_thread(memory.at, float(stream_time), float(window))

    async def prompt_lines(self, session_id: str, query: str, k: int = 10) -> tuple[str, ...]:
        """Memory lines for a tick's prompt, selected by `query`, with their times."""
        memory = self._session(session_id).memory
        query = self._check_query(query, k, None, None)
        vector = await self._embedder.embed(query)
        return await asyncio.to_thread(memory.prompt_lines, query, k, POINT_KINDS, vector)

    async def context(self, session_id: str, query: str | None, k: int = 10) -> MemoryContext:
        """All the memory a tick's prompt gets: the long-term blocks and mid-term summaries, then the lines
        `query` selects (the standing instructions or the user's question), each with its times; and when
        the query names a moment older than the short-term window, the keyframe of the scene then."""
        lines = await self.tier_lines(session_id)
        if query is None:
            return MemoryContext(lines=lines)
        lines = tuple(dict.fromkeys((*lines, *await self.prompt_lines(session_id, query, k))))
        memory = self._session(session_id).memory
        moment = parse_clock(query, memory.newest_time)
        keyframes: tuple[tuple[float, bytes], ...] = ()
        if moment is not None and moment < memory.newest_time - self.config.lookback_after_s:
            found = await asyncio.to_thread(memory.keyframe_at, moment)
            if found is not None:
                keyframes = ((found[0].stream_time, found[1]),)
        return MemoryContext(lines=lines, keyframes=keyframes)

    async def recall(self, session_id: str, question: str, k: int = 5) -> tuple[str, ...]:
        """Answer "what happened at 10:30?" or "when did I last see my keys?" from memory alone: what was
        there at a time the question names, then the `k` best matches, in stream order, with their times."""
        return await self.prompt_lines(session_id, question, k)

    async def tier_lines(self, session_id: str) -> tuple[str, ...]:
        """The long-term blocks and mid-term summaries as prompt lines."""
        return await asyncio.to_thread(self._session(session_id).memory.tier_lines)

    async def keyframe(self, session_id: str, item_id: int) -> bytes | None:
        return await asyncio.to_thread(self._session(session_id).memory.keyframe, item_id)

    async def keyframe_at(self, session_id: str, stream_time: float) -> tuple[MemoryItem, bytes] | None:
        return await asyncio.to_thread(self._session(session_id).memory.keyframe_at, stream_time)

    # -- summaries -------------------------------------------------------------------------------------------

    async def _summarize_loop(self, session: _Session) -> None:
        memory = session.memory
        while True:
            await session.wake.wait()
            session.wake.clear()
            while (owed := await asyncio.to_thread(memory.next_job)) is not None:
                job, items = owed
                session.summarizing = True
                try:
                    text = await self._summarize(job, items)
                    await self._commit(session, job.kind, text, job.start, job.end - job.start, job.seq)
                except UnknownSession:
                    return  # released while summarising: the next owner owes this summary
                except MemoryUnavailable as exc:
                    # The job stays owed until its summary lands; try again shortly.
                    log.warning(
                        "session %s: summary %s %d not stored: %s", memory.session_id, job.kind, job.seq, exc
                    )
                    await asyncio.sleep(1.0)
                finally:
                    session.summarizing = False
                    async with session.settled:
                        session.settled.notify_all()
            async with session.settled:
                session.settled.notify_all()

    async def _summarize(self, job: SummaryJob, items: list[MemoryItem]) -> str:
        try:
            text = await asyncio.wait_for(self.summarizer.summarize(items), self.config.summary_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a summary engine failing must not stall the tiers
            log.warning(
                "summarizer failed on %s %d (%s); using the extractive summary", job.kind, job.seq, exc
            )
            text = ""
        text = (text or "").strip() or extract_summary(items, self.config.summary_chars)
        return text[: self.config.max_text_chars]

    async def wait_summaries(self, session_id: str) -> None:
        """Wait until every summary a session owes has landed (end of stream, tests); bound it with
        `asyncio.timeout`."""
        session = self._session(session_id)
        memory = session.memory

        def settled() -> bool:
            return not (memory.owed_summaries or session.summarizing or session.wake.is_set())

        async with session.settled:
            await session.settled.wait_for(settled)

    # -- snapshots -------------------------------------------------------------------------------------------

    def _request_snapshot(self, session_id: str) -> None:
        if session_id not in self._snapshot_pending and not self._snapshot_queue.full():
            self._snapshot_pending.add(session_id)
            self._snapshot_queue.put_nowait(session_id)

    async def snapshot(self, session_id: str) -> bool:
        """Snapshot a session now and trim its log; False when nothing changed since the last one."""
        session = self._session(session_id)
        if self.store is None:
            raise MemoryRequestError("no store configured: memory is not persisted")
        async with session.snapshot_lock:
            if session.memory.last_id <= session.snapshot_id or (session.items is not None and session.items.held):
                return False  # nothing new, or items not logged yet: a snapshot would trim the log past them
            state = await asyncio.to_thread(session.memory.export_state)
            last_id = state["last_id"]
            data = await asyncio.to_thread(encode_snapshot, state)
            del state
            try:
                await self.store.write_snapshot(session_id, last_id, data)
            finally:
                size = len(data)
                del data
                await asyncio.to_thread(release_free_heap)
            session.snapshot_id, session.snapshot_at = last_id, time.monotonic()
            log.debug("session %s: snapshot at item %d, %d bytes", session_id, last_id, size)
            return True

    async def _snapshot_loop(self) -> None:
        interval = self.config.snapshot_interval_s
        while True:
            try:
                due = [await asyncio.wait_for(self._snapshot_queue.get(), timeout=interval / 4)]
                self._snapshot_pending.discard(due[0])
            except TimeoutError:
                now = time.monotonic()
                due = [
                    sid
                    for sid, s in self._sessions.items()
                    if s.memory.last_id > s.snapshot_id and now - s.snapshot_at >= interval
                ]
            for session_id in due:
                try:
                    await self.snapshot(session_id)
                except UnknownSession:
                    continue
                except MemoryUnavailable as exc:
                    log.warning("memory snapshot failed: %s", exc)
