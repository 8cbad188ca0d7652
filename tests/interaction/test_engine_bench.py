"""The CPU engine benchmark runs end to end for both transformers engines on a tiny random Qwen2-VL: it prints
the machine, then one table row per engine and N with plausible numbers (every due tick decided or skipped as
busy, latencies ordered, prompt tokens counted, no prefix reuse without a prefix cache, the unbatched engine
never batching); where vLLM does not import, it says that the vllm engine was skipped and why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.interaction.models.tiny_vlm import ensure_tiny_random_vlm
from tests.fixtures_models import TEST_MODELS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("transformers-batched", "transformers-unbatched")
SESSIONS = 2
SECONDS = 2.0


@pytest.fixture(scope="module")
def output() -> str:
    model = ensure_tiny_random_vlm(TEST_MODELS / "tiny-random")
    command = [
        sys.executable, "-m", "bench.engine_bench", "--engines", ",".join(ENGINES), "--sessions", str(SESSIONS),
        "--seconds", str(SECONDS), "--warmup-s", "0.5", "--max-new-tokens", "4", "--model", str(model),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def table(output: str) -> dict[str, dict[str, str]]:
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("| ").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("| ").split("|")), strict=True))
            for line in lines[1:]]
    return {row["engine"]: row for row in rows}


def test_prints_the_machine(output: str) -> None:
    assert "CPU: " in output and "torch " in output and "transformers " in output and "vllm " in output


def test_one_row_of_plausible_numbers_per_engine(output: str) -> None:
    rows = table(output)
    assert set(rows) == set(ENGINES), output
    for engine, row in rows.items():
        assert int(row["N"]) == SESSIONS
        # Staggered sessions have at most two ticks due in the 2 s window each, and decide at least one of them.
        assert 0 < float(row["decided/s"]) <= SESSIONS * 2 / SECONDS, row
        p50, p99 = float(row["p50 ms"]), float(row["p99 ms"].lstrip(">"))
        assert 0 < p50 <= p99 < 60_000, row
        assert 0.0 <= float(row["skipped busy"]) < 1.0, row
        assert float(row["prompt tokens/tick"]) > 50, row  # a standing instruction and four frames' image tokens
        assert float(row["prefix reuse"]) == 0.0, row  # the transformers engine has no prefix cache
        assert 1.0 <= float(row["mean batch"]) <= (8 if engine == "transformers-batched" else 1), row


def test_vllm_is_skipped_saying_why_where_it_does_not_import() -> None:
    # A None entry in sys.modules makes `import vllm` fail as a missing package does.
    without_vllm = (
        "import runpy, sys; sys.modules['vllm'] = None; sys.argv = ['bench.engine_bench', *sys.argv[1:]]; "
        "runpy.run_module('bench.engine_bench', run_name='__main__', alter_sys=True)"
    )
    command = [sys.executable, "-c", without_vllm, "--engines", "vllm", "--sessions", "2", "--seconds", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "vllm: skipped, vLLM does not import here (ModuleNotFoundError: " in done.stdout, done.stdout
    assert table(done.stdout) == {}
