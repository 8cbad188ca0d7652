"""Two ingest replicas in the real Serve graph: sessions spread over both, each session's HTTP calls reach the
replica that holds its peer (Serve routes by the x-session-id header), and when one replica is killed mid-stream
its sessions resume on the other with tick numbers and stream time going on, memory intact, and no tick number
logged twice, while the other replica's sessions tick on undisturbed. Draining: a redeploy with `serve run` and a
new Serve config, and SIGTERM of Vigil itself, tell each client to connect again after its last tick, and its
session resumes on the new replicas (after SIGTERM, on a Vigil started again on the same Redis), numbering on.
The Vigil is tests/fixtures_roles.py's, after tests/test_replica_kills.py has killed its other roles' replicas."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Generator
from itertools import pairwise
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from actors.ingest.ice import restrict_host_addresses
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fixtures_vigil import ROOT, SHARED_TINY, RunningVigil, launch_vigil

pytestmark = pytest.mark.integration

SERVE = Path(sys.executable).parent / "serve"  # Ray's CLI, beside the interpreter
STOP_WITHIN_S = 30.0  # SIGTERM to exit: the drain (graceful_shutdown_timeout_s), then Serve's and Ray's shutdown

NOTE = "the spare key is under the blue flowerpot"


def _scene(elapsed: float) -> np.ndarray:
    image = np.full((240, 320, 3), 80, np.uint8)
    image[:, int(elapsed * 30) % 320] = 240
    return image


async def _replica_of(http: httpx.AsyncClient, session: dict) -> str:
    reply = await http.get(f"/v1/sessions/{session['session_id']}/events", headers={
        "Authorization": f"Bearer {session['token']}", "x-session-id": session["session_id"]})
    reply.raise_for_status()
    return reply.headers["x-vigil-replica"]


async def _sessions_on_both(vigil: RunningVigil, count: int) -> dict[str, list[dict]]:
    """`count` new sessions (not connected), grouped by the replica their calls reach."""
    by_replica: dict[str, list[dict]] = {}
    async with httpx.AsyncClient(base_url=vigil.url, timeout=15) as http:
        for _ in range(count):
            reply = await http.post("/v1/sessions", json={"instructions": ["say when something red shows"]})
            reply.raise_for_status()
            session = reply.json()
            by_replica.setdefault(await _replica_of(http, session), []).append(session)
    return by_replica


async def _one_session_on_each(vigil: RunningVigil, timeout: float = 90) -> dict[str, dict]:
    """A new session (not connected) on each of the two ingest replicas. New sessions are made until both have
    one, for as long as a replica killed by an earlier test takes to be routed to again, and until each still
    reaches its replica once both are routed to (a replica that joins moves some sessions); the rest end."""
    on: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=vigil.url, timeout=15) as http:

        async def end(session: dict) -> None:
            await http.delete(f"/v1/sessions/{session['session_id']}", headers={
                "Authorization": f"Bearer {session['token']}", "x-session-id": session["session_id"]})

        while True:
            for replica, session in list(on.items()):
                if await _replica_of(http, session) != replica:
                    await end(on.pop(replica))
            if len(on) == 2:
                return on
            assert time.monotonic() < deadline, f"after {timeout:.0f} s new sessions reach only {list(on)}"
            reply = await http.post("/v1/sessions", json={"instructions": ["say when something red shows"]})
            reply.raise_for_status()
            session = reply.json()
            replica = await _replica_of(http, session)
            if replica in on:
                await end(session)
                await asyncio.sleep(0.2)
            else:
                on[replica] = session


async def test_sessions_spread_and_each_call_reaches_its_replica(vigil_every_role: RunningVigil) -> None:
    restrict_host_addresses(["127.0.0.1"])
    by_replica = await _sessions_on_both(vigil_every_role, 12)
    assert len(by_replica) == 2, f"12 sessions all on one ingest replica: {list(by_replica)}"
    assert len(vigil_every_role.replica_pids("Ingest")) == 2
    async with httpx.AsyncClient(base_url=vigil_every_role.url, timeout=15) as http:
        for replica, sessions in by_replica.items():
            for session in sessions:
                assert {await _replica_of(http, session) for _ in range(3)} == {replica}
    clients = []
    try:
        for replica, sessions in by_replica.items():
            client = VigilClient(vigil_every_role.url)
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
        await _end_unused(vigil_every_role, by_replica)


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


async def test_killing_an_ingest_replica_resumes_its_sessions_on_the_other(vigil_every_role: RunningVigil) -> None:
    restrict_host_addresses(["127.0.0.1"])
    (doomed_replica, doomed_session), (_, kept_session) = (await _one_session_on_each(vigil_every_role)).items()
    doomed, kept = VigilClient(vigil_every_role.url), VigilClient(vigil_every_role.url)
    doomed.session, kept.session = doomed_session, kept_session
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


def _serve_config(vigil: RunningVigil, path: Path, **args: object) -> Path:
    """A Serve config file for Vigil's application, as an operator writes one: the builder, its args (they
    override Vigil's settings) and the environment its replicas start with."""
    redis_url = re.search(r"embedded Redis at (\S+)", vigil.log())
    assert redis_url, "Vigil logs its Redis"
    env = {key: value for key, value in vigil.settings.items() if key != "VIGIL_INGEST_REPLICAS"}
    config = {"applications": [{
        "name": "vigil", "route_prefix": "/", "import_path": "serve_app:app_builder",
        "args": {"redis_url": redis_url[1], **args}, "runtime_env": {"env_vars": env},
    }]}
    path.write_text(yaml.safe_dump(config))
    return path


