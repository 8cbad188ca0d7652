"""One session's ticks: once per second take the newest frame, sample it, decide, and record one outcome."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import io
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from actors.common.config import VigilConfig
from actors.common.decisions import format_decision
from actors.common.frame_size import fit_within
from actors.common.messages import (
    Decision,
    MemoryContext,
    Sample,
    SampleVerdict,
    SessionRecord,
    TickOutcome,
    TickRequest,
    Turn,
    from_dict,
    to_dict,
)
from actors.common.metrics import VigilMetrics
from actors.common.replicas import Overloaded, ReplicaFailed
from actors.common.session_store import SessionClock, SessionStore, new_read_id
from actors.ingest.channel import error_message, instructions_message, settings_message, tick_message
from actors.ingest.delegations import Brain, SessionDelegations
from actors.ingest.frames import ArrivedFrame, LatestFrameBuffer
from actors.ingest.outcome_journal import JournalSettings, OutcomeJournal, lost_with_their_replica
from actors.ingest.prompt_window import PromptWindow
from actors.ingest.untried import FAILURES_TO_TAKE_BACK, Untried
from actors.memory.link import MemoryClient, MemoryLinkSettings, MemoryWrite, SessionMemoryLink

log = logging.getLogger(__name__)

JOURNAL_CLOSE_S = 3.0  # a closing session's held outcomes get this long to land (Redis may still be out)

# The sampler is handed how to make the frame (RGB at the model's size) and makes it in the same worker thread as
# its judgement: one hop off the event loop a tick. It answers with the frame and its verdict.
RgbFn = Callable[[], np.ndarray]
SampleFn = Callable[[RgbFn, float, bytes | None, bool], Awaitable[tuple[np.ndarray, SampleVerdict]]]
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
    brain: Brain | None = None  # None: a delegation ends failed at once, saying no brain is configured


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


def _excerpt(text: str, chars: int = 40) -> str:
    return repr(text if len(text) <= chars else text[: chars - 1] + "…")


def frame_to_rgb(frame: object, longest_side: int, max_pixels: int) -> np.ndarray:
    """An av.VideoFrame (or an HxWx3 array, for tests) as an RGB uint8 array at the model's size: for a decoded
    frame, one conversion straight from its YUV (swscale), the only copy of its pixels the tick makes.

    Raises ValueError for a frame over `max_pixels` (before anything is done with it)."""
    height, width = (frame.shape[0], frame.shape[1]) if isinstance(frame, np.ndarray) else (
        frame.height, frame.width)  # type: ignore[attr-defined]
    if width * height > max_pixels:
        raise ValueError(f"frame of {width}x{height} is over the {max_pixels}-pixel limit")
    size = fit_within(width, height, longest_side)
    if isinstance(frame, np.ndarray):
        if size == (width, height):
            return frame
        return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR))
    return frame.to_ndarray(  # type: ignore[attr-defined, no-any-return]
        width=size[0], height=size[1], format="rgb24", interpolation="BILINEAR")


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
        owner: str = "",
        resumed: SessionClock | None = None,
    ) -> None:
        self.session_id = session_id
        self.config = config
        self.services = services
        self.frames = frames
        self.send = send
        self.instructions: tuple[str, ...] = instructions
        self.speak_threshold = speak_threshold
        # This peer's claim on the session: its outcomes are recorded only while it holds the session.
        self.owner = owner
        self.lost = False  # another peer (on this replica or another) took the session over
        # A resumed session goes on where its ticks stopped: numbering, stream time, and one outcome for the gap.
        self.resumed = resumed
        self.missed_s = 0.0 if resumed is None else max(0.0, time.time() - resumed.wall_time)
        self.tick = 0 if resumed is None else resumed.tick
        self.last_activity = time.monotonic()
        self.prompt = PromptWindow(session_id, config.resolved_prompt_layout, config.short_term_frames,
                                   config.dialog_turns, config.prompt_segment_frames)
        self._signature: bytes | None = None
        self._question_pending = False
        self._untried = Untried()  # what the engine has not decided on yet: taken back if it keeps failing
        self._delegated: str | None = None
        self._keyframe_at = float("-inf")
        self._scheduler: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._started_late_s = 0.0  # how long after its due time the last tick started
        self._writes: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        # The event log is written behind when Redis does not answer in time (actors/ingest/outcome_journal.py).
        self.journal = OutcomeJournal(
            session_id, lambda outcome: services.store.record_outcome(outcome, self.owner), services.metrics,
            JournalSettings(capacity=config.outcome_buffer, wait_s=config.redis_tick_timeout_s),
            on_refused=self._held_elsewhere,
        )
        # The pending inbox and control read, owned here: one at a time, never cancelled, its id kept until it
        # answers (asked again with that id, Redis hands back what it took), so what it takes is never lost.
        self._reading: asyncio.Task[tuple[list[dict[str, Any]], list[dict[str, Any]]]] | None = None
        self._read_id = new_read_id()
        self._reads_late = False  # the last read did not answer in time: the next ticks do not wait for one
        self._lookback_of: MemoryContext | None = None
        self._lookback_samples: tuple[Sample, ...] = ()
        self.delegations = SessionDelegations(session_id, services.brain, services.store, services.metrics, send)
        self.memory: SessionMemoryLink | None = None
        if services.memory is not None:
            self.memory = SessionMemoryLink(session_id, services.memory, services.metrics, MemoryLinkSettings(
                top_k=config.memory_top_k, timeout_s=config.memory_timeout_s, refresh_s=config.memory_refresh_s,
            ))

    # -- control -------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._scheduler is None:
            if self.resumed is not None:
                for first, last in self.resumed.unrecorded:  # the log holds one outcome for every tick number
                    self._own_write(self._log_only(
                        lost_with_their_replica(self.session_id, first, last, self.resumed.stream_time)))
                self.tick += 1
                self._record_now(self._missed(self.tick))
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
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a read no tick will take
                await self._reading
        await self.delegations.close()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self.journal.close(JOURNAL_CLOSE_S)
        if self.memory is not None:
            await self.memory.close()
        self.closed.set()

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def set_instructions(self, instructions: tuple[str, ...]) -> None:
        self._untried.change_instructions(self.instructions, instructions)
        self.instructions = instructions
        self.send(instructions_message(instructions))

    def set_speak_threshold(self, threshold: float) -> None:
        """How sure the engine must be before this session hears it speak (0 to 1), from the next tick on."""
        self.speak_threshold = threshold
        self.send(settings_message(threshold))

    def add_question(self, text: str) -> None:
        now = self.frames.stream_time(time.monotonic())
        turn = Turn(role="user", text=text, stream_time=now)
        self.prompt.add_turn(turn)
        self._untried.add_turn(turn)
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
            waited = 0.0
            previous = self._inflight
            if previous is not None and not previous.done() and self._started_late_s > 0:
                # The tick before started late (it waited for its frame): it has as long as one started on time.
                await asyncio.wait({previous}, timeout=self._started_late_s)
                waited = loop.time() - next_at
            if not self._running():
                # A moment for the next frame when the newest is old (LatestFrameBuffer.aligned).
                limit = min(self.config.tick_frame_wait_s, interval / 2)
                waited += await self.frames.aligned(max(0.0, limit - waited))
            self.tick += 1
            if self._running():
                self._started_late_s = 0.0
                self._record_now(self._skipped(self.tick, "busy"))
                continue
            self._started_late_s = waited
            self._inflight = asyncio.create_task(self._run_tick(self.tick, waited), name=f"tick-{self.session_id}")

    def _running(self) -> bool:
        """Whether the session's last tick is still deciding."""
        return self._inflight is not None and not self._inflight.done()

    def _skipped(self, tick: int, reason: str, stream_time: float | None = None) -> TickOutcome:
        if stream_time is None:
            stream_time = self.frames.stream_time(time.monotonic())
        return TickOutcome(
            session_id=self.session_id, tick=tick, stream_time=stream_time,
            outcome=f"skipped:{reason}", wall_time=time.time(),
        )

    def _missed(self, tick: int) -> TickOutcome:
        """The one outcome of the time between where a resumed session's ticks stopped and where they go on."""
        return TickOutcome(
            session_id=self.session_id, tick=tick, stream_time=self.frames.stream_time(time.monotonic()),
            outcome="skipped:reconnect", text=f"{self.missed_s:.0f} s of video missed", wall_time=time.time(),
            missed_s=self.missed_s,
        )

    async def tick_now(self) -> None:
        """Run the next tick at once, on the frame the buffer holds, instead of on the schedule: for a session whose
        frames come with its requests (actors/ingest/http_session.py). Numbered next; its one outcome is recorded
        and sent like a scheduled tick's."""
        self.tick += 1
        await self._run_tick(self.tick)

    async def add_frame(self, rgb: np.ndarray, stream_time: float) -> None:
        """Sample a frame (RGB at the model's size) into the next prompts, and into memory as a keyframe when the
        scene changed: what a request with several frames does with the earlier ones."""
        await self._sample(lambda: rgb, stream_time)

    async def _sample(self, to_rgb: RgbFn, stream_time: float) -> np.ndarray:
        """What each tick does with its frame: made by `to_rgb` and judged off the event loop, kept in the next
        prompts (and as a keyframe when the scene changed). Returns the frame."""
        rgb, verdict = await self.services.sample(to_rgb, stream_time, self._signature, True)
        self._signature = verdict.signature
        if verdict.sample is not None:
            self.prompt.add_frame(verdict.sample)
            if (verdict.change_score >= self.config.keyframe_change
                    and stream_time - self._keyframe_at >= self.config.keyframe_every_s):
                # A camera that keeps moving changes every second: keyframes are rationed, not one a tick.
                self._keyframe_at = stream_time
                self._remember("keyframe", "a new scene", stream_time, rgb)  # the sample's pixels, held here
        return rgb

    async def _run_tick(self, tick: int, waited: float = 0.0) -> None:
        """Decide tick `tick` on the newest frame; `waited`: how long after its due time it was started."""
        arrived = self.frames.take()
        deadline = time.time() + self.config.decide_timeout_s
        try:
            if arrived is None:
                outcome = self._skipped(tick, "no_frame")
                arrival = time.monotonic()
            else:
                arrival = arrived.arrival
                outcome = await asyncio.wait_for(self._decide_tick(tick, arrived, deadline, waited),
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

    async def _decide_tick(self, tick: int, arrived: ArrivedFrame, deadline: float, waited: float = 0.0) -> TickOutcome:
        started = time.monotonic()
        stream_time = self.frames.stream_time(arrived.arrival)
        self._read_pending()  # Redis answers while the frame is made and judged
        rgb = await self._sample(functools.partial(frame_to_rgb, arrived.frame, self.config.image_size,
                                                   self.config.limits.max_frame_pixels), stream_time)
        sampled = time.monotonic()
        stages = {"wait": (started - arrived.arrival) * 1000, "sample": (sampled - started) * 1000}
        if waited >= 0.001:
            stages["align"] = waited * 1000  # how long after its due time the tick started
        inbox_items, changes = await self._take_pending()
        self._apply(changes)
        self.delegations.arrived(inbox_items)
        self._own_write(self.delegations.overdue())  # its failed results go to Redis, behind the tick
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
        try:
            decision = await self.services.decide(request)
        except (TimeoutError, ReplicaFailed, Overloaded):
            raise  # trouble with the replicas, not with this prompt
        except Exception:
            if self._untried.failed(request):
                self._take_back(request)
            raise
        self._untried.decided(request)
        stages["decide"] = (time.monotonic() - deciding) * 1000
        self._question_pending = False
        if decision.kind != "silent":
            self.prompt.add_turn(Turn(role="assistant", text=format_decision(decision), stream_time=stream_time))
            said = decision.text
            if decision.question:
                said = f"{said} (asked the background assistant: {decision.question})"
                self._delegated = decision.question
                # Its id is the tick's number: unique for the session's whole life, across resumes.
                self.delegations.start(str(tick), decision.question, decision.text, stream_time, rgb, memories)
            self._remember("response", said, stream_time)
        return TickOutcome(
            session_id=self.session_id, tick=tick, stream_time=stream_time, outcome=decision.kind,
            text=decision.text, question=decision.question, wall_time=time.time(), stages_ms=stages,
            model_called=True, probability=decision.probability, replica=decision.replica,
            prompt_tokens=decision.prompt_tokens, cached_tokens=decision.cached_tokens,
        )

    def _take_back(self, request: TickRequest) -> None:
        """The engine failed tick after tick on prompts that held what the session added since its last decided
        tick: take that back (actors/ingest/untried.py) and tell the client, so that the next ticks decide."""
        turns, instructions = self._untried.take_back(request)
        if turns:
            for turn in turns:
                self.prompt.drop_turn(turn)
            self._question_pending = False
            log.warning("session %s: the engine failed %d ticks in a row on its newest message; dropped %d",
                        self.session_id, FAILURES_TO_TAKE_BACK, len(turns))
            what = f"your message {_excerpt(turns[-1].text)}" if len(turns) == 1 else f"your last {len(turns)} messages"
            self.send(error_message("message_dropped", f"the model could not take {what}; it was left out of "
                                    "the session: send it again in other words"))
        elif instructions is not None:
            dropped = [text for text in self.instructions if text not in instructions]
            log.warning("session %s: the engine failed %d ticks in a row on its new instructions; back to the "
                        "%d before", self.session_id, FAILURES_TO_TAKE_BACK, len(instructions))
            self.instructions = instructions
            self.send(instructions_message(instructions))
            self.send(error_message("instruction_dropped", "the model could not take the instruction "
                                    f"{', '.join(_excerpt(text) for text in dropped)}; it was withdrawn"))
            self._own_write(self._save_instructions(instructions))

    async def _save_instructions(self, instructions: tuple[str, ...]) -> None:
        """Keep instructions taken back out of the session's record too, so that a resumed session has them."""
        try:
            record = await self.services.store.get(self.session_id)
            await self.services.store.update(from_dict(SessionRecord, to_dict(record) | {"instructions": instructions}))
        except Exception as exc:
            log.warning("session %s: instructions taken back but not saved: %r", self.session_id, exc)

    async def _take_pending(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The inbox items and control changes waiting in Redis, or none this tick when Redis does not answer
        within `redis_tick_timeout_s` (no wait at all while it keeps not answering): the read goes on, and the
        next tick takes what it brought, or asks again with the same id."""
        wait = 0.0 if self._reads_late else self.config.redis_tick_timeout_s
        reading = self._read_pending()
        done, _ = await asyncio.wait({reading}, timeout=wait)
        if not done:
            if not self._reads_late:
                log.warning("session %s: Redis did not answer the pending read in %.2f s; ticks go on without it",
                            self.session_id, wait)
            self._reads_late = True
            return [], []
        self._reading = None
        try:
            taken = reading.result()
        except Exception as exc:  # out of reach: the same read is asked again next tick
            log.debug("session %s: pending read failed: %r", self.session_id, exc)
            self._reads_late = True
            return [], []
        self._reads_late = False
        self._read_id = new_read_id()
        return taken

    def _read_pending(self) -> asyncio.Task[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
        """Ask Redis for what waits for the session, unless a read is on its way already."""
        if self._reading is None:
            self._reading = asyncio.create_task(self.services.store.pop_pending(self.session_id, self._read_id),
                                                name=f"pending-{self.session_id}")
        return self._reading

    def _apply(self, changes: list[dict[str, Any]]) -> None:
        """Settings changed through another replica while this one runs the session."""
        for change in changes:
            threshold = change.get("speak_threshold")
            if isinstance(threshold, int | float) and 0.0 <= threshold <= 1.0:
                self.set_speak_threshold(float(threshold))

    # -- recording -----------------------------------------------------------------------------------------

    def _finish(self, outcome: TickOutcome, arrival: float) -> TickOutcome:
        """The outcome with its total time, from the frame's arrival to now."""
        return dataclasses.replace(outcome, stages_ms=dict(outcome.stages_ms) | {
            "total": (time.monotonic() - arrival) * 1000})

    def _send_and_count(self, final: TickOutcome) -> None:
        """Tell the client and the metrics: only once the outcome is this peer's to record."""
        stages = dict(final.stages_ms)
        sending = time.monotonic()
        try:
            self.send(tick_message(final, stages["total"]))
        except Exception:  # a closing channel must not lose the recorded outcome
            log.debug("session %s: could not send tick %d", self.session_id, final.tick, exc_info=True)
        stages["send"] = (time.monotonic() - sending) * 1000
        self.services.metrics.ticks_total.labels(outcome=final.outcome).inc()
        if not final.skipped:
            self.services.metrics.observe_stages(stages)
            self.services.metrics.observe_prompt(final.prompt_tokens, final.cached_tokens)

    async def _record(self, outcome: TickOutcome, arrival: float) -> None:
        await self._log(self._finish(outcome, arrival))

    def _record_now(self, outcome: TickOutcome) -> None:
        """Record without awaiting (from the scheduler or a cancelled tick); the Redis write is owned here."""
        self._own_write(self._log(self._finish(outcome, time.monotonic())))

    def _own_write(self, write: Coroutine[Any, Any, None]) -> None:
        """Run a Redis write in the background; `stop` waits for it."""
        task = asyncio.get_running_loop().create_task(write)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _log(self, outcome: TickOutcome) -> None:
        """Append the outcome to the session's event log while this peer still holds the session, then send it:
        a tick that another replica's peer now numbers is never shown twice. When Redis does not answer in time
        the client hears it at once and the journal writes it behind, in order."""
        if self.lost:
            return
        try:
            landing = await self.journal.record(outcome)
        except asyncio.CancelledError:
            # Closed while its write was on its way: the journal lands it all the same, so the client hears it.
            self._send_and_count(outcome)
            raise
        if landing == "refused":
            self._held_elsewhere(outcome.tick)
            return
        self._send_and_count(outcome)

    async def _log_only(self, outcome: TickOutcome) -> None:
        """Into the event log, not to the client (which never heard of it, or heard already)."""
        if await self.journal.record(outcome) == "refused":
            self._held_elsewhere(outcome.tick)

    def _held_elsewhere(self, tick: int) -> None:
        """Taken over (a reconnect elsewhere) or ended through another replica: this peer stops at once."""
        if self.lost:
            return
        log.info("session %s: held elsewhere now; tick %d not logged, closing here", self.session_id, tick)
        self.lost = True
        self.closed.set()
