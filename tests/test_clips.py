"""The fake-camera clip is a valid 4:2:0 YUV4MPEG2 file whose red disc appears exactly at the trigger."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.clips import read_y4m, write_trigger_clip

pytestmark = pytest.mark.unit


def red_mask(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (r > 150) & (g < 90) & (b < 90)


@pytest.fixture(scope="module", params=["demo-renderer", "own-renderer"])
def clip(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "own-renderer":
            # The import fails: clips.py draws its own frames.
            patch.setitem(sys.modules, "actors.interaction.models.demo", None)
        path = tmp_path_factory.mktemp("clips") / "trigger.y4m"
        write_trigger_clip(path, seconds=4, trigger_at_s=2.5)
    header, frames = read_y4m(path)
    return path, header, list(frames)


def test_header_names_size_rate_and_420(clip) -> None:
    path, header, _ = clip
    first_line = path.read_bytes().split(b"\n", 1)[0]
    assert first_line.startswith(b"YUV4MPEG2 ")
    assert (header.width, header.height, header.fps) == (320, 240, 10)
    assert header.colorspace.startswith("420")
    assert header.interlace == "p"


def test_frame_count_and_file_size(clip) -> None:
    path, _, frames = clip
    assert len(frames) == 40
    header_len = len(path.read_bytes().split(b"\n", 1)[0]) + 1
    frame_bytes = len(b"FRAME\n") + 320 * 240 * 3 // 2
    assert path.stat().st_size == header_len + 40 * frame_bytes
    assert all(frame.shape == (240, 320, 3) for frame in frames)


def test_red_disc_from_the_trigger_second_and_none_before(clip) -> None:
    _, _, frames = clip
    at_trigger = red_mask(frames[25])
    assert at_trigger.mean() > 0.03, "the disc should cover a visible part of the frame"
    rows = np.flatnonzero(at_trigger.any(axis=1))
    assert 0.2 * 240 <= rows[-1] - rows[0] + 1 <= 0.5 * 240, "the disc spans about a third of the height"
    cy, cx = (int(np.mean(axis)) for axis in np.nonzero(at_trigger))
    assert at_trigger[cy - 5 : cy + 5, cx - 5 : cx + 5].all(), "the disc is solid red around its centre"
    for index in (0, 10, 24):
        assert red_mask(frames[index]).sum() == 0, f"frame {index} comes before the trigger"
    assert all(red_mask(frame).mean() > 0.03 for frame in frames[25:])


def test_scene_moves_before_the_trigger(clip) -> None:
    _, _, frames = clip
    difference = np.abs(frames[0].astype(int) - frames[5].astype(int)).mean()
    assert difference > 1.0


def test_odd_sizes_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError):
        write_trigger_clip(tmp_path / "odd.y4m", seconds=1, trigger_at_s=0, width=321)
