"""The interaction deployment's own logic, without a cluster: a tick whose deadline passed while it queued is
refused as Overloaded before it reaches the engine; an engine that batches itself gets each tick as it comes, and
every decision is tagged with the replica that decided it. (`@serve.batch` itself needs a replica: the batched
path runs in the graph tests.)"""

from __future__ import annotations

import asyncio
import time

import pytest

from actors.common.messages import Sample, TickRequest
from actors.common.replicas import Overloaded
from actors.interaction.deployment import Interaction
from tests.fakes import ScriptedEngine

pytestmark = pytest.mark.unit


def _replica(engine: ScriptedEngine) -> object:
    """The deployment's class as a plain object around `engine` (what its async __init__ would build)."""
    cls = Interaction.func_or_class
    replica = cls.__new__(cls)
    replica.engine = engine
    replica.replica = "r1@123"
    return replica


def _tick(tick: int, deadline: float = 0.0) -> TickRequest:
    return TickRequest(session_id=f"s_{tick}", tick=tick, stream_time=float(tick),
                       samples=(Sample(float(tick), 1, 1, b"\x00\x00\x00"),), deadline=deadline)


async def test_a_tick_past_its_deadline_is_refused_before_the_engine() -> None:
    engine = ScriptedEngine()
    replica = _replica(engine)
    with pytest.raises(Overloaded):
        await replica.decide(_tick(1, deadline=time.time() - 0.01))
    assert engine.requests == []


async def test_an_engine_that_batches_itself_gets_each_tick_as_it_comes() -> None:
    engine = ScriptedEngine(delay_s=0.2)
    engine.batches_itself = True
    replica = _replica(engine)
    started = time.monotonic()
    decisions = await asyncio.gather(*(replica.decide(_tick(i)) for i in range(5)))
    assert time.monotonic() - started < 0.6, "concurrent, not one batch after another"
    assert all(d.replica == "r1@123" for d in decisions) and len(engine.requests) == 5
