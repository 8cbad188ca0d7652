"""A soak: a load run held for a long time, Vigil's vitals sampled every interval and judged after warm-up.

Every `interval_s` of the measured window it samples each Vigil process (RSS, open fds, threads; the ingest's
asyncio tasks and open peer connections) and the window's latency (p50 / p99 of the decided ticks' `total`), and
prints them. At the end each vital gets a verdict (`trend.py`: flat, or grows X per hour), the ingest's peer
connections and tasks must be back where they were before the streams, and every stream's ticks must be
accounted for in its session's event log (`tick_ledger.py`).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, TextIO

import httpx
import numpy as np

from load_tests.packets import EncodedClip
from load_tests.report import LoadReport, Window
from load_tests.runner import LoadRun, Scenario
from load_tests.server_usage import VigilProcesses
from load_tests.soak_table import render_window
from load_tests.stream import LoadStream
from load_tests.tick_ledger import TickLedger, account, logged_ticks
from load_tests.trend import Trend, trend, warmup_windows
from load_tests.vitals import INGEST_VITALS, PROCESS_VITALS, ProcessVitals, VitalsProbe

MAX_SOAK_SECONDS = 6 * 3600.0
SETTLE_S = 15.0  # after the streams closed, how long the ingest has to close their peer connections
TASKS_SETTLE_SLACK = 5  # asyncio tasks after the streams closed may exceed those before by this many
LEDGER_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class SoakScenario(Scenario):
    """A load scenario sampled every `interval_s`; it may run for hours."""

    interval_s: float = 30.0
    longest_s: ClassVar[float] = MAX_SOAK_SECONDS

    def __post_init__(self) -> None:
        Scenario.__post_init__(self)
        if not 1.0 <= self.interval_s <= self.seconds:
            raise ValueError(f"an interval of {self.interval_s} s: must be 1 s to the run's {self.seconds:.0f} s")

    @property
    def windows(self) -> int:
        return math.ceil(self.seconds / self.interval_s - 1e-9)


@dataclass(frozen=True, slots=True)
class SoakWindow:
    """One interval: the ticks heard in it, and every process's vitals at its end."""

    index: int  # from 1
    start_s: float  # since the measured window began
    end_s: float
    ticks: int
    ticks_per_s_per_stream: float
    skipped: int
    decided: int
    p50_ms: float
    p99_ms: float
    processes: list[ProcessVitals]


@dataclass(frozen=True, slots=True)
class Settling:
    """One ingest replica before the streams and once they closed (NaN: not read)."""

    name: str
    peers_before: float
    peers_after: float
    tasks_before: float
    tasks_after: float

    @property
    def ok(self) -> bool:
        return self.peers_after <= self.peers_before and self.tasks_after <= self.tasks_before + TASKS_SETTLE_SLACK


@dataclass(frozen=True, slots=True)
class SoakReport:
    scenario: dict[str, object]
    tick_interval_s: float
    before: list[ProcessVitals]
    windows: list[SoakWindow]
    after: list[ProcessVitals]
    warmup_windows: int
    trends: list[Trend]
    settling: list[Settling]
    ledgers: list[TickLedger]
    load: LoadReport

    @property
    def passed(self) -> bool:
        return (all(t.flat for t in self.trends) and bool(self.trends) and all(s.ok for s in self.settling)
                and bool(self.settling) and all(ledger.ok for ledger in self.ledgers))


def window_figures(index: int, streams: Sequence[LoadStream], start: float, w_start: float, w_end: float,
                   processes: list[ProcessVitals]) -> SoakWindow:
    heard = [t for s in streams for t in s.received if w_start <= t.received_at < w_end]
    totals = [t.stages_ms["total"] for t in heard if t.decided and "total" in t.stages_ms]
    p50, p99 = np.percentile(totals, [50, 99]) if totals else (math.nan, math.nan)
    connected = max(1, sum(s.error is None for s in streams))
    outcomes = Counter(t.decided for t in heard)
    return SoakWindow(index=index, start_s=w_start - start, end_s=w_end - start, ticks=len(heard),
                      ticks_per_s_per_stream=len(heard) / connected / max(w_end - w_start, 1e-9),
                      skipped=outcomes[False], decided=outcomes[True], p50_ms=float(p50), p99_ms=float(p99),
                      processes=processes)


def trends(windows: Sequence[SoakWindow], warmup: int) -> list[Trend]:
    """Each process's vitals and the streams' latency over the windows after warm-up."""
    judged = windows[warmup:]
    times = [w.end_s for w in judged]
    names = sorted({p.name for w in judged for p in w.processes})
    found = []
    for name in names:
        samples = [next((p for p in w.processes if p.name == name), None) for w in judged]
        for vital in PROCESS_VITALS + INGEST_VITALS:
            values = [p.vital(vital) if p is not None else None for p in samples]
            if any(v is not None for v in values):
                found.append(trend(name, vital, times, values, expected_samples=len(judged)))
    for vital in ("p50_ms", "p99_ms"):
        found.append(trend("streams", vital, times, [getattr(w, vital) for w in judged]))
    return found


