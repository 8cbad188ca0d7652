"""The brain's deployment class (run as a plain object, no cluster) with a real Redis and a real chat server:
`delegate` answers at once, and each delegation's one result lands in its session's inbox in the shape the
session loop takes it; the config comes from VIGIL_BRAIN_* with the key only in the variable it names."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from actors.brain.deployment import Brain, brain_backend, engine_config
from actors.common.config import BrainConfig, VigilConfig
from actors.common.embedded_redis import EmbeddedRedis
from actors.common.messages import DelegationResult, from_dict
from actors.common.session_store import SessionStore
from tests.brain.helpers import delegation, until
from tests.openai_server import MODEL, ChatServer

pytestmark = pytest.mark.unit

SECRET = "sk-deployment-secret-42"


@pytest.fixture(scope="module")
def chat_server() -> Iterator[ChatServer]:
    with ChatServer() as running:
        yield running


@pytest.fixture
def chat(chat_server: ChatServer) -> ChatServer:
    chat_server.reset()
    return chat_server


@pytest.fixture
async def deployed(
    chat: ChatServer, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Brain]:
    monkeypatch.setenv("VIGIL_BRAIN_BACKEND", "openai")
    monkeypatch.setenv("VIGIL_BRAIN_BASE_URL", chat.base_url)
    monkeypatch.setenv("VIGIL_BRAIN_MODEL", MODEL)
    monkeypatch.setenv("VIGIL_BRAIN_MAX_IN_FLIGHT_PER_SESSION", "1")
    monkeypatch.setenv("VIGIL_BRAIN_TIMEOUT_S", "5")
    monkeypatch.setenv("VIGIL_BRAIN_API_KEY", SECRET)
    config = VigilConfig.from_env({"redis_url": redis_server.url})
    brain = Brain.func_or_class(config)
    yield brain
    await brain.__del__()


async def inbox(store: SessionStore, session_id: str, count: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    async with asyncio.timeout(5):
        while len(items) < count:
            taken, _ = await store.pop_pending(session_id)
            items += taken
            await asyncio.sleep(0.02)
    return items


async def test_a_result_lands_in_the_session_inbox(deployed: Brain, chat: ChatServer, store: SessionStore) -> None:
    chat.script.free_text = "They add up to 3.50 euros.\n```chart\n{\"mark\": \"bar\"}\n```"
    receipt = await deployed.delegate(delegation())
    assert receipt.accepted
    [item] = await inbox(store, "s_a", 1)
    assert set(item) == {"kind", "text", "result"} and item["kind"] == "delegation"
    assert item["text"] == 'about "what do the prices add up to?": They add up to 3.50 euros.'
    result = from_dict(DelegationResult, item["result"])
    assert (result.session_id, result.delegation_id, result.status) == ("s_a", "d1", "done")
    assert result.rich is not None and result.rich.kind == "chart" and result.rich.content == '{"mark": "bar"}'
    assert set(item["result"]) == {"session_id", "delegation_id", "status", "question", "text", "full_text", "rich",
                                   "reason", "duration_s", "stream_time"}
    assert item["result"]["rich"] == {"kind": "chart", "content": '{"mark": "bar"}'}
    assert chat.calls[-1].headers["authorization"] == f"Bearer {SECRET}"
    await deployed.ready()


async def test_refused_and_cancelled_delegations_land_as_their_outcomes(
    deployed: Brain, chat: ChatServer, store: SessionStore
) -> None:
    chat.script.hang = True
    assert (await deployed.delegate(delegation(session_id="s_b"))).accepted
    refused = await deployed.delegate(delegation(session_id="s_b", delegation_id="d2"))
    assert not refused.accepted and refused.reason.startswith("too many delegations in flight")
    await until(lambda: bool(chat.calls))
    assert await deployed.cancel("s_b", "d1")
    assert not await deployed.cancel("s_b", "d1")
    items = await inbox(store, "s_b", 2)
    outcomes = {item["result"]["delegation_id"]: (item["result"]["status"], item["text"]) for item in items}
    assert outcomes == {
        "d2": ("failed", 'about "what do the prices add up to?": no answer (too many delegations in flight for '
                         'this session (at most 1))'),
        "d1": ("cancelled", 'about "what do the prices add up to?": cancelled (cancelled by the user)'),
    }
    chat.script.hang = False


def test_the_config_holds_no_key_and_refuses_what_it_cannot_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIGIL_BRAIN_BACKEND", "agent")
    monkeypatch.setenv("VIGIL_BRAIN_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("VIGIL_BRAIN_API_KEY", SECRET)
    config = VigilConfig.from_env()
    assert config.brain.backend == "agent" and config.brain.api_key_env == "VIGIL_BRAIN_API_KEY"
    backend = brain_backend(config)
    for shown in (repr(config), str(config.model_dump()), repr(backend)):
        assert SECRET not in shown
    with pytest.raises(ValueError, match=r"needs brain\.base_url"):
        BrainConfig(backend="openai")
    with pytest.raises(ValueError, match="must not hold credentials"):
        BrainConfig(backend="openai", base_url=f"http://user:{SECRET}@host/v1")
    with pytest.raises(ValueError, match="name of an environment variable"):
        BrainConfig(api_key_env=SECRET)
    with pytest.raises(ValueError, match="needs an interaction deployment"):
        brain_backend(config.model_copy(update={"brain": BrainConfig(backend="engine")}))
    bigger = engine_config(config.model_copy(update={"brain": BrainConfig(backend="engine", model="big-vlm")}))
    assert bigger.model == "big-vlm" and bigger.max_new_tokens == 1024
    assert brain_backend(VigilConfig()).name == "none"
