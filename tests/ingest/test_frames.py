"""Between a video track and the ticks, the newest frame wins and stream time follows arrival; a tick converts
its frame once, at the model's size."""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np
import pytest
from PIL import Image

from actors.common.config import VigilConfig
from actors.common.frame_size import model_side
from actors.common.messages import EngineInfo
from actors.ingest.deployment import frames_for_model
from actors.ingest.frames import LatestFrameBuffer
from actors.ingest.session_loop import frame_to_rgb
from actors.interaction.engines.transformers import pixel_budget
from actors.interaction.models.tiny_vlm import build_image_processor

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


async def _frames_every(buffer: LatestFrameBuffer, interval: float, count: int, first_after: float = 0.0) -> None:
    """`count` frames, `interval` apart, the first after `first_after`; returns at the last."""
    await asyncio.sleep(first_after)
    for index in range(count):
        if index:
            await asyncio.sleep(interval)
        buffer.put(index)


async def test_a_tick_waits_for_the_next_frame_when_the_one_it_holds_is_old() -> None:
    buffer = LatestFrameBuffer()
    assert await buffer.aligned(0.5) == 0.0  # no frame yet: nothing to expect
    await _frames_every(buffer, 0.1, 4)  # frames at 0, 0.1, 0.2, 0.3; the next would come at 0.4
    assert buffer.interval == pytest.approx(0.1, abs=0.03)
    await asyncio.sleep(0.06)  # the newest frame is 0.06 s old; the next is due in 0.04 s
    feeder = asyncio.create_task(_frames_every(buffer, 0.1, 1, first_after=0.04))
    waited = await buffer.aligned(0.5)
    newest = buffer.take()
    assert newest is not None and newest.frame == 0 and time.monotonic() - newest.arrival < 0.03
    assert waited < 0.09  # it waited for that frame only
    await feeder


async def test_a_tick_does_not_wait_for_a_frame_too_far_off_or_after_the_video_stopped() -> None:
    buffer = LatestFrameBuffer()
    await _frames_every(buffer, 0.2, 3)
    await asyncio.sleep(0.06)
    assert await buffer.aligned(0.05) == 0.0  # 0.06 s old, and the next 0.14 s off: more than 0.05
    await asyncio.sleep(0.5)  # no frame for 0.56 s: the video paused, no frame is expected
    started = time.monotonic()
    assert await buffer.aligned(0.5) == 0.0 and time.monotonic() - started < 0.02
    buffer.put("fresh")
    assert await buffer.aligned(0.5) == 0.0  # the newest frame has just arrived
    assert buffer.interval == pytest.approx(0.2, abs=0.05)  # a pause is not a frame interval


async def test_a_tick_waits_no_longer_than_its_limit_for_a_late_frame() -> None:
    buffer = LatestFrameBuffer()
    await _frames_every(buffer, 0.1, 4)
    await asyncio.sleep(0.05)  # the next frame is due in about 0.05 s, and never comes
    waited = await buffer.aligned(0.06)
    assert 0.05 <= waited <= 0.1



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


def test_frames_go_no_bigger_than_the_model_takes_and_it_sees_them_as_before() -> None:
    """A model whose processor brings every image down to 12,544 pixels (the tiny Qwen2-VL's and the demo
    model's) gets frames of about twice that area instead of 448 px ones: a sixth of the pixels to convert, store
    and send, and the same grid of patches once its processor has scaled them."""
    processor = build_image_processor()
    budget = pixel_budget(processor)
    assert budget == 112 * 112
    config = frames_for_model(VigilConfig(redis_url="unused"), EngineInfo("transformers", "m", image_pixels=budget))
    assert config.image_size == model_side(448, budget) == 183
    rng = np.random.default_rng(7)
    for width, height in ((640, 480), (1280, 720), (480, 640), (720, 480)):
        frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), np.uint8), format="rgb24")
        small, full = frame_to_rgb(frame, config.image_size, 10**8), frame_to_rgb(frame, 448, 10**8)
        assert budget < small.shape[0] * small.shape[1] < full.shape[0] * full.shape[1] / 5
        grids = [processor(images=[Image.fromarray(rgb)], return_tensors="pt")["image_grid_thw"].tolist()
                 for rgb in (small, full)]
        assert grids[0] == grids[1], (width, height)
    unknown = VigilConfig(redis_url="unused")
    assert frames_for_model(unknown, EngineInfo("openai", "m")) is unknown  # no budget said: image_size stands
    assert frames_for_model(VigilConfig(redis_url="unused", image_size=96), EngineInfo("t", "m", image_pixels=budget)
                            ).image_size == 96  # never bigger than image_size
