"""The sampler on Ray Serve, and its handle-side client for the ingest.

Frames travel as ObjectRefs: the ingest puts each frame into the object store once, and the sampler reads it
from there, so a frame is never pickled into the call itself.
"""

from __future__ import annotations

import asyncio

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.common.config import VigilConfig
from actors.common.messages import SampleVerdict
from actors.sampler.frame_sampler import FrameSampler


@serve.deployment(max_ongoing_requests=256)
class Sampler:
    """Frame sampling off the ingest's event loop; frames arrive as ObjectRefs."""

    def __init__(self, config: VigilConfig) -> None:
        self.sampler = FrameSampler(config.image_size, config.change_threshold, config.limits.max_frame_pixels)

    async def sample(
        self, frame_refs: list[ray.ObjectRef], stream_time: float, previous: bytes | None, due: bool
    ) -> SampleVerdict:
        rgb = await frame_refs[0]
        return await asyncio.to_thread(self.sampler.sample, rgb, stream_time, previous, due)


class RemoteSampler:
    """The sampler deployment seen from the ingest: one `ray.put` per frame (off the event loop), then a call."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def sample(self, rgb: np.ndarray, stream_time: float, previous: bytes | None, due: bool) -> SampleVerdict:
        ref = await asyncio.to_thread(ray.put, rgb)
        return await self.handle.sample.remote([ref], stream_time, previous, due)
