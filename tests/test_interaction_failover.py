"""Two interaction replicas in the real Serve graph, of the transformers engine and of vLLM: each session's ticks
stay on one replica, sessions spread over both, and when one replica is killed every tick still ends in one
recorded outcome within its deadline — the sessions it served move to the survivor, with no tick hanging for the
replacement."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from actors.ingest.ice import restrict_host_addresses
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fixtures_models import TEST_MODELS
from tests.fixtures_vigil import RunningVigil, launch_vigil

pytestmark = pytest.mark.integration

DEADLINE_S = 2.0
ROUND = 4  # sessions connected at a time, until both replicas hold some


VLLM_ENGINE_ARGS = {"dtype": "float32", "gpu_memory_utilization": 0.15, "max_model_len": 4096, "max_num_seqs": 16,
                    "block_size": 32}


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def vigil_two(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_random_model_dir: Path
) -> Iterator[RunningVigil]:
    """Two interaction replicas of the tiny random Qwen2-VL (transformers), or of vLLM with a tiny Qwen2."""
    settings = {"VIGIL_INTERACTION_REPLICAS": "2", "VIGIL_INTERACTION_CPUS": "0.5", "VIGIL_MEMORY": "false",
                "VIGIL_DECIDE_TIMEOUT_S": str(DEADLINE_S)}
    model = tiny_random_model_dir
    if request.param == "vllm":
        pytest.importorskip("vllm")
        from actors.interaction.models.tiny_lm import ensure_tiny_random_lm

        model = ensure_tiny_random_lm(TEST_MODELS / "tiny-random-lm")
        settings |= {"VIGIL_ENGINE": "vllm", "VIGIL_VLLM_ENGINE_ARGS": json.dumps(VLLM_ENGINE_ARGS)}
    yield from launch_vigil(tmp_path_factory.mktemp(f"vigil-two-{request.param}"), model, **settings)


def _scene(elapsed: float) -> np.ndarray:
    image = np.full((240, 320, 3), 80, np.uint8)
    image[:, int(elapsed * 30) % 320] = 240
    return image


async def test_sessions_stay_on_their_replica_and_survive_losing_one(vigil_two: RunningVigil) -> None:
    restrict_host_addresses(["127.0.0.1"])
    clients: list[VigilClient] = []
    try:
        owners: dict[str, str] = {}
        # Session ids are random: a round of sessions lands on both replicas with probability 7/8; three rounds
        # leave both unused with probability 1/2048.
        while len(set(owners.values())) < 2 and len(clients) < 3 * ROUND:
            fresh = [VigilClient(vigil_two.url) for _ in range(ROUND)]
            clients += fresh
            await asyncio.gather(*(c.connect(SyntheticVideoTrack(_scene, fps=5), ["describe any change"])
                                   for c in fresh))
            await asyncio.sleep(5)
            for client in clients:
                # The last ticks: while the second replica is still starting (vLLM takes tens of seconds), the ring
                # holds one replica, and its sessions move once the other joins.
                recent = [e["replica"] for e in await client.events() if e["replica"]][-3:]
                assert len(set(recent)) == 1, f"{client.session_id} decided on {set(recent)}"
                owners[client.session_id] = recent[0]
        assert len(set(owners.values())) == 2, f"sessions not spread over both replicas: {owners}"
        before = {c.session_id: await c.events() for c in clients}
        victim = owners[clients[0].session_id]
        os.kill(int(victim.rpartition("@")[2]), signal.SIGKILL)
        killed_at = time.time()
        await asyncio.sleep(8)
        # Every tick due in those 8 s has ended once its deadline has passed: read the log after that.
        cutoff = {c.session_id: max(e["tick"] for e in await c.events()) for c in clients}
        await asyncio.sleep(DEADLINE_S + 1)
        first = {s: max(t["tick"] for t in events) for s, events in before.items()}
        after = {c.session_id: [e for e in await c.events() if first[c.session_id] < e["tick"] <= cutoff[
            c.session_id]] for c in clients}
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    for session, events in after.items():
        # One outcome per tick (a busy tick is logged while the slow one before it is still running, so the log
        # is in the order ticks ended, not always in tick order).
        numbers = sorted(e["tick"] for e in events)
        assert numbers == list(range(first[session] + 1, cutoff[session] + 1)), "one outcome per tick"
        outcomes = Counter(e["outcome"] for e in events)
        # A tick or two around the kill may fail or run long (a retry on a loaded 2-core machine can take two
        # seconds); none waits for the replacement, which used to mean ten busy ticks in a row.
        failed = outcomes["skipped:replica_failed"] + outcomes["skipped:timeout"] + outcomes["skipped:overload"]
        assert failed <= 2, (session, outcomes)
        assert outcomes["skipped:busy"] <= 3, (session, outcomes)
        late = [e for e in events if e["outcome"] in ("silent", "respond", "delegate")]
        assert len(late) >= 5, f"{session} decided only {outcomes} in the 8 s after the kill"
        settled = {e["replica"] for e in late[2:]}
        assert len(settled) == 1, f"{session} did not settle on one replica"
        assert victim not in settled, f"{session} still decided on the killed replica"
        if owners[session] != victim:
            assert settled == {owners[session]}, f"{session} moved although its replica lived"
    print(f"interaction replica killed at {killed_at:.1f}:",
          {s: dict(Counter(e["outcome"] for e in ev)) for s, ev in after.items()})
