"""A session's timeline: the outcome of every tick, in stream time, as a run records it and `vigil score` reads it.

The file (`vigil.timeline`, version 1; `docs/replay.md` has the whole format) is one JSON object:

    {"format": "vigil.timeline", "version": 1, "video": "clip.mp4",
     "ticks": [{"t": 4.0, "tick": 5, "decision": "respond", "text": "a red disc"}, ...]}

`t` is the tick's stream time in seconds (since the session's first video frame: the tick message's
`stream_time`), `decision` is `silent`, `respond`, `delegate` or `skipped:<reason>`. What a client already has
is read as it is: a bare list of ticks, the event log (`{"events": [<tick message>, ...]}` from
`GET /v1/sessions/{id}/events`), or JSON lines of data-channel messages as a client receives them (`tick`
messages count, every other type is passed over).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "vigil.timeline"
VERSION = 1
DECISIONS = ("silent", "respond", "delegate")
SPOKEN = ("respond", "delegate")
MAX_FILE_BYTES = 256 * 1024 * 1024  # a day of ticks is ~10 MB; anything far bigger is not a timeline


class BadInput(ValueError):
    """A file `vigil` cannot use; the message says which file and what is wrong with it, in one line."""


@dataclass(frozen=True, slots=True)
class Tick:
    """One tick's outcome: `t` its stream time in seconds, `decision` a decision kind or `skipped:<reason>`."""

    t: float
    decision: str
    text: str = ""
    tick: int | None = None

    @property
    def spoke(self) -> bool:
        """A response the user heard: `respond`, or `delegate` (its spoken note)."""
        return self.decision in SPOKEN


@dataclass(frozen=True, slots=True)
class Timeline:
    ticks: tuple[Tick, ...]
    video: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def responses(self) -> list[Tick]:
        """The spoken ticks in stream order."""
        return sorted((t for t in self.ticks if t.spoke), key=lambda t: t.t)


def read_json_or_lines(path: Path) -> Any:
    """The file's JSON value; a file of JSON lines is the list of its (non-blank) lines' values."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise BadInput(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    if not text.strip():
        raise BadInput(f"{path}: the file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as whole:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if len(lines) < 2:
            raise BadInput(f"{path}: not JSON ({whole.msg} at line {whole.lineno} column {whole.colno})") from None
        values = []
        for n, line in lines:
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise BadInput(f"{path}: line {n} is not JSON ({exc.msg})") from None
        return values


def number(value: Any, what: str) -> float:
    """A finite number (not a bool), else BadInput naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadInput(f"{what}: expected a number, got {json.dumps(value)[:60]}")
    return float(value)


def _tick(entry: Any, where: str) -> Tick | None:
    """One entry as a Tick; None for a message that is not a tick (`hello`, `pong`, ...)."""
    if not isinstance(entry, Mapping):
        raise BadInput(f"{where}: expected an object, got {json.dumps(entry)[:60]}")
    if "type" in entry and entry["type"] != "tick":
        return None
    t = entry.get("t", entry.get("stream_time"))
    if t is None:
        raise BadInput(f"{where}: no stream time (`t` or `stream_time`)")
    decision = entry.get("decision", entry.get("outcome"))
    if not isinstance(decision, str) or not (decision in DECISIONS or decision.startswith("skipped:")):
        raise BadInput(f"{where}: decision {json.dumps(decision)[:60]} is not silent, respond, delegate or "
                       "skipped:<reason>")
    text = entry.get("text") or ""
    if not isinstance(text, str):
        raise BadInput(f"{where}: `text` must be a string")
    tick = entry.get("tick")
    if tick is not None and (isinstance(tick, bool) or not isinstance(tick, int)):
        raise BadInput(f"{where}: `tick` must be an integer")
    return Tick(t=number(t, f"{where}: `t`"), decision=decision, text=text, tick=tick)


def parse_timeline(value: Any, name: str = "timeline") -> Timeline:
    """A timeline from any of the accepted shapes (see the module's docstring)."""
    meta: dict[str, Any] = {}
    video = None
    if isinstance(value, Mapping):
        if "ticks" in value:
            if value.get("format", FORMAT) != FORMAT:
                raise BadInput(f"{name}: format {json.dumps(value.get('format'))[:40]} is not {FORMAT!r}")
            if value.get("version", VERSION) != VERSION:
                raise BadInput(f"{name}: version {json.dumps(value.get('version'))[:20]} (this Vigil reads "
                               f"version {VERSION})")
            entries, video = value["ticks"], value.get("video")
            meta = {k: v for k, v in value.items() if k not in ("ticks", "format", "version", "video")}
        elif "events" in value:
            entries = value["events"]
        else:
            raise BadInput(f"{name}: a JSON object without `ticks` or `events`: not a timeline")
    else:
        entries = value
    if not isinstance(entries, list):
        raise BadInput(f"{name}: the ticks must be a list")
    if video is not None and not isinstance(video, str):
        raise BadInput(f"{name}: `video` must be a string")
    ticks = [tick for i, entry in enumerate(entries) if (tick := _tick(entry, f"{name}: tick {i}")) is not None]
    return Timeline(ticks=tuple(ticks), video=video, meta=meta)


def load_timeline(path: Path) -> Timeline:
    return parse_timeline(read_json_or_lines(path), str(path))


def timeline_payload(ticks: Iterable[Tick], video: str | None = None, **meta: Any) -> dict[str, Any]:
    """The `vigil.timeline` object for these ticks (what a replay or a load stream writes)."""
    rows: list[dict[str, Any]] = []
    for tick in ticks:
        row: dict[str, Any] = {"t": round(tick.t, 3), "decision": tick.decision, "text": tick.text}
        if tick.tick is not None:
            row["tick"] = tick.tick
        rows.append(row)
    payload: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    if video is not None:
        payload["video"] = video
    return payload | meta | {"ticks": rows}


def ticks_from_messages(messages: Sequence[Mapping[str, Any]]) -> list[Tick]:
    """The ticks among data-channel messages (or event-log entries) as a client received them."""
    return list(parse_timeline(list(messages), "messages").ticks)


def write_timeline(path: Path, ticks: Iterable[Tick], video: str | None = None, **meta: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timeline_payload(ticks, video, **meta), indent=1, allow_nan=False) + "\n")
