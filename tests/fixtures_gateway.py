"""A real Vigil gateway over real HTTP (uvicorn) and real WebRTC, without Ray: for API and error-path tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import pytest

from actors.brain.backends import load_backend
from actors.brain.runner import FOLLOW_WAIT_S
from actors.brain.runner import Brain as BrainRunner
from actors.common.config import VigilConfig
from actors.common.embedded_redis import EmbeddedRedis
from actors.common.messages import Decision, DelegationReceipt, DelegationRequest
from actors.common.metrics import VigilMetrics
from actors.common.session_store import SessionStore
from actors.ingest.delegations import Brain
from actors.ingest.gateway import Gateway, build_api
from actors.ingest.ice import restrict_host_addresses
from actors.ingest.session_loop import TickServices
from actors.interaction.engine import Engine
from actors.memory.link import MemoryClient
from actors.sampler.frame_sampler import FrameSampler
from tests.fakes import LocalEngineHandle, ScriptedEngine, ServerThread, red_pixels, threaded_sample

LOOPBACK = {"ice_host_addresses": ["127.0.0.1"], "ice_allowed_networks": ["127.0.0.0/8"]}


@dataclass
class LocalVigil:
    url: str
    gateway: Gateway
    engine: ScriptedEngine
    config: VigilConfig
    brain: BrainRunner | None = None


def red_rule(request) -> Decision:
    return Decision(kind="respond", text="I see red.") if red_pixels(request) else Decision(kind="silent")


def start_local_vigil(
    redis: EmbeddedRedis, memory: MemoryClient | None = None, model_engine: Engine | None = None,
    **overrides: object,
) -> tuple[ServerThread, LocalVigil]:
    """The gateway deciding with `model_engine` (default: a ScriptedEngine answering red with `red_rule`), on
    frames at 64 px unless `image_size` says otherwise."""
    config = VigilConfig(**({"redis_url": redis.url, "image_size": 64} | LOOPBACK | overrides))  # type: ignore[arg-type]
    restrict_host_addresses(config.ice_host_addresses)
    engine = model_engine or ScriptedEngine(red_rule)
    asyncio.run(engine.start())
    store = SessionStore.from_url(redis.url, config.session_ttl_s, config.event_log_max)
    sampler = FrameSampler(config.image_size, config.change_threshold, config.limits.max_frame_pixels)

    handle = LocalEngineHandle(engine)
    metrics = VigilMetrics()
    runner = None
    brain = None
    if config.brain.backend != "none":
        # The brain as its deployment runs it (its backend, its runner, results into Redis), in this process.
        # Its own metrics, as the brain replica has: the ingest counts the outcomes it takes from the inbox.
        runner = BrainRunner.from_config(config.brain, load_backend(config.brain), store.push_delegation_result,
                                         VigilMetrics())

        async def delegate(request: DelegationRequest) -> DelegationReceipt:
            assert runner is not None
            return runner.delegate(request)

        async def cancel(session_id: str, delegation_id: str) -> bool:
            assert runner is not None
            return runner.cancel(session_id, delegation_id)

        async def cancel_session(session_id: str) -> int:
            assert runner is not None
            return runner.cancel_session(session_id)

        async def follow(session_id: str, delegation_id: str) -> bool:
            assert runner is not None
            return await runner.follow(session_id, delegation_id, FOLLOW_WAIT_S)

        brain = Brain(delegate=delegate, cancel=cancel, cancel_session=cancel_session, follow=follow)
    services = TickServices(
        sample=threaded_sample(sampler), decide=handle.decide, store=store, metrics=metrics, memory=memory, brain=brain
    )
    gateway = Gateway(config, store, services, handle)
    asyncio.run(gateway.start())
    server = ServerThread(build_api(gateway))
    scripted = cast(ScriptedEngine, engine)  # what the tests that script it reach; another engine otherwise
    return server, LocalVigil(url="", gateway=gateway, engine=scripted, config=config, brain=runner)


@pytest.fixture
def local_vigil(redis_server: EmbeddedRedis, request: pytest.FixtureRequest) -> Iterator[LocalVigil]:
    overrides = getattr(request, "param", {})
    server, vigil = start_local_vigil(redis_server, **overrides)
    with server:
        vigil.url = server.url
        yield vigil


@pytest.fixture
def local_vigil_with_memory(redis_server: EmbeddedRedis, minilm) -> Iterator[LocalVigil]:  # type: ignore[no-untyped-def]
    """The local Vigil with real session memory: MiniLM embeddings, persisted in the same Redis."""
    from actors.memory.api import MemoryApi
    from actors.memory.service import MemoryService
    from actors.memory.session import MemoryConfig
    from actors.memory.store import MemoryStore

    config = MemoryConfig()
    store = MemoryStore.from_config(redis_server.url, config)
    server, vigil = start_local_vigil(redis_server, memory=MemoryApi(MemoryService(minilm, config, store), store))
    with server:
        vigil.url = server.url
        yield vigil
