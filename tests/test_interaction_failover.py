"""Two interaction replicas of the transformers engine (a tiny random Qwen2-VL) in the real Serve graph, memory
off: each session's ticks stay on one replica, sessions spread over both, and when one replica is killed every
tick still ends in one recorded outcome within its deadline (tests/replica_failover.py; vLLM's run is in
tests/test_vllm_graph.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_vigil import RunningVigil, launch_vigil
from tests.replica_failover import sessions_stay_on_their_replica_and_survive_losing_one

pytestmark = pytest.mark.integration

DEADLINE_S = 2.0


@pytest.fixture(scope="module")
def vigil_two(tmp_path_factory: pytest.TempPathFactory, tiny_random_model_dir: Path) -> Iterator[RunningVigil]:
    yield from launch_vigil(
        tmp_path_factory.mktemp("vigil-two"), tiny_random_model_dir, VIGIL_INTERACTION_REPLICAS="2",
        VIGIL_INTERACTION_CPUS="0.5", VIGIL_MEMORY="false", VIGIL_DECIDE_TIMEOUT_S=str(DEADLINE_S),
    )


async def test_sessions_stay_on_their_replica_and_survive_losing_one(vigil_two: RunningVigil) -> None:
    await sessions_stay_on_their_replica_and_survive_losing_one(vigil_two, DEADLINE_S)
