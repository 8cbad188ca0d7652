"""Two ingest replicas in the real Serve graph: sessions spread over both, each session's HTTP calls reach the
replica that holds its peer (Serve routes by the x-session-id header), and when one replica is killed mid-stream
its sessions resume on the other with tick numbers and stream time going on, memory intact, and no tick number
logged twice, while the other replica's sessions tick on undisturbed."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import httpx
import numpy as np
import pytest

from actors.ingest.ice import restrict_host_addresses
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fixtures_vigil import ROOT, RunningVigil, launch_vigil

pytestmark = pytest.mark.integration

NOTE = "the spare key is under the blue flowerpot"


@pytest.fixture(scope="module")
def vigil_two_ingest(tmp_path_factory: pytest.TempPathFactory, tiny_random_model_dir: Path) -> Iterator[RunningVigil]:
    yield from launch_vigil(tmp_path_factory.mktemp("vigil-two-ingest"), tiny_random_model_dir,
                            VIGIL_INGEST_REPLICAS="2")


def _scene(elapsed: float) -> np.ndarray:
    image = np.full((240, 320, 3), 80, np.uint8)
    image[:, int(elapsed * 30) % 320] = 240
    return image


async def _replica_of(http: httpx.AsyncClient, session: dict) -> str:
    reply = await http.get(f"/v1/sessions/{session['session_id']}/events", headers={
        "Authorization": f"Bearer {session['token']}", "x-session-id": session["session_id"]})
    reply.raise_for_status()
    return reply.headers["x-vigil-replica"]


async def _sessions_on_both(vigil: RunningVigil, count: int, stop_when_both: bool = False) -> dict[str, list[dict]]:
    """Up to `count` new sessions (not connected), grouped by the replica their calls reach; `stop_when_both`:
    only until each replica has one."""
    by_replica: dict[str, list[dict]] = {}
    async with httpx.AsyncClient(base_url=vigil.url, timeout=15) as http:
        for _ in range(count):
            if stop_when_both and len(by_replica) == 2:
                break
            reply = await http.post("/v1/sessions", json={"instructions": ["say when something red shows"]})
            reply.raise_for_status()
            session = reply.json()
            by_replica.setdefault(await _replica_of(http, session), []).append(session)
    return by_replica


async def test_sessions_spread_and_each_call_reaches_its_replica(vigil_two_ingest: RunningVigil) -> None:
    restrict_host_addresses(["127.0.0.1"])
    by_replica = await _sessions_on_both(vigil_two_ingest, 12)
    assert len(by_replica) == 2, f"12 sessions all on one ingest replica: {list(by_replica)}"
    assert len(vigil_two_ingest.replica_pids("Ingest")) == 2
    async with httpx.AsyncClient(base_url=vigil_two_ingest.url, timeout=15) as http:
        for replica, sessions in by_replica.items():
            for session in sessions:
                assert {await _replica_of(http, session) for _ in range(3)} == {replica}
    clients = []
    try:
        for replica, sessions in by_replica.items():
            client = VigilClient(vigil_two_ingest.url)
            client.session = sessions[0]
            await client.connect(SyntheticVideoTrack(_scene, fps=5))
            clients.append(client)
            assert client.replica == replica, "the offer reached the replica the session's calls reach"
            await asyncio.wait_for(client.ticks.get(), 15)
            settings = await client.http.patch(f"/v1/sessions/{client.session_id}", json={"speak_threshold": 0.7},
                                               headers=client.auth())
            assert settings.headers["x-vigil-replica"] == replica
            memory = await client.http.get(f"/v1/sessions/{client.session_id}/memory", params={"q": "red"},
                                           headers=client.auth())
            assert memory.headers["x-vigil-replica"] == replica
    finally:
        for client in clients:
            await client.close()
        await _end_unused(vigil_two_ingest, by_replica)


async def _end_unused(vigil: RunningVigil, by_replica: dict[str, list[dict]]) -> None:
    """End the sessions no client connected (the first of each replica's), so they leave the address quota."""
    async with httpx.AsyncClient(base_url=vigil.url, timeout=15) as http:
        for sessions in by_replica.values():
            for session in sessions[1:]:
                await http.delete(f"/v1/sessions/{session['session_id']}", headers={
                    "Authorization": f"Bearer {session['token']}", "x-session-id": session["session_id"]})


async def _reconnect_until_it_ticks(client: VigilClient, timeout: float) -> None:
    """What a client does when its ticks stop: connect again, with the same session, until it is answered."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.reconnect(SyntheticVideoTrack(_scene, fps=5))
            return
        except (httpx.HTTPError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _recalled(client: VigilClient, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any("flowerpot" in line for line in await client.recall("where is the spare key?")):
                return True
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)
    return False


async def test_killing_an_ingest_replica_resumes_its_sessions_on_the_other(vigil_two_ingest: RunningVigil) -> None:
    restrict_host_addresses(["127.0.0.1"])
    by_replica = await _sessions_on_both(vigil_two_ingest, 12, stop_when_both=True)
    assert len(by_replica) == 2
    await _end_unused(vigil_two_ingest, by_replica)
    (doomed_replica, doomed_sessions), (_, kept_sessions) = by_replica.items()
    doomed, kept = VigilClient(vigil_two_ingest.url), VigilClient(vigil_two_ingest.url)
    doomed.session, kept.session = doomed_sessions[0], kept_sessions[0]
    try:
        for client in (doomed, kept):
            await client.connect(SyntheticVideoTrack(_scene, fps=5))
        doomed.send({"type": "question", "text": NOTE})
        assert await _recalled(doomed, 15), "memory took the note before the replica was killed"
        before = [await asyncio.wait_for(doomed.ticks.get(), 15) for _ in range(3)]
        kept_ticks: list[float] = []

        async def watch_kept() -> None:
            while True:
                await kept.ticks.get()
                kept_ticks.append(time.monotonic())

        watcher = asyncio.create_task(watch_kept())
        os.kill(int(doomed_replica.rpartition("@")[2]), signal.SIGKILL)
        killed_at = time.monotonic()
        # The client notices that its ticks stopped, and connects again.
        while True:
            try:
                before.append(await asyncio.wait_for(doomed.ticks.get(), 2.5))
            except TimeoutError:
                break
        await _reconnect_until_it_ticks(doomed, timeout=60)
        after = []
        while len(after) < 3:
            tick = await asyncio.wait_for(doomed.ticks.get(), 15)
            if tick["outcome"] != "skipped:reconnect":
                after.append(tick)
        back_after = time.monotonic() - killed_at
        watcher.cancel()
        print(f"ingest replica killed: its session ticking again on {doomed.replica} after {back_after:.1f} s")
        assert doomed.replica != doomed_replica
        assert back_after < 30
        gaps = [later - earlier for earlier, later in pairwise([killed_at, *kept_ticks])]
        assert kept_ticks and max(gaps) < 2.5, f"the other replica's session stalled: {gaps}"
        hello = [m for m in doomed.messages if m["type"] == "hello"][-1]
        assert hello["resumed"]["missed_s"] > 0
        events = await doomed.events()
        ticks = [event["tick"] for event in events]
        assert len(ticks) == len(set(ticks)), f"a tick number logged twice: {sorted(ticks)}"
        assert sorted(ticks) == list(range(1, max(ticks) + 1))
        gap = [event for event in events if event["outcome"] == "skipped:reconnect"]
        assert len(gap) == 1 and gap[0]["tick"] > max(tick["tick"] for tick in before)
        assert min(tick["stream_time"] for tick in after) > max(tick["stream_time"] for tick in before)
        assert await _recalled(doomed, 15), "memory kept the note across the resume"
    finally:
        for client in (doomed, kept):
            await client.close()


def _redeploy_with_one_ingest_replica(vigil: RunningVigil) -> float:
    """What an operator does to scale the ingest down: deploy the application again, from another driver joined
    to Vigil's cluster, with one ingest replica. Serve replaces the replicas and stops the old ones gracefully.
    Returns the seconds `serve.run` took."""
    log = vigil.log()
    gcs = re.search(r"Ray cluster at (\S+)", log)
    redis_url = re.search(r"embedded Redis at (\S+)", log)
    assert gcs and redis_url, "Vigil logs its Ray cluster and Redis"
    driver = textwrap.dedent(f"""
        import os, time, ray
        from ray import serve
        import serve_app
        from actors.common.config import VigilConfig
        ray.init(address={gcs[1]!r}, runtime_env={{"env_vars": {{k: v for k, v in os.environ.items()
                                                                 if k.startswith(("VIGIL_", "HF_"))}}}})
        config = VigilConfig.from_env({{"redis_url": {redis_url[1]!r}, "ingest_replicas": 1}})
        started = time.monotonic()
        serve.run(serve_app.build_app(config), name="vigil", route_prefix="/")
        print(f"redeployed in {{time.monotonic() - started:.1f}} s")
    """)
    env = os.environ | {key: value for key, value in vigil.settings.items() if key != "VIGIL_INGEST_REPLICAS"}
    env["RAY_AUTH_MODE"] = "token"  # a cluster started by ray.init() takes tokens; its token is in ~/.ray
    done = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return float(re.search(r"redeployed in (\S+) s", done.stdout)[1])  # type: ignore[index]


async def _told_to_reconnect(clients: list[VigilClient], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(any(m["type"] == "reconnect" for m in client.messages) for client in clients):
        assert time.monotonic() < deadline, [[m["type"] for m in c.messages[-3:]] for c in clients]
        await asyncio.sleep(0.1)
    for client in clients:
        told = [m for m in client.messages if m["type"] == "reconnect"][-1]
        assert told["reason"] == "drain"
        last_tick = max(m["received_at"] for m in client.messages if m["type"] == "tick")
        assert told["received_at"] >= last_tick, "told after its last tick, so the next owner numbers on"


async def test_scaling_down_drains_sessions_that_resume_and_stopping_drains_them_again(
        vigil_two_ingest: RunningVigil) -> None:
    """Scale-down (a redeploy with one ingest replica) tells every client to connect again before its replica
    goes; they resume on the replica that stays, numbering on. Then stopping Vigil drains them once more. Last
    in this module: it stops the module's Vigil."""
    restrict_host_addresses(["127.0.0.1"])
    by_replica = await _sessions_on_both(vigil_two_ingest, 12, stop_when_both=True)
    await _end_unused(vigil_two_ingest, by_replica)
    old_replicas = set(by_replica)
    clients = []
    try:
        for sessions in by_replica.values():
            client = VigilClient(vigil_two_ingest.url)
            client.session = sessions[0]
            await client.connect(SyntheticVideoTrack(_scene, fps=5))
            await asyncio.wait_for(client.ticks.get(), 15)
            clients.append(client)
        took = await asyncio.to_thread(_redeploy_with_one_ingest_replica, vigil_two_ingest)
        await _told_to_reconnect(clients, timeout=60)
        for client in clients:
            await _reconnect_until_it_ticks(client, timeout=60)
        print(f"redeployed with one ingest replica in {took:.1f} s; both sessions resumed on {clients[0].replica}")
        assert len({client.replica for client in clients}) == 1
        assert clients[0].replica not in old_replicas
        assert len(vigil_two_ingest.replica_pids("Ingest")) == 1
        for client in clients:
            while (await asyncio.wait_for(client.ticks.get(), 15))["outcome"] == "skipped:reconnect":
                pass
            ticks = [event["tick"] for event in await client.events()]
            assert sorted(ticks) == list(range(1, max(ticks) + 1)), "numbered on, no tick twice"
        vigil_two_ingest.process.send_signal(signal.SIGINT)
        await _told_to_reconnect(clients, timeout=30)
    finally:
        for client in clients:
            await client.close(end_session=False)
