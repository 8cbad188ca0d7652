"""A load report as tables on screen and as a JSON file."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from load_tests.report import LoadReport, Percentiles, StreamReport

STREAM_HEADER = ("stream", "ticks/s", "outcomes", "triggers found", "delay p50 stream / wall (s)", "false resp.",
                 "total p50 / p95 / p99 (ms)", "overhead p50 / p99 (ms)")
ROLE_HEADER = ("role", "replicas", "CPU ms per stream-s", "cores", "RSS (MB)", "RSS growth per stream (MB)")


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def _s(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _outcomes(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in outcomes.items()) or "-"


def _latency(p: Percentiles) -> str:
    return f"{_ms(p['p50'])} / {_ms(p['p95'])} / {_ms(p['p99'])}"


def _rows(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _stream_row(r: StreamReport) -> tuple[str, ...]:
    stream = [t.delay_stream_s for t in r.triggers if t.delay_stream_s is not None]
    wall = [t.delay_wall_s for t in r.triggers if t.delay_wall_s is not None]
    delays = f"{_s(statistics.median(stream))} / {_s(statistics.median(wall))}" if stream and wall else "-"
    outcomes = _outcomes(r.outcomes) if r.error is None else f"failed: {r.error}"
    return (str(r.index), f"{r.ticks_per_s:.2f}", outcomes, f"{r.triggers_found}/{len(r.triggers)}", delays,
            str(r.false_responses), _latency(r.latency_ms["total"]),
            f"{_ms(r.latency_ms['overhead']['p50'])} / {_ms(r.latency_ms['overhead']['p99'])}")


def render(report: LoadReport) -> str:
    """Per-stream rows, the overall figures and (when measured) Vigil's CPU and memory per role."""
    o = report.overall
    lines = _rows(STREAM_HEADER, [_stream_row(r) for r in report.streams])
    lines.append("")
    delay_s, delay_w = o.trigger_delay_stream_s, o.trigger_delay_wall_s
    lines += [
        f"{o.connected}/{o.streams} streams over {o.window_s:.1f} s: {o.ticks} ticks, {o.ticks_per_s:.2f}/s "
        f"(per stream min {_s(o.ticks_per_s_per_stream['min'])}, p50 {_s(o.ticks_per_s_per_stream['p50'])})",
        f"outcomes: {_outcomes(o.outcomes)}; skipped by reason: {_outcomes(o.skipped)}",
        f"triggers found {o.triggers_found}/{o.triggers_total}; first response after onset, stream time "
        f"p50 {_s(delay_s['p50'])} / max {_s(delay_s['max'])} s, wall time p50 {_s(delay_w['p50'])} / "
        f"p95 {_s(delay_w['p95'])} / max {_s(delay_w['max'])} s; false responses {o.false_responses}",
    ]
    for name in ("total", "overhead", "wait", "sample", "decide"):
        p = o.latency_ms[name]
        lines.append(f"{name:>8} ms  p50 {_ms(p['p50']):>5}  p95 {_ms(p['p95']):>5}  p99 {_ms(p['p99']):>5}  "
                     f"max {_ms(p['max']):>5}  ({int(p['count'])} decided ticks)")
    lines.append("")
    if report.server:
        lines += _rows(ROLE_HEADER, [(r.role, str(r.replicas), f"{r.cpu_ms_per_stream_s:.1f}", f"{r.cores:.2f}",
                                      f"{r.rss_mb:.0f}", f"{r.rss_mb_per_stream:.1f}") for r in report.server])
    else:
        lines.append("Vigil's CPU and memory: not measured (no replica process of the target found on this machine)")
    if report.generator:
        g = report.generator
        lines.append(f"load generator: {g['cpu_ms_per_stream_s']:.1f} ms CPU per stream-second, "
                     f"{g['cores']:.2f} cores, RSS {g['rss_mb']:.0f} MB")
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """JSON has no NaN: a figure with nothing to measure is null; the rest is rounded to 4 decimals."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def report_payload(report: LoadReport) -> dict[str, Any]:
    payload = asdict(report)
    for stream, source in zip(payload["streams"], report.streams, strict=True):
        stream["triggers_found"] = source.triggers_found
    return dict(_finite(payload))


def write_json(report: LoadReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_payload(report), indent=2, allow_nan=False) + "\n")
