"""The tables under a session's memory: items, distinct texts, and the FAISS index over the texts.

Items are every caption, summary, message, result and keyframe, with stream time. Texts are each distinct
(kind, text) once; row r of the text table is row r of the FAISS index. A quiet scene captioned the same way
for an hour costs one vector, and a search returns distinct memories by construction, each with its newest
occurrence, its first one and how many there were ("when did I last see my keys?").

Index: `IndexScalarQuantizer`, 8 bits per dimension, uniform over [-1, 1], inner product. Embeddings are unit
vectors, so no component leaves that range and no training data is needed. At 43,200 distinct 384-d texts it
holds 16.6 MB (float32 would be 66 MB, float16 33 MB) and an exhaustive top-10 search takes about a
millisecond, exact up to the quantisation step. Eviction removes rows in place and keeps their order, so a
restored index answers exactly as the lost one did.

Not thread-safe on its own: `SessionMemory` serialises every call.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Container, Sequence
from typing import Any

import faiss
import numpy as np

from actors.memory.tiers import KIND_CODE, KINDS, MemoryItem

ITEM_COLUMNS: dict[str, Any] = {
    "ids": np.int64,
    "times": np.float64,
    "spans": np.float64,
    "kinds": np.int8,
    "seqs": np.int64,
    "texts": np.int64,  # row in the text table
}
TEXT_COLUMNS: dict[str, Any] = {"hashes": np.int64, "kinds": np.int8}


def text_hash(kind: str, text: str) -> int:
    """A stable 64-bit key of (kind, text): same text, same key, in every process."""
    digest = hashlib.blake2b(f"{kind}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def make_index(kind: str, dim: int) -> faiss.Index:
    """An empty inner-product index whose rows keep their order under `remove_ids`."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "fp16":
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    if kind == "sq8":
        quantizer = faiss.ScalarQuantizer.QT_8bit_uniform
        index = faiss.IndexScalarQuantizer(dim, quantizer, faiss.METRIC_INNER_PRODUCT)
        # Unit vectors live in [-1, 1]: training on the two corners fixes that range with no data.
        index.train(np.stack([-np.ones(dim, np.float32), np.ones(dim, np.float32)]))
        return index
    raise ValueError(f"unknown index kind {kind!r}")


