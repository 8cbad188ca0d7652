"""The GPU streams benchmark runs end to end in its CPU smoke mode, with only the packages the GPU machine has:
it builds a tiny Qwen2.5-VL offline, loads it through the transformers engine, drives synthetic sessions at
both frame sizes, and prints a row of plausible numbers per frame size and N, then the streams held."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.common.messages import Decision, TickRequest
from bench.stream_load import LoadSettings, run_point

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SESSIONS = (2, 3)
FRAMES = ("256x192", "448x448")
# The GPU image has torch, transformers, numpy, pillow and msgpack but none of these: the benchmark must not
# need them (a None entry in sys.modules makes an import fail as a missing package does).
RUN_WITHOUT = """
import runpy, sys
for name in ("pydantic", "ray", "faiss", "redis", "aiortc", "fastapi"):
    sys.modules[name] = None
sys.argv = ["bench.gpu_streams", *sys.argv[1:]]
runpy.run_module("bench.gpu_streams", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def smoke_output() -> str:
    command = [
        sys.executable, "-c", RUN_WITHOUT, "--smoke", "--sessions", ",".join(map(str, SESSIONS)),
        "--seconds", "1.5", "--warmup-s", "0.5", "--max-batch", "8", "--max-new-tokens", "4",
        "--speak-share", "0.5", "--sweep-all", "--budget-s", "150",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def rows(output: str) -> dict[tuple[str, int], list[str]]:
    table = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in FRAMES:
            table[(cells[0], int(cells[1]))] = cells
    return table


def test_prints_the_machine_and_the_model(smoke_output: str) -> None:
    assert "torch" in smoke_output and "transformers" in smoke_output
    assert "Qwen2.5-VL (tiny)" in smoke_output
    assert "engine started from disk" in smoke_output


def test_one_row_of_plausible_numbers_per_frame_size_and_n(smoke_output: str) -> None:
    table = rows(smoke_output)
    assert set(table) == {(frames, n) for frames in FRAMES for n in SESSIONS}, smoke_output
    for (_, n), cells in table.items():
        decided_per_s, busy = float(cells[2]), int(cells[3])
        p50, p95, p99 = (float(cell.lstrip(">")) for cell in cells[4:7])
        # Staggered sessions have at most two ticks due in the 1.5 s window each.
        assert 0 < decided_per_s <= n * 2 / 1.5 + 0.05, cells
        assert busy >= 0
        assert 0 < p50 <= p95 <= p99 < 60_000, cells
        assert 0.0 <= float(cells[7]) <= 1.0, cells
        assert 1.0 <= float(cells[8]) <= n, cells  # the mean batch never holds more ticks than sessions


def test_says_how_many_streams_each_frame_size_held(smoke_output: str) -> None:
    summary = smoke_output.split("streams held at p99 < 500 ms", 1)[1]
    for frames in FRAMES:
        assert f"  {frames}: " in summary


class SelfBatchingEngine:
    """An engine that batches concurrent calls itself, as vLLM does: each call takes 0.3 s, however many overlap."""

    batches_itself = True

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.running = 0
        self.most_at_once = 0

    async def decide(self, requests: list[TickRequest]) -> list[Decision]:
        self.calls.append(len(requests))
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(0.3)
        finally:
            self.running -= 1
        return [Decision(kind="silent", model_ms=300.0) for _ in requests]


def test_an_engine_that_batches_itself_gets_every_tick_as_it_comes() -> None:
    engine = SelfBatchingEngine()
    settings = LoadSettings(warmup_s=0.2, seconds=1.5, max_batch=8, window=1, speak_share=None)
    result = asyncio.run(run_point(engine, settings, (32, 24), 8))
    assert set(engine.calls) == {1}  # never gathered into a batch first
    assert engine.most_at_once >= 2  # 8 staggered sessions, 0.3 s each: calls overlap
    assert result.busy == 0 and result.unfinished == 0
    assert 8 <= result.decided <= 8 * 2, result
    assert all(300 <= latency < 1000 for latency in result.latencies_ms), result.latencies_ms
    assert {batch.size for batch in result.batches} == {1}
