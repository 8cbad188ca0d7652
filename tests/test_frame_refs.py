"""A tick's frames cross processes as ObjectRefs, not pixels: the ingest's one put of a kept frame (inline
sampler) is what the interaction call carries, and the replica reads back exactly the pixels the ingest held."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import numpy as np
import pytest
import ray

from actors.common.config import VigilConfig
from actors.common.messages import Sample, TickRequest
from actors.interaction.deployment import _as_refs, _with_pixels
from actors.sampler.deployment import InlineSampler

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


async def test_kept_frames_travel_as_their_refs_and_come_back_whole(local_ray: None) -> None:
    sampler = InlineSampler(VigilConfig(image_size=64))
    frames = [np.full((48, 64, 3), value, np.uint8) for value in (10, 200)]
    made, first = await sampler.sample(lambda: frames[0], 1.0, None, True)
    assert made is frames[0]
    _, second = await sampler.sample(lambda: frames[1], 2.0, first.signature, True)
    assert first.sample is not None and second.sample is not None and first.sample.ref is not None
    assert first.sample.rgb == b"", "the ingest keeps no copy of a stored frame's pixels"
    _, unchanged = await sampler.sample(lambda: frames[1], 2.5, second.signature, False)
    assert not unchanged.keep and unchanged.sample is None
    lookback = Sample(0.5, 64, 48, frames[0].tobytes())  # from memory: no ref, travels with its pixels
    request = TickRequest(session_id="s_refs", tick=3, stream_time=2.0,
                          samples=(lookback, first.sample, second.sample))
    light, refs = _as_refs(request)
    assert refs[0] is None and refs[1] is first.sample.ref
    assert light.samples[0].rgb == lookback.rgb and light.samples[1].rgb == b"" and light.samples[2].rgb == b""
    frame_bytes = 64 * 48 * 3
    assert len(pickle.dumps(light)) < frame_bytes + 4096, "only the look-back frame's pixels are in the call"
    restored = await _with_pixels(light, refs)
    assert [sample.rgb for sample in restored.samples] == [frames[0].tobytes(), frames[0].tobytes(),
                                                           frames[1].tobytes()]
    assert all(sample.ref is None for sample in restored.samples)


async def test_a_request_without_refs_goes_as_it_is(local_ray: None) -> None:
    request = TickRequest(session_id="s_plain", tick=1, stream_time=0.0, samples=(Sample(0.0, 1, 1, b"abc"),))
    light, refs = _as_refs(request)
    assert light is request and refs == []
