"""`vigil replay` runs a recording through a real Vigil over its streaming HTTP API and writes what a user would
check: one tick per step, responses only while the red square shows (so `vigil score` gives SW-F1 1.0 on it), an
HTML report with the responses' times and thumbnails; `--speed real` keeps to the video's clock and `fast` does
not; a 5xx is retried and counted; a bad video, a Vigil that is down and a missing API key each end with exit 2
and one line saying why, and the key never appears in what it writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from actors.common.embedded_redis import EmbeddedRedis
from actors.common.messages import Decision, TickRequest
from actors.interaction.engine import EngineError
from load_tests.clip import ClipSpec, render_frames
from load_tests.streaming_client import decision_of
from load_tests.video_steps import read_steps
from tests.fakes import free_port, red_pixels
from tests.fixtures_gateway import LocalVigil, red_rule, start_local_vigil

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
VIGIL = Path(sys.executable).parent / "vigil"
WATCH = "tell me when you see red"
RED_WINDOW = (3.0, 5.0)  # the red square shows from 3 s to 5 s (frames at 3.0 .. 4.8)


def make_clip(path: Path, seconds: float, fps: int = 5, size: tuple[int, int] = (320, 240),
              red: tuple[float, float] | None = RED_WINDOW) -> Path:
    """A grey clip with a red square while `red` lasts, encoded with PyAV."""
    width, height = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(round(seconds * fps)):
            picture = np.full((height, width, 3), 70, np.uint8)
            if red is not None and red[0] <= index / fps < red[1]:
                picture[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = (230, 10, 10)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = index
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clips") / "red_square.mp4", 8)


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clips") / "short.mp4", 3, red=None)


def vigil(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The installed console script, as a user runs it (no key or URL from this environment)."""
    command = [str(VIGIL)] if VIGIL.exists() else [sys.executable, "-m", "load_tests.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("VIGIL_API_KEY", "VIGIL_URL")}
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def replay(local_vigil: LocalVigil, video: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return vigil("replay", video, "--url", local_vigil.url, "--instruction", WATCH, "-o", out / "run.json",
                 "--report", out / "run.html", *args)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("vigil replay: "), done.stderr
    return lines[0]


# -- the whole path ------------------------------------------------------------------------------------------


def test_replay_records_a_tick_per_step_and_scores_1(local_vigil: LocalVigil, clip: Path, tmp_path: Path) -> None:
    done = replay(local_vigil, clip, tmp_path, "--session", "replay-test-1", "--progress", "on")
    assert done.returncode == 0, done.stderr
    assert "8/8 s" in done.stderr and "2 responses" in done.stderr  # the progress bar
    timeline = json.loads((tmp_path / "run.json").read_text())
    ticks = timeline["ticks"]
    assert [t["t"] for t in ticks] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]  # each step's end
    assert [(t["t"], t["text"]) for t in ticks if t["decision"] == "respond"] == [(4.0, "I see red."),
                                                                                  (5.0, "I see red.")]
    assert {t["decision"] for t in ticks if t["t"] not in (4.0, 5.0)} == {"silent"}
    assert [t["tick"] for t in ticks] == list(range(1, 9))  # the session's own tick numbers
    assert timeline["video"] == str(clip) and timeline["instructions"] == [WATCH]
    assert timeline["figures"]["ticks"] == 8 and timeline["figures"]["responses"] == 2
    assert timeline["figures"]["retries"] == 0 and timeline["figures"]["latency_ms"]["p95"] > 0
    assert "8 ticks, 2 responses" in done.stdout

    # Vigil decided on each step's frame at that frame's time.
    times = [r.stream_time for r in local_vigil.engine.requests]
    assert times == [float(s) for s in range(8)]

    expected = tmp_path / "expected.json"
    expected.write_text(json.dumps({"format": "vigil.expectations", "version": 1,
                                    "windows": [{"start": 3, "end": 6, "label": "red square"}]}))
    scored = vigil("score", tmp_path / "run.json", expected, "--fail-under", "1.0")
    assert scored.returncode == 0, scored.stdout + scored.stderr
    assert "SW-F1 1.000" in scored.stdout and "(TP 1, FP 0, FN 0" in scored.stdout

    report = (tmp_path / "run.html").read_text()
    assert report.count('<img src="data:image/jpeg;base64,') == 2
    assert "0:03.0&ndash;0:04.0" in report and "0:04.0&ndash;0:05.0" in report and "I see red." in report
    assert clip.name in report and WATCH in report and "p50" in report and "p95" in report
    assert report.count('<span class="silent" title=') == 6 and report.count('<span class="respond" title=') == 2


def test_the_session_is_reset_at_the_end(local_vigil: LocalVigil, short_clip: Path, tmp_path: Path) -> None:
    import httpx

    assert replay(local_vigil, short_clip, tmp_path, "--session", "replay-reset").returncode == 0
    events = httpx.get(f"{local_vigil.url}/v1/streaming/events", headers={"x-streaming-session": "replay-reset"})
    assert events.status_code == 404  # the name has no session any more


def test_a_delegation_is_read_from_the_answer(local_vigil: LocalVigil, clip: Path, tmp_path: Path) -> None:
    def delegate(request: TickRequest) -> Decision:
        if red_pixels(request):
            return Decision(kind="delegate", text="Let me look that up.", question="what is red?")
        return Decision(kind="silent")

    local_vigil.engine.rule = delegate
    assert replay(local_vigil, clip, tmp_path).returncode == 0
    ticks = json.loads((tmp_path / "run.json").read_text())["ticks"]
    assert [(t["t"], t["decision"], t["text"]) for t in ticks if t["decision"] != "silent"] == [
        (4.0, "delegate", "Let me look that up."), (5.0, "delegate", "Let me look that up.")]


def test_real_speed_keeps_to_the_video_and_fast_does_not(local_vigil: LocalVigil, short_clip: Path,
                                                         tmp_path: Path) -> None:
    walls = {}
    for speed in ("real", "fast"):
        done = replay(local_vigil, short_clip, tmp_path / speed, "--speed", speed)
        assert done.returncode == 0, done.stderr
        timeline = json.loads((tmp_path / speed / "run.json").read_text())
        assert len(timeline["ticks"]) == 3
        walls[speed] = timeline["figures"]["wall_s"]
    assert walls["real"] >= 2.95  # the last step goes when 3 s of video have played
    assert walls["fast"] < walls["real"] - 1.5


def test_a_5xx_is_retried_and_counted(local_vigil: LocalVigil, short_clip: Path, tmp_path: Path) -> None:
    calls = 0
    lock = threading.Lock()

    def flaky(request: TickRequest) -> Decision:
        nonlocal calls
        with lock:
            calls += 1
            if calls in (2, 4, 5):  # step 2 fails once; step 3 fails twice, more than --retries 1 allows
                raise EngineError("scripted failure")
        return red_rule(request)

    local_vigil.engine.rule = flaky
    done = replay(local_vigil, short_clip, tmp_path, "--retries", "1")
    assert done.returncode == 0, done.stderr
    timeline = json.loads((tmp_path / "run.json").read_text())
    assert [t["decision"] for t in timeline["ticks"]] == ["silent", "silent", "skipped:http_502"]
    assert timeline["figures"]["retries"] == 2 and "2 retries" in done.stdout
    assert "<th>retries</th><td>2</td>" in (tmp_path / "run.html").read_text()


def test_vigil_going_away_midway_keeps_what_was_recorded(redis_server: EmbeddedRedis, clip: Path,
                                                         tmp_path: Path) -> None:
    server, local = start_local_vigil(redis_server)

    def then_stop(request: TickRequest) -> Decision:
        if len(local.engine.requests) == 3:
            server.server.should_exit = True  # uvicorn answers this request, then stops listening
        return red_rule(request)

    local.engine.rule = then_stop
    with server:
        local.url = server.url
        done = replay(local, clip, tmp_path, "--retries", "1", "--speed", "4")
    line = one_line(done)
    timeline = json.loads((tmp_path / "run.json").read_text())
    kept = [t["t"] for t in timeline["ticks"]]  # up to the 3rd step, or one more if uvicorn was slow to stop
    assert kept in ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]) and timeline["aborted"]
    assert f"stopped answering at {kept[-1]:.1f} s (after 1 retry)" in line and str(tmp_path / "run.json") in line
    assert "Stopped early" in (tmp_path / "run.html").read_text()