def _serve_run(vigil: RunningVigil, config: Path) -> float:
    """What an operator does to redeploy: `serve run <config> --non-blocking` against Vigil's running cluster.
    Serve replaces the replicas whose config changed and stops the old ones gracefully. Returns the seconds
    `serve run` took."""
    gcs = re.search(r"Ray cluster at (\S+)", vigil.log())
    assert gcs, "Vigil logs its Ray cluster's address"
    env = {"PATH": str(SERVE.parent) + ":/usr/bin:/bin", "HOME": str(Path.home()), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token"}  # a cluster started by ray.init() takes tokens; its token is in ~/.ray
    started = time.monotonic()
    done = subprocess.run([str(SERVE), "run", str(config), "--address", gcs[1], "--non-blocking"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return time.monotonic() - started


async def _told_to_reconnect(clients: list[VigilClient], timeout: float, after: list[int] | None = None) -> None:
    """Each client got `reconnect` (reason `drain`) after its first `after` messages, and after its last tick, so
    that whoever runs its session next numbers on from there."""
    starts = after or [0] * len(clients)
    deadline = time.monotonic() + timeout
    while not all(any(m["type"] == "reconnect" for m in client.messages[start:])
                  for client, start in zip(clients, starts, strict=True)):
        assert time.monotonic() < deadline, [[m["type"] for m in c.messages[-3:]] for c in clients]
        await asyncio.sleep(0.1)
    for client, start in zip(clients, starts, strict=True):
        told = next(m for m in client.messages[start:] if m["type"] == "reconnect")
        assert told["reason"] == "drain"
        last_tick = max(m["received_at"] for m in client.messages if m["type"] == "tick")
        assert told["received_at"] >= last_tick, "told after its last tick, so the next owner numbers on"


async def test_a_redeploy_drains_sessions_onto_the_new_replicas_and_sigterm_onto_a_new_vigil(
        vigil_every_role: RunningVigil, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
        tiny_random_model_dir: Path) -> None:
    """A redeploy with `serve run` and a new Serve config (one ingest replica instead of two: a scale-down) tells
    every client to connect again before its replica goes; they resume on the replica that stays, numbering on.
    Then SIGTERM stops Vigil, draining them once more, and they resume on a Vigil started again on the same
    Redis. Last in this module: it stops the module's Vigil, and hands the new one (default settings) over to
    the tests that use `vigil_tiny`."""
    restrict_host_addresses(["127.0.0.1"])
    # Both replicas hold a session (the one the last test killed is routed to again), so that once both clients
    # are told to reconnect, neither old replica is left to resume them.
    on_replica = await _one_session_on_each(vigil_every_role)
    old_replicas = set(on_replica)
    clients = []
    again: Generator[RunningVigil, None, None] | None = None
    restarted: RunningVigil | None = None
    passed = False
    try:
        for replica, session in on_replica.items():
            client = VigilClient(vigil_every_role.url)
            client.session = session
            await client.connect(SyntheticVideoTrack(_scene, fps=5))
            assert client.replica == replica
            await asyncio.wait_for(client.ticks.get(), 15)
            clients.append(client)
        config = _serve_config(vigil_every_role, tmp_path / "one-ingest.yaml", ingest_replicas=1)
        took = await asyncio.to_thread(_serve_run, vigil_every_role, config)
        await _told_to_reconnect(clients, timeout=60)
        for client in clients:
            await _reconnect_until_it_ticks(client, timeout=60)
        print(f"serve run redeployed with one ingest replica in {took:.1f} s; both sessions resumed on "
              f"{clients[0].replica}")
        assert len({client.replica for client in clients}) == 1
        assert clients[0].replica not in old_replicas
        assert len(vigil_every_role.replica_pids("Ingest")) == 1
        for client in clients:
            await _decided_again(client)
        told_before = [len(client.messages) for client in clients]
        vigil_every_role.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await _told_to_reconnect(clients, timeout=30, after=told_before)
        told_after = time.monotonic() - signalled
        assert await asyncio.to_thread(vigil_every_role.process.wait, STOP_WITHIN_S) == 0
        stopped_after = time.monotonic() - signalled
        before = {client.session_id: max(m["tick"] for m in client.messages if m["type"] == "tick")
                  for client in clients}
        # The operator starts Vigil again on the same (persisted) Redis; each client finds it and resumes.
        again = launch_vigil(tmp_path_factory.mktemp("vigil-again"), tiny_random_model_dir,
                             VIGIL_REDIS_DIR=vigil_every_role.settings["VIGIL_REDIS_DIR"])
        restarted = await asyncio.to_thread(next, again)
        for client in clients:
            await client.http.aclose()
            client.http = httpx.AsyncClient(base_url=restarted.url, timeout=15)
            await _reconnect_until_it_ticks(client, timeout=60)
            hello = [m for m in client.messages if m["type"] == "hello"][-1]
            assert hello["resumed"]["tick"] == before[client.session_id] and hello["resumed"]["missed_s"] > 0
            await _decided_again(client)
        print(f"SIGTERM: told to reconnect after {told_after:.2f} s, Vigil exited after {stopped_after:.1f} s; "
              "both sessions resumed on a new Vigil")
        passed = True
    finally:
        for client in clients:
            await client.close(end_session=restarted is not None)
        if again is not None and restarted is not None and passed:
            SHARED_TINY.hand_over(again, restarted)
        elif again is not None:
            again.close()


async def _decided_again(client: VigilClient) -> None:
    """Past the resumed session's `skipped:reconnect`, a tick decided; the log numbered 1..n, each once."""
    while (await asyncio.wait_for(client.ticks.get(), 15))["outcome"] == "skipped:reconnect":
        pass
    ticks = [event["tick"] for event in await client.events()]
    assert sorted(ticks) == list(range(1, max(ticks) + 1)), f"a tick missing or twice: {sorted(ticks)}"
