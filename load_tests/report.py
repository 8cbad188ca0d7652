"""What a load run measured, per stream and overall, from the ticks each stream heard.

A tick counts when it arrived inside the measured window. A trigger counts when its whole response window
(onset to end of the disc plus the grace time) lies inside it; its delay runs from the onset to the first
response whose decided frame is in that window, in stream seconds (how far into the trigger the decided frame
was) and in wall seconds (from sending the onset frame to hearing the response). A response whose frame is
in no trigger window is a false response.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from load_tests.clip import ClipSpec, TriggerWindow
from load_tests.server_usage import RoleUsage
from load_tests.stream import ReceivedTick

Percentiles = dict[str, float]
LATENCIES = ("total", "overhead", "wait", "sample", "decide")


def percentiles(values: Sequence[float]) -> Percentiles:
    if not values:
        return {"min": math.nan, "p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan, "count": 0}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"min": float(min(values)), "p50": float(p50), "p95": float(p95), "p99": float(p99),
            "max": float(max(values)), "count": len(values)}


@dataclass(frozen=True, slots=True)
class Window:
    """The measured window, in monotonic seconds."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class TriggerResult:
    onset_s: float
    found: bool
    delay_stream_s: float | None = None
    delay_wall_s: float | None = None
    text: str = ""


@dataclass(frozen=True, slots=True)
class StreamReport:
    index: int
    session_id: str
    error: str | None
    ticks: int
    ticks_per_s: float
    outcomes: dict[str, int]
    skipped: dict[str, int]
    latency_ms: dict[str, Percentiles]
    triggers: list[TriggerResult]
    false_responses: int

    @property
    def triggers_found(self) -> int:
        return sum(t.found for t in self.triggers)


@dataclass(frozen=True, slots=True)
class OverallReport:
    streams: int
    connected: int
    window_s: float
    ticks: int
    ticks_per_s: float
    ticks_per_s_per_stream: Percentiles
    outcomes: dict[str, int]
    skipped: dict[str, int]
    latency_ms: dict[str, Percentiles]
    triggers_total: int
    triggers_found: int
    trigger_delay_stream_s: Percentiles
    trigger_delay_wall_s: Percentiles
    false_responses: int


@dataclass(frozen=True, slots=True)
class RoleReport:
    role: str
    replicas: int
    cpu_s: float
    cpu_ms_per_stream_s: float
    cores: float
    rss_mb: float
    rss_mb_per_stream: float


@dataclass(frozen=True, slots=True)
class LoadReport:
    scenario: dict[str, object]
    overall: OverallReport
    streams: list[StreamReport]
    server: list[RoleReport] = field(default_factory=list)
    generator: dict[str, float] = field(default_factory=dict)


def _latencies(ticks: Iterable[ReceivedTick]) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {name: [] for name in LATENCIES}
    for tick in ticks:
        if not tick.decided or "total" not in tick.stages_ms:
            continue
        stages = tick.stages_ms
        for name in ("total", "wait", "sample", "decide"):
            if name in stages:
                values[name].append(stages[name])
        values["overhead"].append(stages["total"] - stages.get("wait", 0.0) - stages.get("decide", 0.0))
    return values


def _skipped(outcomes: Counter[str]) -> dict[str, int]:
    return {k.removeprefix("skipped:"): v for k, v in sorted(outcomes.items()) if k.startswith("skipped:")}


def stream_report(
    index: int, session_id: str, ticks: Sequence[ReceivedTick], started: float | None, window: Window,
    spec: ClipSpec, grace_s: float, error: str | None = None,
) -> StreamReport:
    """One stream's figures; `started` is when its first packet went out (None: it never streamed)."""
    heard = [t for t in ticks if window.start <= t.received_at < window.end]
    outcomes = Counter(t.outcome for t in heard)
    triggers: list[TriggerResult] = []
    false_responses = 0
    if started is not None:
        first, last = window.start - started, window.end - started
        every = spec.windows(0.0, last + spec.seconds, grace_s)
        counted = [w for w in every if w.onset >= first and w.due <= last]
        spoken = [t for t in heard if t.spoke]
        triggers = [_trigger_result(w, spoken, started) for w in counted]
        false_responses = sum(not any(w.holds(t.frame_time) for w in every) for t in spoken)
    return StreamReport(
        index=index, session_id=session_id, error=error, ticks=len(heard),
        ticks_per_s=len(heard) / window.seconds if window.seconds > 0 else 0.0,
        outcomes=dict(sorted(outcomes.items())), skipped=_skipped(outcomes),
        latency_ms={name: percentiles(v) for name, v in _latencies(heard).items()},
        triggers=triggers, false_responses=false_responses,
    )


def _trigger_result(window: TriggerWindow, spoken: Sequence[ReceivedTick], started: float) -> TriggerResult:
    for tick in spoken:
        if window.holds(tick.frame_time):
            return TriggerResult(onset_s=window.onset, found=True, delay_stream_s=tick.frame_time - window.onset,
                                 delay_wall_s=tick.received_at - (started + window.onset), text=tick.text)
    return TriggerResult(onset_s=window.onset, found=False)


def overall_report(
    streams: Sequence[StreamReport], ticks: Sequence[Sequence[ReceivedTick]], window: Window
) -> OverallReport:
    """All streams together; `ticks[i]` are the ticks of `streams[i]` (latency pools every decided tick)."""
    outcomes: Counter[str] = Counter()
    for report in streams:
        outcomes.update(report.outcomes)
    heard = [t for stream in ticks for t in stream if window.start <= t.received_at < window.end]
    found = [t for report in streams for t in report.triggers if t.found]
    total = sum(r.ticks for r in streams)
    return OverallReport(
        streams=len(streams), connected=sum(r.error is None for r in streams), window_s=window.seconds,
        ticks=total, ticks_per_s=total / window.seconds if window.seconds > 0 else 0.0,
        ticks_per_s_per_stream=percentiles([r.ticks_per_s for r in streams if r.error is None]),
        outcomes=dict(sorted(outcomes.items())), skipped=_skipped(outcomes),
        latency_ms={name: percentiles(v) for name, v in _latencies(heard).items()},
        triggers_total=sum(len(r.triggers) for r in streams), triggers_found=len(found),
        trigger_delay_stream_s=percentiles([t.delay_stream_s for t in found if t.delay_stream_s is not None]),
        trigger_delay_wall_s=percentiles([t.delay_wall_s for t in found if t.delay_wall_s is not None]),
        false_responses=sum(r.false_responses for r in streams),
    )


def role_reports(usage: Sequence[RoleUsage], streams: int, window: Window) -> list[RoleReport]:
    """Per role and in all: CPU in ms per stream-second and in cores; RSS and its growth per stream."""
    stream_seconds = max(streams, 1) * window.seconds
    rows = [RoleReport(role=u.role, replicas=u.replicas, cpu_s=u.cpu_s, cpu_ms_per_stream_s=u.cpu_s * 1000 /
                       stream_seconds, cores=u.cpu_s / window.seconds, rss_mb=u.rss_mb,
                       rss_mb_per_stream=u.rss_growth_mb / max(streams, 1)) for u in usage]
    if rows:
        rows.append(RoleReport(
            role="all", replicas=sum(r.replicas for r in rows), cpu_s=sum(r.cpu_s for r in rows),
            cpu_ms_per_stream_s=sum(r.cpu_ms_per_stream_s for r in rows), cores=sum(r.cores for r in rows),
            rss_mb=sum(r.rss_mb for r in rows), rss_mb_per_stream=sum(r.rss_mb_per_stream for r in rows),
        ))
    return rows
