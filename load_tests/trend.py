"""Whether a vital stays flat over a soak: its slope after warm-up, against a tolerance.

A vital grows when its fitted change over the judged span is above a noise floor (what a short run cannot tell
from noise) and its slope is above a rate per hour (the drift a long run allows). The slope is Theil-Sen's, the
median of the slopes between every two samples, so one slow window (a neighbour's burst of CPU, a collection)
does not make a trend, while a steady leak does.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

WARMUP_SHARE = 0.2  # the first 20 % of the windows, and at least WARMUP_MIN_WINDOWS, are warm-up
WARMUP_MIN_WINDOWS = 2
MIN_SAMPLES = 3  # fewer samples after warm-up: no verdict


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How much a vital may rise: `floor` over the judged span (at least `relative` times its median level)
    and `per_hour`; it grows only when it rises more than both."""

    unit: str
    floor: float
    per_hour: float
    relative: float = 0.0

    def allowed(self, level: float) -> float:
        return max(self.floor, self.relative * abs(level))


TOLERANCES: dict[str, Tolerance] = {
    # A replica's RSS swings by a few MB with what it is doing when sampled (the engine's more than others').
    "rss_mb": Tolerance("MB", floor=8.0, per_hour=10.0, relative=0.02),
    "fds": Tolerance("fds", floor=3.0, per_hour=3.0),
    "threads": Tolerance("threads", floor=2.0, per_hour=2.0),
    "asyncio_tasks": Tolerance("tasks", floor=10.0, per_hour=10.0, relative=0.1),
    "peer_connections": Tolerance("connections", floor=0.5, per_hour=0.0),
    "p50_ms": Tolerance("ms", floor=50.0, per_hour=50.0, relative=0.25),
    "p99_ms": Tolerance("ms", floor=100.0, per_hour=100.0, relative=0.5),
}

FLAT, GROWS, TOO_FEW, NOT_EVERY_WINDOW = "flat", "grows", "too few windows", "not in every window"


def warmup_windows(count: int) -> int:
    """How many of `count` windows are warm-up: the first 20 %, at least 2."""
    return min(count, max(WARMUP_MIN_WINDOWS, math.ceil(WARMUP_SHARE * count)))


def theil_sen(times: Sequence[float], values: Sequence[float]) -> float:
    """The median of the slopes between every two samples (value units per time unit)."""
    slopes = [(values[j] - values[i]) / (times[j] - times[i])
              for i in range(len(times)) for j in range(i + 1, len(times)) if times[j] != times[i]]
    return statistics.median(slopes) if slopes else 0.0


@dataclass(frozen=True, slots=True)
class Trend:
    """One vital of one subject (a process, or the streams' latency) after warm-up."""

    subject: str
    vital: str
    unit: str
    samples: int
    first: float
    last: float
    median: float
    slope_per_hour: float
    change: float  # the slope times the judged span
    allowed: float  # the change under which it is noise
    verdict: str

    @property
    def flat(self) -> bool:
        return self.verdict == FLAT

    def described(self) -> str:
        if self.verdict == GROWS:
            return f"grows {self.slope_per_hour:.1f} {self.unit}/h"
        if self.verdict == FLAT:
            return f"flat ({self.slope_per_hour:+.1f} {self.unit}/h)"
        return self.verdict


def trend(subject: str, vital: str, times_s: Sequence[float], values: Sequence[float | None],
          expected_samples: int | None = None) -> Trend:
    """The verdict on one vital sampled at `times_s` (seconds) after warm-up; a None sample is one not taken.
    A subject missing from some of `expected_samples` windows (a replica replaced) is not judged flat."""
    tolerance = TOLERANCES[vital]
    taken = [(t, v) for t, v in zip(times_s, values, strict=True) if v is not None and math.isfinite(v)]
    times = [t for t, _ in taken]
    levels = [v for _, v in taken]
    if len(taken) < MIN_SAMPLES:
        nan = math.nan
        return Trend(subject, vital, tolerance.unit, len(taken), levels[0] if levels else nan,
                     levels[-1] if levels else nan, statistics.median(levels) if levels else nan, nan, nan, nan,
                     TOO_FEW)
    slope = theil_sen(times, levels)
    median = statistics.median(levels)
    change = slope * (times[-1] - times[0])
    allowed = tolerance.allowed(median)
    if expected_samples is not None and len(taken) < expected_samples:
        verdict = NOT_EVERY_WINDOW
    elif change > allowed and slope * 3600 > tolerance.per_hour:
        verdict = GROWS
    else:
        verdict = FLAT
    return Trend(subject, vital, tolerance.unit, len(taken), levels[0], levels[-1], median, slope * 3600, change,
                 allowed, verdict)
