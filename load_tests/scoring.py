"""Score a timeline against expectations: which responses came when one was due, and SW-F1.

A response is a tick whose decision is `respond` or `delegate` (what the user hears). Responses are taken in
stream order; each one answers the still unanswered window that holds it and closes first (a window holds the
stream times from its `start` to its `end`, both included; a point expectation holds its ground-truth time ±2 s,
StreamingBench's proactive rule). That matches every window at most once and as many windows as can be
matched. Then:

- TP: a window answered; FN: a window no response answered;
- FP: a response outside every window;
- a response inside a window that an earlier one already answered is reported as *extra*, not as an FP (SW-F1
  counts outputs outside the ground-truth windows), unless `extra_as_fp`;
- with `require_answer`, a response inside a window whose `answer` it does not contain (case-insensitively)
  answers nothing and counts as an FP: StreamingBench scores the output as well as its time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from load_tests.expectations import Expectation, ExpectationSet
from load_tests.timeline import Tick, Timeline

# SW-F1's weights, as the Streaming Harness ("Harnessing Streaming Video in the Wild") defines its benchmark
# metric: SW-F1 = 2·TP / (2·TP + 0.2·FP + 2·FN). A false alarm costs a tenth of a miss.
TP_WEIGHT = 2.0
FP_WEIGHT = 0.2
FN_WEIGHT = 2.0
EPSILON_S = 1e-6  # stream times are written to the millisecond; a border is not missed by float rounding


def sw_f1(tp: int, fp: int, fn: int) -> float:
    """2·TP / (2·TP + 0.2·FP + 2·FN), the Streaming Harness's SW-F1; 1.0 when nothing was due and nothing said."""
    denominator = TP_WEIGHT * tp + FP_WEIGHT * fp + FN_WEIGHT * fn
    return 1.0 if denominator == 0 else TP_WEIGHT * tp / denominator


def f1(tp: int, fp: int, fn: int) -> float:
    """The plain F1, 2·TP / (2·TP + FP + FN); 1.0 when nothing was due and nothing said."""
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2 * tp / denominator


def holds(window: Expectation, t: float) -> bool:
    return window.start - EPSILON_S <= t <= window.end + EPSILON_S


def has_answer(window: Expectation, text: str) -> bool:
    return window.answer is None or window.answer.casefold() in text.casefold()


@dataclass(frozen=True, slots=True)
class WindowResult:
    """One window and the response that answered it (None: missed). `delay_s` runs from the window's start, or
    for a point from its ground-truth time (negative: early); `answer_ok` is None when the window names no
    answer or nothing answered it."""

    expectation: Expectation
    response: Tick | None = None

    @property
    def delay_s(self) -> float | None:
        return None if self.response is None else self.response.t - self.expectation.anchor

    @property
    def answer_ok(self) -> bool | None:
        if self.response is None or self.expectation.answer is None:
            return None
        return has_answer(self.expectation, self.response.text)


@dataclass(frozen=True, slots=True)
class Score:
    windows: tuple[WindowResult, ...]
    false_responses: tuple[Tick, ...]  # outside every window (and, with require_answer, wrong answers)
    extra_responses: tuple[Tick, ...]  # inside a window already answered
    responses: int
    extra_as_fp: bool = False

    @property
    def tp(self) -> int:
        return sum(w.response is not None for w in self.windows)

    @property
    def fn(self) -> int:
        return len(self.windows) - self.tp

    @property
    def fp(self) -> int:
        return len(self.false_responses) + (len(self.extra_responses) if self.extra_as_fp else 0)

    @property
    def sw_f1(self) -> float:
        return sw_f1(self.tp, self.fp, self.fn)

    @property
    def f1(self) -> float:
        return f1(self.tp, self.fp, self.fn)

    @property
    def precision(self) -> float:
        """TP / (TP + FP); 1.0 when nothing counted was said."""
        return 1.0 if self.tp + self.fp == 0 else self.tp / (self.tp + self.fp)

    @property
    def recall(self) -> float:
        """TP / (TP + FN); 1.0 when nothing was due."""
        return 1.0 if not self.windows else self.tp / len(self.windows)

    @property
    def mean_delay_s(self) -> float | None:
        delays = [w.delay_s for w in self.windows if w.delay_s is not None]
        return sum(delays) / len(delays) if delays else None