def settling(before: Sequence[ProcessVitals], after: Sequence[ProcessVitals]) -> list[Settling]:
    earlier = {p.pid: p for p in before}
    rows = []
    for process in after:
        if process.peer_connections is None and process.asyncio_tasks is None:
            continue  # not an ingest replica
        # Before the streams only one ingest replica was reached; another is compared with nothing.
        then = earlier.get(process.pid, ProcessVitals(process.role, process.pid, peer_connections=0.0))
        rows.append(Settling(process.name, _known(then.peer_connections), _known(process.peer_connections),
                             _known(then.asyncio_tasks), _known(process.asyncio_tasks)))
    return rows


def _known(value: float | None) -> float:
    return math.nan if value is None else value


class SoakRun(LoadRun):
    """One soak; `soak()` returns its report. Each window's table goes to `out` as it ends."""

    scenario: SoakScenario

    def __init__(self, scenario: SoakScenario, clip: EncodedClip, processes: VigilProcesses | None = None,
                 progress: TextIO = sys.stderr, out: TextIO = sys.stdout) -> None:
        super().__init__(scenario, clip, processes, progress)
        self.out = out
        self.windows: list[SoakWindow] = []
        self._probe: VitalsProbe | None = None

    async def soak(self) -> SoakReport:
        async with httpx.AsyncClient(base_url=self.scenario.url, timeout=15.0) as http:
            self._probe = probe = VitalsProbe(http, self.processes)
            info = (await http.get("/v1/info")).raise_for_status().json()
            interval_s = float(info.get("tick_interval_s") or 1.0)
            before = await probe.sample()
            load = await self.run()  # connects, warms up, measures window by window (_measure), closes
            after = await self._settled(probe, before)
            ledgers = await asyncio.wait_for(
                asyncio.gather(*(self._ledger(http, s, interval_s) for s in self.streams)), LEDGER_TIMEOUT_S)
        warmup = warmup_windows(len(self.windows))
        return SoakReport(
            scenario=self.scenario.described(), tick_interval_s=interval_s, before=before, windows=self.windows,
            after=after, warmup_windows=warmup, trends=trends(self.windows, warmup),
            settling=settling(before, after), ledgers=list(ledgers), load=load,
        )

    def _routes(self) -> list[Mapping[str, str]]:
        """Headers that reach each ingest replica holding a stream (one session each), or any one replica."""
        by_replica = {s.replica: {"x-session-id": s.session_id} for s in self.streams if s.session and s.replica}
        return list(by_replica.values()) or [{}]

    async def _measure(self) -> Window:
        assert self._probe is not None
        scenario = self.scenario
        start = time.monotonic()
        end = start + scenario.seconds
        for index in range(1, scenario.windows + 1):
            w_start = start + (index - 1) * scenario.interval_s
            w_end = min(start + index * scenario.interval_s, end)
            await asyncio.sleep(max(0.0, w_end - time.monotonic()))
            processes = await self._probe.sample(self._routes())
            window = window_figures(index, self.streams, start, w_start, w_end, processes)
            self.windows.append(window)
            print(render_window(window, scenario), file=self.out, flush=True)
        return Window(start, end)

    async def _settled(self, probe: VitalsProbe, before: Sequence[ProcessVitals]) -> list[ProcessVitals]:
        """The processes once the ingest is back where it was before the streams, or SETTLE_S after they closed."""
        routes = self._routes()
        deadline = time.monotonic() + SETTLE_S
        while True:
            after = await probe.sample(routes)
            if all(row.ok for row in settling(before, after)) or time.monotonic() > deadline:
                return after
            await asyncio.sleep(0.5)

    async def _ledger(self, http: httpx.AsyncClient, stream: LoadStream, interval_s: float) -> TickLedger:
        session_id = str(stream.session.get("session_id", ""))
        times = (stream.connect_began, stream.connected_at, stream.closing_at, stream.closed_at)
        if stream.error is not None or None in times:
            return TickLedger(stream.index, session_id, 0, 0, 0, 0.0, error=stream.error or "never connected")
        began, connected, closing, closed = (float(t) for t in times if t is not None)
        try:
            logged = await logged_ticks(http, session_id, str(stream.session["token"]))
        except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
            return TickLedger(stream.index, session_id, 0, 0, 0, closing - connected,
                              error=f"event log not read: {exc!r}"[:300])
        return account(stream.index, session_id, logged, (t.tick for t in stream.received), interval_s,
                       began, connected, closing, closed)
