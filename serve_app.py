"""Vigil's application graph on Ray Serve, and `main()`, which `make run` starts.

    ingest (HTTP + WebRTC, session loops) ──▶ sampler
                                          ├─▶ interaction (the VLM engine)
                                          └─▶ memory (12-hour session memory; sessions routed by id)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from typing import Any, cast

import numpy as np
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from actors.common.config import VigilConfig
from actors.common.messages import MemoryContext
from actors.common.metrics import VigilMetrics
from actors.common.replicas import ReplicaFailed
from actors.common.session_store import SessionStore
from actors.ice import restrict_host_addresses
from actors.ingest import Gateway, build_api
from actors.interaction.deployment import Interaction, RemoteEngine
from actors.memory import MemoryConfig
from actors.memory_api import MemoryApi
from actors.memory_persistence import MemoryStore
from actors.memory_service import MemoryService
from actors.sampler.deployment import RemoteSampler, Sampler
from actors.session_loop import TickServices

log = logging.getLogger("vigil")


# Each session's memory calls land on the replica its id hashes to, which holds (or restores) that memory.
# One fallback, the next replica on the ring: when the owner dies, its sessions go at once to the replica that
# owns them once the ring is rebuilt, instead of queueing (and holding up other sessions' calls) until then.
SESSION_AFFINITY = RequestRouterConfig(
    request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",  # type: ignore[arg-type]
    request_router_kwargs={"num_fallback_replicas": 1},
)


@serve.deployment(max_ongoing_requests=512, graceful_shutdown_timeout_s=10, request_router_config=SESSION_AFFINITY)
class Memory(MemoryApi):
    """Session memories, MiniLM embeddings, persistence in Redis (see actors.memory_api)."""

    async def __init__(self, config: VigilConfig) -> None:
        from actors.embedder import MiniLMEmbedder

        logging.basicConfig(level=logging.INFO)
        memory_config = MemoryConfig(ttl_s=config.session_ttl_s)
        embedder = await asyncio.to_thread(MiniLMEmbedder)
        self.summarizer = None
        if config.summary_model:
            from actors.summary_engine import ModelSummarizer

            self.summarizer = await asyncio.to_thread(ModelSummarizer, config.summary_model, config.summary_device)
        store = MemoryStore.from_config(config.redis_url or "", memory_config)
        super().__init__(MemoryService(embedder, memory_config, store, self.summarizer), store)

    async def __del__(self) -> None:
        await self.close()
        if self.summarizer is not None:
            self.summarizer.close()


class RemoteMemory:
    """The memory deployment seen from the ingest: each call routed by session id; a lost replica is
    reported as ReplicaFailed so the caller retries (the replacement restores the session from Redis)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def _call(self, method: str, session_id: str, *args: Any) -> Any:
        routed = self.handle.options(session_id=session_id)
        try:
            return await getattr(routed, method).remote(session_id, *args)
        except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as exc:
            raise ReplicaFailed(str(exc)) from exc

    async def add(self, session_id: str, kind: str, text: str, stream_time: float) -> None:
        await self._call("add", session_id, kind, text, stream_time)

    async def add_keyframe(self, session_id: str, stream_time: float, image: np.ndarray, caption: str) -> None:
        await self._call("add_keyframe", session_id, stream_time, image, caption)

    async def context(self, session_id: str, query: str | None, k: int) -> MemoryContext:
        return cast(MemoryContext, await self._call("context", session_id, query, k))

    async def recall(self, session_id: str, question: str, k: int) -> tuple[str, ...]:
        return tuple(await self._call("recall", session_id, question, k))

    async def release(self, session_id: str) -> None:
        await self._call("release", session_id)

    async def check_health(self) -> None:
        await self.handle.check_health.remote()


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


def build_app(config: VigilConfig) -> serve.Application:
    """The bound graph for a config (its `redis_url` must be set)."""
    if not config.redis_url:
        raise ValueError("build_app needs config.redis_url: start Redis first (main() embeds one)")
    interaction = Interaction.options(
        num_replicas=config.interaction_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.interaction_cpus},
    ).bind(config)
    sampler = Sampler.options(ray_actor_options={"num_cpus": config.sampler_cpus}).bind(config)
    memory = None
    if config.memory:
        memory = Memory.options(
            num_replicas=config.memory_replicas, ray_actor_options={"num_cpus": config.memory_cpus}
        ).bind(config)
    ingest = Ingest.options(ray_actor_options={"num_cpus": config.ingest_cpus})
    return ingest.bind(config, sampler, interaction, memory)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for `serve run serve_app:app_builder` and Serve config files (`args` override VIGIL_*)."""
    return build_app(VigilConfig.from_env(args))


def main() -> None:
    """Start Redis (embedded unless REDIS_URL is set), Ray, and Vigil; block until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = VigilConfig.from_env()
    except ValueError as exc:
        sys.exit(f"vigil: {exc}")
    redis = None
    if not config.redis_url:
        from actors.common.embedded_redis import EmbeddedRedis

        redis = EmbeddedRedis(config.redis_dir)
        config = config.model_copy(update={"redis_url": redis.url})
        log.info("embedded Redis at %s", redis.url)
    from actors.interaction.engines.transformers import prepare_model

    config = prepare_model(config)
    ray.init(include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("VIGIL_", "HF_"))}})
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name="vigil", route_prefix="/")
    url = f"http://{config.host}:{config.port}/"
    print(f"\nVigil is running: open {url}\n", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    print("stopping Vigil…", flush=True)
    serve.shutdown()
    ray.shutdown()
    if redis is not None:
        redis.shutdown()


if __name__ == "__main__":
    main()
