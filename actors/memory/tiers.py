"""Memory items and the tiers built from them: summaries of each chunk of stream time, blocks folded from
summaries, keyframes, and the summarizer interface with an extractive default.

The tiers follow the Streaming Harness: the mid-term tier holds the newest summaries (one per `chunk_s` of
stream), every `per_block` summaries fold into one long-term block, and everything older than the horizon is
evicted. Summaries and blocks are ordinary memory items, so they are logged, restored and searchable like
captions. Which chunk still waits for its summary is derived only from the sequence of items, so a restored
session owes exactly the summaries that the lost replica owed.
"""

from __future__ import annotations

import io
import logging
import math
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from PIL import Image

from actors.common.stream_time import clock

log = logging.getLogger(__name__)

Kind = Literal["caption", "summary", "block", "response", "user", "background", "keyframe"]
KINDS: tuple[str, ...] = ("caption", "summary", "block", "response", "user", "background", "keyframe")
# What a caller may add; summaries and blocks are written by the summarizer only.
ADDABLE_KINDS: tuple[str, ...] = ("caption", "response", "user", "background", "keyframe")
# What a chunk summary is made of.
SUMMARIZED_KINDS: tuple[str, ...] = ("caption", "response", "user", "background", "keyframe")
KIND_CODE = {kind: code for code, kind in enumerate(KINDS)}


@dataclass(frozen=True, slots=True)
class MemoryItem:
    """One thing the session remembers, stamped with stream time.

    Summaries and blocks cover `span_s` seconds from `stream_time` and carry the sequence number `seq` of the
    last chunk they cover. A keyframe item's `keyframe` is the key of its JPEG (its own id) while the JPEG is
    kept.
    """

    id: int
    session_id: str
    stream_time: float
    kind: Kind
    text: str
    span_s: float = 0.0
    seq: int = -1
    keyframe: int | None = None

    @property
    def end_time(self) -> float:
        return self.stream_time + self.span_s


@dataclass(frozen=True, slots=True)
class Hit:
    """A retrieved memory: the newest occurrence of its text, its similarity, how often the text occurred."""

    item: MemoryItem
    score: float
    count: int = 1
    first_time: float = 0.0


def memory_line(item: MemoryItem, count: int = 1, first_time: float | None = None) -> str:
    """One prompt line with its time, e.g. `at 02:14:07 you saw a dog at the door`."""
    when = f"at {clock(item.stream_time)}"
    if item.kind in ("summary", "block"):
        return f"from {clock(item.stream_time)} to {clock(item.end_time)}: {item.text}"
    if item.kind == "response":
        line = f"{when} you said: {item.text}"
    elif item.kind == "user":
        line = f"{when} the user said: {item.text}"
    elif item.kind == "background":
        line = f"{when} the background assistant reported: {item.text}"
    elif item.kind == "keyframe":
        line = f"{when} you saw {item.text} [keyframe {item.id}]"
    else:
        line = f"{when} you saw {item.text}"
    if count > 1 and first_time is not None and first_time < item.stream_time:
        line += f" ({count} times since {clock(first_time)})"
    return line


# -- summarizers ---------------------------------------------------------------------------------------------


class Summarizer(ABC):
    """Turns a chunk of memory items (or a run of summaries) into one short text.

    An implementation may call the interaction engine or a separate summary engine; it runs in its own task
    and never holds up a tick. Calls for one session come one at a time, in stream order.
    """

    @abstractmethod
    async def summarize(self, items: Sequence[MemoryItem]) -> str:
        """A summary of `items` (oldest first); an empty string when there is nothing worth keeping."""


def _parts(item: MemoryItem) -> list[str]:
    if item.kind in ("summary", "block"):
        return [part for part in item.text.split("; ") if part]
    if item.kind == "user":
        return [f'the user said "{item.text}"']
    if item.kind == "response":
        return [f'you said "{item.text}"']
    if item.kind == "background":
        return [f"background result: {item.text}"]
    return [item.text]


