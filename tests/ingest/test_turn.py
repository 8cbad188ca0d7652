"""TURN credentials a relay accepts: the TURN REST API scheme coturn checks (username "<expiry>:<session>",
base64 HMAC-SHA1 over the shared secret), handed to a session's client when it is created and again with each
answer, and not at all without a relay."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from pydantic import SecretStr

from actors.common.config import VigilConfig
from actors.ingest.turn import client_ice_servers, turn_credentials, turn_password
from bench.webrtc_client import SyntheticVideoTrack
from tests.fixtures_gateway import LocalVigil

TURN = {"turn_urls": ["turn:turn.example.com:3478?transport=udp", "turn:turn.example.com:3478?transport=tcp"],
        "turn_secret": SecretStr("north-wind"), "turn_ttl_s": 600}


@pytest.mark.unit
def test_the_password_is_what_the_relay_computes() -> None:
    # From `printf %s 1700000000:0123abcd | openssl dgst -sha1 -hmac north-wind -binary | base64`.
    assert turn_password("north-wind", "1700000000:0123abcd") == "6lyAxbIneCFbN7mCwPiYqKiK4q0="
    assert turn_credentials("north-wind", "0123abcd", 600, now=1_699_999_400.7) == (
        "1700000000:0123abcd", "6lyAxbIneCFbN7mCwPiYqKiK4q0=")


@pytest.mark.unit
def test_credentials_last_a_session_unless_told_otherwise() -> None:
    assert client_ice_servers(VigilConfig(), "s1") == {}
    assert client_ice_servers(VigilConfig(turn_urls=TURN["turn_urls"]), "s1") == {}  # no secret: no relay
    (server,) = client_ice_servers(VigilConfig(turn_secret=SecretStr("x"), turn_urls=["turn:t:3478"]), "s1",
                                   now=1000.0)["iceServers"]
    assert server["username"] == f"{1000 + VigilConfig().session_ttl_s}:s1"
    config = VigilConfig(**TURN)
    (server,) = client_ice_servers(config, "s1", now=1000.0)["iceServers"]
    assert server == {"urls": TURN["turn_urls"], "username": "1600:s1", "credential": turn_password("north-wind",
                                                                                                     "1600:s1")}
    assert "north-wind" not in repr(config)


@pytest.mark.integration
@pytest.mark.parametrize("local_vigil", [TURN], indirect=True)
async def test_a_session_gets_turn_credentials_before_it_connects_and_with_its_answer(local_vigil: LocalVigil) -> None:
    async with httpx.AsyncClient(base_url=local_vigil.url) as http:
        created = (await http.post("/v1/sessions", json={})).json()
        (server,) = created["iceServers"]
        expiry, _, session = server["username"].partition(":")
        assert session == created["session_id"] and abs(int(expiry) - (time.time() + 600)) < 5
        assert server["credential"] == turn_password("north-wind", server["username"])
        assert server["urls"] == TURN["turn_urls"]

        pc = RTCPeerConnection()
        try:
            pc.createDataChannel("vigil")
            pc.addTrack(SyntheticVideoTrack(lambda _: np.zeros((48, 64, 3), np.uint8)))
            await pc.setLocalDescription(await pc.createOffer())
            reply = await http.post(f"/v1/sessions/{created['session_id']}/offer",
                                    json={"type": "offer", "sdp": pc.localDescription.sdp},
                                    headers={"Authorization": f"Bearer {created['token']}"})
            assert reply.status_code == 200, reply.text
            answer = reply.json()
            assert answer["type"] == "answer" and answer["sdp"].startswith("v=0")
            (fresh,) = answer["iceServers"]
            assert fresh["username"].endswith(f":{created['session_id']}")
            assert fresh["credential"] == turn_password("north-wind", fresh["username"])
        finally:
            await pc.close()
            await http.delete(f"/v1/sessions/{created['session_id']}",
                              headers={"Authorization": f"Bearer {created['token']}"})


@pytest.mark.integration
async def test_without_a_relay_nothing_about_turn_is_sent(local_vigil: LocalVigil) -> None:
    async with httpx.AsyncClient(base_url=local_vigil.url) as http:
        created = (await http.post("/v1/sessions", json={})).json()
        assert "iceServers" not in created