class Columns:
    """Typed numpy columns that grow by doubling and compact in place."""

    def __init__(self, dtypes: dict[str, Any], capacity: int = 1024) -> None:
        self._data = {name: np.empty(capacity, dtype) for name, dtype in dtypes.items()}
        self.size = 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self._data[name][: self.size]

    def append(self, **values: Any) -> int:
        if self.size == len(next(iter(self._data.values()))):
            self._data = {name: np.resize(col, 2 * len(col)) for name, col in self._data.items()}
        for name, value in values.items():
            self._data[name][self.size] = value
        self.size += 1
        return self.size - 1

    def keep(self, mask: np.ndarray) -> None:
        for col in self._data.values():
            kept = col[: self.size][mask]
            col[: len(kept)] = kept
        self.size = int(mask.sum())

    @property
    def nbytes(self) -> int:
        return sum(col.nbytes for col in self._data.values())

    def state(self) -> dict[str, bytes]:
        return {name: self[name].tobytes() for name in self._data}

    @classmethod
    def from_state(cls, dtypes: dict[str, Any], state: dict[str, bytes]) -> Columns:
        loaded = {name: np.frombuffer(state[name], dtype) for name, dtype in dtypes.items()}
        size = len(next(iter(loaded.values())))
        columns = cls(dtypes, 0)
        capacity = size + max(1024, size // 8)  # room to grow without doubling right away
        columns._data = {name: np.resize(col, capacity) for name, col in loaded.items()}
        columns.size = size
        return columns


class MemoryIndex:
    """Items and distinct texts of one session, and the FAISS index of the texts."""

    def __init__(self, session_id: str, dim: int, kind: str) -> None:
        self.session_id = session_id
        self.dim = dim
        self.kind = kind
        self.faiss = make_index(kind, dim)
        self.items = Columns(ITEM_COLUMNS)
        self.texts = Columns(TEXT_COLUMNS)
        self.strings: list[str] = []  # by text row
        self.oldest_end = math.inf
        self._pending: list[np.ndarray] = []  # vectors of new texts, not yet in FAISS

    def __len__(self) -> int:
        return self.items.size

    def append(self, item: MemoryItem, vector: np.ndarray) -> None:
        """Add an item row, and a text row (vector pending until `flush`) if its text is new."""
        key = text_hash(item.kind, item.text)
        # A vectorised scan of the text keys costs tens of microseconds at 12 hours and needs no map.
        rows = np.flatnonzero(self.texts["hashes"] == key)
        if len(rows):
            text_row = int(rows[0])
        else:
            text_row = self.texts.append(hashes=key, kinds=KIND_CODE[item.kind])
            self.strings.append(item.text)
            self._pending.append(vector)
        self.items.append(
            ids=item.id,
            times=item.stream_time,
            spans=item.span_s,
            kinds=KIND_CODE[item.kind],
            seqs=item.seq,
            texts=text_row,
        )
        self.oldest_end = min(self.oldest_end, item.end_time)

    def flush(self) -> None:
        """Put pending vectors into FAISS (one add for the lot)."""
        if self._pending:
            self.faiss.add(np.stack(self._pending))
            self._pending.clear()

    def evict(self, cutoff: float) -> tuple[int, list[int]]:
        """Drop items that ended before `cutoff`, and texts left without items; returns how many items, and
        the ids of the keyframes among them."""
        self.flush()
        drop = self.items["times"] + self.items["spans"] < cutoff
        count = int(drop.sum())
        keyframes: list[int] = []
        if count:
            keyframes = self.items["ids"][drop & (self.items["kinds"] == KIND_CODE["keyframe"])].tolist()
            self.items.keep(~drop)
            used = np.bincount(self.items["texts"], minlength=self.texts.size) > 0
            if not used.all():
                self._drop_texts(used)
        ends = self.items["times"] + self.items["spans"]
        self.oldest_end = float(ends.min()) if self.items.size else math.inf
        return count, keyframes

    def _drop_texts(self, used: np.ndarray) -> None:
        unused = np.flatnonzero(~used)
        prefix = unused[-1] == len(unused) - 1
        selector = faiss.IDSelectorRange(0, len(unused)) if prefix else faiss.IDSelectorBatch(unused)
        removed = self.faiss.remove_ids(selector)
        if removed != len(unused):
            raise RuntimeError(f"index removed {removed} of {len(unused)} rows")
        remap = np.cumsum(used) - 1
        self.items["texts"][:] = remap[self.items["texts"]]
        self.texts.keep(used)
        if prefix:
            del self.strings[: len(unused)]
        else:
            self.strings = [text for text, keep in zip(self.strings, used.tolist(), strict=True) if keep]

    def item(self, row: int, keyframes: Container[int] = ()) -> MemoryItem:
        """The item at `row`; `keyframe` is set for keyframe items whose JPEG is in `keyframes`."""
        item_id = int(self.items["ids"][row])
        kind = KINDS[self.items["kinds"][row]]
        return MemoryItem(
            id=item_id,
            session_id=self.session_id,
            stream_time=float(self.items["times"][row]),
            kind=kind,  # type: ignore[arg-type]
            text=self.strings[self.items["texts"][row]],
            span_s=float(self.items["spans"][row]),
            seq=int(self.items["seqs"][row]),
            keyframe=item_id if kind == "keyframe" and item_id in keyframes else None,
        )

    def row_of(self, item_id: int) -> int | None:
        ids = self.items["ids"]
        row = int(np.searchsorted(ids, item_id))
        return row if row < len(ids) and ids[row] == item_id else None

    def rows_between_ids(self, first_id: int, last_id: int, kinds: Sequence[str]) -> np.ndarray:
        ids = self.items["ids"]
        rows = np.arange(np.searchsorted(ids, first_id), np.searchsorted(ids, last_id, "right"))
        return rows[np.isin(self.items["kinds"][rows], [KIND_CODE[kind] for kind in kinds])]

    def item_mask(self, cutoff: float, time_range: tuple[float, float] | None) -> np.ndarray | None:
        """Items that end at or after `cutoff` and overlap `time_range`; None when that is every item."""
        if self.oldest_end >= cutoff and time_range is None:
            return None
        times = self.items["times"]
        ends = times + self.items["spans"]
        mask = ends >= cutoff
        if time_range is not None:
            mask &= (ends >= time_range[0]) & (times <= time_range[1])
        return mask

    def search(
        self, vector: np.ndarray, k: int, items: np.ndarray | None, kinds: Sequence[str] | None
    ) -> list[tuple[int, float, int, float]]:
        """Top `k` texts among allowed items and kinds: (newest item row, score, occurrences, first time)."""
        self.flush()
        allowed: np.ndarray | None = None
        if items is not None:
            allowed = np.zeros(self.texts.size, dtype=bool)
            allowed[self.items["texts"][items]] = True
        if kinds is not None and set(kinds) != set(KINDS):
            of_kind = np.isin(self.texts["kinds"], [KIND_CODE[kind] for kind in kinds])
            allowed = of_kind if allowed is None else allowed & of_kind
        count = self.texts.size if allowed is None else int(allowed.sum())
        if count == 0 or k <= 0:
            return []
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, self.dim)
        if allowed is None:
            scores, rows = self.faiss.search(query, min(k, count))
        else:
            bits = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
            params = faiss.SearchParameters()
            params.sel = selector
            scores, rows = self.faiss.search(query, min(k, count), params=params)
        hits = []
        for score, text_row in zip(scores[0].tolist(), rows[0].tolist(), strict=True):
            if text_row < 0:
                break
            same = self.items["texts"] == text_row
            if items is not None:
                same &= items
            occurrences = np.flatnonzero(same)
            times = self.items["times"][occurrences]
            newest = int(occurrences[len(occurrences) - 1 - int(np.argmax(times[::-1]))])
            hits.append((newest, score, len(occurrences), float(times.min())))
        return hits

    @property
    def nbytes(self) -> int:
        """Bytes held: FAISS codes, columns, and the text strings (CPython str header + ASCII)."""
        strings = sum(len(text) + 57 for text in self.strings) + 8 * len(self.strings)
        return self.index_bytes + self.items.nbytes + self.texts.nbytes + strings

    @property
    def index_bytes(self) -> int:
        return int(self.faiss.ntotal * self.faiss.sa_code_size())

    def state(self) -> dict[str, Any]:
        self.flush()
        return {
            "index_kind": self.kind,
            "index": faiss.serialize_index(self.faiss).tobytes(),
            "items": self.items.state(),
            "texts": self.texts.state(),
            "strings": list(self.strings),
        }

    @classmethod
    def from_state(cls, session_id: str, dim: int, state: dict[str, Any]) -> MemoryIndex:
        index = cls(session_id, dim, state["index_kind"])
        index.faiss = faiss.deserialize_index(np.frombuffer(state["index"], dtype=np.uint8))
        index.items = Columns.from_state(ITEM_COLUMNS, state["items"])
        index.texts = Columns.from_state(TEXT_COLUMNS, state["texts"])
        index.strings = list(state["strings"])
        if not index.faiss.ntotal == index.texts.size == len(index.strings):
            raise ValueError(f"memory snapshot of session {session_id!r} is inconsistent")
        # A deserialised code buffer is exactly full, so the first add after a restore would copy all of it
        # (16 MB at 12 hours) into a buffer twice the size while a tick waits. Make that copy here instead.
        rows = index.faiss.ntotal
        index.faiss.add(np.zeros((1, dim), np.float32))
        index.faiss.remove_ids(faiss.IDSelectorRange(rows, rows + 1))
        ends = index.items["times"] + index.items["spans"]
        index.oldest_end = float(ends.min()) if index.items.size else math.inf
        return index