def extract_summary(items: Sequence[MemoryItem], max_chars: int = 600) -> str:
    """Distinct statements of `items` in stream order, within `max_chars`.

    When they do not fit, dialog and background results go first (rare and addressed to someone), then what
    was seen most often (the scene), then the rest in order of first appearance.
    """
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    spoken: set[str] = set()
    for item in items:
        for part in _parts(item):
            counts[part] += 1
            first.setdefault(part, len(first))
            if item.kind in ("user", "response", "background"):
                spoken.add(part)
    ranked = sorted(counts, key=lambda p: (p not in spoken, -counts[p], first[p]))
    chosen: list[str] = []
    used = 0
    for part in ranked:
        cost = len(part) + (2 if chosen else 0)
        if used + cost > max_chars:
            continue
        chosen.append(part)
        used += cost
    if not chosen and ranked:
        return ranked[0][: max_chars - 1] + "…"
    return "; ".join(sorted(chosen, key=first.__getitem__))


class ExtractiveSummarizer(Summarizer):
    """Needs no model: keeps the distinct statements of a chunk (see `extract_summary`)."""

    def __init__(self, max_chars: int = 600) -> None:
        self.max_chars = max_chars

    async def summarize(self, items: Sequence[MemoryItem]) -> str:
        return extract_summary(items, self.max_chars)


# -- the summary tiers ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SummaryJob:
    """A summary the session owes: of the items with ids in [first_id, last_id] (kind "summary": the items
    of a chunk; kind "block": mid-term summaries), covering stream time [start, end)."""

    kind: Literal["summary", "block"]
    seq: int
    start: float
    end: float
    first_id: int
    last_id: int


@dataclass(frozen=True, slots=True)
class TierEntry:
    id: int
    seq: int
    start: float
    end: float


