"""A soak's judgement: a steady leak is called growing with its rate per hour, noise and a stray slow window are
flat, a run too short to judge is not passed; a stream's ticks are accounted for only when its event log holds
1..n once each with n matching the time it streamed; and the ingest's /metrics counts its asyncio tasks and every
peer connection not closed, also one no session holds any more."""

from __future__ import annotations

import asyncio
import math
import random

import httpx
import numpy as np
import pytest

from actors.common.metrics import VigilMetrics
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from load_tests.runner import Scenario
from load_tests.soak import MAX_SOAK_SECONDS, SoakScenario
from load_tests.tick_ledger import TICK_SLACK, account
from load_tests.trend import FLAT, GROWS, NOT_EVERY_WINDOW, TOO_FEW, theil_sen, trend, warmup_windows
from load_tests.vitals import read_gauges, replica_pid
from tests.fixtures_gateway import LocalVigil

HOUR = 3600.0


def _minutes(count: int, every_s: float = 60.0) -> list[float]:
    return [i * every_s for i in range(count)]


# -- trends ------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_steady_leak_grows_at_its_rate_per_hour() -> None:
    rng = random.Random(1)
    times = _minutes(60)
    rss = [300.0 + 30.0 * t / HOUR + rng.uniform(-3, 3) for t in times]  # 30 MB/h under ±3 MB of noise
    found = trend("Ingest 1", "rss_mb", times, rss)
    assert found.verdict == GROWS and not found.flat
    assert found.slope_per_hour == pytest.approx(30.0, rel=0.15)
    assert found.described().startswith("grows ") and found.described().endswith(" MB/h")


@pytest.mark.unit
def test_noise_and_one_slow_window_are_flat() -> None:
    rng = random.Random(2)
    times = _minutes(30)
    rss = [600.0 + rng.choice((-6.0, 6.0)) for _ in times]  # the engine's RSS swings with what it is doing
    assert trend("Interaction 2", "rss_mb", times, rss).verdict == FLAT
    p99 = [250.0 + rng.uniform(-20, 20) for _ in times]
    p99[-2] = 2500.0  # a neighbour's burst of CPU in one window
    judged = trend("streams", "p99_ms", times, p99)
    assert judged.verdict == FLAT, judged
    assert judged.described().startswith("flat (")


@pytest.mark.unit
def test_a_short_run_cannot_call_a_small_leak() -> None:
    # 20 MB/h over 4 minutes is 1.3 MB: under the noise floor, so flat; an hour of it is not.
    times = _minutes(9, every_s=30.0)
    assert trend("Ingest 1", "rss_mb", times, [300.0 + 20.0 * t / HOUR for t in times]).verdict == FLAT
    hour = _minutes(60)
    assert trend("Ingest 1", "rss_mb", hour, [300.0 + 20.0 * t / HOUR for t in hour]).verdict == GROWS


@pytest.mark.unit
def test_one_peer_connection_more_for_the_second_half_grows() -> None:
    times = _minutes(10)
    peers = [8.0] * 5 + [9.0] * 5
    assert trend("Ingest 1", "peer_connections", times, peers).verdict == GROWS
    assert trend("Ingest 1", "peer_connections", times, [8.0] * 10).verdict == FLAT


@pytest.mark.unit
def test_too_few_windows_or_a_replaced_replica_is_not_flat() -> None:
    few = trend("Ingest 1", "fds", [0.0, 30.0], [80.0, 80.0])
    assert few.verdict == TOO_FEW and not few.flat and math.isnan(few.slope_per_hour)
    gone = trend("Memory 3", "fds", _minutes(6), [70.0, 70.0, 70.0, 70.0, None, None], expected_samples=6)
    assert gone.verdict == NOT_EVERY_WINDOW and not gone.flat
    assert trend("streams", "p99_ms", _minutes(4), [math.nan] * 4).verdict == TOO_FEW  # nothing was decided


@pytest.mark.unit
def test_warm_up_is_the_first_fifth_and_at_least_two_windows() -> None:
    assert [warmup_windows(n) for n in (1, 2, 5, 8, 10, 11, 60)] == [1, 2, 2, 2, 2, 3, 12]
    assert theil_sen([0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0, 100.0]) == pytest.approx(1.0)  # the median


@pytest.mark.unit
def test_a_soak_may_run_for_hours_a_load_run_may_not() -> None:
    assert SoakScenario(seconds=3600.0, interval_s=60.0).windows == 60
    assert SoakScenario(seconds=100.0, interval_s=30.0).windows == 4  # the last one is 10 s
    with pytest.raises(ValueError):
        Scenario(seconds=3600.0)
    for bad in ({"seconds": MAX_SOAK_SECONDS + 1}, {"seconds": 60.0, "interval_s": 90.0}, {"interval_s": 0.5}):
        with pytest.raises(ValueError):
            SoakScenario(**bad)  # type: ignore[arg-type]


