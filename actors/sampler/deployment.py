"""The sampler on Ray Serve, and its handle-side client for the ingest.

Frames travel as ObjectRefs: the ingest converts each frame once, straight from the decoder's YUV to RGB at the
model's size, puts it into the object store once, and the sampler reads it from there, so a frame is never
pickled into the call itself. The sampler answers with its verdict alone; the ingest, which holds the pixels,
makes the sample.

A frame the deployment cannot judge at once (its replica lost mid-call, or none taking the call within
ASSIGN_WAIT_S: lost and not yet replaced, or all busy) is judged in the ingest instead, as `sampler: inline`
does, and so are the frames of the next INLINE_FOR_S: a lost sampler replica costs no tick.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.common.config import VigilConfig
from actors.common.messages import Sample, SampleVerdict
from actors.common.replicas import Overloaded, ReplicaFailed, call_replica, taken_by_replica
from actors.sampler.frame_sampler import FrameSampler

log = logging.getLogger(__name__)

# The judgement takes milliseconds: a call that no replica takes within ASSIGN_WAIT_S, or that is not answered
# within JUDGE_TIMEOUT_S, is judged here instead (Serve would hold it until a replacement is up, seconds).
ASSIGN_WAIT_S = 0.25
JUDGE_TIMEOUT_S = 0.5
# After the deployment failed a frame, frames are judged here for this long before it is asked again.
INLINE_FOR_S = 2.0


@serve.deployment(max_ongoing_requests=256)
class Sampler:
    """Frame sampling off the ingest's event loop; frames arrive as ObjectRefs."""

    def __init__(self, config: VigilConfig) -> None:
        self.sampler = FrameSampler(config.image_size, config.change_threshold, config.limits.max_frame_pixels)

    async def judge(self, frame_refs: list[ray.ObjectRef], previous: bytes | None, due: bool) -> SampleVerdict:
        """Keep or drop the frame behind the ref (at the model's size already), without its pixels."""
        rgb = await frame_refs[0]
        return await asyncio.to_thread(self.sampler.judge, rgb, previous, due)


def _made_and_stored(to_rgb: Callable[[], np.ndarray]) -> tuple[np.ndarray, ray.ObjectRef]:
    rgb = to_rgb()
    return rgb, ray.put(rgb)


def _stored_sample(rgb: np.ndarray, stream_time: float, change_score: float, ref: ray.ObjectRef) -> Sample:
    """A kept frame as a sample whose pixels are in the object store only (no copy in the ingest)."""
    return Sample(stream_time=stream_time, width=rgb.shape[1], height=rgb.shape[0], rgb=b"",
                  change_score=change_score, ref=ref)


class RemoteSampler:
    """The sampler deployment seen from the ingest: one `ray.put` per frame (off the event loop), then a call,
    bounded; judged here when the deployment cannot answer in time."""

    def __init__(self, handle: DeploymentHandle, config: VigilConfig) -> None:
        self.handle = handle
        self.fallback = FrameSampler(config.image_size, config.change_threshold, config.limits.max_frame_pixels)
        self._inline_until = float("-inf")  # time.monotonic() until which frames are judged here

    async def sample(self, to_rgb: Callable[[], np.ndarray], stream_time: float, previous: bytes | None,
                     due: bool) -> tuple[np.ndarray, SampleVerdict]:
        """`to_rgb` makes the frame at the model's size (the ingest's `frame_to_rgb`); the frame and its verdict."""
        rgb, ref = await asyncio.to_thread(_made_and_stored, to_rgb)
        verdict = await self._judge(rgb, ref, previous, due)
        if not verdict.keep:
            return rgb, verdict
        return rgb, dataclasses.replace(verdict, sample=_stored_sample(rgb, stream_time, verdict.change_score, ref))

    async def _judge(self, rgb: np.ndarray, ref: ray.ObjectRef, previous: bytes | None, due: bool) -> SampleVerdict:
        if time.monotonic() >= self._inline_until:
            try:
                taken = await taken_by_replica(self.handle.judge.remote([ref], previous, due), ASSIGN_WAIT_S,
                                               "a frame to judge")
                verdict: SampleVerdict = await asyncio.wait_for(call_replica(taken), JUDGE_TIMEOUT_S)
                return verdict
            except (ReplicaFailed, Overloaded, TimeoutError) as exc:
                log.warning("the sampler deployment did not judge a frame (%s); judging here for %.0f s",
                            type(exc).__name__, INLINE_FOR_S)
                self._inline_until = time.monotonic() + INLINE_FOR_S
        return await asyncio.to_thread(self.fallback.judge, rgb, previous, due)


class InlineSampler:
    """The sampler's judgement made in the caller's process (`sampler: inline`): for a frame already at the
    model's size it is a 16x16 signature, far cheaper than a call to another process."""

    def __init__(self, config: VigilConfig) -> None:
        self.sampler = FrameSampler(config.image_size, config.change_threshold, config.limits.max_frame_pixels)

    async def sample(self, to_rgb: Callable[[], np.ndarray], stream_time: float, previous: bytes | None,
                     due: bool) -> tuple[np.ndarray, SampleVerdict]:
        """The frame `to_rgb` makes, and its verdict: both in one worker thread."""
        return await asyncio.to_thread(self._sample, to_rgb, stream_time, previous, due)

    def _sample(self, to_rgb: Callable[[], np.ndarray], stream_time: float, previous: bytes | None,
                due: bool) -> tuple[np.ndarray, SampleVerdict]:
        rgb = to_rgb()
        verdict = self.sampler.judge(rgb, previous, due)
        if not verdict.keep:
            return rgb, verdict
        # A kept frame goes into the object store once: the interaction calls of its ticks carry the ref.
        sample = _stored_sample(rgb, stream_time, verdict.change_score, ray.put(rgb))
        return rgb, dataclasses.replace(verdict, sample=sample)

