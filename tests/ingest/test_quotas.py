"""Session quotas as a client meets them: sessions per client address and per API key are capped across every
ingest replica (one Redis); a refusal is a 429 that names the quota, its limit and when to retry; a session that
ends, or is never connected, gives its slot back; a connected one keeps it, with the full session TTL."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
import redis.asyncio as redis
from fastapi import FastAPI

from actors.common.config import VigilConfig
from actors.common.embedded_redis import EmbeddedRedis
from actors.common.metrics import VigilMetrics
from actors.common.session_store import SessionStore, UnknownSession
from actors.ingest.gateway import Gateway, build_api
from actors.ingest.quotas import SessionQuotas, address_id, client_address, key_id
from actors.ingest.session_loop import TickServices
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fakes import LocalEngineHandle, ScriptedEngine
from tests.fixtures_gateway import LocalVigil

pytestmark = pytest.mark.integration


def _address() -> str:
    """A client address no other test uses (the Redis lives for the whole test run)."""
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


async def _never_sampled(*_: object) -> None:
    raise AssertionError("no session here streams video")


@asynccontextmanager
async def _gateway(redis_server: EmbeddedRedis, **overrides: object) -> AsyncIterator[Gateway]:
    """One ingest replica's gateway over the shared Redis, without Ray or a network."""
    config = VigilConfig(redis_url=redis_server.url, **overrides)
    store = SessionStore.from_url(redis_server.url, config.session_ttl_s, config.event_log_max)
    engine = LocalEngineHandle(ScriptedEngine())
    await engine.engine.start()
    services = TickServices(sample=_never_sampled, decide=engine.decide, store=store, metrics=VigilMetrics())
    gateway = Gateway(config, store, services, engine)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.shutdown()


def _client(app: FastAPI, address: str, api_key: str | None = None) -> httpx.AsyncClient:
    """HTTP from `address` straight into the app (ASGI): the address is the connection's peer."""
    transport = httpx.ASGITransport(app=app, client=(address, 40_000))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(transport=transport, base_url="http://vigil", headers=headers)


async def test_an_address_over_its_cap_gets_a_429_that_says_which_quota_and_when_to_retry(
    redis_server: EmbeddedRedis,
) -> None:
    async with _gateway(redis_server, limits={"max_sessions_per_address": 2}) as gateway:
        app, address = build_api(gateway), _address()
        async with _client(app, address) as http, _client(app, _address()) as neighbour:
            created = [await http.post("/v1/sessions") for _ in range(2)]
            assert [reply.status_code for reply in created] == [201, 201]
            assert created[0].json()["expires_in"] == 120  # the unconnected TTL: the offer is due within it
            refused = await http.post("/v1/sessions")
            assert refused.status_code == 429
            error = refused.json()["error"]
            assert error["code"] == "quota_exceeded"
            assert "client address already holds 2 sessions" in error["message"]
            assert "max_sessions_per_address" in error["message"]
            retry = int(refused.headers["Retry-After"])
            assert 110 <= retry <= 120 and f"retry in {retry} s" in error["message"]
            assert (await neighbour.post("/v1/sessions")).status_code == 201
            assert await gateway.quotas.held("address", address) == 2
            metrics = (await http.get("/metrics")).text
    assert 'vigil_quota_refusals_total{quota="address"} 1.0' in metrics
    assert 'vigil_http_rejected_total{code="quota_exceeded"} 1.0' in metrics
    assert "vigil_sessions_created_total 3.0" in metrics


async def test_an_api_key_over_its_cap_is_refused_from_any_address_and_is_never_stored(
    redis_server: EmbeddedRedis,
) -> None:
    api_key = secrets.token_urlsafe(16)
    limits = {"max_sessions_per_key": 2, "max_sessions_per_address": 10}
    async with _gateway(redis_server, api_key=api_key, limits=limits) as gateway:
        app = build_api(gateway)
        for expected in (201, 201, 429):
            async with _client(app, _address(), api_key) as http:
                reply = await http.post("/v1/sessions")
            assert reply.status_code == expected, reply.text
        error = reply.json()["error"]
        assert error["code"] == "quota_exceeded" and "API key already holds 2 sessions" in error["message"]
        assert "max_sessions_per_key" in error["message"] and int(reply.headers["Retry-After"]) >= 1
        assert await gateway.quotas.held("key", key_id(api_key)) == 2
        stored = [key async for key in gateway.store.client.scan_iter("vigil:*")]
        assert any(key_id(api_key).encode() in key for key in stored)
        assert not any(api_key.encode() in key for key in stored)
        async with _client(app, _address(), api_key) as http:
            metrics = (await http.get("/metrics")).text
    assert 'vigil_quota_refusals_total{quota="key"} 1.0' in metrics


