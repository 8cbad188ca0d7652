"""A load run: connect N replaying streams, let them warm up, measure a window, close them, report.

Everything is bounded: streams and seconds by `Scenario`, connecting by a budget, closing by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, TextIO
from urllib.parse import urlparse

import numpy as np
import psutil

from actors.ingest.ice import restrict_host_addresses
from load_tests.clip import ClipSpec
from load_tests.packets import DEFAULT_CACHE_DIR, EncodedClip
from load_tests.replay import PacketReplayTrack, send_temporal_layers
from load_tests.report import LoadReport, Window, overall_report, role_reports, stream_report
from load_tests.server_usage import RoleUsage, VigilProcesses, role_usage
from load_tests.stream import LoadStream

log = logging.getLogger(__name__)

MAX_STREAMS = 256
MAX_SECONDS = 1800.0
MAX_WARMUP_S = 120.0
CLOSE_TIMEOUT_S = 20.0
DEFAULT_INSTRUCTIONS = ("tell me when a red disc shows",)


@dataclass(frozen=True, slots=True)
class Scenario:
    """What to run: against which Vigil, how many streams, for how long, with which clip and instructions."""

    url: str = "http://127.0.0.1:8000"
    streams: int = 8
    seconds: float = 30.0
    warmup_s: float = 5.0
    clip: ClipSpec = field(default_factory=ClipSpec)
    instructions: tuple[str, ...] = DEFAULT_INSTRUCTIONS
    grace_s: float = 2.0
    connect_concurrency: int = 4
    progress_s: float = 5.0
    cache_dir: Path = DEFAULT_CACHE_DIR
    api_key: str | None = field(default=None, repr=False)
    longest_s: ClassVar[float] = MAX_SECONDS  # a soak (load_tests/soak.py) runs longer

    def __post_init__(self) -> None:
        if not 1 <= self.streams <= MAX_STREAMS:
            raise ValueError(f"{self.streams} streams: must be 1 to {MAX_STREAMS}")
        if not 1.0 <= self.seconds <= self.longest_s:
            raise ValueError(f"{self.seconds} s: must be 1 to {self.longest_s:.0f} s")
        if not 0.0 <= self.warmup_s <= MAX_WARMUP_S:
            raise ValueError(f"warm-up of {self.warmup_s} s: must be 0 to {MAX_WARMUP_S:.0f} s")
        if self.grace_s < 0 or self.connect_concurrency < 1 or self.progress_s <= 0:
            raise ValueError("grace_s must be >= 0, connect_concurrency >= 1 and progress_s > 0")

    @property
    def loopback(self) -> bool:
        host = urlparse(self.url).hostname or ""
        return host == "localhost" or host.startswith("127.") or host == "::1"

    @property
    def connect_budget_s(self) -> float:
        return 30.0 + 3.0 * self.streams / self.connect_concurrency

    def described(self) -> dict[str, object]:
        """The scenario for the report (never the API key)."""
        described = {k: v for k, v in asdict(self).items() if k != "api_key"}
        described["cache_dir"] = str(self.cache_dir)
        return described


class LoadRun:
    """One run of a scenario; `run()` returns its report."""

    def __init__(self, scenario: Scenario, clip: EncodedClip, processes: VigilProcesses | None = None,
                 progress: TextIO = sys.stderr) -> None:
        self.scenario = scenario
        self.clip = clip
        self.processes = processes
        self.progress = progress
        send_temporal_layers(clip)  # a clip with temporal layers goes out as the page sends it
        # Each stream starts its clip at a moment of its own in Vigil's tick second (the same for the same run).
        starts = random.Random(clip.spec.seed)
        self.streams = [LoadStream(i, scenario.url, PacketReplayTrack(clip, start_delay_s=starts.random()),
                                   api_key=scenario.api_key) for i in range(scenario.streams)]

    async def run(self) -> LoadReport:
        scenario = self.scenario
        if scenario.loopback:
            restrict_host_addresses(["127.0.0.1"])
        baseline = self.processes.sample() if self.processes else {}
        myself = psutil.Process()
        try:
            await self._connect_all()
            connected = [s for s in self.streams if s.error is None]
            if not connected:
                raise RuntimeError(f"no stream connected to {scenario.url}: {self.streams[0].error}")
            self._say(f"{len(connected)}/{scenario.streams} streams connected (VP8, "
                      f"{self.clip.bytes_per_s * 8 / 1000:.0f} kbit/s each); warming up {scenario.warmup_s:.0f} s")
            await asyncio.sleep(scenario.warmup_s)
            before = self.processes.sample() if self.processes else {}
            mine_before = sum(myself.cpu_times()[:2])
            window = await self._measure()
            after = self.processes.sample() if self.processes else {}
            mine_cpu = sum(myself.cpu_times()[:2]) - mine_before
        finally:
            await self._close_all()
        return self._report(window, role_usage(baseline, before, after), mine_cpu, myself.memory_info().rss)

    async def _connect_all(self) -> None:
        gate = asyncio.Semaphore(self.scenario.connect_concurrency)

        async def connect(stream: LoadStream) -> None:
            async with gate:
                try:
                    await stream.connect(instructions=list(self.scenario.instructions))
                except Exception as exc:
                    stream.error = f"{type(exc).__name__}: {exc}"[:300]
                    log.warning("stream %d did not connect: %s", stream.index, stream.error)

        tasks = [asyncio.create_task(connect(s), name=f"load-connect-{s.index}") for s in self.streams]
        _, pending = await asyncio.wait(tasks, timeout=self.scenario.connect_budget_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream, task in zip(self.streams, tasks, strict=True):
            if task in pending and stream.error is None:
                stream.error = f"not connected within {self.scenario.connect_budget_s:.0f} s"

    async def _measure(self) -> Window:
        scenario = self.scenario
        start = time.monotonic()
        end = start + scenario.seconds
        while (now := time.monotonic()) < end:
            await asyncio.sleep(min(scenario.progress_s, end - now))
            self._say(self._progress_line(Window(start, min(time.monotonic(), end))))
        return Window(start, end)

    def _progress_line(self, window: Window) -> str:
        heard = [t for s in self.streams for t in s.received if t.received_at >= window.start]
        outcomes = Counter(t.outcome for t in heard)
        totals = [t.stages_ms["total"] for t in heard if t.decided and "total" in t.stages_ms]
        p50 = f"{np.percentile(totals, 50):.0f} ms" if totals else "-"
        mix = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "no ticks yet"
        return (f"{window.seconds:5.0f}/{self.scenario.seconds:.0f} s: {len(heard)} ticks "
                f"({len(heard) / max(window.seconds, 1e-9):.1f}/s) {mix}; total p50 {p50}")

    async def _close_all(self) -> None:
        closing = asyncio.gather(*(s.close() for s in self.streams), return_exceptions=True)
        try:
            await asyncio.wait_for(closing, CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("streams did not close within %.0f s", CLOSE_TIMEOUT_S)
            with contextlib.suppress(asyncio.CancelledError):
                await closing

    def _report(self, window: Window, usage: list[RoleUsage], mine_cpu_s: float, mine_rss: int) -> LoadReport:
        scenario = self.scenario
        streams = [
            stream_report(s.index, str(s.session.get("session_id", "")), s.received, s.track.started, window,
                          self.clip.spec, scenario.grace_s, s.error)
            for s in self.streams
        ]
        connected = sum(s.error is None for s in self.streams)
        stream_seconds = max(connected, 1) * window.seconds
        return LoadReport(
            scenario=scenario.described(),
            overall=overall_report(streams, [s.received for s in self.streams], window),
            streams=streams,
            server=role_reports(usage, connected, window),
            generator={"cpu_ms_per_stream_s": mine_cpu_s * 1000 / stream_seconds,
                       "cores": mine_cpu_s / window.seconds, "rss_mb": mine_rss / 2**20},
        )

    def _say(self, line: str) -> None:
        print(f"[load] {line}", file=self.progress, flush=True)
