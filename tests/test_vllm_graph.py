"""Vigil started as a user starts it with `VIGIL_ENGINE=vllm`: the interaction replica runs vLLM's engine (a tiny
random Qwen2 on the CPU), ticks of concurrent sessions are decided through it in the real Serve graph, each decided
tick reports its prompt tokens and the share vLLM's prefix cache served — rising, as the append layout makes each
prompt extend the last — and the metrics carry both."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

pytest.importorskip("vllm")

from actors.ingest.ice import restrict_host_addresses
from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fixtures_models import TEST_MODELS
from tests.fixtures_vigil import RunningVigil, launch_vigil

pytestmark = pytest.mark.integration

ENGINE_ARGS = {"dtype": "float32", "gpu_memory_utilization": 0.2, "max_model_len": 4096, "max_num_seqs": 16,
               "block_size": 32}


@pytest.fixture(scope="module")
def vigil_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningVigil]:
    from actors.interaction.models.tiny_lm import ensure_tiny_random_lm

    model = ensure_tiny_random_lm(TEST_MODELS / "tiny-random-lm")
    yield from launch_vigil(
        tmp_path_factory.mktemp("vigil-vllm"), model, VIGIL_ENGINE="vllm", VIGIL_MEMORY="false",
        VIGIL_VLLM_ENGINE_ARGS=json.dumps(ENGINE_ARGS), VIGIL_DECIDE_TIMEOUT_S="5",
    )


def _scene(elapsed: float) -> np.ndarray:
    image = np.full((240, 320, 3), 80, np.uint8)
    image[:, int(elapsed * 30) % 320] = 240
    return image


async def test_sessions_are_decided_by_vllm_in_the_graph(vigil_vllm: RunningVigil) -> None:
    restrict_host_addresses(["127.0.0.1"])
    clients = [VigilClient(vigil_vllm.url) for _ in range(3)]
    try:
        await asyncio.gather(*(c.connect(SyntheticVideoTrack(_scene, fps=5), ["describe any change"])
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
                assert t["cached_tokens"] >= t["prompt_tokens"] - 2 * ENGINE_ARGS["block_size"], segment
    assert "vigil_prefix_reuse_ratio_count" in metrics and "vigil_prompt_tokens_count" in metrics
