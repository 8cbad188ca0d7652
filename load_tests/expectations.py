"""Expectations: the windows of stream time in which a response is due, and importers from public benchmarks.

The file (`vigil.expectations`, version 1; `docs/replay.md` has the whole format):

    {"format": "vigil.expectations", "version": 1, "video": "clip.mp4", "tolerance_s": 2.0,
     "windows": [{"start": 4.0, "end": 8.0, "label": "red disc", "answer": "red"},
                 {"at": 29.0, "label": "scoreboard shows 3", "answer": "3"}]}

A window is due from `start` to `end` (both included); a point `at` is due within ±`tolerance_s` of it
(StreamingBench's proactive rule, 2 s unless the entry or the file says otherwise). A bare list of windows is
read too. The importers turn OVO-Bench's forward active responding annotations (REC, SSR, CRR) and
StreamingBench's proactive output questions into the same windows, one set per video.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from load_tests.timeline import BadInput, number, read_json_or_lines

FORMAT = "vigil.expectations"
VERSION = 1
DEFAULT_TOLERANCE_S = 2.0  # StreamingBench proactive output: correct when -2 <= t - ground truth <= 2
SOURCES = ("vigil", "ovo-bench", "streamingbench")
OVO_FORWARD_TASKS = ("REC", "SSR", "CRR")
_HMS = re.compile(r"^\s*(?:(\d+):)?(?:(\d+):)?(\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True, slots=True)
class Expectation:
    """A response is due between `start` and `end` (stream seconds, both included).

    A point expectation keeps its `at` and `tolerance_s` (start and end are at ∓ tolerance); a response's delay
    is measured from `at` for a point and from `start` for a window. `asked` (when the question was put, in
    the benchmark) and `source_id`/`task` (the annotation it came from) are for the report only.
    """

    start: float
    end: float
    label: str = ""
    answer: str | None = None
    at: float | None = None
    tolerance_s: float | None = None
    asked: float | None = None
    source_id: str | None = None
    task: str | None = None

    @classmethod
    def point(cls, at: float, tolerance_s: float = DEFAULT_TOLERANCE_S, **fields: Any) -> Expectation:
        return cls(start=at - tolerance_s, end=at + tolerance_s, at=at, tolerance_s=tolerance_s, **fields)

    @property
    def anchor(self) -> float:
        return self.at if self.at is not None else self.start

    def with_tolerance(self, tolerance_s: float) -> Expectation:
        """A point with another tolerance; a window as it is."""
        if self.at is None:
            return self
        return dataclasses.replace(self, start=self.at - tolerance_s, end=self.at + tolerance_s,
                                   tolerance_s=tolerance_s)


@dataclass(frozen=True, slots=True)
class ExpectationSet:
    """The expectations of one video (None: the file does not say which)."""

    windows: tuple[Expectation, ...]
    video: str | None = None
    source: str = "vigil"


def seconds_of(value: Any, what: str) -> float:
    """Seconds from a number or from `HH:MM:SS` / `H:MM:SS` / `MM:SS` (StreamingBench writes `00:03:10`)."""
    if isinstance(value, str):
        match = _HMS.match(value)
        if match is None:
            raise BadInput(f"{what}: {value!r} is not a time (seconds, MM:SS or HH:MM:SS)")
        parts = [p for p in match.groups() if p is not None]
        return sum(float(p) * 60**i for i, p in enumerate(reversed(parts)))
    return number(value, what)


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise BadInput(f"{what}: expected text, got {json.dumps(value)[:60]}")
    return str(value)


def _window(entry: Any, where: str, tolerance_s: float) -> Expectation:
    if not isinstance(entry, Mapping):
        raise BadInput(f"{where}: expected an object, got {json.dumps(entry)[:60]}")

    def optional(key: str) -> str | None:
        return None if entry.get(key) is None else _text(entry[key], f"{where}: `{key}`")

    fields: dict[str, Any] = {
        "label": optional("label") or "", "answer": optional("answer"), "source_id": optional("id"),
        "task": optional("task"),
        "asked": None if entry.get("asked") is None else seconds_of(entry["asked"], f"{where}: `asked`"),
    }
    if "at" in entry:
        if "start" in entry or "end" in entry:
            raise BadInput(f"{where}: give either `at` or `start` and `end`, not both")
        tolerance = number(entry.get("tolerance_s", tolerance_s), f"{where}: `tolerance_s`")
        if tolerance < 0:
            raise BadInput(f"{where}: `tolerance_s` is negative")
        return Expectation.point(seconds_of(entry["at"], f"{where}: `at`"), tolerance, **fields)
    if "start" not in entry or "end" not in entry:
        raise BadInput(f"{where}: a window needs `start` and `end` (or a point `at`)")
    start, end = seconds_of(entry["start"], f"{where}: `start`"), seconds_of(entry["end"], f"{where}: `end`")
    if end < start:
        raise BadInput(f"{where}: `end` ({end:g}) is before `start` ({start:g})")
    return Expectation(start=start, end=end, **fields)


def parse_vigil(value: Any, name: str) -> list[ExpectationSet]:
    tolerance_s, video, entries = DEFAULT_TOLERANCE_S, None, value
    if isinstance(value, Mapping):
        if value.get("format", FORMAT) != FORMAT:
            raise BadInput(f"{name}: format {json.dumps(value.get('format'))[:40]} is not {FORMAT!r}")
        if value.get("version", VERSION) != VERSION:
            raise BadInput(f"{name}: version {json.dumps(value.get('version'))[:20]} (this Vigil reads "
                           f"version {VERSION})")
        if "windows" not in value:
            raise BadInput(f"{name}: no `windows`")
        tolerance_s = number(value.get("tolerance_s", DEFAULT_TOLERANCE_S), f"{name}: `tolerance_s`")
        video = value.get("video")
        if video is not None and not isinstance(video, str):
            raise BadInput(f"{name}: `video` must be a string")
        entries = value["windows"]
    if not isinstance(entries, list):
        raise BadInput(f"{name}: `windows` must be a list")
    windows = tuple(_window(e, f"{name}: window {i}", tolerance_s) for i, e in enumerate(entries))
    # A converted file remembers what it was converted from.
    source = value.get("source") if isinstance(value, Mapping) else None
    return [ExpectationSet(windows=windows, video=video, source=source if isinstance(source, str) else "vigil")]


# -- OVO-Bench forward active responding ---------------------------------------------------------------------


def _probes(anno: Mapping[str, Any], where: str) -> list[Mapping[str, Any]]:
    probes = anno.get("test_info") or []
    if not isinstance(probes, list) or not all(isinstance(p, Mapping) for p in probes):
        raise BadInput(f"{where}: `test_info` must be a list of objects")
    return sorted(probes, key=lambda p: seconds_of(p.get("realtime"), f"{where}: test_info `realtime`"))


def _spans(anno: Mapping[str, Any], starts_key: str, ends_key: str, where: str) -> list[tuple[float, float]] | None:
    starts, ends = anno.get(starts_key), anno.get(ends_key)
    if starts is None and ends is None:
        return None
    if not isinstance(starts, list) or not isinstance(ends, list) or len(starts) != len(ends):
        raise BadInput(f"{where}: `{starts_key}` and `{ends_key}` must be lists of the same length")
    spans = [(seconds_of(s, f"{where}: `{starts_key}`"), seconds_of(e, f"{where}: `{ends_key}`"))
             for s, e in zip(starts, ends, strict=True)]
    if any(e < s for s, e in spans):
        raise BadInput(f"{where}: an end in `{ends_key}` is before its start")
    return spans


def _ovo_rec(anno: Mapping[str, Any], where: str, ident: str) -> list[Expectation]:
    """Each repetition of the activity is due while it happens (`start_times`/`end_times`); without those,
    between the probe before the count rose and the probe that saw it."""
    activity = _text(anno.get("activity"), f"{where}: `activity`")
    spans = _spans(anno, "start_times", "end_times", where)
    if spans is None:
        spans, before, seen = [], 0.0, 0
        for probe in _probes(anno, where):
            t = seconds_of(probe["realtime"], f"{where}: `realtime`")
            count = int(number(probe.get("count"), f"{where}: test_info `count`"))
            spans += [(before, t)] * max(count - seen, 0)
            before, seen = t, max(seen, count)
    return [Expectation(start=s, end=e, label=f"{activity} #{n}".strip(), answer=str(n), source_id=ident,
                        task="REC") for n, (s, e) in enumerate(sorted(spans), 1)]


def _ovo_ssr(anno: Mapping[str, Any], where: str, ident: str) -> list[Expectation]:
    """Each step is due while it is performed (`start_time`/`end_time` per step of `all_steps`); without
    those, from its first to its last probe of type 1 (the step is on)."""
    spans = _spans(anno, "start_time", "end_time", where)
    if spans is not None:
        steps = anno.get("all_steps") or [""] * len(spans)
        if not isinstance(steps, list) or len(steps) != len(spans):
            raise BadInput(f"{where}: `all_steps` must match `start_time`")
        return [Expectation(start=s, end=e, label=_text(step, f"{where}: `all_steps`"), source_id=ident, task="SSR")
                for step, (s, e) in zip(steps, spans, strict=True)]
    on: dict[str, list[float]] = {}
    for probe in _probes(anno, where):
        if probe.get("type") == 1:
            on.setdefault(_text(probe.get("step"), f"{where}: `step`"), []).append(
                seconds_of(probe["realtime"], f"{where}: `realtime`"))
    return [Expectation(start=min(ts), end=max(ts), label=step, source_id=ident, task="SSR")
            for step, ts in on.items()]


def _ovo_crr(anno: Mapping[str, Any], where: str, ident: str) -> list[Expectation]:
    """The answer is due once its clue has shown (`clue_time`) until the last probe of type 1 (enough seen)."""
    ready = [seconds_of(p["realtime"], f"{where}: `realtime`") for p in _probes(anno, where) if p.get("type") == 1]
    if anno.get("clue_time") is None and not ready:
        raise BadInput(f"{where}: a CRR annotation without `clue_time` and without a probe of type 1")
    start = seconds_of(anno["clue_time"], f"{where}: `clue_time`") if anno.get("clue_time") is not None \
        else min(ready)
    asked = anno.get("ask_time")
    return [Expectation(start=start, end=max([start, *ready]), label=_text(anno.get("question"), f"{where}: "
                        "`question`"), answer=_text(anno.get("answer"), f"{where}: `answer`") or None,
                        asked=None if asked is None else seconds_of(asked, f"{where}: `ask_time`"),
                        source_id=ident, task="CRR")]


_OVO = {"REC": _ovo_rec, "SSR": _ovo_ssr, "CRR": _ovo_crr}


def import_ovo_forward(value: Any, name: str) -> list[ExpectationSet]:
    """OVO-Bench annotations (its whole list, or `{"forward": [...]}`): the REC, SSR and CRR ones, per video."""
    annotations = value.get("forward") if isinstance(value, Mapping) else value
    if not isinstance(annotations, list):
        raise BadInput(f"{name}: OVO-Bench annotations must be a list (or an object with a `forward` list)")
    by_video: dict[str, list[Expectation]] = {}
    for i, anno in enumerate(annotations):
        if not isinstance(anno, Mapping) or anno.get("task") not in OVO_FORWARD_TASKS:
            continue  # backward tracing and real-time perception have no window in which to speak up
        ident = _text(anno.get("id", i), f"{name}: annotation {i}: `id`")
        where = f"{name}: annotation {ident} ({anno['task']})"
        video = _text(anno.get("video"), f"{where}: `video`")
        by_video.setdefault(video, []).extend(_OVO[anno["task"]](anno, where, ident))
    if not by_video:
        raise BadInput(f"{name}: no OVO-Bench forward active responding annotation (task REC, SSR or CRR)")
    return [ExpectationSet(windows=tuple(sorted(w, key=lambda e: (e.start, e.end))), video=video or None,
                           source="ovo-bench") for video, w in by_video.items()]


# -- StreamingBench proactive output -------------------------------------------------------------------------


def import_streamingbench_proactive(value: Any, name: str) -> list[ExpectationSet]:
    """StreamingBench question records (`video_path`, `questions`): each proactive question is a point at its
    `ground_truth_time_stamp`, its answer the `ground_truth_output`, asked at its `time_stamp`."""
    records = [value] if isinstance(value, Mapping) else value
    if not isinstance(records, list):
        raise BadInput(f"{name}: StreamingBench questions must be a list of records")
    by_video: dict[str, list[Expectation]] = {}
    for i, record in enumerate(records):
        where = f"{name}: record {i}"
        if not isinstance(record, Mapping) or not isinstance(record.get("questions"), list):
            raise BadInput(f"{where}: expected an object with a `questions` list")
        video = _text(record.get("video_path"), f"{where}: `video_path`")
        for j, question in enumerate(record["questions"]):
            if not isinstance(question, Mapping) or "ground_truth_time_stamp" not in question:
                continue  # not a proactive output question
            at = f"{where}: question {j}"
            asked = question.get("time_stamp")
            by_video.setdefault(video, []).append(Expectation.point(
                seconds_of(question["ground_truth_time_stamp"], f"{at}: `ground_truth_time_stamp`"),
                label=_text(question.get("question"), f"{at}: `question`"),
                answer=_text(question.get("ground_truth_output"), f"{at}: `ground_truth_output`") or None,
                asked=None if asked is None else seconds_of(asked, f"{at}: `time_stamp`"),
                source_id=f"{i}.{j}", task=_text(question.get("task_type"), f"{at}: `task_type`") or None,
            ))
    if not by_video:
        raise BadInput(f"{name}: no StreamingBench proactive output question (with `ground_truth_time_stamp`)")
    return [ExpectationSet(windows=tuple(sorted(w, key=lambda e: (e.start, e.end))), video=video or None,
                           source="streamingbench") for video, w in by_video.items()]


# -- reading and choosing ------------------------------------------------------------------------------------


def detect_source(value: Any) -> str | None:
    """Which of SOURCES this JSON value looks like; None when none."""
    if isinstance(value, Mapping):
        if "windows" in value or value.get("format") == FORMAT:
            return "vigil"
        if isinstance(value.get("forward"), list):
            return "ovo-bench"
        if "questions" in value:
            return "streamingbench"
        return None
    if not isinstance(value, list):
        return None
    items = [v for v in value if isinstance(v, Mapping)]
    if not items or len(items) != len(value):
        return None
    if all("questions" in v for v in items):
        return "streamingbench"
    if all("task" in v and "video" in v for v in items):
        return "ovo-bench"
    if all("start" in v or "at" in v for v in items):
        return "vigil"
    return None


def parse_expectations(value: Any, name: str, source: str = "auto") -> list[ExpectationSet]:
    if source == "auto":
        detected = detect_source(value)
        if detected is None:
            raise BadInput(f"{name}: neither Vigil expectations nor OVO-Bench nor StreamingBench annotations")
        source = detected
    if source == "vigil":
        return parse_vigil(value, name)
    if source == "ovo-bench":
        return import_ovo_forward(value, name)
    if source == "streamingbench":
        return import_streamingbench_proactive(value, name)
    raise BadInput(f"{name}: unknown expectation source {source!r} (one of auto, {', '.join(SOURCES)})")


def _same_video(recorded: str, wanted: str) -> bool:
    return recorded == wanted or Path(recorded).name == Path(wanted).name


def select(sets: Sequence[ExpectationSet], name: str, video: str | None = None, ids: Sequence[str] = (),
           prefer_video: str | None = None) -> ExpectationSet:
    """The one set to score: the one of `video` (matched by path or file name), else the file's only one, else
    the one of `prefer_video` (the timeline's); with `ids`, only the windows of those annotations."""
    if video is None and prefer_video is not None and len(sets) > 1 and not ids:
        video = prefer_video
    if video is not None:
        chosen = [s for s in sets if s.video is not None and _same_video(s.video, video)]
        if not chosen:
            raise BadInput(f"{name}: no expectations for video {video!r}")
        if len({s.video for s in chosen}) > 1:
            raise BadInput(f"{name}: video {video!r} matches {len(chosen)} videos; give its whole path")
    elif ids:
        chosen = [s for s in sets if any(w.source_id in ids for w in s.windows)]
    else:
        chosen = list(sets)
    if len(chosen) > 1:
        examples = ", ".join(repr(s.video) for s in chosen[:3])
        raise BadInput(f"{name}: holds expectations for {len(chosen)} videos ({examples}, ...); choose one "
                       "with --video")
    if not chosen:
        raise BadInput(f"{name}: no annotation with id {', '.join(ids)}")
    picked = chosen[0]
    if ids:
        windows = tuple(w for w in picked.windows if w.source_id in ids)
        if not windows:
            raise BadInput(f"{name}: no annotation with id {', '.join(ids)} for video {picked.video!r}")
        picked = dataclasses.replace(picked, windows=windows)
    return picked


def load_expectations(path: Path, source: str = "auto", video: str | None = None, ids: Sequence[str] = (),
                      tolerance_s: float | None = None, prefer_video: str | None = None) -> ExpectationSet:
    """The expectations to score from `path` (see `select`); `tolerance_s` replaces every point's tolerance."""
    sets = parse_expectations(read_json_or_lines(path), str(path), source)
    chosen = select(sets, str(path), video, ids, prefer_video)
    if tolerance_s is not None:
        chosen = dataclasses.replace(chosen, windows=tuple(w.with_tolerance(tolerance_s) for w in chosen.windows))
    return chosen


def expectations_payload(chosen: ExpectationSet) -> dict[str, Any]:
    """The set as a `vigil.expectations` object (what `vigil expectations` writes)."""
    rows: list[dict[str, Any]] = []
    for w in chosen.windows:
        row: dict[str, Any] = ({"at": w.at, "tolerance_s": w.tolerance_s} if w.at is not None
                               else {"start": w.start, "end": w.end})
        row |= {k: v for k, v in (("label", w.label), ("answer", w.answer), ("asked", w.asked),
                                  ("id", w.source_id), ("task", w.task)) if v not in (None, "")}
        rows.append(row)
    payload: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    if chosen.video is not None:
        payload["video"] = chosen.video
    return payload | {"source": chosen.source, "windows": rows}
