"""Between a video track and the ticks, the newest frame wins and stream time follows arrival; a tick converts
its frame once, at the model's size."""

from __future__ import annotations

import av
import numpy as np
import pytest

from actors.ingest.frames import LatestFrameBuffer
from actors.ingest.session_loop import frame_to_rgb

pytestmark = pytest.mark.unit


def test_newest_frame_wins() -> None:
    buffer = LatestFrameBuffer()
    assert buffer.take() is None
    for index in range(5):
        buffer.put(index, arrival=10.0 + index)
    newest = buffer.take()
    assert newest is not None and newest.frame == 4 and buffer.replaced == 4
    assert buffer.take() is None
    assert buffer.stream_time(12.5) == 2.5



def test_a_decoded_frame_is_converted_once_straight_to_the_models_size() -> None:
    rgb = np.zeros((480, 640, 3), np.uint8)
    rgb[:, 320:] = (220, 20, 20)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")  # as the decoder gives
    small = frame_to_rgb(frame, 448, 10**7)
    assert small.shape == (336, 448, 3) and small.dtype == np.uint8 and small.flags["C_CONTIGUOUS"]
    assert small[:, :200].mean() < 10 and abs(int(small[100, 400, 0]) - 220) < 12  # colours survive
    assert frame_to_rgb(frame, 1024, 10**7).shape == (480, 640, 3)  # never scaled up
    assert frame_to_rgb(rgb, 448, 10**7).shape == (336, 448, 3)  # arrays (tests, files) the same way
    with pytest.raises(ValueError, match="pixel limit"):
        frame_to_rgb(frame, 448, 640 * 480 - 1)
