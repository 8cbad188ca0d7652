"""`vigil`: Vigil's command-line tools, one subcommand each.

    vigil score TIMELINE EXPECTED [--json OUT]     score a recorded timeline against expectations (SW-F1)
    vigil expectations ANNOTATIONS [-o OUT]        convert benchmark annotations to Vigil's expectation format
    vigil replay VIDEO [--url URL] [--speed S]     run a recording through a Vigil session: its timeline and a report

`docs/replay.md` describes the replay, the timeline and expectation formats, the importers and the metric. Exit
status: 0 done; 1 the score is under `--fail-under`; 2 a bad file or argument, or a Vigil that cannot be reached or
refuses (one line on stderr saying which and why).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from load_tests.expectations import SOURCES, expectations_payload, load_expectations
from load_tests.scoring import render, score, score_payload
from load_tests.timeline import BadInput, load_timeline

Handler = Callable[[argparse.Namespace], int]


def _tolerance(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a tolerance is a number of seconds, 0 or more")
    return value


def _selection(p: argparse.ArgumentParser) -> None:
    """The options that say which expectations of a file to use."""
    p.add_argument("--from", dest="source", choices=("auto", *SOURCES), default="auto",
                   help="the expectation file's format (default: recognised from its content)")
    p.add_argument("--video", default=None,
                   help="the video whose expectations to use, by path or file name, when the file holds several "
                        "(score's default: the timeline's `video`)")
    p.add_argument("--id", dest="ids", action="append", default=[],
                   help="only the windows of this annotation id (repeatable)")
    p.add_argument("--tolerance-s", type=_tolerance, default=None,
                   help="the ± seconds around a point expectation (default: the file's, else 2, StreamingBench's)")


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    except OSError as exc:
        raise BadInput(f"{path}: cannot write it ({exc.__class__.__name__}: {exc})") from None


# -- vigil score ---------------------------------------------------------------------------------------------


def add_score(commands: Any) -> None:
    p = commands.add_parser("score", help="score a timeline against expectations (SW-F1)",
                            description="Score a timeline (vigil.timeline JSON, an event log, or JSON lines of "
                                        "tick messages) against expectations: windows in which a response is "
                                        "due. Prints SW-F1 = 2·TP / (2·TP + 0.2·FP + 2·FN), precision, recall, "
                                        "F1, the mean delay and a row per window.")
    p.add_argument("timeline", type=Path, help="the timeline file")
    p.add_argument("expected", type=Path,
                   help="expectations: vigil.expectations JSON, OVO-Bench or StreamingBench annotations")
    _selection(p)
    p.add_argument("--require-answer", action="store_true",
                   help="a response answers a window only if it contains the window's `answer`; one that does "
                        "not counts as an FP (StreamingBench scores the output too)")
    p.add_argument("--extra-as-fp", action="store_true",
                   help="count a response inside a window already answered as an FP (default: reported only)")
    p.add_argument("--json", type=Path, default=None, help="also write everything as JSON here")
    p.add_argument("--fail-under", type=float, default=None, help="exit 1 when SW-F1 is under this")
    p.set_defaults(handler=run_score)


def run_score(args: argparse.Namespace) -> int:
    timeline = load_timeline(args.timeline)
    expected = load_expectations(args.expected, args.source, args.video, args.ids, args.tolerance_s,
                                 prefer_video=timeline.video)
    result = score(timeline, expected, require_answer=args.require_answer, extra_as_fp=args.extra_as_fp)
    header = f"{args.timeline} against {args.expected}"
    if expected.video:
        header += f" (video {expected.video}, {expected.source})"
    print(header + "\n")
    print(render(result))
    if args.json is not None:
        _write_json(args.json, score_payload(
            result, timeline=str(args.timeline), expectations=str(args.expected), video=expected.video,
            source=expected.source, require_answer=args.require_answer))
        print(f"\nscore written to {args.json}", file=sys.stderr)
    if args.fail_under is not None and result.sw_f1 < args.fail_under:
        return 1
    return 0


# -- vigil expectations --------------------------------------------------------------------------------------


def add_expectations(commands: Any) -> None:
    p = commands.add_parser("expectations", help="convert benchmark annotations to Vigil's expectation format",
                            description="Read OVO-Bench forward or StreamingBench proactive annotations (or "
                                        "Vigil expectations) and write the chosen video's windows as "
                                        "vigil.expectations JSON.")
    p.add_argument("annotations", type=Path, help="the annotation file")
    _selection(p)
    p.add_argument("-o", "--output", type=Path, default=None, help="write here (default: stdout)")
    p.set_defaults(handler=run_expectations)


def run_expectations(args: argparse.Namespace) -> int:
    chosen = load_expectations(args.annotations, args.source, args.video, args.ids, args.tolerance_s)
    payload = expectations_payload(chosen)
    if args.output is None:
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        _write_json(args.output, payload)
        print(f"{len(chosen.windows)} windows written to {args.output}", file=sys.stderr)
    return 0


# -- vigil replay -------------------------------------------------------------------------------------------

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_INSTRUCTION = "Tell me when something happens that I should know about."
SESSION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,120}")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number above 0")
    return value


def _retries(text: str) -> int:
    if not text.isdigit() or int(text) > 20:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number from 0 to 20")
    return int(text)


def add_replay(commands: Any) -> None:
    p = commands.add_parser("replay", help="run a recording through a Vigil session; write its timeline and report",
                            description="Run a video file through a session of a running Vigil, over its "
                                        "JoyAI-compatible streaming API: every --step-s of video is one request "
                                        "with that step's frames. Writes the timeline (vigil.timeline JSON, what "
                                        "`vigil score` reads) and an HTML report, and resets the session at the "
                                        "end. The API key (--api-key or $VIGIL_API_KEY) is never printed.")
    p.add_argument("video", type=Path, help="the recording (any file PyAV decodes)")
    p.add_argument("--url", default=os.environ.get("VIGIL_URL") or DEFAULT_URL,
                   help=f"Vigil's base URL (default: $VIGIL_URL, else {DEFAULT_URL})")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION,
                   help=f"the standing instruction, sent with every step (default: {DEFAULT_INSTRUCTION!r})")
    p.add_argument("--speed", default="fast",
                   help="fast: the next step as soon as the answer came (default); real: at the video's pace; "
                        "N: at N times real time")
    p.add_argument("--fps", type=_positive, default=1.0, help="frames sent per second of video (default 1)")
    p.add_argument("--step-s", type=_positive, default=1.0,
                   help="seconds of video per request, one tick each (default 1)")
    p.add_argument("--max-s", type=_positive, default=None,
                   help="replay only the video's first MAX_S seconds (default: all of it)")
    p.add_argument("--session", default=None,
                   help="the session's name (x-streaming-session; default: a fresh replay-<hex> per run)")
    p.add_argument("--api-key", default=None, help="Vigil's API key (default: $VIGIL_API_KEY)")
    p.add_argument("-o", "--timeline", type=Path, default=None,
                   help="where to write the timeline (default: VIDEO's name + .timeline.json, here)")
    p.add_argument("--report", type=Path, default=None,
                   help="where to write the HTML report (default: the timeline's name + .report.html)")
    p.add_argument("--retries", type=_retries, default=3,
                   help="retries of a step that got no answer, a 5xx or a busy session (default 3)")
    p.add_argument("--timeout-s", type=_positive, default=60.0, help="per request (default 60)")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="the progress bar on stderr (auto: when stderr is a terminal)")
    p.add_argument("--no-reset", action="store_true", help="leave the session open at the end")
    p.set_defaults(handler=run_replay)


def _outputs(args: argparse.Namespace) -> tuple[Path, Path]:
    timeline: Path = args.timeline or Path(args.video.stem + ".timeline.json")
    if args.report is not None:
        return timeline, args.report
    stem = timeline.name.removesuffix(".json").removesuffix(".timeline")
    return timeline, timeline.with_name(stem + ".report.html")


def run_replay(args: argparse.Namespace) -> int:
    # Imported here: `vigil score` should not pay for PyAV.
    from load_tests.progress import Progress
    from load_tests.recording import ReplayRun, ReplaySettings, finish, replay, speed_of
    from load_tests.report_html import write_report
    from load_tests.streaming_client import CallFailed, StreamingClient
    from load_tests.timeline import write_timeline
    from load_tests.video_steps import Prefetch, VideoError, probe, read_steps

    try:
        speed = speed_of(args.speed)
    except ValueError as exc:
        raise BadInput(f"--speed {exc}") from None
    session = args.session or f"replay-{uuid.uuid4().hex[:16]}"
    if not SESSION_NAME.fullmatch(session):
        raise BadInput(f"--session {session[:40]!r}: a session name is 1 to 120 of A-Z a-z 0-9 _ . -")
    if not args.instruction.strip():
        raise BadInput("--instruction is empty: Vigil stays silent without one")
    try:
        info = probe(args.video)
        client = StreamingClient(args.url, session, args.api_key or os.environ.get("VIGIL_API_KEY") or None,
                                 args.timeout_s)
    except VideoError as exc:
        raise BadInput(str(exc)) from None
    except ValueError as exc:
        raise BadInput(f"--url {exc}") from None
    try:
        health = client.health()
    except CallFailed as failure:
        if failure.status is None:
            raise BadInput(f"cannot reach Vigil at {args.url}: {failure.message}") from None
        raise BadInput(f"{args.url} does not answer as Vigil does (is it Vigil's URL?): {failure.message}") from None
    model = health.get("model") if isinstance(health.get("model"), str) else None
    settings = ReplaySettings(args.instruction.strip(), args.fps, args.step_s, speed, args.retries,
                              max_s=args.max_s)
    duration = info.duration_s
    if args.max_s is not None:
        duration = args.max_s if duration is None else min(duration, args.max_s)
    run = ReplayRun(str(args.video), client.url, session, settings, model, duration)
    enabled = {"on": True, "off": False}.get(args.progress, sys.stderr.isatty())
    progress = Progress(duration, args.video.name, enabled)
    steps = Prefetch(read_steps(args.video, args.fps, args.step_s, max_s=args.max_s))
    try:
        replay(run, steps, client, lambda step: progress.advance(step.tick.t, step.tick.spoke))
    finally:
        steps.close()
        progress.close()
        if not args.no_reset and any(step.answer is not None for step in run.steps):
            finish(run, client)
        client.close()
    timeline_path, report_path = _outputs(args)
    if run.steps:
        try:
            write_timeline(timeline_path, run.ticks, video=str(args.video), **run.meta())
            write_report(report_path, run)
        except OSError as exc:
            raise BadInput(f"cannot write the results ({exc.__class__.__name__}: {exc})") from None
    if run.aborted:
        kept = f"; the {len(run.steps)} steps before are in {timeline_path}" if run.steps else ""
        if run.interrupted:
            print(f"vigil replay: {run.aborted}{kept}", file=sys.stderr)
            return 130
        raise BadInput(run.aborted + kept)
    if run.reset is not None:
        print(f"vigil replay: the session was not reset ({run.reset}); it lapses on its own", file=sys.stderr)
    figures = run.figures()
    latency = figures["latency_ms"]
    pace = f" ({run.replayed_s / run.wall_s:.1f}x real time)" if run.wall_s > 0 else ""
    print(f"{args.video.name}: {run.replayed_s:.1f} s replayed in {run.wall_s:.1f} s{pace}: {figures['ticks']} ticks, "
          f"{figures['responses']} responses, {figures['skipped_ticks']} skipped, {figures['retries']} retries; "
          f"latency p50 {latency['p50']} ms, p95 {latency['p95']} ms")
    print(f"timeline  {timeline_path}\nreport    {report_path}")
    return 0


# Each subcommand adds its parser here.
COMMANDS: tuple[Callable[[Any], None], ...] = (add_score, add_expectations, add_replay)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vigil", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except BadInput as exc:
        print(f"vigil {args.command}: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vigil ... | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
