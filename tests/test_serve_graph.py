"""The real Serve graph, started as `make run` starts it, with a tiny random Qwen2-VL: the whole path works.

A Python WebRTC client streams synthetic video; every tick comes back as exactly one outcome on the data channel
and in the Redis log; the stage histograms, readiness and the model banner reflect the running graph, and the
dashboard and alerts name only metrics it exports. Its replicas killed, memory's among them: test_replica_kills.py.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from actors.ingest.ice import restrict_host_addresses
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.deploy.promql import (
    BLACKBOX,
    alert_rules,
    dashboard_queries,
    exposed_families,
    is_exported,
    metric_names,
    ray_metric_names,
)
from tests.fixtures_vigil import RunningVigil

pytestmark = pytest.mark.integration


def _scene(elapsed: float) -> np.ndarray:
    image = np.full((240, 320, 3), 80, np.uint8)
    image[:, int(elapsed * 30) % 320] = 240
    return image


async def test_ticks_flow_through_the_serve_graph(vigil_tiny: RunningVigil) -> None:
    restrict_host_addresses(["127.0.0.1"])
    clients = [VigilClient(vigil_tiny.url) for _ in range(2)]
    try:
        await asyncio.gather(*(c.connect(SyntheticVideoTrack(_scene, fps=5), ["describe any change"])
                               for c in clients))
        ticks = {id(c): [] for c in clients}
        for client in clients:
            while len(ticks[id(client)]) < 5:
                ticks[id(client)].append(await asyncio.wait_for(client.ticks.get(), 30))
        for client in clients:
            received = ticks[id(client)]
            decided = [t for t in received if not t["outcome"].startswith("skipped:")]
            assert decided, f"no decided tick in {received}"
            assert {t["outcome"] for t in decided} <= {"silent", "respond", "delegate"}
            assert all(t["stages_ms"]["decide"] > 0 for t in decided)
            logged = await client.events()
            numbers = [e["tick"] for e in logged]
            assert len(numbers) == len(set(numbers)), "one outcome per tick in the log"
            assert {t["tick"] for t in received} <= set(numbers)
        hello = next(m for m in clients[0].messages if m["type"] == "hello")
        assert hello["model"]["engine"] == "transformers"
        async with httpx.AsyncClient(base_url=vigil_tiny.url) as http:
            ready = (await http.get("/readyz")).json()
            metrics = (await http.get("/metrics")).text
        assert ready == {"redis": True, "engine": True, "memory": True, "ok": True}
        assert 'vigil_tick_stage_seconds_count{stage="decide"}' in metrics
        assert "vigil_active_sessions 2.0" in metrics
        # aiortc's encoder sends one temporal layer: every frame is decoded, none dropped.
        frames = await vigil_tiny.video_frames()
        assert frames["decoded"] >= 10 and frames["dropped"] == 0, frames
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    async with httpx.AsyncClient(base_url=vigil_tiny.url) as http:
        for _ in range(50):
            if "vigil_active_sessions 0.0" in (await http.get("/metrics")).text:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("sessions were not released after DELETE")


async def test_the_dashboard_and_alerts_name_metrics_the_running_graph_exports(vigil_tiny: RunningVigil) -> None:
    # After the ticks above; a family is declared on /metrics (# TYPE) even before its first labelled sample.
    async with httpx.AsyncClient(base_url=vigil_tiny.url) as http:
        families = exposed_families((await http.get("/metrics")).text)
    queried = {name for _, expr in dashboard_queries() for name in metric_names(expr)}
    queried |= {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    vigil = {name for name in queried if name not in ray_metric_names() and name not in BLACKBOX}
    assert vigil and {name for name in vigil if not is_exported(name, families)} == set()

