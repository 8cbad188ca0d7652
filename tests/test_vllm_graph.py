"""Vigil started as a user starts it with `VIGIL_ENGINE=vllm`, two interaction replicas of vLLM's engine (a tiny
random Qwen2 on the CPU) in the real Serve graph. Ticks of concurrent sessions are decided through it, each
decided tick reports its prompt tokens and the share vLLM's prefix cache served — rising, as the append layout
makes each prompt extend the last — and the metrics carry both. Then one replica is killed: its sessions move to
the survivor, every tick ending once (tests/replica_failover.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from actors.ingest.ice import restrict_host_addresses
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fixtures_models import TEST_MODELS
from tests.fixtures_vigil import RunningVigil, launch_vigil
from tests.replica_failover import moving_bar, sessions_stay_on_their_replica_and_survive_losing_one

pytest.importorskip("vllm")

pytestmark = pytest.mark.integration

DEADLINE_S = 2.0
# What vLLM on these CPUs needs (float32, a share of RAM for its KV cache, blocks of 32 tokens so that the prefix
# cache shows reuse on short prompts), and eager execution: a test has no use for minutes of kernel compiling.
VLLM_ENGINE_ARGS = {"dtype": "float32", "gpu_memory_utilization": 0.15, "max_model_len": 4096, "max_num_seqs": 16,
                    "block_size": 32, "enforce_eager": True}


@pytest.fixture(scope="module")
def vigil_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningVigil]:
    """Two interaction replicas of vLLM with a tiny random Qwen2."""
    from actors.interaction.models.tiny_lm import ensure_tiny_random_lm

    model = ensure_tiny_random_lm(TEST_MODELS / "tiny-random-lm")
    yield from launch_vigil(
        tmp_path_factory.mktemp("vigil-vllm"), model, VIGIL_ENGINE="vllm",
        VIGIL_VLLM_ENGINE_ARGS=json.dumps(VLLM_ENGINE_ARGS), VIGIL_INTERACTION_REPLICAS="2",
        VIGIL_INTERACTION_CPUS="0.5", VIGIL_MEMORY="false", VIGIL_DECIDE_TIMEOUT_S=str(DEADLINE_S),
    )


async def test_sessions_are_decided_by_vllm_and_its_prefix_cache_serves_them(vigil_vllm: RunningVigil) -> None:
    restrict_host_addresses(["127.0.0.1"])
    clients = [VigilClient(vigil_vllm.url) for _ in range(3)]
    try:
        await asyncio.gather(*(c.connect(SyntheticVideoTrack(moving_bar, fps=5), ["describe any change"])
                               for c in clients))
        hello = next(m for m in clients[0].messages if m["type"] == "hello")
        assert hello["model"]["engine"] == "vllm"
        decided: dict[int, list[dict]] = {id(c): [] for c in clients}
        for client in clients:
            while len(decided[id(client)]) < 6:
                tick = await asyncio.wait_for(client.ticks.get(), 30)
                if not tick["outcome"].startswith("skipped:"):
                    decided[id(client)].append(tick)
        async with httpx.AsyncClient(base_url=vigil_vllm.url) as http:
            metrics = (await http.get("/metrics")).text
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    for ticks in decided.values():
        assert {t["outcome"] for t in ticks} <= {"silent", "respond", "delegate"}
        assert all(0.0 <= t["probability"] <= 1.0 and t["prompt_tokens"] > 0 for t in ticks)
        # The append layout (auto for vllm): within a segment each prompt extends the last, and vLLM serves all
        # but its newest block from the cache; a new segment (staggered per session) starts short again.
        segments: list[list[dict]] = [[]]
        for t in ticks:
            if segments[-1] and t["prompt_tokens"] <= segments[-1][-1]["prompt_tokens"]:
                segments.append([])
            segments[-1].append(t)
        assert max(len(segment) for segment in segments) >= 3, [t["prompt_tokens"] for t in ticks]
        for segment in segments:
            for t in segment[1:]:
                assert t["cached_tokens"] >= t["prompt_tokens"] - 2 * VLLM_ENGINE_ARGS["block_size"], segment
    assert "vigil_prefix_reuse_ratio_count" in metrics and "vigil_prompt_tokens_count" in metrics


async def test_sessions_stay_on_their_replica_and_survive_losing_one(vigil_vllm: RunningVigil) -> None:
    await sessions_stay_on_their_replica_and_survive_losing_one(vigil_vllm, DEADLINE_S)
