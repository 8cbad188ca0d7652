"""A recording read as replay steps: every `step_s` of video, the frames a viewer would have seen at `fps`, as JPEGs.

The file is decoded with PyAV from start to end, one frame at a time, and only the sampled frames are converted
(scaled so that the longest side is at most 640 px, then JPEG-encoded): a file of any length is read in constant
memory. Sample `j` is at `j / fps` seconds of stream time (seconds since the first frame) and shows the last
frame at or before that moment, as a player would. Step `k` holds the samples in `[k·step_s, (k+1)·step_s)`; the
last step ends with the video, or at `max_s` when that comes first (decoding stops there). `Prefetch` runs the
reading in a thread of its own, a few steps ahead.
"""

from __future__ import annotations

import contextlib
import io
import math
import queue
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import av
from PIL import Image

LONGEST_SIDE = 640
JPEG_QUALITY = 85
EPSILON_S = 1e-6  # frame times are rationals turned to floats; a sample on a frame's time shows that frame

T = TypeVar("T")


class VideoError(ValueError):
    """A recording that cannot be replayed; the message says which file and why, in one line."""


@dataclass(frozen=True, slots=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    codec: str
    duration_s: float | None  # as the container says (None: it does not); the last step ends with the frames


@dataclass(frozen=True, slots=True)
class SampledFrame:
    """A sampled frame: its stream time (the sample's), how long it stands for (1 / fps), the JPEG."""

    t: float
    span_s: float
    jpeg: bytes


@dataclass(frozen=True, slots=True)
class Step:
    """One step of the replay: its number from 0, its stretch of stream time, its frames (oldest first)."""

    index: int
    start: float
    end: float
    frames: tuple[SampledFrame, ...]


def fit_within(width: int, height: int, longest_side: int) -> tuple[int, int]:
    """`(width, height)` scaled down, aspect kept, to a longest side of at most `longest_side` (never up)."""
    scale = longest_side / max(width, height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _open(path: Path) -> Any:
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"{path}: not a video PyAV can open ({exc.__class__.__name__}: {exc})") from None


def probe(path: Path) -> VideoInfo:
    """What the file holds, after decoding its first frame; VideoError when it has no decodable video."""
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: the file has no video stream")
        stream = container.streams.video[0]
        try:
            first = next(container.decode(stream), None)
        except (av.FFmpegError, ValueError) as exc:
            raise VideoError(f"{path}: its video does not decode ({exc.__class__.__name__}: {exc})") from None
        if first is None:
            raise VideoError(f"{path}: the video stream holds no frames")
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        return VideoInfo(path, first.width, first.height, stream.codec_context.name,
                         duration if duration and duration > 0 else None)


def _jpeg(frame: Any, longest_side: int) -> bytes:
    width, height = fit_within(frame.width, frame.height, longest_side)
    image = frame.reformat(width=width, height=height, format="rgb24").to_image()
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def thumbnail(jpeg: bytes, longest_side: int) -> bytes:
    """A smaller JPEG of a frame, for a report."""
    with Image.open(io.BytesIO(jpeg)) as image:
        image.thumbnail((longest_side, longest_side))
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=75)
    return out.getvalue()


def _frames(path: Path) -> Generator[tuple[float, float | None, Any], None, None]:
    """Every decoded frame with its stream time and its own duration (None: unknown), in decoding order."""
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate) if stream.average_rate else None
        origin = None
        for index, frame in enumerate(container.decode(stream)):
            if frame.pts is not None and frame.time_base is not None:
                at = float(frame.pts * frame.time_base)
            else:
                at = index / rate if rate else float(index)
            origin = at if origin is None else origin
            own = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else None
            yield at - origin, own or (1 / rate if rate else None), frame


def read_steps(path: Path, fps: float, step_s: float, longest_side: int = LONGEST_SIDE,
               max_s: float | None = None) -> Iterator[Step]:
    """The recording's steps, read as they are iterated (see the module); with `max_s`, only its first `max_s`
    seconds. Raises VideoError."""
    interval = 1 / fps
    limit = math.inf if max_s is None else max_s
    pending: list[SampledFrame] = []
    index = 0
    sample = 0
    shown: Any = None  # the frame on screen at the next sample's time
    shown_at = last_span = 0.0
    encoded: tuple[Any, bytes] | None = None  # a frame sampled twice (fps above the video's) is encoded once

    def take(frame: Any, at: float) -> Step | None:
        nonlocal index, pending, encoded
        if encoded is None or encoded[0] is not frame:
            encoded = (frame, _jpeg(frame, longest_side))
        done = None
        step = math.floor(at / step_s + 1e-9)
        if pending and step != index:
            done = Step(index, index * step_s, (index + 1) * step_s, tuple(pending))
            pending = []
        index = step
        pending.append(SampledFrame(at, interval, encoded[1]))
        return done

    try:
        with contextlib.closing(_frames(path)) as frames:
            for at, span, frame in frames:
                while shown is not None and sample * interval < min(at, limit) - EPSILON_S:
                    if (done := take(shown, sample * interval)) is not None:
                        yield done
                    sample += 1
                if at >= limit - EPSILON_S:  # past `max_s`: this frame is never shown
                    break
                if shown is not None and span is None:
                    span = at - shown_at
                shown, shown_at, last_span = frame, at, span or last_span or interval
        end = min(shown_at + last_span, limit)
        while shown is not None and sample * interval < end - EPSILON_S:
            if (done := take(shown, sample * interval)) is not None:
                yield done
            sample += 1
    except VideoError:
        raise
    except (av.FFmpegError, ValueError) as exc:
        raise VideoError(f"{path}: decoding failed after {sample * interval:.1f} s "
                         f"({exc.__class__.__name__}: {exc})") from None
    if pending:
        yield Step(index, index * step_s, max(pending[-1].t, min((index + 1) * step_s, end)), tuple(pending))


class Prefetch(Generic[T]):
    """Iterates `source` in a thread of its own, at most `depth` items ahead; an error there is raised here.
    `close()` stops the thread (and closes the source there) at its next item."""

    def __init__(self, source: Iterator[T], depth: int = 4) -> None:
        self._source = source
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replay-video", daemon=True)
        self._thread.start()

    def _put(self, entry: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(entry, timeout=0.1)
                return True
        return False

    def _run(self) -> None:
        with contextlib.closing(self._source):  # type: ignore[type-var]
            try:
                for item in self._source:
                    if not self._put(("item", item)):
                        return
            except BaseException as exc:  # handed to the reader, who raises it
                self._put(("error", exc))
                return
            self._put(("end", None))

    def __iter__(self) -> Prefetch[T]:
        return self

    def __next__(self) -> T:
        if self._stop.is_set():
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "item":
            return value  # type: ignore[no-any-return]
        self._stop.set()
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