async def test_ending_a_session_gives_its_slot_back(redis_server: EmbeddedRedis) -> None:
    async with _gateway(redis_server, limits={"max_sessions_per_address": 1}) as gateway:
        async with _client(build_api(gateway), _address()) as http:
            first = (await http.post("/v1/sessions")).json()
            assert (await http.post("/v1/sessions")).status_code == 429
            auth = {"Authorization": f"Bearer {first['token']}"}
            assert (await http.delete(f"/v1/sessions/{first['session_id']}", headers=auth)).status_code == 200
            assert (await http.post("/v1/sessions")).status_code == 201


OFFER_SDP = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"


async def test_a_session_that_left_its_quota_connects_again_only_if_there_is_room(
    redis_server: EmbeddedRedis,
) -> None:
    """A session whose peer closed left its quotas (it may be resumed for hours): an offer for it counts it
    again, so parked sessions cannot be brought back past the cap."""
    async with _gateway(redis_server, limits={"max_sessions_per_address": 2}) as gateway:
        address = _address()
        async with _client(build_api(gateway), address) as http:
            first, second = [(await http.post("/v1/sessions")).json() for _ in range(2)]
            await gateway.quotas.release(first["session_id"])  # as when its peer closes
            third = (await http.post("/v1/sessions")).json()  # takes the slot the first left
            refused = await http.post(f"/v1/sessions/{first['session_id']}/offer", json={"type": "offer",
                                      "sdp": OFFER_SDP}, headers={"Authorization": f"Bearer {first['token']}"})
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
            assert int(refused.headers["Retry-After"]) >= 1
            # A session still counted connects again whatever the count (the SDP here is not a real one).
            again = await http.post(f"/v1/sessions/{second['session_id']}/offer", json={"type": "offer",
                                    "sdp": OFFER_SDP}, headers={"Authorization": f"Bearer {second['token']}"})
            assert again.status_code == 400 and again.json()["error"]["code"] == "invalid_sdp"
            auth = {"Authorization": f"Bearer {third['token']}"}
            assert (await http.delete(f"/v1/sessions/{third['session_id']}", headers=auth)).status_code == 200
            await gateway.quotas.readmit(first["session_id"], time.time() + 60)  # room again: counted again
            assert await gateway.quotas.held("address", address) == 2


async def test_a_session_never_connected_is_gone_after_its_short_ttl_and_frees_its_slot(
    redis_server: EmbeddedRedis,
) -> None:
    async with _gateway(redis_server, unconnected_session_ttl_s=1, limits={"max_sessions_per_address": 1}) as gateway:
        async with _client(build_api(gateway), _address()) as http:
            created = (await http.post("/v1/sessions")).json()
            assert created["expires_in"] == 1
            session_id, auth = created["session_id"], {"Authorization": f"Bearer {created['token']}"}
            # Changing a setting is no way to keep an unconnected session: it still expires on time.
            changed = await http.patch(f"/v1/sessions/{session_id}", json={"speak_threshold": 0.7}, headers=auth)
            assert changed.status_code == 200
            refused = await http.post("/v1/sessions")
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            await asyncio.sleep(1.3)
            with pytest.raises(UnknownSession):
                await gateway.store.get(session_id)
            offer = await http.post(f"/v1/sessions/{session_id}/offer", json={"type": "offer", "sdp": "v=0"},
                                    headers=auth)
            assert offer.status_code == 404 and offer.json()["error"]["code"] == "unknown_session"
            assert (await http.post("/v1/sessions")).status_code == 201


async def test_two_replicas_sharing_one_redis_share_the_quotas(redis_server: EmbeddedRedis) -> None:
    limits = {"max_sessions_per_address": 2}
    async with _gateway(redis_server, limits=limits) as one, _gateway(redis_server, limits=limits) as other:
        address = _address()
        async with _client(build_api(one), address) as first, _client(build_api(other), address) as second:
            on_one = (await first.post("/v1/sessions")).json()
            assert (await second.post("/v1/sessions")).status_code == 201
            assert (await first.post("/v1/sessions")).status_code == 429
            assert (await second.post("/v1/sessions")).status_code == 429
            auth = {"Authorization": f"Bearer {on_one['token']}"}
            assert (await second.delete(f"/v1/sessions/{on_one['session_id']}", headers=auth)).status_code == 200
            assert (await first.post("/v1/sessions")).status_code == 201
        async with _client(build_api(one), racer := _address()) as first, _client(build_api(other), racer) as second:
            # Twelve at once through both replicas: the check and the join are one step, so exactly two get in.
            replies = await asyncio.gather(*(http.post("/v1/sessions") for http in (first, second) * 6))
            assert sorted(reply.status_code for reply in replies) == [201] * 2 + [429] * 10
            assert await one.quotas.held("address", racer) == 2


