"""The ingest on Ray Serve: the HTTP API, the WebRTC peers and every session's tick loop."""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.common.config import VigilConfig
from actors.common.metrics import VigilMetrics
from actors.common.session_store import SessionStore
from actors.ingest.gateway import Gateway, build_api
from actors.ingest.ice import restrict_host_addresses
from actors.ingest.session_loop import TickServices
from actors.interaction.deployment import RemoteEngine
from actors.memory.deployment import RemoteMemory
from actors.sampler.deployment import RemoteSampler


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_timeout_s=5)
@serve.ingress()
class Ingest:
    """HTTP API, WebRTC peers and session loops."""

    async def __init__(
        self,
        config: VigilConfig,
        sampler: DeploymentHandle,
        interaction: DeploymentHandle,
        memory: DeploymentHandle | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        restrict_host_addresses(config.ice_host_addresses)
        engine = RemoteEngine(interaction)
        store = SessionStore.from_url(config.redis_url or "", config.session_ttl_s, config.event_log_max)

        services = TickServices(
            sample=RemoteSampler(sampler).sample, decide=engine.decide, store=store, metrics=VigilMetrics(),
            memory=RemoteMemory(memory) if memory is not None else None,
        )
        self.gateway = Gateway(config, store, services, engine)
        await self.gateway.start()

    def __serve_build_asgi_app__(self) -> Any:
        return build_api(self.gateway)

    async def __del__(self) -> None:
        await self.gateway.shutdown()
