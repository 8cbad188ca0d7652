"""Two gateways on one Redis, as two ingest replicas are: a session connected again through the other one resumes
where it was (tick numbers and stream time go on, one outcome for the gap, no tick number logged twice), the peer
it left stops recording at once, a draining gateway tells its clients to reconnect first, and settings or an end
sent through the other replica reach the one that runs the session."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from actors.common.embedded_redis import EmbeddedRedis
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fakes import ServerThread
from tests.fixtures_gateway import LocalVigil, start_local_vigil

pytestmark = pytest.mark.integration


@pytest.fixture
def two_replicas(redis_server: EmbeddedRedis) -> Iterator[tuple[LocalVigil, LocalVigil]]:
    servers: list[ServerThread] = []
    vigils = []
    for name in ("replica-a", "replica-b"):
        server, vigil = start_local_vigil(redis_server)
        vigil.gateway.replica = name
        servers.append(server.__enter__())
        vigil.url = server.url
        vigils.append(vigil)
    try:
        yield vigils[0], vigils[1]
    finally:
        for server in servers:
            server.__exit__(None, None, None)


def _scene(elapsed: float) -> np.ndarray:
    image = np.full((120, 160, 3), 70, np.uint8)
    image[:, int(elapsed * 20) % 160] = 200
    return image


async def _ticks(client: VigilClient, count: int, timeout: float = 10.0) -> list[dict]:
    return [await asyncio.wait_for(client.ticks.get(), timeout) for _ in range(count)]


async def _next_outcome(client: VigilClient, outcome: str, timeout: float = 10.0) -> dict:
    while True:
        tick = await asyncio.wait_for(client.ticks.get(), timeout)
        if tick["outcome"] == outcome:
            return tick


async def _past_the_gap(client: VigilClient, count: int) -> list[dict]:
    """The resumed connection's next `count` ticks after its `skipped:reconnect`."""
    after: list[dict] = []
    while len(after) < count:
        tick = await asyncio.wait_for(client.ticks.get(), 10)
        if tick["outcome"] != "skipped:reconnect":
            after.append(tick)
    return after


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def _on(client: VigilClient, vigil: LocalVigil) -> None:
    """Send the client's next calls to `vigil` (as Serve's proxy would once its replica is gone)."""
    client.http = httpx.AsyncClient(base_url=vigil.url, timeout=15.0)


def _run_on_gateway(vigil: LocalVigil, coro) -> None:
    """Run `coro` on the event loop the gateway's peers live on (the server thread's), and wait for it."""
    peer = next(iter(vigil.gateway.peers.values()))
    loop = peer.loop._scheduler.get_loop()  # type: ignore[union-attr]
    asyncio.run_coroutine_threadsafe(coro, loop).result(10)


def _assert_log_continues(events: list[dict], first_part: list[dict], second_part: list[dict]) -> None:
    ticks = [event["tick"] for event in events]
    assert len(ticks) == len(set(ticks)), f"a tick number logged twice: {ticks}"
    assert sorted(ticks) == list(range(1, max(ticks) + 1)), f"tick numbers with a gap: {sorted(ticks)}"
    gap = [event for event in events if event["outcome"] == "skipped:reconnect"]
    assert len(gap) == 1, "the time that was missed is one outcome"
    last_before = max(tick["tick"] for tick in first_part)
    assert gap[0]["tick"] > last_before
    assert all(tick["tick"] > gap[0]["tick"] for tick in second_part)
    assert min(t["stream_time"] for t in second_part) >= max(t["stream_time"] for t in first_part), (
        "stream time goes on, never a second 0:00:00")


async def test_a_session_resumes_on_the_other_replica_where_it_was(two_replicas) -> None:
    a, b = two_replicas
    client = VigilClient(a.url)
    await client.connect(SyntheticVideoTrack(_scene, fps=5), instructions=["say when red"])
    # The same session connected again through replica B, while its first connection still runs on A (as when
    # a client saw its connection fail before the replica did).
    again = VigilClient(b.url)
    try:
        assert client.replica == "replica-a"
        before = await _ticks(client, 3)
        old_peer = a.gateway.peers[client.session_id]
        again.session = client.session
        await again.connect(SyntheticVideoTrack(_scene, fps=5))
        assert again.replica == "replica-b"
        await _until(lambda: any(m["type"] == "hello" for m in again.messages))
        hello = next(m for m in again.messages if m["type"] == "hello")
        assert hello["resumed"] is not None and hello["resumed"]["tick"] >= before[-1]["tick"]
        assert hello["instructions"] == ["say when red"], "standing instructions come back from Redis"
        # The peer left on replica A stops at its next tick: its outcome is refused, so it closes.
        await _until(lambda: client.session_id not in a.gateway.peers, timeout=5)
        assert old_peer.loop.lost
        after = await _past_the_gap(again, 3)
        await asyncio.sleep(0.5)
        seen_on_a = [tick for tick in client.messages if tick["type"] == "tick"]
        _assert_log_continues(await again.events(), seen_on_a, after)
    finally:
        await again.close()
        await client.close(end_session=False)


