"""The interaction engine on Ray Serve, and its handle-side client for the ingest."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.common.config import VigilConfig
from actors.common.messages import Decision, EngineInfo, TickRequest
from actors.common.replicas import call_replica


@serve.deployment(max_ongoing_requests=64)
class Interaction:
    """The decision engine; concurrent ticks of many sessions are decided as one batch."""

    async def __init__(self, config: VigilConfig) -> None:
        # Imported here: torch and transformers load only in the interaction replicas.
        from actors.interaction.engines.transformers import load_engine

        self.engine = load_engine(config)
        await self.engine.start()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def decide(self, requests: list[TickRequest]) -> list[Decision]:
        return await self.engine.decide(requests)

    async def info(self) -> EngineInfo:
        return self.engine.info()

    async def check_health(self) -> None:
        await self.engine.check_health()


class RemoteEngine:
    """The interaction deployment seen from the ingest: decide, info and health through a handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def decide(self, request: TickRequest) -> Decision:
        return await call_replica(self.handle.decide.remote(request))

    async def info(self) -> EngineInfo:
        return await self.handle.info.remote()

    async def check_health(self) -> None:
        await self.handle.check_health.remote()
