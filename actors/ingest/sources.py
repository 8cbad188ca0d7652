"""A video source that is not a WebRTC track: an RTSP or HTTP stream or a file, read with PyAV in a thread.

`VideoSource` opens its input, decodes it, and hands the event loop at most `max_fps` frames a second (RGB, at
the model's size: the tick takes the newest). A file plays in real time, once or in a loop; a stream that drops
or stalls is opened again with backoff, for as long as it once played. What it is doing — connecting, playing,
reconnecting, ended, failed (with the reason), stopped — is reported on every change. Every open and every read
has a timeout, so the thread notices `stop()` within `read_timeout_s` even when a camera goes silent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Literal

import av
import av.error
import numpy as np

from actors.common.config import VigilConfig
from actors.ingest.session_loop import frame_to_rgb
from actors.ingest.source_policy import SourcePolicy, SourceRefused, SourceTarget

log = logging.getLogger(__name__)

SourceState = Literal["connecting", "playing", "reconnecting", "ended", "failed", "stopped"]
TERMINAL: tuple[SourceState, ...] = ("ended", "failed", "stopped")
FrameFn = Callable[[np.ndarray, float], None]
StatusFn = Callable[["SourceStatus"], None]
# Probe little before the first frame: a camera's stream should play within a second of connecting.
PROBE_OPTIONS = {"analyzeduration": "500000", "probesize": "262144"}


@dataclass(frozen=True, slots=True)
class SourceSettings:
    """How a source is read: frame rate handed on, frame size, timeouts and reconnection backoff."""

    max_fps: float = 5.0
    longest_side: int = 448
    max_pixels: int = 1920 * 1080
    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    tries_before_playing: int = 3  # a source that never played is given up after this many failed opens

    @classmethod
    def from_config(cls, config: VigilConfig) -> SourceSettings:
        return cls(max_fps=config.sources_max_fps, longest_side=config.image_size,
                   max_pixels=config.limits.max_frame_pixels, open_timeout_s=config.sources_open_timeout_s,
                   read_timeout_s=config.sources_read_timeout_s)


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """A source's state as its session's clients see it (the `source` message of docs/protocol.md)."""

    state: SourceState
    source: str
    kind: str
    reason: str = ""
    attempt: int = 0  # failed tries since it last played
    retry_in_s: float | None = None
    frames: int = 0  # frames handed to the session's ticks so far
    loop: bool = False

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def payload(self) -> dict[str, Any]:
        return {"state": self.state, "source": self.source, "kind": self.kind, "reason": self.reason or None,
                "attempt": self.attempt, "retry_in_s": self.retry_in_s, "frames": self.frames, "loop": self.loop}


class Unplayable(Exception):
    """The input opened but cannot be played (no video, frames too large): trying again will not help."""


@dataclass
class OpenedInput:
    """An open PyAV container, whether it ends (a file, a recording) or only drops (a live stream), and the file
    object it reads from, if any."""

    container: Any  # av.container.InputContainer
    finite: bool
    file: IO[bytes] | None = None

    @property
    def duration_s(self) -> float | None:
        duration = self.container.duration
        return None if duration is None or duration <= 0 else duration / 1_000_000

    def close(self) -> None:
        try:
            self.container.close()
        finally:
            if self.file is not None:
                self.file.close()


def open_input(target: SourceTarget, policy: SourcePolicy, settings: SourceSettings) -> OpenedInput:
    """Open `target` with every rule of the policy applied now (a URL's host is resolved and checked again)."""
    timeout = (settings.open_timeout_s, settings.read_timeout_s)
    if target.kind == "url":
        url, options = policy.connection(target)
        live = av.open(url, "r", options=options | PROBE_OPTIONS, timeout=timeout)
        return OpenedInput(live, finite=live.duration is not None and live.duration > 0)
    file = open(target.location, "rb")  # closed with the container
    try:
        container = av.open(file, "r", options=policy.file_options() | PROBE_OPTIONS, timeout=timeout)
    except BaseException:
        file.close()
        raise
    return OpenedInput(container, finite=True, file=file)


def probe_video(target: SourceTarget, policy: SourcePolicy, settings: SourceSettings) -> None:
    """Raise Unplayable unless `target` opens and holds a video stream (for files and uploads, before they are
    attached). Blocks: call it off the event loop."""
    try:
        opened = open_input(target, policy, settings)
    except (av.error.FFmpegError, OSError) as exc:
        raise Unplayable(f"not a video Vigil can read ({describe(exc)})") from None
    try:
        if not opened.container.streams.video:
            raise Unplayable("the file holds no video stream")
    finally:
        opened.close()


def describe(exc: BaseException) -> str:
    """Why a try failed, for people: FFmpeg's words without the URL (which may carry credentials)."""
    if isinstance(exc, av.error.ExitError):
        return "no answer within the timeout"
    if isinstance(exc, av.error.FFmpegError | OSError) and exc.strerror:
        return str(exc.strerror)
    return type(exc).__name__


class VideoSource:
    """Reads one target in a thread of its own and hands frames and state changes to the event loop it was
    started from. `stop()` asks the thread to end; `join()` waits for it without blocking the loop."""

    def __init__(
        self,
        target: SourceTarget,
        opener: Callable[[], OpenedInput],
        on_frame: FrameFn,
        on_status: StatusFn,
        settings: SourceSettings,
        name: str = "vigil-source",
    ) -> None:
        self.target = target
        self._opener = opener
        self._on_frame = on_frame
        self._on_status = on_status
        self.settings = settings
        self.name = name
        self.status = SourceStatus("connecting", target.shown, target.kind, loop=target.loop)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handed = 0

    # -- control (from the event loop) ---------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def join(self, timeout_s: float | None = None) -> bool:
        """Stop and wait for the thread (at most `timeout_s`, default its open and read timeouts): True if gone."""
        self.stop()
        thread = self._thread
        if thread is None:
            return True
        if timeout_s is None:
            timeout_s = self.settings.open_timeout_s + self.settings.read_timeout_s + 1.0
        await asyncio.to_thread(thread.join, timeout_s)
        if thread.is_alive():
            log.warning("source %s: its reader is still blocked; it ends within its timeout", self.target.shown)
        return not thread.is_alive()

    # -- the reader thread ---------------------------------------------------------------------------------

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is left to read this source
            self._stop.set()

    def _report(self, state: SourceState, reason: str = "", attempt: int = 0, retry_in_s: float | None = None) -> None:
        self.status = dataclasses.replace(self.status, state=state, reason=reason, attempt=attempt,
                                          retry_in_s=retry_in_s, frames=self._handed)
        self._call(self._on_status, self.status)

    def _run(self) -> None:
        try:
            final = self._play_until_done()
        except Exception as exc:  # a bug here must still end as a reported state, not a silent thread
            log.exception("source %s: the reader failed", self.target.shown)
            final = ("failed", f"the reader failed ({type(exc).__name__})")
        self._report(*final)

    def _play_until_done(self) -> tuple[SourceState, str]:
        attempt, reason, resume_at, announce = 0, "", 0.0, True
        while not self._stop.is_set():
            if announce:  # not when a looped file starts again: it goes on playing
                self._report("connecting" if self._handed == 0 and attempt == 0 else "reconnecting", reason, attempt)
            opened: OpenedInput | None = None
            handed = self._handed
            try:
                opened = self._opener()
                position, finished = self._play(opened, resume_at)
                if self._stop.is_set():
                    break
                if finished and not self.target.loop:
                    return "ended", ""
                if finished:
                    attempt, reason, resume_at, announce = 0, "", 0.0, False
                    continue
                # A live stream that ends has dropped; a recording that ends early is taken up where it stopped.
                reason, resume_at = "the stream ended", position
                if self._handed > handed:
                    attempt = 0  # it played: the backoff starts again from its shortest
                elif self._handed == 0 and attempt + 1 >= self.settings.tries_before_playing:
                    return "failed", "the stream ends before its first frame"
            except SourceRefused as exc:
                return "failed", exc.message
            except Unplayable as exc:
                return "failed", str(exc)
            except (av.error.FFmpegError, OSError) as exc:
                reason = describe(exc)
                permanent = isinstance(exc, av.error.HTTPClientError | av.error.InvalidDataError) and not isinstance(
                    exc, av.error.HTTPTooManyRequestsError)
                if self._handed == 0 and (permanent or attempt + 1 >= self.settings.tries_before_playing):
                    return "failed", reason
                if self._handed > handed:
                    attempt = 0
            finally:
                if opened is not None:
                    opened.close()
            if self._stop.is_set():
                break
            attempt, announce = attempt + 1, True
            delay = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * 2 ** (attempt - 1))
            log.info("source %s: %s; trying again in %.1f s", self.target.shown, reason, delay)
            self._report("reconnecting", reason, attempt, round(delay, 2))
            if self._stop.wait(delay):
                break
        return "stopped", ""

    def _play(self, opened: OpenedInput, resume_at: float) -> tuple[float, bool]:
        """Decode until the input ends or the source is stopped: (the stream time reached, whether it played to
        its end). Frames are paced in real time by their timestamps, and handed on at most `max_fps` a second."""
        container = opened.container
        if not container.streams.video:
            raise Unplayable("the input holds no video stream")
        stream = container.streams.video[0]
        if resume_at > 0 and opened.finite:
            try:
                container.seek(int(resume_at * 1_000_000))
            except av.error.FFmpegError:
                resume_at = 0.0
        interval = 1.0 / self.settings.max_fps
        last_handed = float("-inf")
        anchor: tuple[float, float] | None = None  # (frame time, monotonic time) it was due at
        position = resume_at
        for frame in container.decode(stream):
            if self._stop.is_set():
                return position, False
            now = time.monotonic()
            stamp = frame.time
            if stamp is not None:
                if anchor is None or stamp < position - 0.5 or stamp - position > 5.0:
                    anchor = (stamp, now)  # the first frame, or a jump in the timestamps (a loop, a new segment)
                due = anchor[1] + (stamp - anchor[0])
                if due - now > 0 and self._stop.wait(due - now):
                    return position, False
                if now - due > 1.0:
                    anchor = (stamp, now)  # behind (a slow decode, a burst after a stall): catch up, never queue
                position = stamp
            now = time.monotonic()
            if now - last_handed < interval:
                continue
            try:
                rgb = frame_to_rgb(frame, self.settings.longest_side, self.settings.max_pixels)
            except ValueError as exc:
                raise Unplayable(str(exc)) from None
            last_handed = now
            self._handed += 1
            if self._handed == 1 or self.status.state != "playing":
                self._report("playing")
            self._call(self._on_frame, rgb, now)
        if not opened.finite:
            return position, False
        duration = opened.duration_s  # a recording over HTTP has ended only when it reached its end
        return position, self.target.kind != "url" or duration is None or position >= duration - 1.0
