"""A replay's report as one self-contained HTML page: the run's figures, the timeline (one mark per tick, coloured
by its decision), and every response with its stream time, latency and a thumbnail of the frame it answered.

No scripts, no external files: the thumbnails are JPEG data URLs, the style is inline. Everything taken from the
run (the instruction, what the model said, the video's name) is escaped.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from load_tests.recording import ReplayRun, StepOutcome

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #222; }
h1 { font-size: 1.4rem; margin-bottom: .2rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
.sub { color: #666; margin-top: 0; } table { border-collapse: collapse; } td, th { padding: .3rem .7rem; }
th { text-align: left; color: #555; font-weight: 600; } .figures td { font-variant-numeric: tabular-nums; }
.responses td { border-top: 1px solid #ddd; vertical-align: top; } .responses img { display: block; }
.timeline { display: flex; flex-wrap: wrap; gap: 2px; } .timeline span { width: 10px; height: 22px; }
.silent { background: #d6d6d6; } .respond { background: #2e9d5b; } .delegate { background: #3367d6; }
.skipped { background: #f0a030; }
.legend span { display: inline-block; width: 10px; height: 10px; margin: 0 .3rem 0 1rem; }
.time { white-space: nowrap; font-variant-numeric: tabular-nums; } .aborted { color: #b00; }
"""


def clock(seconds: float) -> str:
    """Stream time as `m:ss.s` (`h:mm:ss.s` past an hour)."""
    tenths = round(seconds * 10)
    hours, rest = divmod(tenths, 36000)
    minutes, rest = divmod(rest, 600)
    text = f"{minutes:02d}:{rest / 10:04.1f}" if hours else f"{minutes}:{rest / 10:04.1f}"
    return f"{hours}:{text}" if hours else text


def _kind(decision: str) -> str:
    return "skipped" if decision.startswith("skipped:") else decision


def _ms(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.0f} ms"


def _figures(run: ReplayRun) -> str:
    figures = run.figures()
    latency = figures["latency_ms"]
    speed = run.settings.speed
    pace = "as fast as answered" if speed is None else "real time" if speed == 1 else f"{speed:g}&times; real time"
    through = f"{run.replayed_s:.1f} s of video in {run.wall_s:.1f} s"
    if run.wall_s > 0 and run.replayed_s > 0:
        through += f" ({run.replayed_s / run.wall_s:.2f}&times; real time)"
    rows = [
        ("ticks", f"{figures['ticks']} (one per {run.settings.step_s:g} s step of {run.settings.fps:g} "
                  f"frame{'s' if run.settings.fps != 1 else ''} per second)"),
        ("responses", f"{figures['responses']} ({figures['respond_ticks']} respond, "
                      f"{figures['delegate_ticks']} delegate)"),
        ("silent / skipped", f"{figures['silent_ticks']} / {figures['skipped_ticks']}"),
        ("latency p50 / p95", f"{_ms(latency['p50'])} / {_ms(latency['p95'])}"),
        ("retries", str(figures["retries"])),
        ("pace", pace), ("replayed", through),
        ("model", html.escape(run.model) if run.model else "&ndash;"), ("session", html.escape(run.session)),
        ("Vigil", html.escape(run.url)),
    ]
    # Every value is markup already: the figures are numbers, the names were escaped above.
    return "\n".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)


def _timeline(run: ReplayRun) -> str:
    marks = []
    for step in run.steps:
        tick = step.tick
        label = f"{clock(tick.t)} {tick.decision}" + (f": {tick.text}" if tick.text else "")
        marks.append(f'<span class="{_kind(tick.decision)}" title="{html.escape(label)}"></span>')
    return "".join(marks)


def _response(step: StepOutcome) -> str:
    tick, answer = step.tick, step.answer
    picture = ""
    if step.thumbnail is not None:
        data = base64.b64encode(step.thumbnail).decode()
        picture = f'<img src="data:image/jpeg;base64,{data}" alt="frame at {clock(tick.t)}">'
    latency = _ms(None if answer is None else answer.latency_ms)
    return (f'<tr><td class="time">{clock(step.start)}&ndash;{clock(tick.t)}</td><td>{picture}</td>'
            f"<td>{html.escape(tick.decision)}</td><td>{html.escape(tick.text)}</td>"
            f'<td class="time">{latency}</td></tr>')


def render_report(run: ReplayRun) -> str:
    """The whole page."""
    name = Path(run.video).name
    aborted = f'<p class="aborted">Stopped early: {html.escape(run.aborted)}</p>' if run.aborted else ""
    responses = "\n".join(_response(step) for step in run.responses)
    if not responses:
        responses = '<tr><td colspan="5">No responses: the session stayed silent throughout.</td></tr>'
    span = f" from {clock(run.steps[0].start)} to {clock(run.replayed_s)}" if run.steps else ""
    legend = "".join(f'<span class="{k}"></span>{k}' for k in ("silent", "respond", "delegate", "skipped"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Vigil replay: {html.escape(name)}</title>
<style>{STYLE}</style></head>
<body>
<h1>Vigil replay: {html.escape(name)}</h1>
<p class="sub">{html.escape(run.video)}</p>
<p><b>Instruction:</b> {html.escape(run.settings.instruction)}</p>
{aborted}
<table class="figures">
{_figures(run)}
</table>
<h2>Timeline</h2>
<p class="legend">one mark per tick{span}, in stream order (hover one for its time):{legend}</p>
<div class="timeline">{_timeline(run)}</div>
<h2>Responses</h2>
<table class="responses">
<tr><th>stream time</th><th>frame</th><th>decision</th><th>said</th><th>latency</th></tr>
{responses}
</table>
</body></html>
"""


def write_report(path: Path, run: ReplayRun) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(run), encoding="utf-8")