async def test_x_forwarded_for_counts_only_when_the_proxy_in_front_is_trusted(redis_server: EmbeddedRedis) -> None:
    proxy = _address()
    for trusted in (False, True):
        overrides = {"trust_forwarded_for": trusted, "limits": {"max_sessions_per_address": 1}}
        async with _gateway(redis_server, **overrides) as gateway:
            app = build_api(gateway)
            alice, bob = _address(), _address()
            async with _client(app, proxy) as http:
                # Whatever the client wrote comes first; the proxy appends the address it saw.
                replies = [await http.post("/v1/sessions", headers={"X-Forwarded-For": f"1.2.3.4, {client}"})
                           for client in (alice, bob, alice)]
            if trusted:
                assert [r.status_code for r in replies] == [201, 201, 429]
                assert await gateway.quotas.held("address", alice) == 1
            else:
                assert [r.status_code for r in replies] == [201, 429, 429]
                assert await gateway.quotas.held("address", proxy) == 1


def test_client_addresses_are_grouped_as_one_subscriber_holds_them() -> None:
    assert address_id("2001:db8:1:2::7") == address_id("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert address_id("2001:db8:1:3::7") != address_id("2001:db8:1:2::7")
    assert address_id("::ffff:198.51.100.4") == "198.51.100.4"
    assert client_address("198.51.100.4", "203.0.113.9", trust_forwarded_for=False) == "198.51.100.4"
    assert client_address("198.51.100.4", "203.0.113.9", trust_forwarded_for=True) == "203.0.113.9"
    assert client_address("198.51.100.4", "not-an-address", trust_forwarded_for=True) == "198.51.100.4"
    assert client_address(None, "", trust_forwarded_for=True) == "unknown"


def test_the_quota_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = VigilConfig()
    assert (defaults.limits.max_sessions_per_key, defaults.limits.max_sessions_per_address) == (32, 16)
    assert defaults.unconnected_session_ttl_s == 120 and not defaults.trust_forwarded_for
    monkeypatch.setenv("VIGIL_LIMITS_MAX_SESSIONS_PER_KEY", "100")
    monkeypatch.setenv("VIGIL_LIMITS_MAX_SESSIONS_PER_ADDRESS", "3")
    monkeypatch.setenv("VIGIL_UNCONNECTED_SESSION_TTL_S", "30")
    monkeypatch.setenv("VIGIL_TRUST_FORWARDED_FOR", "true")
    config = VigilConfig.from_env()
    assert (config.limits.max_sessions_per_key, config.limits.max_sessions_per_address) == (100, 3)
    assert config.limits.max_sessions == 64
    assert config.unconnected_session_ttl_s == 30 and config.trust_forwarded_for


def _scene(elapsed: float) -> np.ndarray:
    image = np.full((120, 160, 3), 70, np.uint8)
    image[:, int(elapsed * 20) % 160] = 200
    return image


@pytest.mark.parametrize("local_vigil", [{"unconnected_session_ttl_s": 2, "heartbeat_timeout_s": 3.0}],
                         indirect=True)
async def test_a_connected_session_outlives_the_short_ttl_and_leaves_its_quota_when_its_peer_closes(
    local_vigil: LocalVigil,
) -> None:
    url = local_vigil.config.redis_url or ""
    client, address = VigilClient(local_vigil.url), _address()
    # The server trusts X-Forwarded-For from loopback (uvicorn's default, as in Serve's proxy): the session
    # counts against this address.
    client.http.headers["X-Forwarded-For"] = address
    view = redis.Redis.from_url(url)
    quotas = SessionQuotas(view, 1, 1)
    try:
        await client.connect(SyntheticVideoTrack(_scene, fps=5))
        assert client.session["expires_in"] == 2
        await asyncio.sleep(2.5)
        assert await view.ttl(f"vigil:session:{client.session_id}") > 3600  # the full session TTL
        assert await quotas.held("address", address) == 1
    finally:
        await client.close(end_session=False)
    deadline = time.monotonic() + 15
    while await quotas.held("address", address):
        assert time.monotonic() < deadline, "the closed session still holds its slot"
        await asyncio.sleep(0.1)
    await view.aclose()


def test_a_section_in_the_serve_args_sets_fields_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`limits: {...}` or `brain: {...}` in a Serve config's args overrides the fields it names and keeps the
    ones `VIGIL_LIMITS_*` / `VIGIL_BRAIN_*` set."""
    monkeypatch.setenv("VIGIL_LIMITS_MAX_SESSIONS_PER_KEY", "7")
    monkeypatch.setenv("VIGIL_BRAIN_TIMEOUT_S", "30")
    config = VigilConfig.from_env({"limits": {"max_sessions_per_address": 2},
                                   "brain": {"backend": "openai", "base_url": "http://brain:8000/v1"}})
    assert (config.limits.max_sessions_per_key, config.limits.max_sessions_per_address) == (7, 2)
    assert (config.brain.backend, config.brain.timeout_s) == ("openai", 30.0)
