"""`vigil`: Vigil's command-line tools, one subcommand each.

    vigil score TIMELINE EXPECTED [--json OUT]     score a recorded timeline against expectations (SW-F1)
    vigil expectations ANNOTATIONS [-o OUT]        convert benchmark annotations to Vigil's expectation format

`docs/replay.md` describes the timeline and expectation formats, the importers and the metric. Exit status: 0
done; 1 the score is under `--fail-under`; 2 a bad file or argument (one line on stderr saying which and why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


# Each subcommand adds its parser here. `vigil replay VIDEO` (issue 10: run a recording through a session and
# write its timeline with load_tests.timeline.write_timeline, plus an HTML report) goes in as `add_replay`.
COMMANDS: tuple[Callable[[Any], None], ...] = (add_score, add_expectations)


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
