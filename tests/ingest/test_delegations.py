"""Delegation end to end, through the real gateway, WebRTC, Redis and the brain's runner with its OpenAI-compatible
backend, against a local chat server that answers after a delay: the answer reaches the client, enters the
prompts of the following ticks and the session's memory, and is recorded once; a timeout, a failure, a cancel
(data channel and HTTP) and a Vigil without a brain each end in their one outcome; ticks keep their cadence while
a delegation is in flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from itertools import pairwise

import numpy as np
import pytest

from actors.common.config import BrainConfig
from actors.common.embedded_redis import EmbeddedRedis
from actors.common.messages import Decision, TickRequest
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fakes import red_pixels
from tests.fixtures_gateway import LocalVigil, start_local_vigil
from tests.openai_server import MODEL, ChatServer

pytestmark = pytest.mark.integration

ANSWER = "The three prices add up to 42 euros."
QUESTION = "what do the prices on the shelf add up to?"


def _scene(elapsed: float) -> np.ndarray:
    image = np.full((120, 160, 3), 70, np.uint8)
    image[:, int(elapsed * 20) % 160] = 200
    if elapsed >= 1.5:
        image[30:90, 50:110] = (225, 15, 15)
    return image


def _delegate_once() -> object:
    """The interaction model's part: the first time it sees red it delegates the question, then stays silent."""
    delegated = False

    def rule(request: TickRequest) -> Decision:
        nonlocal delegated
        if red_pixels(request) and not delegated:
            delegated = True
            return Decision(kind="delegate", text="Let me work that out.", question=QUESTION)
        return Decision(kind="silent")

    return rule


@pytest.fixture
def chat() -> Iterator[ChatServer]:
    with ChatServer() as server:
        server.script.free_text = ANSWER
        yield server


def _vigil(redis: EmbeddedRedis, brain: BrainConfig, memory: object = None) -> Iterator[LocalVigil]:
    server, vigil = start_local_vigil(redis, memory=memory, brain=brain)  # type: ignore[arg-type]
    vigil.engine.rule = _delegate_once()  # type: ignore[assignment]
    with server:
        vigil.url = server.url
        yield vigil


@pytest.fixture
def vigil_with_brain(redis_server: EmbeddedRedis, chat: ChatServer, minilm) -> Iterator[LocalVigil]:  # type: ignore[no-untyped-def]
    from actors.memory.api import MemoryApi
    from actors.memory.service import MemoryService
    from actors.memory.session import MemoryConfig
    from actors.memory.store import MemoryStore

    config = MemoryConfig()
    store = MemoryStore.from_config(redis_server.url, config)
    brain = BrainConfig(backend="openai", base_url=chat.base_url, model=MODEL, timeout_s=3.0)
    yield from _vigil(redis_server, brain, MemoryApi(MemoryService(minilm, config, store), store))


async def _delegation(client: VigilClient, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in client.messages if m["type"] == "delegation"]
        if found:
            return found[0]
        assert time.monotonic() < deadline, [m["type"] for m in client.messages[-5:]]
        await asyncio.sleep(0.05)


async def _recorded(client: VigilClient) -> list[dict]:
    reply = await client.http.get(f"/v1/sessions/{client.session_id}/delegations", headers=client.auth())
    reply.raise_for_status()
    return list(reply.json()["delegations"])


async def test_an_answer_reaches_the_client_the_next_prompts_and_memory(
        vigil_with_brain: LocalVigil, chat: ChatServer) -> None:
    chat.script.delay_s = 2.0
    client = VigilClient(vigil_with_brain.url)
    await client.connect(SyntheticVideoTrack(_scene, fps=5), instructions=["help with the shopping"])
    try:
        result = await _delegation(client)
        assert result["status"] == "done" and result["text"] == ANSWER and result["question"] == QUESTION
        assert result["duration_s"] >= 2.0
        delegate_tick = next(m for m in client.messages if m["type"] == "tick" and m["outcome"] == "delegate")
        assert result["id"] == str(delegate_tick["tick"])
        # The call reached the chat server with the frame the model saw (a data URL the server decoded).
        (call,) = chat.calls
        assert [frame.format for frame in call.frames] == ["JPEG"]
        # While it was in flight, the session kept ticking once a second.
        ticks = [m["received_at"] for m in client.messages if m["type"] == "tick"
                 and delegate_tick["tick"] <= m["tick"]]
        assert len(ticks) >= 3 and max(b - a for a, b in pairwise(ticks)) < 1.6
        # The following prompts carry it (the engine decides when and how to say it).
        deadline = time.monotonic() + 5
        while not any(ANSWER in line for request in vigil_with_brain.engine.requests for line in request.inbox):
            assert time.monotonic() < deadline, "the answer never entered a prompt"
            await asyncio.sleep(0.05)
        # Memory keeps it, and it is recorded once.
        deadline = time.monotonic() + 10
        while not any("42 euros" in line for line in await client.recall("what did the prices add up to?")):
            assert time.monotonic() < deadline, "memory never took the answer"
            await asyncio.sleep(0.2)
        recorded = await _recorded(client)
        assert [(r["delegation_id"], r["status"]) for r in recorded] == [(result["id"], "done")]
    finally:
        await client.close()


