"""The interaction engine on Ray Serve, and its handle-side client for the ingest.

A session's ticks go to the replica its id hashes to (so its prompt prefix stays in that engine's cache), spread
evenly over replicas. A tick whose replica dies is retried once on the replica that takes the session over, if
its deadline leaves time (`ReplicaFailed` when none takes it: the only replica was lost); a tick that no replica
takes within ASSIGN_WAIT_S, or that cannot start before its deadline, is refused as `Overloaded`.

A tick's frames travel as the ObjectRefs the ingest put them in the object store with (each frame once, though
it is in the prompt of several ticks); the replica reads them from there, so no call carries pixels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, cast

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from actors.common.config import VigilConfig
from actors.common.messages import Decision, EngineInfo, TickRequest
from actors.common.replicas import Overloaded, ReplicaFailed, call_replica, session_affinity, taken_by_replica

log = logging.getLogger(__name__)

# A retry is worth starting only with at least this much of the tick's deadline left.
RETRY_MIN_S = 0.2
# A tick that no replica takes within this long is refused as Overloaded: every replica's queue is full, or
# every replica is lost and Serve has not yet started a replacement (calls would queue until then, seconds).
ASSIGN_WAIT_S = 0.5


def _past_deadline(request: TickRequest, now: float) -> bool:
    return bool(request.deadline) and now >= request.deadline


@serve.deployment(max_ongoing_requests=64, request_router_config=session_affinity())
class Interaction:
    """The decision engine; concurrent ticks of many sessions are decided as one batch."""

    async def __init__(self, config: VigilConfig) -> None:
        # Imported here: torch and transformers load only in the interaction replicas.
        from actors.interaction.engines import load_engine

        self.engine = load_engine(config)
        await self.engine.start()
        # Which replica decided a tick, for the event log: its Serve id and process (to find it on its node).
        self.replica = f"{serve.get_replica_context().replica_id.unique_id}@{os.getpid()}"

    async def decide(self, request: TickRequest, frame_refs: list[Any] | None = None) -> Decision:
        """Decide one tick, batched with the ticks of other sessions that arrive in the same moment.

        `frame_refs`: one entry per sample of `request.samples`, the ref of its pixels (None: the sample carries
        them), as `RemoteEngine` sends it."""
        if frame_refs:
            request = await _with_pixels(request, frame_refs)
        if _past_deadline(request, time.time()):
            raise Overloaded(f"tick {request.tick} of {request.session_id} reached its deadline while queued")
        if self.engine.batches_itself:
            [decided] = await self.engine.decide([request])
            return dataclasses.replace(decided, replica=self.replica)
        decision = await self._decide_batch(request)
        if decision is None:
            raise Overloaded(f"tick {request.tick} of {request.session_id} reached its deadline waiting for a batch")
        return decision

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _decide_batch(self, requests: list[TickRequest]) -> list[Decision | None]:
        # Ticks whose deadline passed while the previous batch ran are not decided (None: overload).
        now = time.time()
        live = [request for request in requests if not _past_deadline(request, now)]
        decided = iter(await self.engine.decide(live) if live else [])
        return [
            None if _past_deadline(request, now) else dataclasses.replace(next(decided), replica=self.replica)
            for request in requests
        ]

    async def info(self) -> EngineInfo:
        return self.engine.info()

    async def check_health(self) -> None:
        await self.engine.check_health()


async def _with_pixels(request: TickRequest, frame_refs: list[Any]) -> TickRequest:
    """The request with each sample's pixels read back from the object store (zero-copy, then one copy)."""
    held = [(index, ref) for index, ref in enumerate(frame_refs) if ref is not None]
    arrays = await asyncio.gather(*(ref for _, ref in held))
    samples = list(request.samples)
    for (index, _), array in zip(held, arrays, strict=True):
        samples[index] = samples[index].with_pixels(array.tobytes())
    return dataclasses.replace(request, samples=tuple(samples))


def _as_refs(request: TickRequest) -> tuple[TickRequest, list[Any]]:
    """The request without the pixels that are in the object store already, and their refs."""
    refs = [sample.ref for sample in request.samples]
    if not any(ref is not None for ref in refs):
        return request, []
    samples = tuple(sample if sample.ref is None else sample.without_pixels() for sample in request.samples)
    return dataclasses.replace(request, samples=samples), refs


class RemoteEngine:
    """The interaction deployment seen from the ingest: decide (routed by session, retried once across a lost
    replica, bounded by the tick's deadline), info and health through a handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def decide(self, request: TickRequest) -> Decision:
        try:
            return await self._decide_once(request)
        except ReplicaFailed as lost:
            if request.deadline and request.deadline - time.time() < RETRY_MIN_S:
                raise
            log.info("interaction replica lost during tick %d of %s; retrying once", request.tick,
                     request.session_id)
            try:
                return await self._decide_once(request)
            except Overloaded:
                # No survivor took the retry (the only replica was lost): the tick ends as the loss's, at once.
                raise lost from None

    async def _decide_once(self, request: TickRequest) -> Decision:
        light, refs = _as_refs(request)
        call = self.handle.options(session_id=request.session_id).decide
        response = cast(DeploymentResponse, call.remote(light, refs) if refs else call.remote(light))
        remaining = max(0.0, request.deadline - time.time()) if request.deadline else None
        # The wait for a replica to take the call is bounded on its own: with every replica lost, Serve would
        # hold it until a replacement is up (seconds), and the tick would end only at its deadline.
        ref = await taken_by_replica(response, min(remaining or ASSIGN_WAIT_S, ASSIGN_WAIT_S),
                                     f"interaction tick {request.tick}")
        remaining = max(0.0, request.deadline - time.time()) if request.deadline else None
        decision: Decision = await asyncio.wait_for(call_replica(ref), remaining)
        return decision

    async def info(self) -> EngineInfo:
        return await self.handle.info.remote()

    async def check_health(self) -> None:
        await self.handle.check_health.remote()
