"""Memory through the gateway, over real WebRTC and HTTP with a real memory (MiniLM, Redis): what the user
said and what the assistant answered can be recalled with times, by a paraphrased question, from the data
channel and the HTTP API; a session that comes back finds its memory; bad recall requests get clear errors."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from actors.memory.session import parse_clock
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fixtures_gateway import LocalVigil

pytestmark = pytest.mark.integration


def _render(trigger_at: float):
    def render(elapsed: float) -> np.ndarray:
        image = np.full((120, 160, 3), 70, np.uint8)
        image[:, int(elapsed * 20) % 160] = 200
        if elapsed >= trigger_at:
            image[30:90, 50:110] = (225, 15, 15)
        return image

    return render


async def _recall_message(client: VigilClient, question: str, timeout: float = 10.0) -> dict:
    client.send({"type": "recall", "text": question})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in client.messages:
            if message["type"] in ("recall", "error") and message.get("query", question) == question:
                client.messages.remove(message)
                return message
        await asyncio.sleep(0.05)
    raise AssertionError(f"no recall answer for {question!r}: {client.messages[-5:]}")


async def _until_recalled(client: VigilClient, question: str, needle: str, timeout: float = 15.0) -> list[str]:
    # Memory writes never hold up a tick: they land a moment after the message that caused them.
    deadline = time.monotonic() + timeout
    while True:
        lines = await client.recall(question)
        if any(needle in line for line in lines) or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.2)


async def test_what_was_said_is_recalled_with_times(local_vigil_with_memory: LocalVigil) -> None:
    client = VigilClient(local_vigil_with_memory.url)
    await client.connect(SyntheticVideoTrack(_render(trigger_at=3.0), fps=5), instructions=["say when red"])
    try:
        client.send({"type": "question", "text": "I put my car keys in the blue bowl by the door"})
        while True:
            tick = await asyncio.wait_for(client.ticks.get(), 10)
            if tick["outcome"] == "respond":
                break
        lines = await _until_recalled(client, "where did I leave my keys?", "blue bowl")
        keys = [line for line in lines if "blue bowl" in line]
        assert keys and keys[0].startswith("at 00:00:0"), lines
        assert "the user said: I put my car keys in the blue bowl by the door" in keys[0]
        said = await _until_recalled(client, "when did you notice something red?", "I see red.")
        line = next(line for line in said if "you said: I see red." in line)
        assert abs(parse_clock(line) - tick["stream_time"]) <= 1.0, (line, tick)

        answer = await _recall_message(client, "where are my keys?")
        assert answer["type"] == "recall" and any("blue bowl" in line for line in answer["lines"])
        silly = await _recall_message(client, "x" * 2000)
        assert silly["type"] == "error" and silly["code"] == "bad_field"
    finally:
        await client.close(end_session=False)

    # The same session, back with a new peer connection: its memory is still there.
    back = VigilClient(local_vigil_with_memory.url)
    back.session = client.session
    await asyncio.sleep(0.5)
    await back.connect(SyntheticVideoTrack(_render(trigger_at=1e9), fps=5))
    try:
        answer = await _recall_message(back, "which bowl holds my keys?")
        assert any("blue bowl" in line for line in answer["lines"])
    finally:
        await back.close()


async def test_bad_recall_requests_get_clear_errors(local_vigil_with_memory: LocalVigil) -> None:
    async with httpx.AsyncClient(base_url=local_vigil_with_memory.url) as http:
        created = (await http.post("/v1/sessions", json={})).json()
        sid, auth = created["session_id"], {"Authorization": f"Bearer {created['token']}"}
        cases = [
            (await http.get(f"/v1/sessions/{sid}/memory", params={"q": "keys"}), 401, "unauthorized"),
            (await http.get("/v1/sessions/s_nope/memory", params={"q": "keys"}, headers=auth), 404,
             "unknown_session"),
            (await http.get(f"/v1/sessions/{sid}/memory", headers=auth), 422, "invalid_request"),
            (await http.get(f"/v1/sessions/{sid}/memory", params={"q": "k", "k": 0}, headers=auth), 422,
             "invalid_request"),
            (await http.get(f"/v1/sessions/{sid}/memory", params={"q": "k" * 5000}, headers=auth), 422,
             "invalid_request"),
        ]
        for reply, status, code in cases:
            assert (reply.status_code, reply.json()["error"]["code"]) == (status, code), reply.text
        empty = await http.get(f"/v1/sessions/{sid}/memory", params={"q": "anything at 00:10?"}, headers=auth)
        assert empty.status_code == 200 and empty.json() == {"query": "anything at 00:10?", "lines": []}
        ready = (await http.get("/readyz")).json()
        assert ready["memory"] is True and ready["ok"] is True
