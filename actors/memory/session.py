"""Twelve hours of memory for one session: retrieval, the summary tiers, keyframes and prompt lines.

`SessionMemory` is plain and synchronous, safe to call from worker threads. Under it, `MemoryIndex` holds the
items, their distinct texts and the FAISS index (see `actors.memory.index` for the index choice); beside it,
`SummaryTiers` and `KeyframeStore` (`actors.memory.tiers`). `MemoryService` (`actors.memory.service`) runs
many sessions with persistence in Redis and summaries in the background.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np
from pydantic import BaseModel, Field

from actors.common.session_store import UnknownSession
from actors.memory.embedder import Embedder
from actors.memory.index import MemoryIndex
from actors.memory.tiers import (
    ADDABLE_KINDS,
    KIND_CODE,
    KINDS,
    Hit,
    KeyframeStore,
    MemoryItem,
    SummaryJob,
    SummaryTiers,
    memory_line,
)

log = logging.getLogger(__name__)

__all__ = [
    "ADDABLE_KINDS",
    "KINDS",
    "BadItem",
    "BadQuery",
    "Hit",
    "ItemTooLarge",
    "MemoryConfig",
    "MemoryItem",
    "MemoryRequestError",
    "SessionMemory",
    "UnknownSession",
    "parse_clock",
]

# Retrieval lines for the prompt leave out summaries and blocks: the tier lines already carry them.
POINT_KINDS: tuple[str, ...] = ("caption", "response", "user", "background", "keyframe")


class MemoryRequestError(ValueError):
    """A request to memory was refused; the message says why."""


class BadItem(MemoryRequestError):
    """An item is malformed: unknown kind, empty text, bad time, ids out of order."""


class ItemTooLarge(MemoryRequestError):
    """An item's text or image is over its limit."""


class BadQuery(MemoryRequestError):
    """A query is malformed: empty or oversized text, bad k, unknown kinds, bad time range."""


class MemoryConfig(BaseModel):
    """Memory settings; the defaults give the Streaming Harness tiers over 12 hours."""

    horizon_s: float = Field(default=43_200.0, gt=0, description="everything older is evicted")
    short_term_s: float = Field(default=200.0, gt=0, description="window of `recent()`")
    chunk_s: float = Field(default=200.0, gt=0, description="stream time covered by one mid-term summary")
    summaries_per_block: int = Field(default=5, ge=1, description="mid-term summaries folded into one block")
    index: Literal["sq8", "fp16", "flat"] = "sq8"
    faiss_threads: int = Field(default=1, ge=1, description="OpenMP threads of one FAISS call")
    embed_workers: int = Field(default=1, ge=1, description="embedding batches computed at once")
    evict_slack_s: float = Field(default=60.0, ge=0, description="eviction runs in batches this far apart")
    max_text_chars: int = 2000
    max_query_chars: int = 1000
    max_k: int = 100
    max_window_s: float = 6 * 3600.0
    max_at_items: int = 200
    max_image_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    keyframe_side: int = 160
    lookback_after_s: float = Field(default=30.0, ge=0, description="a keyframe comes back only if older")
    keyframe_quality: int = 70
    max_keyframes: int = 512
    summary_queue: int = Field(default=8, ge=2, description="owed summaries before the newest ones merge")
    summary_chars: int = 600
    summary_timeout_s: float = 120.0
    max_summary_items: int = 400
    snapshot_every: int = Field(default=600, ge=1, description="items between snapshots")
    snapshot_interval_s: float = Field(default=300.0, gt=0, description="at least this often, if items came")
    max_sessions: int = 256
    restore_concurrency: int = Field(default=2, ge=1, description="restores decoding at once on a replica")
    mmap_threshold_bytes: int | None = Field(
        default=1 << 20,
        description="see actors.memory.heap.keep_large_buffers_off_the_heap; None: leave glibc be",
    )
    key_prefix: str = "vigil:memory:"
    ttl_s: int = 13 * 3600
    redis_timeout_s: float = 5.0
    accept_timeout_s: float = Field(
        default=1.0, gt=0, description="an item whose log write Redis does not answer this soon is held (below)",
    )
    unlogged_max: int = Field(
        default=512, ge=0, description="items a session holds, searchable, while Redis is out of reach, logged in "
        "order once it is back; past it, writes are refused (the ingest retries them)",
    )


