"""Synthetic sessions ticking once a second into an engine, batched as `@serve.batch` batches them.

Each session's ticks fall on a one-second grid, the sessions staggered across the second; a tick carries the
short-term window of frames the session loop sends. A session whose previous tick is still running skips the
due one as busy, as `SessionLoop` does. Latency runs from a tick's due time to its decision. Used by
`bench.gpu_streams`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actors.common.messages import Decision, Sample, TickRequest

TARGET_P99_MS = 500.0
INSTRUCTIONS = ("Tell me when someone enters the room.",)


def frame_pool(width: int, height: int, count: int = 8, seed: int = 0) -> list[bytes]:
    """A few distinct RGB frames (a gradient, a moving bar, some noise) that all sessions share."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 200, width, dtype=np.float32)[None, :, None] + np.zeros((height, 1, 3), np.float32)
    frames = []
    for index in range(count):
        image = base + rng.normal(0, 12, size=(height, width, 3)).astype(np.float32)
        column = index * width // count
        image[:, column : column + max(2, width // 32)] = 240
        frames.append(np.clip(image, 0, 255).astype(np.uint8).tobytes())
    return frames


def tick_request(session: int, tick: int, size: tuple[int, int], frames: list[bytes], window: int,
                 speak_threshold: float = 0.5) -> TickRequest:
    """Tick `tick` of session `session`: the frames of its last `window` seconds, and a standing instruction."""
    width, height = size
    samples = tuple(
        Sample(stream_time=float(second), width=width, height=height, rgb=frames[(session + second) % len(frames)])
        for second in range(max(0, tick - window + 1), tick + 1)
    )
    return TickRequest(
        session_id=f"bench-{session}", tick=tick, stream_time=float(tick), samples=samples, instructions=INSTRUCTIONS,
        speak_threshold=speak_threshold,
    )


@dataclass(frozen=True, slots=True)
class BatchStat:
    """One engine call: when it started (event-loop time), its size, its wall time and the engine's model_ms."""

    started: float
    size: int
    ms: float
    model_ms: float


@dataclass(slots=True)
class TickBatcher:
    """Batches concurrent ticks as `@serve.batch` does with `max_concurrent_batches=1`: a batch leaves when it
    is full or `wait_s` after it began to gather, and the next one gathers while it runs."""

    engine: Any
    max_batch: int
    wait_s: float
    batches: list[BatchStat] = field(default_factory=list)
    _pending: deque[tuple[TickRequest, asyncio.Future[Decision]]] = field(default_factory=deque)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _closing: bool = False
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bench-batcher")

    async def decide(self, request: TickRequest) -> Decision:
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        self._arrived.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            deadline = loop.time() + self.wait_s
            while len(self._pending) < self.max_batch and not self._closing and loop.time() < deadline:
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(deadline - loop.time()):
                        await self._arrived.wait()
            taken = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            batch = [(request, future) for request, future in taken if not future.done()]
            if batch and not self._closing:
                await self._decide(batch)

    async def _decide(self, batch: list[tuple[TickRequest, asyncio.Future[Decision]]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            decisions = await self.engine.decide([request for request, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        model_ms = decisions[0].model_ms if decisions else 0.0  # one generate call: the same for every row
        self.batches.append(BatchStat(started, len(batch), (loop.time() - started) * 1000, model_ms))
        for (_, future), decision in zip(batch, decisions, strict=True):
            if not future.done():
                future.set_result(decision)

    async def close(self) -> None:
        """Drop the ticks still queued and wait for the batch in flight, so that the engine is idle after."""
        self._closing = True
        while self._pending:
            self._pending.popleft()[1].cancel()
        self._arrived.set()
        if self._task is not None:
            await self._task


@dataclass(slots=True)
class ConcurrentTicks:
    """What `run_point` uses for an engine that batches concurrent calls itself (vLLM): every tick is its own
    call, made as soon as it is due, as the interaction deployment calls such an engine; each is a "batch" of 1."""

    engine: Any
    batches: list[BatchStat] = field(default_factory=list)

    def start(self) -> None:
        pass

    async def decide(self, request: TickRequest) -> Decision:
        loop = asyncio.get_running_loop()
        started = loop.time()
        (decision,) = await self.engine.decide([request])
        self.batches.append(BatchStat(started, 1, (loop.time() - started) * 1000, decision.model_ms))
        return decision

    async def close(self) -> None:
        pass  # `run_point` cancels the ticks still running, and with them their requests


@dataclass(frozen=True, slots=True)
class PointResult:
    """One steady-state measurement of `sessions` streams of `frames`-sized frames for `seconds`."""

    frames: str
    sessions: int
    seconds: float
    latencies_ms: list[float]
    busy: int
    unfinished: int
    silent: int
    batches: list[BatchStat]
    peak_gib: float | None

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def decided(self) -> int:
        return len(self.latencies_ms) - self.unfinished

    @property
    def held(self) -> bool:
        """Every due tick was decided, and p99 is within the target."""
        return self.busy == 0 and self.unfinished == 0 and self.decided > 0 and self.p(99) < TARGET_P99_MS


def parse_share(text: str) -> float | None:
    """A `--speak-share` argument: a share of ticks from 0 to 1, or "model" (None: the model decides)."""
    if text == "model":
        return None
    share = float(text)
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError("a share is between 0 and 1, or 'model'")
    return share


@dataclass(frozen=True, slots=True)
class LoadSettings:
    """How the synthetic sessions tick and are batched."""

    warmup_s: float = 2.0
    seconds: float = 5.0
    max_batch: int = 32
    batch_wait_s: float = 0.005
    window: int = 4
    # The share of ticks made to speak, through their speak_threshold (0: speaks whatever the model's
    # probability, 2: never); None leaves each decision to the model at the default threshold.
    speak_share: float | None = 0.1

    def request(self, session: int, tick: int, size: tuple[int, int], frames: list[bytes]) -> TickRequest:
        if self.speak_share is None:
            threshold = 0.5
        else:
            # An even, deterministic spread over sessions and ticks (an additive recurrence).
            threshold = 0.0 if (session * 0.6180339887 + tick * 0.7548776662) % 1.0 < self.speak_share else 2.0
        return tick_request(session, tick, size, frames, self.window, threshold)

    @property
    def drain_s(self) -> float:
        """How long ticks still running when the window closes are waited for."""
        return max(2.0, self.seconds)


async def run_point(engine: Any, settings: LoadSettings, size: tuple[int, int], sessions: int) -> PointResult:
    """`sessions` streams for `settings.warmup_s` (not measured), then `settings.seconds`, whose due ticks count."""
    width, height = size
    frames = frame_pool(width, height)
    loop = asyncio.get_running_loop()
    batcher: TickBatcher | ConcurrentTicks
    if getattr(engine, "batches_itself", False):
        batcher = ConcurrentTicks(engine)
    else:
        batcher = TickBatcher(engine, settings.max_batch, settings.batch_wait_s)
    batcher.start()
    t0 = loop.time() + 0.05
    measure_from, measure_to = t0 + settings.warmup_s, t0 + settings.warmup_s + settings.seconds
    latencies: list[float] = []
    due_of: dict[asyncio.Task[None], float] = {}
    counts = {"busy": 0, "silent": 0}

    def measured(due: float) -> bool:
        return measure_from <= due < measure_to

    async def tick(session: int, number: int, due: float) -> None:
        # Numbered past the window, so that every tick carries a full window (the steady state).
        decision = await batcher.decide(settings.request(session, number + settings.window, size, frames))
        if measured(due):
            latencies.append((loop.time() - due) * 1000)
            counts["silent"] += int(decision.kind == "silent")

    async def session(index: int) -> None:
        phase = (index + 0.5) / sessions  # staggered across the second, as sessions start at any time
        inflight: asyncio.Task[None] | None = None
        number = 0
        while (due := t0 + phase + number) < measure_to:
            await asyncio.sleep(max(0.0, due - loop.time()))
            number += 1
            if inflight is not None and not inflight.done():
                counts["busy"] += int(measured(due))  # SessionLoop records such a tick as `skipped:busy`
                continue
            inflight = asyncio.create_task(tick(index, number, due))
            due_of[inflight] = due

    # vLLM's memory is its engine core's, in another process: torch here cannot see it.
    device = getattr(engine, "device", None)
    cuda = isinstance(device, str) and device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    await asyncio.gather(*(session(index) for index in range(sessions)))
    running = [task for task in due_of if not task.done()]
    if running:
        await asyncio.wait(running, timeout=settings.drain_s)
    unfinished = 0
    for task, due in due_of.items():
        if not task.done() and measured(due):
            latencies.append((loop.time() - due) * 1000)  # undecided: its latency is at least this
            unfinished += 1
        task.cancel()
    await batcher.close()
    await asyncio.gather(*due_of, return_exceptions=True)
    failed = [task.exception() for task in due_of if not task.cancelled() and task.exception() is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} ticks failed; the first: {failed[0]!r}") from failed[0]
    return PointResult(
        frames=f"{width}x{height}", sessions=sessions, seconds=settings.seconds, latencies_ms=latencies,
        busy=counts["busy"], unfinished=unfinished, silent=counts["silent"],
        batches=[batch for batch in batcher.batches if batch.started >= measure_from],
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    )
