"""Draining the whole application: a redeploy with `serve run` and a new Serve config file, and SIGTERM of Vigil
itself. Each time, every client is told on its data channel to connect again after its last tick, and its
session resumes on the new replicas (after SIGTERM: on a Vigil started again on the same Redis) with the same
session id and token, its tick numbers going on with no number twice."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from actors.ingest.ice import restrict_host_addresses
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fixtures_vigil import ROOT, RunningVigil, launch_vigil

pytestmark = pytest.mark.integration

SERVE = ROOT / ".venv" / "bin" / "serve"
STOP_WITHIN_S = 30.0  # SIGTERM to exit: the drain (graceful_shutdown_timeout_s) and Serve's and Ray's shutdown


@pytest.fixture(scope="module")
def draining_vigil(tmp_path_factory: pytest.TempPathFactory, tiny_random_model_dir: Path) -> Iterator[RunningVigil]:
    yield from launch_vigil(tmp_path_factory.mktemp("vigil-draining"), tiny_random_model_dir, VIGIL_MEMORY="false")


def _scene(elapsed: float) -> np.ndarray:
    image = np.full((240, 320, 3), 80, np.uint8)
    image[:, int(elapsed * 30) % 320] = 240
    return image


async def _told_to_reconnect(client: VigilClient, after: int, timeout: float) -> dict:
    """The `reconnect` message that came after the client's first `after` messages, checked to follow its
    last tick (so that whoever runs the session next numbers on from there)."""
    deadline = time.monotonic() + timeout
    while not any(m["type"] == "reconnect" for m in client.messages[after:]):
        assert time.monotonic() < deadline, [m["type"] for m in client.messages[-3:]]
        await asyncio.sleep(0.1)
    told = next(m for m in client.messages[after:] if m["type"] == "reconnect")
    assert told["reason"] == "drain"
    assert told["received_at"] >= max(m["received_at"] for m in client.messages if m["type"] == "tick")
    return told


async def _reconnect_until_it_ticks(client: VigilClient, timeout: float) -> float:
    """Connect again with the same session until a decided tick comes; the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            await client.reconnect(SyntheticVideoTrack(_scene, fps=5))
            break
        except (httpx.HTTPError, TimeoutError):
            assert time.monotonic() - started < timeout, "the session did not resume"
            await asyncio.sleep(0.5)
    while (await asyncio.wait_for(client.ticks.get(), 15))["outcome"] == "skipped:reconnect":
        pass
    return time.monotonic() - started


async def _numbered_once(client: VigilClient) -> list[int]:
    ticks = [event["tick"] for event in await client.events()]
    assert sorted(ticks) == list(range(1, max(ticks) + 1)), f"a tick missing or twice: {sorted(ticks)}"
    return ticks


def _serve_config(vigil: RunningVigil, path: Path) -> Path:
    """A Serve config file for Vigil's application, as an operator writes one: the builder, its args (here a new
    speak threshold, so every deployment gets a new version and its replicas are replaced) and the environment."""
    redis_url = re.search(r"embedded Redis at (\S+)", vigil.log())
    assert redis_url, "Vigil logs its Redis"
    config = {"applications": [{
        "name": "vigil", "route_prefix": "/", "import_path": "serve_app:app_builder",
        "args": {"redis_url": redis_url[1], "speak_threshold": 0.45},
        "runtime_env": {"env_vars": dict(vigil.settings)},
    }]}
    path.write_text(yaml.safe_dump(config))
    return path


def _serve_run(vigil: RunningVigil, config: Path) -> float:
    """`serve run <config> --non-blocking` against Vigil's running cluster; the seconds it took."""
    gcs = re.search(r"Ray cluster at (\S+)", vigil.log())
    assert gcs, "Vigil logs its Ray cluster's address"
    env = {"PATH": str(SERVE.parent) + ":/usr/bin:/bin", "HOME": str(Path.home()), "RAY_AUTH_MODE": "token",
           "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.monotonic()
    done = subprocess.run([str(SERVE), "run", str(config), "--address", gcs[1], "--non-blocking"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return time.monotonic() - started


async def test_a_redeploy_with_serve_run_drains_every_session_onto_the_new_replicas(
        draining_vigil: RunningVigil, tmp_path: Path) -> None:
    restrict_host_addresses(["127.0.0.1"])
    client = VigilClient(draining_vigil.url)
    try:
        await client.connect(SyntheticVideoTrack(_scene, fps=5))
        await asyncio.wait_for(client.ticks.get(), 15)
        old_replica, seen = client.replica, len(client.messages)
        took = await asyncio.to_thread(_serve_run, draining_vigil, _serve_config(draining_vigil, tmp_path / "v2.yaml"))
        await _told_to_reconnect(client, seen, timeout=60)
        back = await _reconnect_until_it_ticks(client, timeout=60)
        print(f"serve run redeployed in {took:.1f} s; the session ticked again {back:.1f} s after reconnecting")
        assert client.replica != old_replica
        hello = [m for m in client.messages if m["type"] == "hello"][-1]
        assert hello["resumed"]["tick"] > 0 and hello["speak_threshold"] == pytest.approx(0.5)  # its own setting
        await _numbered_once(client)
    finally:
        await client.close()


async def test_sigterm_drains_every_session_and_a_new_vigil_resumes_them(
        draining_vigil: RunningVigil, tmp_path_factory: pytest.TempPathFactory, tiny_random_model_dir: Path) -> None:
    """Last in this module: it stops the module's Vigil, and starts another on the same Redis directory."""
    restrict_host_addresses(["127.0.0.1"])
    client = VigilClient(draining_vigil.url)
    again: Iterator[RunningVigil] | None = None
    try:
        await client.connect(SyntheticVideoTrack(_scene, fps=5))
        for _ in range(3):
            await asyncio.wait_for(client.ticks.get(), 15)
        seen = len(client.messages)
        draining_vigil.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await _told_to_reconnect(client, seen, timeout=15)
        told_after = time.monotonic() - signalled
        rc = await asyncio.to_thread(draining_vigil.process.wait, STOP_WITHIN_S)
        stopped_after = time.monotonic() - signalled
        assert rc == 0, draining_vigil.log()[-3000:]
        before = await asyncio.to_thread(_last_logged_tick, client)
        # The operator starts Vigil again on the same (persisted) Redis; the client finds it and resumes.
        again = launch_vigil(tmp_path_factory.mktemp("vigil-draining-again"), tiny_random_model_dir,
                             VIGIL_MEMORY="false", VIGIL_REDIS_DIR=draining_vigil.settings["VIGIL_REDIS_DIR"])
        restarted = await asyncio.to_thread(next, again)
        await client.http.aclose()
        client.http = httpx.AsyncClient(base_url=restarted.url, timeout=15)
        back = await _reconnect_until_it_ticks(client, timeout=60)
        print(f"SIGTERM: told to reconnect after {told_after:.2f} s, exited after {stopped_after:.1f} s; "
              f"resumed on the new Vigil {back:.1f} s after reconnecting")
        hello = [m for m in client.messages if m["type"] == "hello"][-1]
        assert hello["resumed"]["tick"] == before and hello["resumed"]["missed_s"] > 0
        ticks = await _numbered_once(client)
        assert max(ticks) > before
    finally:
        await client.close()
        if again is not None:
            again.close()


def _last_logged_tick(client: VigilClient) -> int:
    """The newest tick the client was sent before Vigil stopped (each one was logged before it was sent)."""
    return max(int(m["tick"]) for m in client.messages if m["type"] == "tick")
