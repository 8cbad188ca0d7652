"""Run N concurrent WebRTC streams against a running Vigil and report what they heard and what Vigil spent.

    python -m load_tests --url http://127.0.0.1:8000 --streams 8 --seconds 30 --json .cache/load/report.json
    python -m load_tests --start-vigil --streams 8 --seconds 30          # starts Vigil (demo model) and stops it
    python -m load_tests --start-vigil --streams 8 --seconds 3600 --soak-interval-s 60 --json soak.json   # a soak

Vigil must gather loopback ICE candidates for a loopback run, e.g.
    VIGIL_ICE_HOST_ADDRESSES=127.0.0.1 VIGIL_ICE_ALLOWED_NETWORKS=127.0.0.0/8 make run

The clip (640x480 at 5 fps by default, a red disc from each --triggers second for --trigger-s) is encoded
once into --cache-dir and replayed by every stream. The generator lowers its own priority (--nice) and
stops by itself after --warmup-s + --seconds. With --soak-interval-s it is a soak: Vigil's vitals every interval,
a verdict on each after warm-up and every tick accounted for; the exit status is 1 when the soak fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from load_tests.clip import ClipSpec
from load_tests.packets import DEFAULT_CACHE_DIR, EncodedClip, cached_clip
from load_tests.runner import CLOSE_TIMEOUT_S, DEFAULT_INSTRUCTIONS, MAX_SECONDS, MAX_STREAMS, LoadRun, Scenario
from load_tests.server_usage import VigilProcesses
from load_tests.soak import LEDGER_TIMEOUT_S, MAX_SOAK_SECONDS, SETTLE_S, SoakRun, SoakScenario
from load_tests.soak_table import render_soak, write_soak_json
from load_tests.table import render, write_json

DEFAULT_URL = "http://127.0.0.1:8000"


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 640x480")
    return int(width), int(height)


def _seconds_list(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m load_tests", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_argument_group("target")
    target.add_argument("--url", default=os.environ.get("VIGIL_URL", DEFAULT_URL),
                        help="Vigil's base URL (default: $VIGIL_URL, else %(default)s)")
    target.add_argument("--api-key", default=os.environ.get("VIGIL_API_KEY"),
                        help="API key for creating sessions (default: $VIGIL_API_KEY; never printed)")
    target.add_argument("--start-vigil", action="store_true",
                        help="start Vigil (serve_app.py; $VIGIL_MODEL or the demo model) for the run, stop it after")
    target.add_argument("--vigil-pid", type=int, default=None,
                        help="pid of the process that started the target Vigil, to find its replicas "
                             "(default: the Ray cluster whose Serve proxy listens on the URL's port)")
    run = p.add_argument_group("run")
    run.add_argument("--streams", type=int, default=8, help=f"concurrent streams, at most {MAX_STREAMS}")
    run.add_argument("--seconds", type=float, default=30.0, help=f"measured window, at most {MAX_SECONDS:.0f} s")
    run.add_argument("--warmup-s", type=float, default=5.0, help="after connecting, before measuring")
    run.add_argument("--instruction", action="append", default=None,
                     help="standing instruction of every session (repeatable; default: tell me when a red disc "
                          "shows)")
    run.add_argument("--grace-s", type=float, default=2.0,
                     help="a response counts for a trigger until this long after the disc goes")
    run.add_argument("--connect-concurrency", type=int, default=4, help="streams connecting at once")
    run.add_argument("--progress-s", type=float, default=5.0, help="a progress line on stderr this often")
    run.add_argument("--nice", type=int, default=19, help="the generator's niceness (Ray's workers run at 15)")
    run.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    run.add_argument("--soak-interval-s", type=float, default=None,
                     help="a soak: sample Vigil's processes (RSS, fds, threads, asyncio tasks, peer connections) "
                          "and the latency this often, judge each after warm-up and check every stream's ticks "
                          f"(--seconds up to {MAX_SOAK_SECONDS:.0f})")
    clip = p.add_argument_group("clip")
    clip.add_argument("--size", type=_size, default=(640, 480), help="WIDTHxHEIGHT (default 640x480)")
    clip.add_argument("--fps", type=int, default=5)
    clip.add_argument("--clip-s", type=float, default=10.0, help="clip length; it loops")
    clip.add_argument("--triggers", type=_seconds_list, default=(4.0,),
                      help="clip seconds at which the red disc appears, comma-separated (default 4)")
    clip.add_argument("--trigger-s", type=float, default=2.0, help="how long the disc shows each time")
    clip.add_argument("--keyframe-s", type=float, default=2.0, help="a keyframe this often")
    clip.add_argument("--bitrate-kbps", type=int, default=ClipSpec().bitrate_kbps)
    clip.add_argument("--temporal-layers", type=int, choices=(1, 2), default=ClipSpec().temporal_layers,
                      help="2: every other frame in a second layer, as the page sends it (default); 1: one layer")
    clip.add_argument("--seed", type=int, default=0)
    clip.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="encoded clips (default %(default)s)")
    return p


def scenario_from(args: argparse.Namespace, url: str) -> Scenario:
    width, height = args.size
    clip = ClipSpec(width=width, height=height, fps=args.fps, seconds=args.clip_s, triggers=args.triggers,
                    trigger_s=args.trigger_s, keyframe_s=args.keyframe_s, bitrate_kbps=args.bitrate_kbps,
                    temporal_layers=args.temporal_layers, seed=args.seed)
    instructions = tuple(args.instruction) if args.instruction else DEFAULT_INSTRUCTIONS
    settings: dict[str, Any] = {
        "url": url, "streams": args.streams, "seconds": args.seconds, "warmup_s": args.warmup_s, "clip": clip,
        "instructions": instructions, "grace_s": args.grace_s, "connect_concurrency": args.connect_concurrency,
        "progress_s": args.progress_s, "cache_dir": args.cache_dir, "api_key": args.api_key,
    }
    if args.soak_interval_s is not None:
        return SoakScenario(**settings, interval_s=args.soak_interval_s)
    return Scenario(**settings)


@contextlib.contextmanager
def target(args: argparse.Namespace) -> Iterator[tuple[str, VigilProcesses | None]]:
    """The URL to load and how to find its replicas: a Vigil started here, or the one at --url."""
    if args.start_vigil:
        from load_tests.launch import started_vigil

        print("[load] starting Vigil …", file=sys.stderr, flush=True)
        with started_vigil(args.streams) as vigil:
            print(f"[load] Vigil is running at {vigil.url} (log: {vigil.log_path})", file=sys.stderr, flush=True)
            yield vigil.url, VigilProcesses(root_pid=vigil.process.pid)
        return
    url = args.url
    host = urlparse(url).hostname or ""
    local = host == "localhost" or host.startswith("127.") or host == "::1"
    if args.vigil_pid is not None:
        yield url, VigilProcesses(root_pid=args.vigil_pid)
    elif local:
        yield url, VigilProcesses(port=urlparse(url).port or 80)
    else:
        yield url, None


def lower_priority(niceness: int) -> None:
    current = os.nice(0)
    if niceness > current:
        os.nice(niceness - current)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("load_tests").setLevel(logging.INFO)
    try:
        scenario = scenario_from(args, args.url)
    except ValueError as exc:
        raise SystemExit(f"load_tests: {exc}") from None
    clip = cached_clip(scenario.clip, scenario.cache_dir)
    with target(args) as (url, processes):
        # After starting Vigil, so that it does not inherit the lower priority.
        lower_priority(args.nice)
        scenario = scenario_from(args, url)
        if isinstance(scenario, SoakScenario):
            return soak(scenario, clip, processes, args.json)
        load = LoadRun(scenario, clip, processes)
        budget = scenario.connect_budget_s + scenario.warmup_s + scenario.seconds + CLOSE_TIMEOUT_S + 30.0
        try:
            report = asyncio.run(asyncio.wait_for(load.run(), budget))
        except (RuntimeError, TimeoutError) as exc:
            print(f"[load] failed: {exc or 'over the time budget'}", file=sys.stderr)
            return 1
    print(render(report))
    if args.json is not None:
        write_json(report, args.json)
        print(f"\nreport written to {args.json}", file=sys.stderr)
    return 0


def soak(scenario: SoakScenario, clip: EncodedClip, processes: VigilProcesses | None, json_path: Path | None) -> int:
    """Run a soak, print its load report and verdict; 0 when it passed, 1 when not."""
    run = SoakRun(scenario, clip, processes)
    budget = (scenario.connect_budget_s + scenario.warmup_s + scenario.seconds + CLOSE_TIMEOUT_S + SETTLE_S
              + LEDGER_TIMEOUT_S + 30.0)
    try:
        report = asyncio.run(asyncio.wait_for(run.soak(), budget))
    except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
        print(f"[soak] failed: {exc or 'over the time budget'}", file=sys.stderr)
        return 1
    print(render(report.load) + "\n")
    print(render_soak(report))
    if json_path is not None:
        write_soak_json(report, json_path)
        print(f"\nsoak report written to {json_path}", file=sys.stderr)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