async def test_a_hanging_brain_ends_timed_out(vigil_with_brain: LocalVigil, chat: ChatServer) -> None:
    chat.script.hang = True
    client = VigilClient(vigil_with_brain.url)
    await client.connect(SyntheticVideoTrack(_scene, fps=5), instructions=["help with the shopping"])
    try:
        result = await _delegation(client)
        assert result["status"] == "timed_out" and result["reason"]
        assert len(await _recorded(client)) == 1
    finally:
        await client.close()


async def test_a_failing_brain_ends_failed_with_its_reason(vigil_with_brain: LocalVigil, chat: ChatServer) -> None:
    chat.script.always_status = 503
    client = VigilClient(vigil_with_brain.url)
    await client.connect(SyntheticVideoTrack(_scene, fps=5), instructions=["help with the shopping"])
    try:
        result = await _delegation(client)
        assert result["status"] == "failed" and "503" in result["reason"]
    finally:
        await client.close()


@pytest.mark.parametrize("how", ["data channel", "http"])
async def test_the_user_can_cancel_a_delegation(vigil_with_brain: LocalVigil, chat: ChatServer, how: str) -> None:
    chat.script.hang = True
    client = VigilClient(vigil_with_brain.url)
    await client.connect(SyntheticVideoTrack(_scene, fps=5), instructions=["help with the shopping"])
    try:
        deadline = time.monotonic() + 15
        while not any(m["type"] == "tick" and m["outcome"] == "delegate" for m in client.messages):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        delegate_tick = next(m for m in client.messages if m["type"] == "tick" and m["outcome"] == "delegate")
        delegation_id = str(delegate_tick["tick"])
        while not chat.calls:  # in flight at the brain
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        if how == "http":
            reply = await client.http.delete(f"/v1/sessions/{client.session_id}/delegations/{delegation_id}",
                                             headers=client.auth())
            assert reply.status_code == 202, reply.text
            again = await client.http.delete(f"/v1/sessions/{client.session_id}/delegations/{delegation_id}",
                                             headers=client.auth())
            assert again.status_code == 404 and again.json()["error"]["code"] == "not_in_flight"
        else:
            client.send({"type": "cancel", "delegation": delegation_id})
        result = await _delegation(client)
        assert result["status"] == "cancelled" and result["id"] == delegation_id
        assert [r["status"] for r in await _recorded(client)] == ["cancelled"]
    finally:
        await client.close()


@pytest.fixture
def vigil_without_brain(redis_server: EmbeddedRedis) -> Iterator[LocalVigil]:
    yield from _vigil(redis_server, BrainConfig())


async def test_without_a_brain_a_delegation_ends_failed_saying_so(vigil_without_brain: LocalVigil) -> None:
    client = VigilClient(vigil_without_brain.url)
    await client.connect(SyntheticVideoTrack(_scene, fps=5), instructions=["help with the shopping"])
    try:
        result = await _delegation(client)
        assert result["status"] == "failed" and "VIGIL_BRAIN_BACKEND" in result["reason"]
        assert [r["status"] for r in await _recorded(client)] == ["failed"]
        client.send({"type": "cancel", "delegation": "not a valid id!"})
        deadline = time.monotonic() + 5
        while not any(m["type"] == "error" and m["code"] == "bad_field" for m in client.messages):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await client.close()


async def test_ending_a_session_cancels_its_delegations_at_the_brain(
        vigil_with_brain: LocalVigil, chat: ChatServer) -> None:
    chat.script.hang = True
    client = VigilClient(vigil_with_brain.url)
    await client.connect(SyntheticVideoTrack(_scene, fps=5), instructions=["help with the shopping"])
    session_id = client.session_id
    deadline = time.monotonic() + 15
    assert vigil_with_brain.brain is not None
    while not vigil_with_brain.brain.in_flight(session_id):
        assert time.monotonic() < deadline, "the delegation never reached the brain"
        await asyncio.sleep(0.05)
    taken = time.monotonic()
    await client.close()  # DELETE /v1/sessions/{id}
    while vigil_with_brain.brain.in_flight(session_id):
        # Well before the brain's own 3 s timeout would have ended it.
        assert time.monotonic() - taken < 2.0, "the ended session's delegation held its brain slot till its timeout"
        await asyncio.sleep(0.05)
