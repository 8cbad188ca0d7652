"""The HTTP API and WebRTC endpoint over real HTTP and real WebRTC: sessions, decisions, and every bad input."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from actors.common.session_store import SessionStore
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fixtures_gateway import LocalVigil

pytestmark = pytest.mark.integration


def _render(trigger_at: float | None):
    def render(elapsed: float) -> np.ndarray:
        image = np.full((120, 160, 3), 70, np.uint8)
        image[:, int(elapsed * 20) % 160] = 200  # a moving bar: the scene is alive
        if trigger_at is not None and elapsed >= trigger_at:
            image[30:90, 50:110] = (225, 15, 15)
        return image

    return render


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def _wait_for_async(read, predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate(await read()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_stream_gets_decisions_and_ends_cleanly(local_vigil: LocalVigil) -> None:
    client = VigilClient(local_vigil.url)
    await client.connect(SyntheticVideoTrack(_render(trigger_at=2.5), fps=5), instructions=["say when red"])
    try:
        await _wait_for(lambda: any(m["type"] == "hello" for m in client.messages))
        hello = next(m for m in client.messages if m["type"] == "hello")
        assert hello["instructions"] == ["say when red"] and hello["model"]["model"] == "scripted-test-engine"
        responses = []
        while not responses:
            tick = await asyncio.wait_for(client.ticks.get(), 5)
            if tick["outcome"] == "respond":
                responses.append(tick)
            else:
                assert tick["stream_time"] < 3.6, "no response before the trigger, and one soon after it"
        assert responses[0]["text"] == "I see red." and responses[0]["stream_time"] >= 2.5
        assert responses[0]["latency_ms"] > 0
        logged = await client.events()
        assert {e["tick"] for e in logged} >= {m["tick"] for m in client.messages if m["type"] == "tick"}
        async with httpx.AsyncClient(base_url=local_vigil.url) as http:
            metrics = (await http.get("/metrics")).text
        assert 'vigil_ticks_total{outcome="respond"}' in metrics
        assert 'vigil_tick_stage_seconds_bucket{le="0.005",stage="sample"}' in metrics
        assert "vigil_active_sessions 1.0" in metrics
    finally:
        await client.close()
    await _wait_for(lambda: not local_vigil.gateway.peers)


async def test_bad_data_channel_messages_are_rejected_and_the_session_goes_on(local_vigil: LocalVigil) -> None:
    client = VigilClient(local_vigil.url)
    await client.connect(SyntheticVideoTrack(_render(None), fps=5))
    try:
        client.send("x" * 10_000)
        client.send("{broken")
        client.send({"type": "exec", "cmd": "ls"})
        client.send({"type": "instruction", "text": "tell me when something red shows up"})
        client.send({"type": "ping", "id": 42})
        await _wait_for(lambda: any(m["type"] == "pong" for m in client.messages))
        errors = [m["code"] for m in client.messages if m["type"] == "error"]
        assert errors == ["too_large", "malformed", "unknown_type"]
        assert any(m["type"] == "instructions" and m["items"] == ["tell me when something red shows up"]
                   for m in client.messages)
        before = client.ticks.qsize()
        await _wait_for(lambda: client.ticks.qsize() >= before + 2)
        async with httpx.AsyncClient(base_url=local_vigil.url) as http:
            metrics = (await http.get("/metrics")).text
        for reason in ("too_large", "malformed", "unknown_type"):
            assert f'vigil_channel_rejected_total{{reason="{reason}"}} 1.0' in metrics
    finally:
        await client.close()


async def _session(http: httpx.AsyncClient) -> tuple[str, dict[str, str]]:
    reply = await http.post("/v1/sessions", json={})
    assert reply.status_code == 201
    body = reply.json()
    return body["session_id"], {"Authorization": f"Bearer {body['token']}"}


VALID_SHAPE = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n" \
              "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"type": "offer", "sdp": "garbage"}, 400, "invalid_sdp"),
        ({"type": "answer", "sdp": VALID_SHAPE}, 400, "invalid_sdp"),
        ({"type": "offer", "sdp": VALID_SHAPE}, 400, "invalid_sdp"),  # right shape, unusable media
        ({"type": "offer", "sdp": "v=0\r\n" + "a=x\r\n" * 14000}, 413, "body_too_large"),
        ({"type": "offer", "sdp": "v=0\r\n" + "a=x\r\n" * 7000}, 413, "sdp_too_large"),
        ({"sdp": "v=0"}, 422, "invalid_request"),
    ],
)
async def test_bad_offers_get_4xx_and_leave_nothing_behind(local_vigil: LocalVigil, body, status, code) -> None:
    async with httpx.AsyncClient(base_url=local_vigil.url) as http:
        session_id, auth = await _session(http)
        tasks_before = len(asyncio.all_tasks())
        reply = await http.post(f"/v1/sessions/{session_id}/offer", json=body, headers=auth)
        assert reply.status_code == status, reply.text
        assert reply.json()["error"]["code"] == code
        assert reply.json()["error"]["message"]
    assert local_vigil.gateway.peers == {}
    assert len(asyncio.all_tasks()) <= tasks_before


async def test_tokens_sessions_and_bodies_are_checked(local_vigil: LocalVigil) -> None:
    async with httpx.AsyncClient(base_url=local_vigil.url) as http:
        session_id, auth = await _session(http)
        offer = {"type": "offer", "sdp": VALID_SHAPE}
        cases = [
            (await http.post(f"/v1/sessions/{session_id}/offer", json=offer), 401, "unauthorized"),
            (await http.post(f"/v1/sessions/{session_id}/offer", json=offer,
                             headers={"Authorization": "Bearer nope"}), 401, "unauthorized"),
            (await http.post("/v1/sessions/s_unknown/offer", json=offer, headers=auth), 404, "unknown_session"),
            (await http.delete("/v1/sessions/s_unknown", headers=auth), 404, "unknown_session"),
            (await http.get(f"/v1/sessions/{session_id}/events", headers={"Authorization": "Bearer x"}), 401,
             "unauthorized"),
            (await http.post("/v1/sessions", content=b"{" * 70_000), 413, "body_too_large"),
            (await http.post("/v1/sessions", content=b"[1,2"), 422, "invalid_request"),
            (await http.post("/v1/sessions", json={"instructions": ["x"] * 20}), 422, "invalid_request"),
            (await http.get(f"/v1/sessions/{session_id}/events?after=abc", headers=auth), 422, "invalid_request"),
        ]
        for reply, status, code in cases:
            assert (reply.status_code, reply.json()["error"]["code"]) == (status, code), reply.text
        ended = await http.delete(f"/v1/sessions/{session_id}", headers=auth)
        assert ended.json() == {"ok": True, "session_id": session_id}
        again = await http.post(f"/v1/sessions/{session_id}/offer", json=offer, headers=auth)
        assert again.status_code == 404


@pytest.mark.parametrize("local_vigil", [{"api_key": "k3y"}], indirect=True)
async def test_api_key_guards_session_creation(local_vigil: LocalVigil) -> None:
    async with httpx.AsyncClient(base_url=local_vigil.url) as http:
        assert (await http.post("/v1/sessions")).status_code == 401
        assert (await http.post("/v1/sessions", headers={"Authorization": "Bearer bad"})).status_code == 401
        assert (await http.post("/v1/sessions", headers={"Authorization": "Bearer k3y"})).status_code == 201


async def test_health_and_readiness(local_vigil: LocalVigil) -> None:
    async with httpx.AsyncClient(base_url=local_vigil.url) as http:
        assert (await http.get("/healthz")).json() == {"ok": True}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] is True and ready.json()["engine"] is True
        page = await http.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()


async def test_the_speak_threshold_is_a_session_setting_over_http_and_the_data_channel(
    local_vigil: LocalVigil,
) -> None:
    client = VigilClient(local_vigil.url)
    await client.connect(SyntheticVideoTrack(_render(None), fps=5), instructions=["say when red"])
    auth = client.auth()
    try:
        await _wait_for(lambda: any(m["type"] == "hello" for m in client.messages))
        hello = next(m for m in client.messages if m["type"] == "hello")
        assert hello["speak_threshold"] == local_vigil.config.speak_threshold
        async with httpx.AsyncClient(base_url=local_vigil.url) as http:
            path = f"/v1/sessions/{client.session_id}"
            changed = await http.patch(path, json={"speak_threshold": 0.8}, headers=auth)
            assert changed.status_code == 200 and changed.json()["speak_threshold"] == 0.8
            for bad in ({"speak_threshold": 1.5}, {"speak_threshold": "high"}, {"speak_threshold": 0.5, "x": 1}, {}):
                refused = await http.patch(path, json=bad, headers=auth)
                assert refused.status_code == 422, bad
            assert (await http.patch(path, json={"speak_threshold": 0.2})).status_code == 401
        seen = len(local_vigil.engine.requests)
        await _wait_for(lambda: len(local_vigil.engine.requests) > seen + 1)
        assert local_vigil.engine.requests[-1].speak_threshold == 0.8
        client.send({"type": "settings", "speak_threshold": 0.3})
        client.send({"type": "settings", "speak_threshold": True})
        await _wait_for(lambda: any(m["type"] == "settings" and m["speak_threshold"] == 0.3 for m in client.messages))
        assert [m["code"] for m in client.messages if m["type"] == "error"] == ["bad_field"]
        seen = len(local_vigil.engine.requests)
        await _wait_for(lambda: len(local_vigil.engine.requests) > seen + 1)
        assert local_vigil.engine.requests[-1].speak_threshold == 0.3
        store = SessionStore.from_url(local_vigil.config.redis_url or "", 60, 10)
        await _wait_for_async(lambda: store.get(client.session_id), lambda r: r.speak_threshold == 0.3)
        await store.close()  # kept in Redis: a resumed session keeps it
    finally:
        await client.close()


async def test_a_new_session_can_ask_for_its_own_threshold(local_vigil: LocalVigil) -> None:
    async with httpx.AsyncClient(base_url=local_vigil.url) as http:
        created = await http.post("/v1/sessions", json={"speak_threshold": 0.9})
        assert created.status_code == 201 and created.json()["speak_threshold"] == 0.9
        assert (await http.post("/v1/sessions", json={"speak_threshold": -0.1})).status_code == 422
        default = await http.post("/v1/sessions", json={})
        assert default.json()["speak_threshold"] == local_vigil.config.speak_threshold
