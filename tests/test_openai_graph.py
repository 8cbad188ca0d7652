"""Vigil started as a user starts it with `VIGIL_ENGINE=openai`, pointed at an OpenAI-compatible server: ticks
flow through the real Serve graph to that server with the session's frames and header, the model banner names
the engine, and a session's threshold decides whether the server's P(speak) is enough to speak."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from actors.ingest.ice import restrict_host_addresses
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fixtures_vigil import RunningVigil, launch_vigil
from tests.openai_server import MODEL, ChatServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chat_server() -> Iterator[ChatServer]:
    with ChatServer() as server:
        yield server


@pytest.fixture(scope="module")
def vigil_openai(tmp_path_factory: pytest.TempPathFactory, chat_server: ChatServer) -> Iterator[RunningVigil]:
    yield from launch_vigil(
        tmp_path_factory.mktemp("vigil-openai"), Path("unused"), VIGIL_ENGINE="openai",
        VIGIL_OPENAI_BASE_URL=chat_server.base_url, VIGIL_OPENAI_MODEL=MODEL, VIGIL_MEMORY="false",
        VIGIL_INTERACTION_CPUS="0.25",
    )


def _scene(elapsed: float) -> np.ndarray:
    image = np.full((240, 320, 3), 80, np.uint8)
    image[:, int(elapsed * 30) % 320] = 240
    return image


async def test_ticks_are_decided_by_the_server_under_each_sessions_threshold(
    vigil_openai: RunningVigil, chat_server: ChatServer
) -> None:
    restrict_host_addresses(["127.0.0.1"])
    chat_server.script.p_speak = 0.7
    eager, cautious = VigilClient(vigil_openai.url), VigilClient(vigil_openai.url)
    try:
        await eager.connect(SyntheticVideoTrack(_scene, fps=5), ["describe the room"])
        await cautious.connect(SyntheticVideoTrack(_scene, fps=5), ["describe the room"])
        cautious.send({"type": "settings", "speak_threshold": 0.9})
        hello = next(m for m in eager.messages if m["type"] == "hello")
        assert hello["model"] == {"engine": "openai", "model": MODEL, "demo": False, "note": ""}
        heard: dict[str, list[dict]] = {"eager": [], "cautious": []}
        for name, client in (("eager", eager), ("cautious", cautious)):
            while len([t for t in heard[name] if not t["outcome"].startswith("skipped:")]) < 3:
                heard[name].append(await asyncio.wait_for(client.ticks.get(), 20))
    finally:
        await asyncio.gather(eager.close(), cautious.close(), return_exceptions=True)
    spoken = [t for t in heard["eager"] if t["outcome"] == "respond"]
    assert len(spoken) >= 3 and spoken[0]["text"] == "A man is working on a laptop."
    assert all(t["probability"] == pytest.approx(0.7, abs=0.01) for t in spoken)
    settled = [t for t in heard["cautious"] if not t["outcome"].startswith("skipped:")][-2:]
    assert [t["outcome"] for t in settled] == ["silent", "silent"]
    calls = [c for c in chat_server.calls if c.headers.get("x-streaming-session") == cautious.session_id]
    assert calls and all(c.frames for c in calls), "every call carried the session's frames"
