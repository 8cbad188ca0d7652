"""A soak as tables on screen (one per window as it ends, the verdict at the end) and as a JSON file."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from load_tests.table import _finite, _rows, report_payload
from load_tests.vitals import ProcessVitals

if TYPE_CHECKING:
    from load_tests.soak import SoakReport, SoakScenario, SoakWindow

PROCESS_HEADER = ("process", "RSS (MB)", "fds", "threads", "asyncio tasks", "peer connections")
TREND_HEADER = ("process", "vital", "first", "last", "median", "slope per hour", "noise floor", "verdict")
SETTLING_HEADER = ("ingest", "peer connections before / after", "asyncio tasks before / after", "verdict")
LEDGER_HEADER = ("stream", "session", "ticks logged", "expected", "streamed (s)", "verdict")
VITAL_NAMES = {"rss_mb": "RSS (MB)", "fds": "open fds", "threads": "threads", "asyncio_tasks": "asyncio tasks",
               "peer_connections": "peer connections", "p50_ms": "total p50 (ms)", "p99_ms": "total p99 (ms)"}


def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def process_rows(processes: list[ProcessVitals]) -> list[str]:
    return _rows(PROCESS_HEADER, [(p.name, _n(p.rss_mb, 1), _n(p.fds), _n(p.threads), _n(p.asyncio_tasks),
                                   _n(p.peer_connections)) for p in processes])


def render_window(window: SoakWindow, scenario: SoakScenario) -> str:
    head = (f"[soak] window {window.index}/{scenario.windows}, {window.start_s:.0f}-{window.end_s:.0f} s: "
            f"{window.ticks} ticks ({window.ticks_per_s_per_stream:.2f}/s per stream), {window.skipped} skipped; "
            f"decided total p50 {_n(window.p50_ms)} / p99 {_n(window.p99_ms)} ms")
    return "\n".join([head, *process_rows(window.processes), ""])


def render_soak(report: SoakReport) -> str:
    """The verdict: each vital's trend after warm-up, the ingest after the streams, every stream's ticks."""
    judged = report.windows[report.warmup_windows:]
    lines = []
    if judged:
        lines.append(f"verdict on windows {judged[0].index}-{judged[-1].index} ({judged[0].end_s:.0f}-"
                     f"{judged[-1].end_s:.0f} s), after {report.warmup_windows} warm-up windows:")
    lines += _rows(TREND_HEADER, [
        (t.subject, VITAL_NAMES.get(t.vital, t.vital), _n(t.first, 1), _n(t.last, 1), _n(t.median, 1),
         f"{_n(t.slope_per_hour, 1)} {t.unit}", f"{_n(t.allowed, 1)} {t.unit}", t.described())
        for t in report.trends])
    lines += ["", "the ingest before the streams and after they closed:"]
    lines += _rows(SETTLING_HEADER, [
        (s.name, f"{_n(s.peers_before)} / {_n(s.peers_after)}", f"{_n(s.tasks_before)} / {_n(s.tasks_after)}",
         "ok" if s.ok else "not back") for s in report.settling])
    lines += ["", f"ticks in each session's event log (one every {report.tick_interval_s:g} s):"]
    lines += _rows(LEDGER_HEADER, [
        (str(t.stream), t.session_id, str(t.logged), f"{t.expected_min}-{t.expected_max}", f"{t.streamed_s:.0f}",
         t.described()) for t in report.ledgers])
    lines += ["", summary(report)]
    return "\n".join(lines)


def summary(report: SoakReport) -> str:
    growing = [f"{t.subject} {VITAL_NAMES.get(t.vital, t.vital)} {t.described()}" for t in report.trends
               if not t.flat]
    unsettled = [f"{s.name} not back after the streams" for s in report.settling if not s.ok]
    unaccounted = [f"stream {t.stream}: {t.described()}" for t in report.ledgers if not t.ok]
    if report.passed:
        return (f"SOAK PASSED: {len(report.trends)} vitals flat, the ingest back where it was, "
                f"{len(report.ledgers)}/{len(report.ledgers)} streams' ticks accounted for")
    problems = growing + unsettled + unaccounted or ["nothing judged"]
    return "SOAK FAILED: " + "; ".join(problems)


def soak_payload(report: SoakReport) -> dict[str, Any]:
    payload = {
        "scenario": report.scenario, "tick_interval_s": report.tick_interval_s,
        "passed": report.passed, "summary": summary(report), "warmup_windows": report.warmup_windows,
        "before": [asdict(p) for p in report.before], "windows": [asdict(w) for w in report.windows],
        "after": [asdict(p) for p in report.after],
        "trends": [asdict(t) | {"flat": t.flat, "described": t.described()} for t in report.trends],
        "settling": [asdict(s) | {"ok": s.ok} for s in report.settling],
        "ticks": [asdict(t) | {"ok": t.ok, "described": t.described()} for t in report.ledgers],
    }
    return dict(_finite(payload)) | {"load": report_payload(report.load)}


def write_soak_json(report: SoakReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(soak_payload(report), indent=2, allow_nan=False) + "\n")