class SummaryTiers:
    """Chunking, owed summaries (a bounded queue), the mid-term summaries and the long-term blocks.

    Fed every applied item in id order (`on_item`). A chunk closes when an item from a later chunk arrives.
    When more than `max_jobs` summaries are owed, the newest owed ones merge into one longer job: adding an
    item never waits for the summarizer and nothing goes unsummarised. The head job is never merged, since it
    may be in progress. A fold job goes to the head as soon as `per_block` summaries wait, so blocks land in
    order too.
    """

    def __init__(self, chunk_s: float, per_block: int, max_jobs: int) -> None:
        if chunk_s <= 0 or per_block < 1 or max_jobs < 2:
            raise ValueError("chunk_s must be > 0, per_block >= 1, max_jobs >= 2")
        self.chunk_s = chunk_s
        self.per_block = per_block
        self.max_jobs = max_jobs
        self.open_chunk: int | None = None
        self.open_first_id = 0
        self.jobs: deque[SummaryJob] = deque()
        self.mid: list[TierEntry] = []
        self.blocks: list[TierEntry] = []
        self.merged_jobs = 0

    def on_item(self, item: MemoryItem) -> None:
        if item.kind == "summary":
            self._apply_summary(item)
        elif item.kind == "block":
            self._apply_block(item)
        elif item.kind in SUMMARIZED_KINDS:
            self._chunk(item)

    def _chunk(self, item: MemoryItem) -> None:
        index = math.floor(item.stream_time / self.chunk_s)
        if self.open_chunk is None:
            self.open_chunk, self.open_first_id = index, item.id
            return
        if index <= self.open_chunk:
            return  # late items belong to the chunk they arrived in
        job = SummaryJob(
            kind="summary",
            seq=self.open_chunk,
            start=self.open_chunk * self.chunk_s,
            end=(self.open_chunk + 1) * self.chunk_s,
            first_id=self.open_first_id,
            last_id=item.id - 1,
        )
        self.open_chunk, self.open_first_id = index, item.id
        last = self.jobs[-1] if self.jobs else None
        if (
            len(self.jobs) >= self.max_jobs
            and last is not None
            and last.kind == "summary"
            and len(self.jobs) > 1
        ):
            self.jobs[-1] = replace(last, seq=job.seq, end=job.end, last_id=job.last_id)
            self.merged_jobs += 1
            log.warning("summarizer behind: merged chunk %d into the previous owed summary", job.seq)
        else:
            self.jobs.append(job)

    def _apply_summary(self, item: MemoryItem) -> None:
        self.jobs = deque(j for j in self.jobs if not (j.kind == "summary" and j.seq <= item.seq))
        self.mid.append(TierEntry(item.id, item.seq, item.stream_time, item.end_time))
        self._maybe_fold()

    def _apply_block(self, item: MemoryItem) -> None:
        self.jobs = deque(j for j in self.jobs if not (j.kind == "block" and j.seq <= item.seq))
        self.mid = [entry for entry in self.mid if entry.seq > item.seq]
        self.blocks.append(TierEntry(item.id, item.seq, item.stream_time, item.end_time))
        self._maybe_fold()

    def _maybe_fold(self) -> None:
        if len(self.mid) < self.per_block or any(j.kind == "block" for j in self.jobs):
            return
        run = self.mid[: self.per_block]
        self.jobs.appendleft(
            SummaryJob("block", run[-1].seq, run[0].start, run[-1].end, run[0].id, run[-1].id)
        )

    def evict_before(self, cutoff: float) -> None:
        self.mid = [entry for entry in self.mid if entry.end >= cutoff]
        self.blocks = [entry for entry in self.blocks if entry.end >= cutoff]
        self.jobs = deque(j for j in self.jobs if j.end >= cutoff)

    def next_job(self) -> SummaryJob | None:
        return self.jobs[0] if self.jobs else None

    def drop_job(self, job: SummaryJob) -> None:
        """Forget an owed summary that has nothing left to summarise."""
        self.jobs = deque(j for j in self.jobs if j != job)

    def state(self) -> dict[str, Any]:
        return {
            "open_chunk": self.open_chunk,
            "open_first_id": self.open_first_id,
            "jobs": [[j.kind, j.seq, j.start, j.end, j.first_id, j.last_id] for j in self.jobs],
            "mid": [[e.id, e.seq, e.start, e.end] for e in self.mid],
            "blocks": [[e.id, e.seq, e.start, e.end] for e in self.blocks],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.open_chunk = state["open_chunk"]
        self.open_first_id = state["open_first_id"]
        self.jobs = deque(SummaryJob(*job) for job in state["jobs"])
        self.mid = [TierEntry(*entry) for entry in state["mid"]]
        self.blocks = [TierEntry(*entry) for entry in state["blocks"]]


# -- keyframes -----------------------------------------------------------------------------------------------


def encode_keyframe(image: bytes | np.ndarray, longest_side: int, quality: int, max_pixels: int) -> bytes:
    """A small JPEG of an RGB array or of encoded image bytes (JPEG, PNG, ...): longest side as given."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
        picture = Image.fromarray(image)
    else:
        picture = Image.open(io.BytesIO(image))
        if picture.width * picture.height > max_pixels:
            raise ValueError(
                f"image of {picture.width}x{picture.height} is over the {max_pixels}-pixel limit"
            )
        picture = picture.convert("RGB")
    if picture.width * picture.height > max_pixels:
        raise ValueError(f"image of {picture.width}x{picture.height} is over the {max_pixels}-pixel limit")
    picture.thumbnail((longest_side, longest_side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=quality)
    return out.getvalue()


class KeyframeStore:
    """JPEGs by item id, oldest dropped beyond `max_count`."""

    def __init__(self, max_count: int) -> None:
        self.max_count = max_count
        self._frames: OrderedDict[int, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._frames)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._frames

    def put(self, item_id: int, jpeg: bytes) -> None:
        self._frames[item_id] = jpeg
        while len(self._frames) > self.max_count:
            self._frames.popitem(last=False)

    def get(self, item_id: int) -> bytes | None:
        return self._frames.get(item_id)

    def discard(self, item_ids: Sequence[int]) -> None:
        for item_id in item_ids:
            self._frames.pop(item_id, None)

    @property
    def nbytes(self) -> int:
        return sum(len(jpeg) for jpeg in self._frames.values())

    def state(self) -> list[list[Any]]:
        return [[item_id, jpeg] for item_id, jpeg in self._frames.items()]

    def load_state(self, frames: list[list[Any]]) -> None:
        self._frames = OrderedDict((int(item_id), bytes(jpeg)) for item_id, jpeg in frames)