def render_demo_clip(path: Path, spec: ClipSpec) -> Path:
    """The demo model's scene (the clip the load test streams), with its red disc while a trigger is on."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=spec.fps, options={"qscale": "3"})
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        for index, rgb in enumerate(render_frames(spec)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def demo_vigil(redis_server: EmbeddedRedis, demo_model_dir: Path) -> Iterator[LocalVigil]:
    """The local gateway deciding with the trained demo model, at the image size `make run` gives it."""
    from actors.common.config import VigilConfig
    from actors.interaction.engines.transformers import TransformersEngine

    server, local = start_local_vigil(redis_server, model_engine=TransformersEngine(str(demo_model_dir)),
                                      image_size=VigilConfig().image_size)
    with server:
        local.url = server.url
        yield local


@pytest.mark.parametrize(("triggers", "responses"), [((4.0, 16.0), {5.0, 6.0, 17.0, 18.0}), ((), set())])
def test_the_demo_model_answers_its_triggers_and_nothing_else(
    demo_vigil: LocalVigil, tmp_path: Path, triggers: tuple[float, ...], responses: set[float]
) -> None:
    spec = ClipSpec(width=320, height=240, fps=2, seconds=20, triggers=triggers)
    video = render_demo_clip(tmp_path / "red_disc.mp4", spec)
    done = replay(demo_vigil, video, tmp_path)
    assert done.returncode == 0, done.stderr
    ticks = json.loads((tmp_path / "run.json").read_text())["ticks"]
    assert len(ticks) == 20 and {t["t"] for t in ticks if t["decision"] == "respond"} == responses
    if triggers:  # the fixture's expectations: the disc from 4 to 8 s and at 17 ± 2 s
        scored = vigil("score", tmp_path / "run.json", ROOT / "tests/fixtures/scoring/expectations.json",
                       "--fail-under", "1.0")
        assert scored.returncode == 0 and "SW-F1 1.000" in scored.stdout, scored.stdout + scored.stderr


# -- what refuses to run -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "says"), [
    (None, "no such file"),
    (b"", "not a video"),
    (b"this is not a video at all\n" * 50, "not a video"),
])
def test_a_bad_video_exits_2_with_one_line(tmp_path: Path, content: bytes | None, says: str) -> None:
    video = tmp_path / "bad.mp4"
    if content is not None:
        video.write_bytes(content)
    line = one_line(vigil("replay", video, "--url", f"http://127.0.0.1:{free_port()}", "-o", tmp_path / "t.json"))
    assert "bad.mp4" in line and says in line
    assert not (tmp_path / "t.json").exists()


def test_vigil_down_exits_2_with_one_line(clip: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = one_line(vigil("replay", clip, "--url", url, "-o", tmp_path / "t.json"))
    assert "cannot reach Vigil" in line and url in line
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("local_vigil", [{"api_key": "k3y-s3cret"}], indirect=True)
def test_a_missing_api_key_exits_2_naming_401(local_vigil: LocalVigil, short_clip: Path, tmp_path: Path) -> None:
    line = one_line(replay(local_vigil, short_clip, tmp_path))
    assert "401" in line and "VIGIL_API_KEY" in line
    assert not (tmp_path / "run.json").exists()
    done = replay(local_vigil, short_clip, tmp_path, "--api-key", "k3y-s3cret")
    assert done.returncode == 0, done.stderr
    written = (tmp_path / "run.json").read_text() + (tmp_path / "run.html").read_text()
    assert "k3y-s3cret" not in done.stdout + done.stderr + written


# -- the pieces ----------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(("content", "raw", "decision"), [
    ("</silence>", "", ("silent", "")),
    ("</response> I see red.", "</response> I see red.\n(more)", ("respond", "I see red.")),
    ("</response>  two   spaces ", "", ("respond", "two spaces")),
    ("</response> Let me check. </delegation> what brand?", "", ("delegate", "Let me check.")),
    ("</response> Let me check.", "</response> Let me check.\n</delegation> what brand?",
     ("delegate", "Let me check.")),
    ("</response> On it. <|background_call|>{\"query\": \"x\"}", "", ("delegate", "On it.")),
    ("</response> Noted.", "</response> Noted. </delegation>", ("respond", "Noted.")),  # no question: no delegation
    ("</response>", "", ("silent", "")),
    ("no marker at all", "", ("respond", "no marker at all")),
    ("</silence> </response> late", "", ("silent", "")),
])
def test_decisions_are_read_as_joyai_clients_read_them(content: str, raw: str,
                                                       decision: tuple[str, str]) -> None:
    assert decision_of(content, raw) == decision


@pytest.mark.unit
def test_steps_group_samples_and_the_last_ends_with_the_video(clip: Path) -> None:
    steps = list(read_steps(clip, fps=2, step_s=3))
    assert [(s.start, s.end) for s in steps] == [(0, 3), (3, 6), (6, 8.0)]
    assert [[f.t for f in s.frames] for s in steps] == [
        [0.0, 0.5, 1.0, 1.5, 2.0, 2.5], [3.0, 3.5, 4.0, 4.5, 5.0, 5.5], [6.0, 6.5, 7.0, 7.5]]
    # Above the video's 5 fps, a frame is sent again (encoded once) rather than invented.
    dense = next(iter(read_steps(clip, fps=10, step_s=1)))
    assert len(dense.frames) == 10 and len({id(f.jpeg) for f in dense.frames}) == 5


@pytest.mark.unit
def test_frames_are_at_most_640_pixels(tmp_path: Path) -> None:
    import io

    from PIL import Image

    big = make_clip(tmp_path / "big.mp4", 1, fps=2, size=(1280, 720), red=None)
    frame = next(iter(read_steps(big, fps=1, step_s=1))).frames[0]
    assert Image.open(io.BytesIO(frame.jpeg)).size == (640, 360)