def score(timeline: Timeline | Sequence[Tick], expectations: ExpectationSet | Sequence[Expectation],
          require_answer: bool = False, extra_as_fp: bool = False) -> Score:
    """Match the timeline's responses to the windows (see the module's docstring) and count."""
    ticks = timeline.ticks if isinstance(timeline, Timeline) else timeline
    windows = expectations.windows if isinstance(expectations, ExpectationSet) else tuple(expectations)
    responses = sorted((t for t in ticks if t.spoke), key=lambda t: t.t)
    answered: dict[int, Tick] = {}
    false: list[Tick] = []
    extra: list[Tick] = []
    for response in responses:
        inside = [i for i, w in enumerate(windows) if holds(w, response.t)]
        open_ = [i for i in inside if i not in answered]
        fitting = [i for i in open_ if not require_answer or has_answer(windows[i], response.text)]
        if fitting:
            answered[min(fitting, key=lambda i: (windows[i].end, windows[i].start, i))] = response
        elif not inside or open_:  # outside every window, or (require_answer) the wrong answer
            false.append(response)
        else:
            extra.append(response)
    return Score(windows=tuple(WindowResult(w, answered.get(i)) for i, w in enumerate(windows)),
                 false_responses=tuple(false), extra_responses=tuple(extra), responses=len(responses),
                 extra_as_fp=extra_as_fp)


# -- output --------------------------------------------------------------------------------------------------


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 4)


def _tick_row(tick: Tick) -> dict[str, Any]:
    return {"t": _round(tick.t), "decision": tick.decision, "text": tick.text, "tick": tick.tick}


def score_payload(result: Score, **context: Any) -> dict[str, Any]:
    """Everything as a JSON-ready object; `context` (files, settings) is put first."""
    windows = []
    for w in result.windows:
        e = w.expectation
        windows.append({
            "label": e.label, "start": _round(e.start), "end": _round(e.end), "at": _round(e.at),
            "tolerance_s": _round(e.tolerance_s), "answer": e.answer, "asked": _round(e.asked), "id": e.source_id,
            "task": e.task, "matched": w.response is not None,
            "response": None if w.response is None else _tick_row(w.response),
            "delay_s": _round(w.delay_s), "answer_ok": w.answer_ok,
        })
    return context | {
        "sw_f1": _round(result.sw_f1), "precision": _round(result.precision), "recall": _round(result.recall),
        "f1": _round(result.f1), "tp": result.tp, "fp": result.fp, "fn": result.fn,
        "weights": {"tp": TP_WEIGHT, "fp": FP_WEIGHT, "fn": FN_WEIGHT},
        "mean_delay_s": _round(result.mean_delay_s), "responses": result.responses,
        "extra_responses_count_as_fp": result.extra_as_fp,
        "windows": windows,
        "false_responses": [_tick_row(t) for t in result.false_responses],
        "extra_responses": [_tick_row(t) for t in result.extra_responses],
    }


def _cell(text: str, width: int = 48) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 1] + "…"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _due(e: Expectation) -> str:
    if e.at is not None:
        return f"{e.at:.1f} ±{e.tolerance_s:g}"
    return f"{e.start:.1f} to {e.end:.1f}"


def render(result: Score) -> str:
    """The figures, a row per window, and the false responses: a table to read on a terminal."""
    extra_note = "counted as FP" if result.extra_as_fp else "not counted"
    lines = [
        f"SW-F1 {result.sw_f1:.3f}   (TP {result.tp}, FP {result.fp}, FN {result.fn}; "
        f"2·TP / (2·TP + 0.2·FP + 2·FN))",
        f"precision {result.precision:.3f}   recall {result.recall:.3f}   F1 {result.f1:.3f}   "
        f"mean delay {_s(result.mean_delay_s)} s",
        f"{result.responses} response{'' if result.responses == 1 else 's'}: {result.tp} answered a window, "
        f"{len(result.false_responses)} false, "
        f"{len(result.extra_responses)} more inside answered windows ({extra_note})",
        "",
        "| # | due (s) | label | response (s) | delay (s) | answer | text |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, w in enumerate(result.windows, 1):
        answer = "-" if w.answer_ok is None else ("yes" if w.answer_ok else "no")
        response = "missed" if w.response is None else f"{w.response.t:.1f}"
        text = "" if w.response is None else _cell(w.response.text)
        lines.append(f"| {n} | {_due(w.expectation)} | {_cell(w.expectation.label, 40)} | {response} | "
                     f"{_s(w.delay_s)} | {answer} | {text} |")
    if not result.windows:
        lines.append("| - | nothing due | | | | | |")
    if result.false_responses:
        lines += ["", "false responses (no window open for them):"]
        lines += [f"  {t.t:8.1f} s  {t.decision:<8}  {_cell(t.text, 80)}" for t in result.false_responses]
    return "\n".join(lines)
