"""What the Redis fault tests share: a client that streams through a fault checking every promise that holds
while it lasts (tests/test_redis_outage.py, tests/test_e2e_redis_stall.py), and the figures each fault cost."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import redis

from actors.memory.store import decode_entry
from bench.webrtc_client import SyntheticVideoTrack, VigilClient

STALL_S = 15.0
LONG_STALL_S = 30.0  # the longest outage Vigil promises to ride out: past three of Serve's health checks
DOWN_S = 7.0
SMALL_BUFFER = 5  # outcomes a session holds in the overflow test
OVERFLOW_STALL_S = 10.0  # the overflow test's stall: twice the buffer
READY_503_WITHIN_S = 1.0  # /readyz answers 503 this soon after it is asked, during the fault
REFUSED_WITHIN_S = 1.0  # a call that needs Redis is refused (503 redis_unavailable) this soon
READY_AGAIN_WITHIN_S = 10.0  # after the fault ends, /readyz is 200 again by itself within this
LANDED_WITHIN_S = 15.0  # after the fault ends, the event log holds every tick the client saw within this
INSTRUCTIONS = ["say when something red shows"]
NOTE = "the spare key is under the blue flowerpot"


def scene(elapsed: float) -> np.ndarray:
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


async def timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    reply = await call
    return reply, time.monotonic() - started


def assert_redis_unavailable(reply: httpx.Response, took: float, what: str) -> None:
    assert reply.status_code == 503, f"{what}: {reply.status_code} {reply.text}"
    assert reply.json()["error"]["code"] == "redis_unavailable", f"{what}: {reply.text}"
    assert int(reply.headers["retry-after"]) > 0
    assert took < REFUSED_WITHIN_S, f"{what} refused after {took:.2f} s"


async def ride_out(url: str, start_fault: Callable[[], None], end_fault: Callable[[], None], fault_s: float,
                    figures: Figures) -> VigilClient:
    """Stream through a fault of `fault_s` seconds, checking every promise that holds while it lasts and that
    readiness comes back after it; returns the client (still streaming) for what to check after."""
    client = VigilClient(url)
    await client.connect(SyntheticVideoTrack(scene, fps=5), INSTRUCTIONS)
    for _ in range(3):
        await asyncio.wait_for(client.ticks.get(), 15)
    async with httpx.AsyncClient(base_url=url, timeout=15) as http:
        assert (await http.get("/readyz")).status_code == 200
        start_fault()
        started = time.monotonic()
        try:
            ready, figures.timings["readyz 503 in"] = await timed(http.get("/readyz"))
            assert ready.status_code == 503, ready.text
            assert figures.timings["readyz 503 in"] < READY_503_WITHIN_S
            assert "unavailable" in str(ready.json()["redis"])
            created, figures.timings["create 503 in"] = await timed(http.post("/v1/sessions", json={}))
            assert_redis_unavailable(created, figures.timings["create 503 in"], "POST /v1/sessions")
            events, took = await timed(http.get(f"/v1/sessions/{client.session_id}/events", headers=client.auth()))
            assert_redis_unavailable(events, took, "GET events")
            offer, took = await timed(http.post(f"/v1/sessions/{client.session_id}/offer", headers=client.auth(),
                                                 json={"type": "offer", "sdp": "v=0"}))
            assert_redis_unavailable(offer, took, "POST offer")
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


async def assert_log_holds_what_the_client_saw(client: VigilClient, figures: Figures) -> None:
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


def memory_log(url: str, session_id: str) -> list[str]:
    """The texts of the session's memory log in Redis (what memory persisted)."""
    client = redis.Redis.from_url(url)
    try:
        entries = client.xrange(f"vigil:memory:{session_id}:log")
    finally:
        client.close()
    return [decode_entry(session_id, fields[b"e"]).item.text for _, fields in entries]


async def assert_memory_kept_the_note(client: VigilClient, redis_url: str) -> None:
    deadline = time.monotonic() + LANDED_WITHIN_S
    while NOTE not in memory_log(redis_url, client.session_id):
        assert time.monotonic() < deadline, "the note said during the fault never reached memory's log"
        await asyncio.sleep(0.2)
    assert memory_log(redis_url, client.session_id).count(NOTE) == 1
    assert any("flowerpot" in line for line in await client.recall("where is the spare key?"))


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else 0.0


