"""Run a recording through a Vigil session: each step of video is one chat-completions request, and each answer is
one tick of the replay's timeline, at the step's end time.

`--speed fast` sends the next step as soon as the answer came (as fast as the model decides); a number N sends
step k when N times real time reaches its end (`real` is 1): a request never goes before its frames would have been
seen live, and when the model is slower the replay falls behind rather than leaving steps out. A call that got no
answer, a 5xx or a `429 session_busy` is sent again after a backoff, `retries` times at most, each retry counted;
a step whose 5xx persists is recorded as `skipped:http_<status>`. Anything else ends the run (`aborted`): no answer
at all after the retries, a 401, a quota's 429, a 400. What was recorded until then is kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from load_tests.streaming_client import Answer, CallFailed, Frame, StreamingClient
from load_tests.timeline import Tick
from load_tests.video_steps import Step, VideoError, thumbnail

THUMBNAIL_PX = 240
MAX_BACKOFF_S = 8.0
MAX_RETRY_AFTER_S = 30.0


@dataclass(frozen=True, slots=True)
class ReplaySettings:
    """How to replay: the instruction sent with every step; frames per second and seconds per step; `speed` times
    real time (None: as fast as answers come); retries per step and the first backoff (doubling each time); how
    much of the video to replay."""

    instruction: str
    fps: float = 1.0
    step_s: float = 1.0
    speed: float | None = None
    retries: int = 3
    backoff_s: float = 0.5
    max_s: float | None = None  # only the video's first max_s seconds (None: all of it)


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """One step as the replay recorded it: its tick (`t` = the step's end), its start, its frame count, the
    answer (None when the step failed), the retries it took, a thumbnail of its last frame for a response."""

    tick: Tick
    start: float
    frames: int
    answer: Answer | None
    retries: int
    thumbnail: bytes | None = None
    error: str | None = None


@dataclass
class ReplayRun:
    """A replay's record: what was replayed, against what, every step's outcome, how long it took."""

    video: str
    url: str
    session: str
    settings: ReplaySettings
    model: str | None = None
    duration_s: float | None = None
    steps: list[StepOutcome] = field(default_factory=list)
    wall_s: float = 0.0
    aborted: str | None = None  # why the run ended early, in one line
    interrupted: bool = False  # by the user (Ctrl-C)
    reset: str | None = None  # what the final reset said went wrong; None: it worked

    @property
    def ticks(self) -> list[Tick]:
        return [step.tick for step in self.steps]

    @property
    def responses(self) -> list[StepOutcome]:
        return [step for step in self.steps if step.tick.spoke]

    @property
    def retries(self) -> int:
        return sum(step.retries for step in self.steps)

    @property
    def replayed_s(self) -> float:
        return self.steps[-1].tick.t if self.steps else 0.0

    def latency_ms(self) -> dict[str, float | None]:
        """p50 and p95 of the answered steps' round trips (None: no step was answered)."""
        values = [step.answer.latency_ms for step in self.steps if step.answer is not None]
        if not values:
            return {"p50": None, "p95": None}
        p50, p95 = np.percentile(values, [50, 95])
        return {"p50": round(float(p50), 1), "p95": round(float(p95), 1)}

    def figures(self) -> dict[str, Any]:
        """The run's figures, as the timeline file and the report carry them."""
        counts = {kind: sum(1 for t in self.ticks if t.decision == kind) for kind in ("silent", "respond", "delegate")}
        return {"ticks": len(self.steps), "responses": len(self.responses), **{f"{k}_ticks": v
                for k, v in counts.items()},
                "skipped_ticks": sum(1 for t in self.ticks if t.decision.startswith("skipped:")),
                "retries": self.retries, "latency_ms": self.latency_ms(), "replayed_s": round(self.replayed_s, 3),
                "wall_s": round(self.wall_s, 3)}

    def meta(self) -> dict[str, Any]:
        """The timeline file's fields besides its ticks (`vigil score` keeps them and reads none)."""
        s = self.settings
        meta: dict[str, Any] = {
            "instructions": [s.instruction], "session": self.session, "url": self.url, "model": self.model,
            "replay": {"fps": s.fps, "step_s": s.step_s, "speed": "fast" if s.speed is None else s.speed}
            | ({} if s.max_s is None else {"max_s": s.max_s}),
            "figures": self.figures(),
        }
        if self.aborted:
            meta["aborted"] = self.aborted
        return meta


def _backoff(settings: ReplaySettings, attempt: int, failure: CallFailed) -> float:
    if failure.retry_after_s is not None:
        return min(failure.retry_after_s, MAX_RETRY_AFTER_S)
    return min(settings.backoff_s * 2 ** attempt, MAX_BACKOFF_S)


def _decide(client: StreamingClient, step: Step, settings: ReplaySettings, model: str,
            sleep: Callable[[float], None]) -> tuple[Answer | CallFailed, int]:
    """The step's answer, or the failure that stayed after the retries; and how many retries it took. A failure
    that retrying will not mend is raised."""
    frames = [Frame(f.jpeg, f.t, f.t + f.span_s) for f in step.frames]
    for attempt in range(settings.retries + 1):
        try:
            return client.complete(frames, settings.instruction, model), attempt
        except CallFailed as failure:
            if not failure.retryable:
                raise
            if attempt == settings.retries:
                return failure, attempt
            sleep(_backoff(settings, attempt, failure))
    raise AssertionError("unreachable")


def _outcome(step: Step, result: Answer | CallFailed, retries: int) -> StepOutcome:
    t = round(step.end, 3)
    if isinstance(result, CallFailed):
        tick = Tick(t=t, decision=f"skipped:http_{result.status}", tick=None)
        return StepOutcome(tick, step.start, len(step.frames), None, retries, error=result.message)
    tick = Tick(t=t, decision=result.decision, text=result.text,
                tick=result.tick if result.tick is not None else step.index + 1)
    picture = thumbnail(step.frames[-1].jpeg, THUMBNAIL_PX) if tick.spoke else None
    return StepOutcome(tick, step.start, len(step.frames), result, retries, picture)


def replay(run: ReplayRun, steps: Iterable[Step], client: StreamingClient,
           on_step: Callable[[StepOutcome], None] = lambda outcome: None,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> ReplayRun:
    """Send every step, in order, paced by `run.settings.speed`, recording each outcome into `run`; a failure
    that ends the run sets `run.aborted`. Returns `run`."""
    settings = run.settings
    began = clock()
    try:
        for step in steps:
            if settings.speed is not None:
                due = began + step.end / settings.speed
                if (wait := due - clock()) > 0:
                    sleep(wait)
            try:
                result, retries = _decide(client, step, settings, run.model or "vigil", sleep)
            except CallFailed as failure:
                run.aborted = _why(failure, step, run)
                break
            if isinstance(result, CallFailed) and result.status is None:
                run.aborted = _why(result, step, run, retries)
                break
            outcome = _outcome(step, result, retries)
            run.steps.append(outcome)
            on_step(outcome)
    except VideoError as exc:
        run.aborted = str(exc)
    except KeyboardInterrupt:
        run.aborted, run.interrupted = f"interrupted at {run.replayed_s:.1f} s", True
    finally:
        run.wall_s = clock() - began
    return run


def _why(failure: CallFailed, step: Step, run: ReplayRun, retries: int = 0) -> str:
    """One line on the failure that ended the run, with what to do about it."""
    where = f"at {step.start:.1f} s"
    if failure.status is None:
        tries = f" (after {retries} retr{'y' if retries == 1 else 'ies'})" if retries else ""
        return f"Vigil at {run.url} stopped answering {where}{tries}: {failure.message}"
    if failure.status == 401:
        return (f"401 unauthorized {where}: Vigil wants an API key (--api-key or $VIGIL_API_KEY); "
                f"{failure.message}")
    if failure.status == 429:
        return f"429 refused {where}: {failure.message}"
    if failure.status == 200:
        return f"an answer {where} that is not a chat completion: {failure.message}"
    return f"refused {where}: {failure.message}"


def finish(run: ReplayRun, client: StreamingClient) -> None:
    """End the session on the server (`POST /v1/streaming/reset`); what went wrong goes into `run.reset`."""
    try:
        client.reset()
    except CallFailed as failure:
        run.reset = failure.message
    finally:
        client.close()


def speed_of(text: str) -> float | None:
    """`--speed`: `fast` (None), `real` (1.0) or a positive number of times real time."""
    if text == "fast":
        return None
    if text == "real":
        return 1.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{text!r}: a speed is fast, real, or a number of times real time above 0")
    return value
