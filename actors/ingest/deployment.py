"""The ingest on Ray Serve: the HTTP API, the WebRTC peers and every session's tick loop.

A session's HTTP calls carry its id in the `x-session-id` header, which Ray Serve's proxy routes by (consistent
hashing over the ingest replicas): its offer, events, settings, recall and DELETE reach the replica that holds its
peer, and sessions spread evenly over replicas. A call that reaches another replica (the header left out, or the
replicas changed) still works: the session's state, its owner and changes meant for it are in Redis.

When a replica goes (scale-down, redeploy), it drains: each client is told on its data channel to connect again,
and resumes on another replica where its ticks stopped.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prometheus_client import start_http_server
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.brain.deployment import RemoteBrain
from actors.common.config import VigilConfig
from actors.common.frame_size import model_side
from actors.common.messages import EngineInfo
from actors.common.metrics import VigilMetrics
from actors.common.replicas import session_affinity
from actors.common.session_store import SessionStore
from actors.ingest.delegations import Brain
from actors.ingest.gateway import Gateway, build_api
from actors.ingest.ice import restrict_host_addresses
from actors.ingest.jitter import hand_frames_on_at_their_last_packet
from actors.ingest.session_loop import TickServices
from actors.ingest.video_layers import decode_layers
from actors.interaction.deployment import RemoteEngine
from actors.memory.deployment import RemoteMemory
from actors.sampler.deployment import InlineSampler, RemoteSampler

log = logging.getLogger(__name__)

DRAIN_GRACE_S = 1.0  # how long a draining replica gives its clients to read "reconnect" before closing


def frames_for_model(config: VigilConfig, info: EngineInfo) -> VigilConfig:
    """The config with frames no bigger than the model takes: a processor that brings every image down to a few
    thousand pixels (the demo model's: 12,544) is not sent 448-pixel frames to convert, store, send and scale."""
    side = model_side(config.image_size, info.image_pixels)
    if side >= config.image_size:
        return config
    log.info("frames go to the model at most %d px on their longest side (image_size %d): its processor takes "
             "%d pixels of a frame", side, config.image_size, info.image_pixels)
    return config.model_copy(update={"image_size": side})


def session_brain(remote: RemoteBrain) -> Brain:
    return Brain(delegate=remote.delegate, cancel=remote.cancel, cancel_session=remote.cancel_session,
                 follow=remote.follow)


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_timeout_s=5, request_router_config=session_affinity())
@serve.ingress()
class Ingest:
    """HTTP API, WebRTC peers and session loops."""

    async def __init__(
        self,
        config: VigilConfig,
        sampler: DeploymentHandle | None,
        interaction: DeploymentHandle,
        memory: DeploymentHandle | None = None,
        brain: DeploymentHandle | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        restrict_host_addresses(config.ice_host_addresses)
        hand_frames_on_at_their_last_packet()
        metrics = VigilMetrics()
        frame_counts = {result: metrics.video_frames_total.labels(result=result) for result in ("decoded", "dropped")}
        decode_layers(config.video_decode_layers, lambda result: frame_counts[result].inc())
        engine = RemoteEngine(interaction)
        engine_info = await engine.info()
        config = frames_for_model(config, engine_info)
        store = SessionStore.from_url(config.redis_url or "", config.session_ttl_s, config.event_log_max)

        frames = RemoteSampler(sampler, config) if sampler is not None else InlineSampler(config)
        services = TickServices(
            sample=frames.sample, decide=engine.decide, store=store, metrics=metrics,
            memory=RemoteMemory(memory) if memory is not None else None,
            brain=session_brain(RemoteBrain(brain)) if brain is not None else None,
        )
        if config.metrics_port is not None:
            # Serve's proxy sends /metrics to any one ingest replica; this port gives each its own scrape target.
            # The manifest allows one ingest replica per node, so the port is free.
            start_http_server(config.metrics_port, registry=services.metrics.registry)
        replica = f"{serve.get_replica_context().replica_id.unique_id}@{os.getpid()}"
        self.gateway = Gateway(config, store, services, engine, replica)
        await self.gateway.start(engine_info)

    def __serve_build_asgi_app__(self) -> Any:
        return build_api(self.gateway)

    async def __del__(self) -> None:
        await self.gateway.shutdown(DRAIN_GRACE_S)
