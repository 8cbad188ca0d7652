"""The source reader on its own, over real files and real local servers: a file plays in real time (once, or in a
loop) at no more than the frame rate the ticks need; what cannot play fails with its reason; a redirect is not
followed; a live camera that drops is reconnected with backoff; and stopping leaves no thread behind."""

from __future__ import annotations

import asyncio
import functools
import http.server
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors.common.config import VigilConfig
from actors.ingest.source_policy import SourcePolicy, SourceTarget
from actors.ingest.sources import SourceSettings, SourceStatus, Unplayable, VideoSource, open_input, probe_video
from tests.video_sources import FileServer, MjpegCamera, write_disc_video

pytestmark = pytest.mark.unit

SETTINGS = SourceSettings(max_fps=5.0, longest_side=64, open_timeout_s=3.0, read_timeout_s=2.0,
                          backoff_initial_s=0.2, backoff_max_s=0.5)


class Recorder:
    """What a source hands the event loop: frames (with when they came) and every state it reports."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, bool]] = []  # (arrival, shows the red disc)
        self.statuses: list[SourceStatus] = []
        self.changed = asyncio.Event()

    def frame(self, rgb: np.ndarray, arrival: float) -> None:
        red = (rgb[..., 0] > 150) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
        self.frames.append((arrival, bool(red.mean() > 0.02)))
        self.changed.set()

    def status(self, status: SourceStatus) -> None:
        self.statuses.append(status)
        self.changed.set()

    @property
    def states(self) -> list[str]:
        states: list[str] = []
        for status in self.statuses:
            if not states or states[-1] != status.state:
                states.append(status.state)
        return states

    async def until(self, predicate: Any, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"not in time; states {self.states}, {len(self.frames)} frames, "
                                     f"last {self.statuses[-1:] if self.statuses else None}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                pass


def source_of(target: SourceTarget, policy: SourcePolicy, recorder: Recorder) -> VideoSource:
    opener = functools.partial(open_input, target, policy, SETTINGS)
    return VideoSource(target, opener, recorder.frame, recorder.status, SETTINGS, name="vigil-source-test")


def http_policy() -> SourcePolicy:
    return SourcePolicy(VigilConfig(sources_allowed_schemes=["http", "rtsp"], sources_allowed_networks=["127.0.0.0/8"]))


def file_target(path: Path, loop: bool = False) -> SourceTarget:
    return SourceTarget("file", str(path), path.name, loop)


async def test_a_file_plays_once_in_real_time_at_the_frame_rate_the_ticks_need(tmp_path: Path) -> None:
    video = write_disc_video(tmp_path / "clip.mp4", seconds=2.0, disc_at_s=1.0, fps=20)
    recorder = Recorder()
    source = source_of(file_target(video), SourcePolicy(VigilConfig()), recorder)
    started = time.monotonic()
    source.start()
    await recorder.until(lambda: recorder.statuses and recorder.statuses[-1].state == "ended")
    took = time.monotonic() - started
    assert recorder.states == ["connecting", "playing", "ended"]
    assert 1.6 <= took <= 4.0, f"two seconds of video played in {took:.2f} s"
    arrivals = [arrival for arrival, _ in recorder.frames]
    assert 7 <= len(arrivals) <= 11, f"{len(arrivals)} frames handed on for 2 s at 5 fps (of 40 decoded)"
    assert min(b - a for a, b in itertools.pairwise(arrivals)) >= 0.19
    shown = [red for _, red in recorder.frames]
    assert not any(shown[:3]) and all(shown[-3:]), shown  # the disc from second 1 on, in order
    assert recorder.statuses[-1].frames == len(arrivals)
    assert await source.join(2.0)


async def test_a_looped_file_plays_on_until_stopped_and_its_thread_ends(tmp_path: Path) -> None:
    video = write_disc_video(tmp_path / "short.webm", seconds=0.6, disc_at_s=None, fps=10)
    recorder = Recorder()
    source = source_of(file_target(video, loop=True), SourcePolicy(VigilConfig()), recorder)
    source.start()
    await recorder.until(lambda: len(recorder.frames) >= 8)  # over two plays
    assert recorder.states == ["connecting", "playing"]  # starting again is not a reconnection
    assert await source.join(2.0)
    assert recorder.states[-1] == "stopped"
    assert not [t for t in threading.enumerate() if t.name == "vigil-source-test"]


async def test_what_cannot_play_fails_with_its_reason(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 100)
    with pytest.raises(Unplayable, match="not a video"):
        probe_video(file_target(text), SourcePolicy(VigilConfig()), SETTINGS)
    recorder = Recorder()
    source = source_of(file_target(text), SourcePolicy(VigilConfig()), recorder)
    source.start()
    await recorder.until(lambda: recorder.statuses and recorder.statuses[-1].terminal)
    assert recorder.states == ["connecting", "failed"]
    assert "Invalid data" in recorder.statuses[-1].reason
    # A URL that answers 404 fails at once: it is not a camera that will come back.
    with FileServer(tmp_path) as server:
        recorder = Recorder()
        source = source_of(SourceTarget("url", server.url("missing.webm"), "missing"), http_policy(), recorder)
        source.start()
        await recorder.until(lambda: recorder.statuses and recorder.statuses[-1].terminal)
        assert recorder.states == ["connecting", "failed"] and "404" in recorder.statuses[-1].reason
    assert await source.join(1.0)


async def test_a_redirect_is_not_followed(tmp_path: Path) -> None:
    write_disc_video(tmp_path / "clip.webm", seconds=1.0, disc_at_s=None)
    requests: list[str] = []

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(302)
            self.send_header("Location", target_url)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    redirector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=redirector.serve_forever, daemon=True).start()
    try:
        with FileServer(tmp_path) as server:
            served: list[str] = []
            original = server.server.RequestHandlerClass
            target_url = server.url("clip.webm")

            def counting(*args: Any, **kwargs: Any) -> Any:
                served.append("request")
                return original(*args, **kwargs)

            server.server.RequestHandlerClass = counting  # type: ignore[assignment]
            recorder = Recorder()
            url = f"http://127.0.0.1:{redirector.server_address[1]}/camera"
            source = source_of(SourceTarget("url", url, "camera"), http_policy(), recorder)
            source.start()
            await recorder.until(lambda: recorder.statuses and recorder.statuses[-1].terminal)
            assert recorder.states[-1] == "failed" and recorder.frames == []
            assert requests and served == []  # the redirect's target was never asked for anything
    finally:
        redirector.shutdown()
        redirector.server_close()


async def test_a_live_camera_that_drops_is_reconnected_with_backoff() -> None:
    camera = MjpegCamera(fps=5.0)
    camera.start()
    recorder = Recorder()
    source = source_of(SourceTarget("url", camera.url, "camera"), http_policy(), recorder)
    source.start()
    try:
        await recorder.until(lambda: len(recorder.frames) >= 3)
        camera.stop()
        await recorder.until(lambda: recorder.statuses[-1].state == "reconnecting"
                             and recorder.statuses[-1].attempt >= 2)
        assert recorder.statuses[-1].retry_in_s == 0.4 or recorder.statuses[-1].retry_in_s == 0.5
        before = len(recorder.frames)
        camera.disc = True
        camera.start()  # back, on the same port
        await recorder.until(lambda: len(recorder.frames) >= before + 3)
        assert recorder.states[-1] == "playing" and recorder.frames[-1][1]
        assert "reconnecting" in recorder.states and camera.connections >= 2
    finally:
        camera.stop()
        assert await source.join(3.0)