_CLOCK = re.compile(r"(?<![\d:])(\d{1,2}):([0-5]\d)(?::([0-5]\d))?(?![\d:])")


def parse_clock(text: str, newest_time: float | None = None) -> float | None:
    """The stream time named in `text` (`02:14:07`, `10:30`), or None.

    `HH:MM` means hours and minutes; when that lies past the end of the stream but minutes and seconds would
    not (a short stream), it means minutes and seconds.
    """
    match = _CLOCK.search(text)
    if match is None:
        return None
    first, second, third = int(match[1]), int(match[2]), match[3]
    if third is not None:
        return float(first * 3600 + second * 60 + int(third))
    as_hours = float(first * 3600 + second * 60)
    as_minutes = float(first * 60 + second)
    if newest_time is not None and as_hours > newest_time >= as_minutes:
        return as_minutes
    return as_hours


@dataclass(frozen=True, slots=True)
class MemoryStats:
    items: int
    texts: int
    index_bytes: int
    held_bytes: int
    keyframes: int
    keyframe_bytes: int
    mid_term: int
    blocks: int
    owed_summaries: int
    merged_summaries: int
    evicted: int
    newest_time: float


class SessionMemory:
    """The memory of one session: retrieval over items, summary tiers, keyframes, prompt lines.

    Thread-safe: every method takes the session's lock; embedding happens before it is taken. Items arrive
    with increasing ids (`reserve_id`). Everything that ended more than `horizon_s` before the newest item is
    evicted, in batches `evict_slack_s` apart, and is never returned in between.
    """

    def __init__(self, session_id: str, embedder: Embedder, config: MemoryConfig | None = None) -> None:
        self.session_id = session_id
        self.embedder = embedder
        self.config = config or MemoryConfig()
        self.index = MemoryIndex(session_id, embedder.dim, self.config.index)
        self.tiers = SummaryTiers(
            self.config.chunk_s, self.config.summaries_per_block, self.config.summary_queue
        )
        self.keyframes = KeyframeStore(self.config.max_keyframes)
        self._lock = threading.RLock()
        # Ids are handed out on the event loop: a lock of their own, never held while searching or evicting.
        self._id_lock = threading.Lock()
        self.next_id = 1
        self.last_id = 0
        self.newest_time = 0.0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.index)

    def _pin_threads(self) -> None:
        # FAISS parallelises over queries and memory asks one query at a time, so a team of OpenMP threads
        # only waits for each other; on a busy machine that turns a 1 ms search into tens of ms. OpenMP keeps
        # the setting per calling thread, hence set on every call from whatever worker thread makes it.
        faiss.omp_set_num_threads(self.config.faiss_threads)

    # -- writing ---------------------------------------------------------------------------------------------

    def reserve_id(self) -> int:
        """The id for the next item; ids are never reused, even when the item never arrives."""
        with self._id_lock:
            item_id = self.next_id
            self.next_id += 1
            return item_id

    def new_item(
        self, kind: str, text: str, stream_time: float, span_s: float = 0.0, seq: int = -1
    ) -> MemoryItem:
        """An item of this session with the next id."""
        item_id = self.reserve_id()
        return MemoryItem(item_id, self.session_id, stream_time, kind, text, span_s, seq)  # type: ignore[arg-type]

    def add(self, item: MemoryItem, vector: np.ndarray | None = None, jpeg: bytes | None = None) -> None:
        """Insert one item (its text embedded here unless `vector` is given); `jpeg` for keyframes."""
        self.add_many([item], None if vector is None else vector.reshape(1, -1), [jpeg])

    def add_many(
        self,
        items: Sequence[MemoryItem],
        vectors: np.ndarray | None = None,
        jpegs: Sequence[bytes | None] | None = None,
    ) -> None:
        """Insert items in id order (a restore replays its log through here)."""
        if not items:
            return
        if vectors is None:
            vectors = self.embedder.embed([item.text for item in items])
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(items), self.embedder.dim):
            raise BadItem(f"expected vectors of shape {(len(items), self.embedder.dim)}, got {vectors.shape}")
        jpegs = list(jpegs) if jpegs is not None else [None] * len(items)
        with self._lock:
            self._pin_threads()
            self._check(items)
            for item, vector, jpeg in zip(items, vectors, jpegs, strict=True):
                self.index.append(item, vector)
                self.last_id = item.id
                with self._id_lock:
                    self.next_id = max(self.next_id, item.id + 1)
                self.newest_time = max(self.newest_time, item.stream_time)
                if jpeg is not None and item.kind == "keyframe":
                    self.keyframes.put(item.id, jpeg)
                self.tiers.on_item(item)
                cutoff = self.newest_time - self.config.horizon_s
                if self.index.oldest_end < cutoff - self.config.evict_slack_s:
                    self._evict(cutoff)
            self.index.flush()

    def _check(self, items: Sequence[MemoryItem]) -> None:
        previous = self.last_id
        for item in items:
            if item.session_id != self.session_id:
                raise BadItem(f"item {item.id} is of session {item.session_id!r}, not {self.session_id!r}")
            if item.id <= previous:
                raise BadItem(f"item id {item.id} is not above {previous}")
            if item.kind not in KIND_CODE:
                raise BadItem(f"unknown kind {item.kind!r}; expected one of {', '.join(KINDS)}")
            if not math.isfinite(item.stream_time) or item.stream_time < 0 or item.span_s < 0:
                raise BadItem(f"item {item.id}: stream time must be finite and >= 0")
            previous = item.id

    def evict_before(self, cutoff: float) -> int:
        """Remove every item that ended before stream time `cutoff`; returns how many."""
        with self._lock:
            self._pin_threads()
            return self._evict(cutoff)

    def _evict(self, cutoff: float) -> int:
        count, keyframes = self.index.evict(cutoff)
        self.keyframes.discard(keyframes)
        self.tiers.evict_before(cutoff)
        self.evicted += count
        if count:
            log.debug("session %s: evicted %d items before %.0f s", self.session_id, count, cutoff)
        return count

    # -- reading ---------------------------------------------------------------------------------------------

    def get(self, item_id: int) -> MemoryItem | None:
        """The item with this id, if still held."""
        with self._lock:
            row = self.index.row_of(item_id)
            return None if row is None else self.index.item(row, self.keyframes)

    def items(self) -> list[MemoryItem]:
        """Every item held, in id order."""
        with self._lock:
            return [self.index.item(row, self.keyframes) for row in range(len(self.index))]

    def _horizon(self) -> float:
        return self.newest_time - self.config.horizon_s

    def search(
        self,
        query: str | np.ndarray,
        k: int = 10,
        kinds: Sequence[str] | None = None,
        time_range: tuple[float, float] | None = None,
    ) -> list[Hit]:
        """The `k` distinct memories most similar to `query` (a text or its vector), best first.

        Each hit is the newest occurrence of its text within the filters, with how many occurrences there were
        and when the first was.
        """
        if kinds is not None and set(kinds) - set(KIND_CODE):
            raise BadQuery(f"unknown kinds {sorted(set(kinds) - set(KIND_CODE))}; expected some of {KINDS}")
        vector = self.embedder.embed([query])[0] if isinstance(query, str) else np.asarray(query, np.float32)
        with self._lock:
            self._pin_threads()
            allowed = self.index.item_mask(self._horizon(), time_range)
            found = self.index.search(vector, k, allowed, kinds)
            return [
                Hit(self.index.item(row, self.keyframes), score, count, first)
                for row, score, count, first in found
            ]

    def at(
        self,
        stream_time: float,
        window: float = 30.0,
        kinds: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[MemoryItem]:
        """What memory holds within `window` seconds of `stream_time` (summaries overlapping it included), in
        stream order; at most `limit` items, the closest to `stream_time` kept."""
        limit = limit or self.config.max_at_items
        with self._lock:
            table = self.index.items
            mask = self.index.item_mask(self._horizon(), (stream_time - window, stream_time + window))
            assert mask is not None
            if kinds is not None:
                mask &= np.isin(table["kinds"], [KIND_CODE[kind] for kind in kinds])
            rows = np.flatnonzero(mask)
            if len(rows) > limit:
                starts, ends = table["times"][rows], table["times"][rows] + table["spans"][rows]
                distance = np.maximum(0.0, np.maximum(starts - stream_time, stream_time - ends))
                rows = np.sort(rows[np.argsort(distance, kind="stable")[:limit]])
            rows = rows[np.argsort(table["times"][rows], kind="stable")]
            return [self.index.item(int(row), self.keyframes) for row in rows]

    def recent(self, seconds: float | None = None) -> list[MemoryItem]:
        """The short-term tier: items but summaries from the last `seconds` (default `short_term_s`)."""
        seconds = self.config.short_term_s if seconds is None else seconds
        since = self.newest_time - seconds
        return [i for i in self.at(self.newest_time, seconds, POINT_KINDS) if i.stream_time >= since]

    def keyframe(self, item_id: int) -> bytes | None:
        """The JPEG of keyframe item `item_id`, while it is kept."""
        with self._lock:
            return self.keyframes.get(item_id)

    def keyframe_at(self, stream_time: float) -> tuple[MemoryItem, bytes] | None:
        """The scene at `stream_time`: the newest kept keyframe at or before it."""
        with self._lock:
            table = self.index.items
            times = table["times"]
            rows = np.flatnonzero((table["kinds"] == KIND_CODE["keyframe"]) & (times <= stream_time))
            for row in rows[np.argsort(times[rows], kind="stable")][::-1]:
                jpeg = self.keyframes.get(int(table["ids"][row]))
                if jpeg is not None:
                    return self.index.item(int(row), self.keyframes), jpeg
            return None

    # -- prompt lines ----------------------------------------------------------------------------------------

    def tier_lines(self) -> tuple[str, ...]:
        """Long-term blocks, then mid-term summaries, oldest first, each with its time span."""
        with self._lock:
            items = (self.get(entry.id) for entry in [*self.tiers.blocks, *self.tiers.mid])
            return tuple(memory_line(item) for item in items if item is not None)

    def at_lines(self, stream_time: float, window: float = 60.0, limit: int = 20) -> tuple[str, ...]:
        """`at()` as prompt lines: the summaries covering the moment, then the `limit` items closest to it in
        stream order, repeats collapsed into one line."""
        items = self.at(stream_time, window)
        spans = ("block", "summary")
        lines = [
            memory_line(i) for i in items if i.kind in spans and i.stream_time <= stream_time <= i.end_time
        ]
        points = sorted(
            (i for i in items if i.kind not in spans), key=lambda i: abs(i.stream_time - stream_time)
        )
        run: list[MemoryItem] = []
        for item in [*sorted(points[:limit], key=lambda i: (i.stream_time, i.id)), None]:
            if run and (item is None or (item.kind, item.text) != (run[0].kind, run[0].text)):
                lines.append(memory_line(run[-1], len(run), run[0].stream_time))
                run = []
            if item is not None:
                run.append(item)
        return tuple(lines)

    def prompt_lines(
        self,
        query: str,
        k: int = 10,
        kinds: Sequence[str] = POINT_KINDS,
        query_vector: np.ndarray | None = None,
    ) -> tuple[str, ...]:
        """Memory lines for a tick's prompt, chosen by `query` (the standing instruction, the user's question
        or a delegated question): what happened at a time the query names, then the top `k` memories in
        stream order, e.g. `at 02:14:07 you saw …`. Summaries and blocks come from `tier_lines`."""
        lines: list[str] = []
        moment = parse_clock(query, self.newest_time)
        if moment is not None:
            lines.extend(self.at_lines(moment))
        found = self.search(query if query_vector is None else query_vector, k, kinds)
        hits = sorted(found, key=lambda hit: (hit.item.stream_time, hit.item.id))
        lines.extend(memory_line(hit.item, hit.count, hit.first_time) for hit in hits)
        return tuple(dict.fromkeys(lines))

    # -- summaries -------------------------------------------------------------------------------------------

    def next_job(self) -> tuple[SummaryJob, list[MemoryItem]] | None:
        """The oldest owed summary and its items (at most `max_summary_items`, evenly spread), or None."""
        with self._lock:
            while (job := self.tiers.next_job()) is not None:
                kinds = ("summary",) if job.kind == "block" else POINT_KINDS
                rows = self.index.rows_between_ids(job.first_id, job.last_id, kinds)
                most = self.config.max_summary_items
                if len(rows) > most:
                    rows = rows[np.linspace(0, len(rows) - 1, most).astype(np.int64)]
                if len(rows):
                    return job, [self.index.item(int(row), self.keyframes) for row in rows]
                self.tiers.drop_job(job)  # everything it covered was evicted
            return None

    @property
    def owed_summaries(self) -> int:
        return len(self.tiers.jobs)

    # -- state -----------------------------------------------------------------------------------------------

    def stats(self) -> MemoryStats:
        with self._lock:
            return MemoryStats(
                items=len(self.index),
                texts=self.index.texts.size,
                index_bytes=self.index.index_bytes,
                held_bytes=self.index.nbytes + self.keyframes.nbytes,
                keyframes=len(self.keyframes),
                keyframe_bytes=self.keyframes.nbytes,
                mid_term=len(self.tiers.mid),
                blocks=len(self.tiers.blocks),
                owed_summaries=len(self.tiers.jobs),
                merged_summaries=self.tiers.merged_jobs,
                evicted=self.evicted,
                newest_time=self.newest_time,
            )

    def export_state(self) -> dict[str, Any]:
        """Everything needed to rebuild this memory exactly (see `from_state`), as msgpack-able data."""
        with self._lock:
            return {
                "session_id": self.session_id,
                "embedder": self.embedder.name,
                "dim": self.embedder.dim,
                "index": self.index.state(),
                "last_id": self.last_id,
                "next_id": self.next_id,
                "newest_time": self.newest_time,
                "evicted": self.evicted,
                "tiers": self.tiers.state(),
                "keyframes": self.keyframes.state(),
            }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], embedder: Embedder, config: MemoryConfig | None = None
    ) -> SessionMemory:
        """Rebuild a memory from `export_state`; refuses a state made in another embedding space."""
        session_id = state["session_id"]
        if state["embedder"] != embedder.name or state["dim"] != embedder.dim:
            raise ValueError(
                f"memory of session {session_id!r} was embedded with {state['embedder']} ({state['dim']}-d); "
                f"this replica embeds with {embedder.name} ({embedder.dim}-d)"
            )
        memory = cls(session_id, embedder, config)
        memory.index = MemoryIndex.from_state(session_id, embedder.dim, state["index"])
        memory.last_id, memory.next_id = state["last_id"], state["next_id"]
        memory.newest_time, memory.evicted = state["newest_time"], state["evicted"]
        memory.tiers.load_state(state["tiers"])
        memory.keyframes.load_state(state["keyframes"])
        return memory