async def test_a_tick_its_old_connection_never_recorded_is_logged_once_on_resume(two_replicas) -> None:
    """The session is taken over while a slow tick is in flight on A and a later tick, skipped as busy, is already
    logged: A's outcome for the slow one is refused, so B logs it (`skipped:unlogged`) and every number is there."""
    a, b = two_replicas
    client = VigilClient(a.url)
    await client.connect(SyntheticVideoTrack(_scene, fps=5), instructions=["say when red"])
    again = VigilClient(b.url)
    try:
        await _ticks(client, 2)
        a.engine.delay_s = 3.0
        busy = await _next_outcome(client, "skipped:busy")
        again.session = client.session
        await again.connect(SyntheticVideoTrack(_scene, fps=5))
        await _until(lambda: client.session_id not in a.gateway.peers, timeout=10)
        after = await _past_the_gap(again, 2)
        await asyncio.sleep(0.5)
        seen_on_a = [tick for tick in client.messages if tick["type"] == "tick"]
        events = await again.events()
        _assert_log_continues(events, seen_on_a, after)
        [lost] = [event for event in events if event["outcome"] == "skipped:unlogged"]
        assert lost["tick"] < busy["tick"] and lost["through"] == lost["tick"], lost
        assert lost["tick"] not in {tick["tick"] for tick in seen_on_a}, "A's client never heard of it"
        assert "taken over" in lost["text"]
    finally:
        await again.close()
        await client.close(end_session=False)


async def test_a_draining_replica_tells_its_clients_to_reconnect_before_it_goes(two_replicas) -> None:
    a, b = two_replicas
    client = VigilClient(a.url)
    await client.connect(SyntheticVideoTrack(_scene, fps=5), instructions=["say when red"])
    try:
        before = await _ticks(client, 2)
        _run_on_gateway(a, a.gateway.shutdown(grace_s=1.0))
        await _until(lambda: any(m["type"] == "reconnect" for m in client.messages), timeout=5)
        told = next(m for m in client.messages if m["type"] == "reconnect")
        assert told["reason"] == "drain" and "connect again" in told["message"]
        assert not a.gateway.peers
        offer = await httpx.AsyncClient(base_url=a.url).post(
            f"/v1/sessions/{client.session_id}/offer", json={"type": "offer", "sdp": "v=0"}, headers=client.auth())
        assert offer.status_code == 503 and offer.json()["error"]["code"] == "draining"
        _on(client, b)
        await client.reconnect(SyntheticVideoTrack(_scene, fps=5))
        after = []
        while len(after) < 2:
            tick = await asyncio.wait_for(client.ticks.get(), 10)
            if tick["outcome"] != "skipped:reconnect" and tick["tick"] > before[-1]["tick"]:
                after.append(tick)
        await asyncio.sleep(0.5)
        events = await client.events()
        # The tick in flight when the drain began was recorded (skipped:closed) before the client was told.
        _assert_log_continues(events, before, after)
    finally:
        await client.close()


async def test_settings_and_end_sent_through_the_other_replica_reach_the_session(two_replicas) -> None:
    a, b = two_replicas
    client = VigilClient(a.url)
    await client.connect(SyntheticVideoTrack(_scene, fps=5), instructions=["say when red"])
    try:
        await _ticks(client, 1)
        async with httpx.AsyncClient(base_url=b.url) as other:
            changed = await other.patch(f"/v1/sessions/{client.session_id}", json={"speak_threshold": 0.9},
                                        headers=client.auth())
            assert changed.status_code == 200 and changed.headers["x-vigil-replica"] == "replica-b"
            peer = a.gateway.peers[client.session_id]
            await _until(lambda: peer.loop.speak_threshold == 0.9, timeout=5)
            await _until(lambda: any(m["type"] == "settings" and m["speak_threshold"] == 0.9
                                     for m in client.messages), timeout=5)
            ended = await other.delete(f"/v1/sessions/{client.session_id}", headers=client.auth())
            assert ended.status_code == 200
        await _until(lambda: client.session_id not in a.gateway.peers, timeout=5)
    finally:
        await client.close(end_session=False)
