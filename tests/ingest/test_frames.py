"""Between a video track and the ticks, the newest frame wins and stream time follows arrival."""

from __future__ import annotations

import pytest

from actors.ingest.frames import LatestFrameBuffer

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

