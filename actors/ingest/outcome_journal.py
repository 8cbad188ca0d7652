"""A session's tick outcomes on their way to its event log in Redis, written behind when Redis is out of reach.

Each outcome is written at once, and its tick waits at most `wait_s` to learn that it landed. When Redis stalls
or restarts, outcomes are held in order (at most `capacity`) and written, oldest first, with backoff, once it
answers again; the client hears each decision meanwhile. Every write keeps the session's ownership (a session
taken over elsewhere refuses this replica's writes, whenever they land) and is idempotent per tick (a write
replayed after its reply was lost appends nothing), so a replay never logs a tick twice. Outcomes past
`capacity` are dropped, counted, and once Redis is back one `skipped:unlogged` outcome in their place says how
many and which.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from actors.common.messages import TickOutcome
from actors.common.metrics import VigilMetrics
from actors.common.session_store import REDIS_UNREACHABLE

log = logging.getLogger(__name__)

WriteFn = Callable[[TickOutcome], Awaitable[bool]]  # True: in the log (now or before); False: not this owner's
Landing = Literal["recorded", "held", "dropped", "refused"]
_Landed = Literal["recorded", "refused", "failed"]  # what became of one write
UNLOGGED = "skipped:unlogged"


@dataclass(frozen=True, slots=True)
class JournalSettings:
    capacity: int = 300  # outcomes held while Redis is out of reach (five minutes of ticks)
    wait_s: float = 0.25  # how long a tick waits to learn that its outcome landed before it goes on
    attempt_timeout_s: float = 1.0  # one write's bound; past it, the write is sent again
    backoff_s: float = 0.1  # first pause between attempts, doubled up to `backoff_max_s`
    backoff_max_s: float = 1.0


@dataclass(slots=True)
class _Drops:
    """Outcomes dropped one after another (the buffer was full): one `skipped:unlogged` outcome stands for them."""

    first: TickOutcome
    last_tick: int
    count: int = 1

    def outcome(self) -> TickOutcome:
        return unlogged(self.first.session_id, self.first.tick, self.last_tick, self.first.stream_time,
                        f"{self.count} outcomes not logged (ticks {_ticks(self.first.tick, self.last_tick)}): Redis "
                        "was out of reach and the replica's buffer for them was full", self.first.wall_time)


def _ticks(first: int, last: int) -> str:
    return str(first) if last <= first else f"{first}-{last}"


def unlogged(session_id: str, first: int, last: int, stream_time: float, why: str,
             wall_time: float | None = None) -> TickOutcome:
    """The one `skipped:unlogged` outcome that stands for ticks `first`..`last` in the event log."""
    return TickOutcome(session_id=session_id, tick=first, stream_time=stream_time, outcome=UNLOGGED, text=why,
                       wall_time=time.time() if wall_time is None else wall_time, through=last if last > first else 0)


def lost_with_their_replica(session_id: str, first: int, last: int, stream_time: float) -> TickOutcome:
    """What a resumed session logs for ticks it finds numbered and never recorded before it."""
    ticks = f"tick{'s' if last > first else ''} {_ticks(first, last)}"
    return unlogged(session_id, first, last, stream_time, f"{ticks} not logged: in flight, or held for Redis, when "
                    "the session's replica was lost or its connection taken over")


@dataclass(slots=True)
class _Entry:
    outcome: TickOutcome | None  # None: the marker of `drops`
    landed: asyncio.Future[_Landed]
    drops: _Drops | None = None
    held: bool = False  # its tick went on without waiting for it

    def to_write(self) -> TickOutcome:
        if self.outcome is not None:
            return self.outcome
        assert self.drops is not None
        return self.drops.outcome()


class OutcomeJournal:
    """Owns one session's writer task: `record` each outcome, `close` to land what is held (bounded)."""

    def __init__(
        self,
        session_id: str,
        write: WriteFn,
        metrics: VigilMetrics,
        settings: JournalSettings | None = None,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        self.session_id = session_id
        self._write = write
        self.metrics = metrics
        self.settings = settings or JournalSettings()
        self._on_refused = on_refused  # told the tick whose write found the session held elsewhere
        self._queue: deque[_Entry] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing held
        self._idle.set()
        self._closed = False
        self._writer: asyncio.Task[None] | None = None
        self._open_drops: _Drops | None = None  # dropped outcomes whose marker is not written yet
        self.behind = False  # an outcome did not land in time: the next ones are held at once, not waited for
        self.refused = False
        self.held = 0  # outcomes that did not land within `wait_s` (they land later, in order)
        self.landed_late = 0  # of those, the ones written since
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Outcomes held, not yet in the log."""
        return sum(1 for entry in self._queue if entry.outcome is not None)

    async def record(self, outcome: TickOutcome) -> Landing:
        """Write `outcome` to the event log: "recorded" when it landed within `wait_s`, "held" when it lands
        later (in order), "dropped" when the buffer is full, "refused" when the session is held elsewhere."""
        if self.refused:
            return "refused"
        if self._closed:
            self.dropped += 1
            self.metrics.outcomes_dropped_total.inc()
            return "dropped"
        if self.pending >= self.settings.capacity:
            self._drop(outcome)
            return "dropped"
        entry = _Entry(outcome, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        self._idle.clear()
        self.metrics.outcomes_pending.inc()
        self._start()
        if not self.behind:
            try:
                landed = await asyncio.wait_for(asyncio.shield(entry.landed), self.settings.wait_s)
            except TimeoutError:
                self.behind = True
            else:
                return "dropped" if landed == "failed" else landed
        entry.held = True
        self.held += 1
        self.metrics.outcomes_held_total.inc()
        return "held"

    def _drop(self, outcome: TickOutcome) -> None:
        self.dropped += 1
        self.metrics.outcomes_dropped_total.inc()
        if self._open_drops is None:
            log.warning("session %s: Redis out of reach and %d outcomes held; tick %d and the next are dropped "
                        "from the event log until it is back", self.session_id, self.settings.capacity, outcome.tick)
            self._open_drops = _Drops(outcome, outcome.tick)
            # The marker takes the dropped outcomes' place in the order: after what is held, before what follows.
            self._queue.append(_Entry(None, asyncio.get_running_loop().create_future(), self._open_drops))
            self._idle.clear()
            self._start()
        else:
            self._open_drops.count += 1
            self._open_drops.last_tick = max(self._open_drops.last_tick, outcome.tick)

    def _start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain(), name=f"outcome-journal-{self.session_id}")
        self._wake.set()

    async def close(self, timeout_s: float = 3.0) -> None:
        """Give held outcomes `timeout_s` to land, then stop the writer; what is left is counted as dropped."""
        self._closed = True
        if self._writer is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        left = self.pending
        if left:
            log.warning("session %s: %d outcomes not logged at close: Redis out of reach", self.session_id, left)
            self.dropped += left
            self.metrics.outcomes_dropped_total.inc(left)
            self.metrics.outcomes_pending.dec(left)
        self._queue.clear()

    async def _drain(self) -> None:
        pause = self.settings.backoff_s
        failing_since: float | None = None
        while True:
            if not self._queue:
                self.behind = False
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            entry = self._queue[0]
            if entry.drops is not None and entry.drops is self._open_drops:
                self._open_drops = None  # dropped from here on: a new marker
            outcome = entry.to_write()
            landed: _Landed
            try:
                written = await asyncio.wait_for(self._write(outcome), self.settings.attempt_timeout_s)
                landed = "recorded" if written else "refused"
            except asyncio.CancelledError:
                raise
            except REDIS_UNREACHABLE as exc:
                self.behind = True
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("session %s: Redis out of reach (%r); outcomes held from tick %d on",
                                self.session_id, exc, outcome.tick)
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.settings.backoff_max_s)
                continue
            except Exception:
                # Not Redis being away (an outcome it refuses, say): sending it again cannot help.
                log.exception("session %s: tick %d cannot be logged", self.session_id, outcome.tick)
                landed = "failed"
                self.dropped += 1
                self.metrics.outcomes_dropped_total.inc()
            pause = self.settings.backoff_s
            if failing_since is not None:
                log.info("session %s: Redis answers again after %.1f s; %d held outcomes landing", self.session_id,
                         time.monotonic() - failing_since, self.pending)
                failing_since = None
            self._queue.popleft()
            if entry.outcome is not None:
                self.metrics.outcomes_pending.dec()
            if entry.held and landed == "recorded":
                self.landed_late += 1
            entry.landed.set_result(landed)
            if landed == "refused":
                self._refuse(outcome.tick)
                return

    def _refuse(self, tick: int) -> None:
        """The session is held elsewhere now: nothing more of this replica's lands."""
        self.refused = True
        left = self.pending
        for entry in self._queue:
            if not entry.landed.done():
                entry.landed.set_result("refused")
        self._queue.clear()
        self._idle.set()
        if left:
            self.metrics.outcomes_pending.dec(left)
            log.info("session %s: held elsewhere now; %d held outcomes not logged here", self.session_id, left)
        if self._on_refused is not None:
            self._on_refused(tick)
