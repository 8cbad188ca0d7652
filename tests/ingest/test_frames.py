"""Between a video track and the ticks, the newest frame wins and stream time follows arrival; a tick converts
its frame once, at the model's size."""

from __future__ import annotations

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