# -- the tick ledger ---------------------------------------------------------------------------------------


def _ledger(logged: list[int], heard: list[int] | None = None, streamed_s: float = 30.0):
    # Connecting took 0.5 s and closing 0.3 s, around `streamed_s` of streaming at one tick a second.
    return account(0, "s_1", logged, heard if heard is not None else logged[:-1], 1.0,
                   connect_began=100.0, connected_at=100.5, closing_at=100.5 + streamed_s,
                   closed_at=100.8 + streamed_s)


@pytest.mark.unit
def test_ticks_one_to_n_once_each_for_the_time_streamed_are_accounted_for() -> None:
    ledger = _ledger(list(range(1, 31)))
    assert ledger.ok, ledger.described()
    assert ledger.described() == "ok"
    assert (ledger.expected_min, ledger.expected_max) == (30 - TICK_SLACK, 31 + TICK_SLACK)


@pytest.mark.unit
@pytest.mark.parametrize(("logged", "heard", "problem", "examples"), [
    ([n for n in range(1, 31) if n != 7], None, "1 missing", [7]),
    ([*range(1, 16), 15, *range(16, 31)], None, "1 recorded twice", [15]),
    (list(range(3, 33)), None, "starts at 3; 2 missing", [1, 2]),
    (list(range(1, 25)), None, "24 for 30 s of streaming, expected 28-33", []),
    (list(range(1, 31)), [*range(1, 31), 31], "1 heard but not logged", []),
    ([], [], "0 for 30 s", []),
])
def test_a_tick_missing_twice_or_out_of_time_is_not_accounted_for(
    logged: list[int], heard: list[int] | None, problem: str, examples: list[int]
) -> None:
    ledger = _ledger(logged, heard)
    assert not ledger.ok
    assert problem in ledger.described()
    assert ledger.examples == examples


# -- the ingest's gauges ---------------------------------------------------------------------------------------


@pytest.mark.unit
async def test_the_gauges_are_counted_at_each_scrape() -> None:
    metrics = VigilMetrics()
    assert read_gauges(metrics.render().decode()) == {"asyncio_tasks": 0.0, "peer_connections": 0.0}
    open_now = [3]
    metrics.watch_event_loop(asyncio.get_running_loop(), lambda: open_now[0])
    blocker = asyncio.get_running_loop().create_task(asyncio.Event().wait())
    try:
        gauges = read_gauges(metrics.render().decode())
        assert gauges["peer_connections"] == 3.0 and gauges["asyncio_tasks"] >= 2  # this test and the blocker
        open_now[0] = 0
        without = await asyncio.to_thread(lambda: read_gauges(metrics.render().decode()))  # the metrics port's thread
        assert without["peer_connections"] == 0.0 and without["asyncio_tasks"] >= 2
    finally:
        blocker.cancel()
    assert replica_pid("8f3k2a@4242") == 4242 and replica_pid("local") == 0


async def _gauges(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url) as http:
        return read_gauges((await http.get("/metrics")).text)


async def _until_gauges(url: str, predicate, timeout_s: float = 10.0) -> dict[str, float]:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate(gauges := await _gauges(url)):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"gauges did not settle: {gauges}")
        await asyncio.sleep(0.1)
    return gauges


@pytest.mark.integration
async def test_the_ingest_counts_its_tasks_and_every_open_peer_connection(local_vigil: LocalVigil) -> None:
    before = await _gauges(local_vigil.url)
    assert before["peer_connections"] == 0 and before["asyncio_tasks"] >= 1
    client = VigilClient(local_vigil.url)
    await client.connect(SyntheticVideoTrack(lambda _: np.zeros((120, 160, 3), np.uint8), fps=5))
    try:
        during = await _gauges(local_vigil.url)
        assert during["peer_connections"] == 1
        assert during["asyncio_tasks"] > before["asyncio_tasks"]  # the session's tick loop and its peer's
        # A peer the gateway forgot without closing it: no session holds it, the gauge still counts it.
        peers = local_vigil.gateway.peers
        peer = peers.pop(client.session_id)
        try:
            gauges = await _gauges(local_vigil.url)
        finally:
            peers[client.session_id] = peer  # ending the session closes it
        assert gauges["peer_connections"] == 1
    finally:
        await client.close()
    after = await _until_gauges(local_vigil.url, lambda g: g["asyncio_tasks"] <= before["asyncio_tasks"] + 2)
    assert after["peer_connections"] == 0
