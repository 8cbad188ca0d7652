"""The openai engine against vLLM's own OpenAI-compatible server (a tiny random Qwen2 on the CPU, in a process of
its own): it decides first through the server's structured outputs with log-probabilities — a silent tick one short
call, a speaking one a second call that continues the prefilled `</response>` — and the session's threshold
decides from the server's probability. The model is text-only (vLLM cannot run a vision model on these CPUs): frames
reach it as their time tags (`images=False`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

pytest.importorskip("vllm")

from actors.common.messages import Sample, TickRequest, Turn
from actors.interaction.engines.openai import OpenAIEngine
from tests.fixtures_models import DEMO_TRAINING
from tests.vllm_server import MODEL_NAME, VLLM_SERVER

pytestmark = pytest.mark.integration
on_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def vllm_server() -> Iterator[str]:
    VLLM_SERVER.start()  # started in the background at collection, unless this module was collected on its own later
    try:
        ready = VLLM_SERVER.wait_ready()
        # The demo model's training, at the server's priority, would take half the CPU the server's calls need.
        with DEMO_TRAINING.paused():
            yield ready
    finally:
        VLLM_SERVER.stop()


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
    assert engine.model == MODEL_NAME
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
