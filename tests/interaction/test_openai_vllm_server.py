"""The openai engine against vLLM's own OpenAI-compatible server (a tiny random Qwen2 on the CPU, in a process of
its own): it decides first through the server's structured outputs with log-probabilities — a silent tick one short
call, a speaking one a second call that continues the prefilled `</response>` — and the session's threshold
decides from the server's probability. The model is text-only (vLLM cannot run a vision model on these CPUs): frames
reach it as their time tags (`images=False`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import pytest_asyncio

pytest.importorskip("vllm")

from actors.common.messages import Sample, TickRequest, Turn
from actors.interaction.engines.openai import OpenAIEngine
from tests.fakes import free_port
from tests.fixtures_models import TEST_MODELS

pytestmark = pytest.mark.integration
on_module_loop = pytest.mark.asyncio(loop_scope="module")
START_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from actors.interaction.models.tiny_lm import ensure_tiny_random_lm

    model = ensure_tiny_random_lm(TEST_MODELS / "tiny-random-lm")
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", "tiny-lm", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--gpu-memory-utilization", "0.2", "--max-model-len", "4096", "--block-size", "32",
               "--enforce-eager"]  # eager: a test has no use for minutes of kernel compiling
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=os.environ | {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM's server exited:\n{log_path.read_text(errors='replace')[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server not up in {START_TIMEOUT_S:.0f} s")
            try:
                if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield base_url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(vllm_server: str) -> AsyncIterator[OpenAIEngine]:
    engine = OpenAIEngine(vllm_server, max_new_tokens=8, timeout_s=30, images=False)
    await engine.start()
    yield engine
    await engine.close()


def text_tick(threshold: float, tick: int = 5) -> TickRequest:
    dialog = tuple(Turn("assistant", "</silence>", float(t)) for t in range(tick))
    samples = tuple(Sample(float(t), 2, 2, b"\x80" * 12) for t in range(tick + 1))
    return TickRequest(session_id="s_text", tick=tick, stream_time=float(tick), samples=samples,
                       instructions=("Tell me when the door opens.",), dialog=dialog, speak_threshold=threshold)


@on_module_loop
async def test_the_server_decides_first_and_the_threshold_applies(engine: OpenAIEngine) -> None:
    assert engine.model == "tiny-lm"
    [probe] = await engine.decide([text_tick(0.5)])
    p_speak = probe.probability if probe.kind != "silent" else 1.0 - probe.probability
    assert 0.0 < p_speak < 1.0
    assert engine.decide_mode == "structured", "vLLM's server takes structured outputs with logprobs"
    [silent] = await engine.decide([text_tick(min(1.0, p_speak + 0.05))])
    assert (silent.kind, silent.raw) == ("silent", "</silence>")
    assert silent.probability == pytest.approx(1.0 - p_speak, abs=0.02)
    [spoken] = await engine.decide([text_tick(max(0.0, p_speak - 0.05))])
    assert spoken.raw.startswith("</response>") and spoken.probability == pytest.approx(p_speak, abs=0.02)
    assert engine.prefill, "vLLM's server continues a prefilled </response>"


@on_module_loop
async def test_concurrent_sessions_are_all_answered(engine: OpenAIEngine) -> None:
    requests = [text_tick(0.5, tick=3 + i) for i in range(8)]
    decisions = await engine.decide(requests)
    assert len(decisions) == 8 and all(d.kind in ("silent", "respond", "delegate") for d in decisions)
