"""One session's ticks: once per second take the newest frame, sample it, decide, and record one outcome."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from actors.common.config import VigilConfig
from actors.common.decisions import format_decision
from actors.common.messages import Decision, MemoryContext, Sample, SampleVerdict, TickOutcome, TickRequest, Turn
from actors.common.metrics import VigilMetrics
from actors.common.replicas import Overloaded, ReplicaFailed
from actors.common.session_store import SessionStore
from actors.ingest.channel import instructions_message, settings_message, tick_message
from actors.ingest.frames import ArrivedFrame, LatestFrameBuffer
from actors.ingest.prompt_window import PromptWindow
from actors.memory.link import MemoryClient, MemoryLinkSettings, MemoryWrite, SessionMemoryLink

log = logging.getLogger(__name__)

SampleFn = Callable[[np.ndarray, float, bytes | None, bool], Awaitable[SampleVerdict]]
DecideFn = Callable[[TickRequest], Awaitable[Decision]]
SendFn = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class TickServices:
    """What a session's ticks call: the sampler, the interaction engine, Redis, the metrics and (optionally)
    the memory deployment."""

    sample: SampleFn
    decide: DecideFn
    store: SessionStore
    metrics: VigilMetrics
    memory: MemoryClient | None = None


def keyframe_samples(keyframes: tuple[tuple[float, bytes], ...]) -> tuple[Sample, ...]:
    """JPEG keyframes from memory as RGB samples for the prompt; an undecodable one is left out."""
    samples = []
    for stream_time, jpeg in keyframes:
        try:
            with Image.open(io.BytesIO(jpeg)) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError):
            log.warning("a keyframe from memory could not be decoded; left out of the prompt")
            continue
        samples.append(Sample(stream_time=stream_time, width=rgb.width, height=rgb.height, rgb=rgb.tobytes()))
    return tuple(samples)


def frame_to_rgb(frame: object) -> np.ndarray:
    """An av.VideoFrame (or an HxWx3 array, for tests) as an RGB uint8 array."""
    if isinstance(frame, np.ndarray):
        return frame
    return frame.to_ndarray(format="rgb24")  # type: ignore[attr-defined]


class SessionLoop:
    """Owns a session's tick scheduler and its in-flight tick; every tick ends as exactly one recorded outcome.

    Ticks are scheduled on a fixed grid. When a tick is due while the previous one is still running, the due
    tick is recorded as `skipped:busy` rather than queued: decisions are about the present.
    """

    def __init__(
        self,
        session_id: str,
        config: VigilConfig,
        services: TickServices,
        frames: LatestFrameBuffer,
        send: SendFn,
        instructions: tuple[str, ...] = (),
        speak_threshold: float = 0.5,
    ) -> None:
        self.session_id = session_id
        self.config = config
        self.services = services
        self.frames = frames
        self.send = send
        self.instructions: tuple[str, ...] = instructions
        self.speak_threshold = speak_threshold
        self.tick = 0
        self.last_activity = time.monotonic()
        self.prompt = PromptWindow(session_id, config.resolved_prompt_layout, config.short_term_frames,
                                   config.dialog_turns, config.prompt_segment_frames)
        self._signature: bytes | None = None
        self._question_pending = False
        self._delegated: str | None = None
        self._keyframe_at = float("-inf")
        self._scheduler: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self._lookback_of: MemoryContext | None = None
        self._lookback_samples: tuple[Sample, ...] = ()
        self.memory: SessionMemoryLink | None = None
        if services.memory is not None:
            self.memory = SessionMemoryLink(session_id, services.memory, services.metrics, MemoryLinkSettings(
                top_k=config.memory_top_k, timeout_s=config.memory_timeout_s, refresh_s=config.memory_refresh_s,
            ))

    # -- control -------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._scheduler is None:
            self._scheduler = asyncio.create_task(self._schedule(), name=f"ticks-{self.session_id}")
        if self.memory is not None:
            self.memory.start()

    async def stop(self) -> None:
        """Stop ticking; an in-flight tick is recorded as `skipped:closed`. Waits for pending writes."""
        for task in (self._scheduler, self._inflight):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._scheduler, self._inflight):
            if task is not None:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self.memory is not None:
            await self.memory.close()
        self.closed.set()

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def set_instructions(self, instructions: tuple[str, ...]) -> None:
        self.instructions = instructions
        self.send(instructions_message(instructions))

    def set_speak_threshold(self, threshold: float) -> None:
        """How sure the engine must be before this session hears it speak (0 to 1), from the next tick on."""
        self.speak_threshold = threshold
        self.send(settings_message(threshold))

    def add_question(self, text: str) -> None:
        now = self.frames.stream_time(time.monotonic())
        self.prompt.add_turn(Turn(role="user", text=text, stream_time=now))
        self._question_pending = True
        self._remember("user", text, now)

    def _remember(self, kind: str, text: str, stream_time: float, image: np.ndarray | None = None) -> None:
        if self.memory is not None and text.strip():
            self.memory.remember(MemoryWrite(kind, text, max(0.0, stream_time), image))

    async def _lookback(self, context: MemoryContext) -> tuple[Sample, ...]:
        """Old keyframes as samples, decoded once per memory context (it is reused between refreshes)."""
        if context is not self._lookback_of:
            self._lookback_of = context
            self._lookback_samples = await asyncio.to_thread(keyframe_samples, context.keyframes)
        return self._lookback_samples

    def _memory_query(self, asked: bool) -> tuple[str | None, bool]:
        """What selects the prompt's memories, and whether to fetch them now rather than reuse the last: the
        newest question when one waits, then a question just delegated (what memory holds on it goes into the
        next prompt), else the standing instructions."""
        if self._question_pending:
            questions = [turn.text for turn in self.prompt.turns if turn.role == "user"]
            if questions:
                return questions[-1], True
        if self._delegated is not None:
            question, self._delegated = self._delegated, None
            return question, True
        return "; ".join(self.instructions) or None, asked

    # -- ticking -------------------------------------------------------------------------------------------

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.tick_interval_s
        next_at = loop.time()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if time.monotonic() - self.last_activity > self.config.heartbeat_timeout_s:
                log.info("session %s: no heartbeat or video for %.0f s, closing",
                         self.session_id, self.config.heartbeat_timeout_s)
                self.closed.set()
                return
            self.tick += 1
            if self._inflight is not None and not self._inflight.done():
                self._record_now(self._skipped(self.tick, "busy"))
                continue
            self._inflight = asyncio.create_task(self._run_tick(self.tick), name=f"tick-{self.session_id}")

    def _skipped(self, tick: int, reason: str, stream_time: float | None = None) -> TickOutcome:
        if stream_time is None:
            stream_time = self.frames.stream_time(time.monotonic())
        return TickOutcome(
            session_id=self.session_id, tick=tick, stream_time=stream_time,
            outcome=f"skipped:{reason}", wall_time=time.time(),
        )

    async def _run_tick(self, tick: int) -> None:
        arrived = self.frames.take()
        deadline = time.time() + self.config.decide_timeout_s
        try:
            if arrived is None:
                outcome = self._skipped(tick, "no_frame")
                arrival = time.monotonic()
            else:
                arrival = arrived.arrival
                outcome = await asyncio.wait_for(self._decide_tick(tick, arrived, deadline),
                                                 self.config.decide_timeout_s)
        except asyncio.CancelledError:
            self._record_now(self._skipped(tick, "closed"))
            raise
        except TimeoutError:
            outcome = self._skipped(tick, "timeout")
        except ReplicaFailed:
            outcome = self._skipped(tick, "replica_failed")
        except Overloaded:
            outcome = self._skipped(tick, "overload")
        except Exception:
            log.exception("session %s tick %d failed", self.session_id, tick)
            outcome = self._skipped(tick, "engine_error")
        await self._record(outcome, arrival)

    async def _decide_tick(self, tick: int, arrived: ArrivedFrame, deadline: float) -> TickOutcome:
        started = time.monotonic()
        stream_time = self.frames.stream_time(arrived.arrival)
        rgb = await asyncio.to_thread(frame_to_rgb, arrived.frame)
        verdict = await self.services.sample(rgb, stream_time, self._signature, True)
        self._signature = verdict.signature
        if verdict.sample is not None:
            self.prompt.add_frame(verdict.sample)
            if (verdict.change_score >= self.config.keyframe_change
                    and stream_time - self._keyframe_at >= self.config.keyframe_every_s):
                # A camera that keeps moving changes every second: keyframes are rationed, not one a tick.
                self._keyframe_at = stream_time
                sample = verdict.sample
                image = np.frombuffer(sample.rgb, np.uint8).reshape(sample.height, sample.width, 3)
                self._remember("keyframe", "a new scene", stream_time, image)
        sampled = time.monotonic()
        stages = {"wait": (started - arrived.arrival) * 1000, "sample": (sampled - started) * 1000}
        inbox_items = await self.services.store.pop_inbox(self.session_id)
        inbox = tuple(str(item.get("text", "")) for item in inbox_items)
        for text in inbox:
            self._remember("background", text, stream_time)
        asked = self._question_pending or bool(inbox)
        if not self.instructions and not asked and self.config.silent_without_instruction:
            # Nothing to watch for and nobody asked: silence without calling the model.
            return TickOutcome(
                session_id=self.session_id, tick=tick, stream_time=stream_time, outcome="silent",
                wall_time=time.time(), stages_ms=stages,
            )
        memories: tuple[str, ...] = ()
        lookback: tuple[Sample, ...] = ()
        if self.memory is not None:
            query, fresh = self._memory_query(asked)
            context = await self.memory.context(query, fresh=fresh)
            memories, lookback = self.prompt.hold_memories(context.lines), await self._lookback(context)
            stages["memory"] = (time.monotonic() - sampled) * 1000
        request = TickRequest(
            session_id=self.session_id, tick=tick, stream_time=stream_time, samples=self.prompt.frames,
            instructions=self.instructions, dialog=self.prompt.turns, inbox=inbox, memories=memories,
            lookback=lookback, speak_threshold=self.speak_threshold, deadline=deadline,
        )
        deciding = time.monotonic()
        decision = await self.services.decide(request)
        stages["decide"] = (time.monotonic() - deciding) * 1000
        self._question_pending = False
        if decision.kind != "silent":
            self.prompt.add_turn(Turn(role="assistant", text=format_decision(decision), stream_time=stream_time))
            said = decision.text
            if decision.question:
                said = f"{said} (asked the background assistant: {decision.question})"
                self._delegated = decision.question
            self._remember("response", said, stream_time)
        return TickOutcome(
            session_id=self.session_id, tick=tick, stream_time=stream_time, outcome=decision.kind,
            text=decision.text, question=decision.question, wall_time=time.time(), stages_ms=stages,
            model_called=True, probability=decision.probability, replica=decision.replica,
            prompt_tokens=decision.prompt_tokens, cached_tokens=decision.cached_tokens,
        )

    # -- recording -----------------------------------------------------------------------------------------

    def _emit(self, outcome: TickOutcome, arrival: float) -> TickOutcome:
        """Send and count an outcome; returns it with its final stage timings."""
        stages = dict(outcome.stages_ms)
        sending = time.monotonic()
        stages["total"] = (sending - arrival) * 1000
        final = dataclasses.replace(outcome, stages_ms=stages)
        try:
            self.send(tick_message(final, stages["total"]))
        except Exception:  # a closing channel must not lose the recorded outcome
            log.debug("session %s: could not send tick %d", self.session_id, outcome.tick, exc_info=True)
        stages["send"] = (time.monotonic() - sending) * 1000
        self.services.metrics.ticks_total.labels(outcome=final.outcome).inc()
        if not final.skipped:
            self.services.metrics.observe_stages(stages)
            self.services.metrics.observe_prompt(final.prompt_tokens, final.cached_tokens)
        return final

    async def _record(self, outcome: TickOutcome, arrival: float) -> None:
        final = self._emit(outcome, arrival)
        try:
            await self.services.store.append_outcome(final)
        except Exception:
            log.exception("session %s: tick %d not logged to Redis", self.session_id, final.tick)

    def _record_now(self, outcome: TickOutcome) -> None:
        """Record without awaiting (from the scheduler or a cancelled tick); the Redis write is owned here."""
        final = self._emit(outcome, time.monotonic())
        task = asyncio.get_running_loop().create_task(self.services.store.append_outcome(final))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
