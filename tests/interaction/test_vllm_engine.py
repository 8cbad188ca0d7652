"""The vllm engine decides first on real vLLM (a tiny random Qwen2 on CPU): a silent tick generates nothing after
its one decision token, the session's speak threshold decides from vLLM's own log-probabilities, concurrent
sessions are batched by vLLM, append-only ticks reuse more and more of their prompt from the prefix cache (a
sliding window does not), and a late tick is refused. Vision-language inputs are checked against vLLM's own
prompt and multimodal types without running a model. Skipped where vLLM is not installed."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
import pytest_asyncio

pytest.importorskip("vllm")

from PIL import Image
from transformers import AutoTokenizer
from vllm.v1.metrics.loggers import StatLoggerBase

from actors.common.config import VigilConfig
from actors.common.decisions import RESPONSE, SILENCE
from actors.common.messages import Sample, TickRequest, Turn
from actors.common.replicas import Overloaded
from actors.interaction.engine import EngineError
from actors.interaction.engines.qwen_vl_inputs import QWEN2_VL_CHAT_TEMPLATE
from actors.interaction.engines.vllm import TickInputs, VLLMEngine
from actors.interaction.prompt import build_prompt
from tests.fixtures_models import TEST_MODELS

pytestmark = pytest.mark.unit
# The engine starts once (tens of seconds) and lives on the module's event loop, as do the tests that use it.
on_module_loop = pytest.mark.asyncio(loop_scope="module")

# What vLLM on these CPUs needs: float32, a fifth of RAM for its KV cache, and blocks of 32 tokens (the CPU
# default is 128) so that the prefix cache shows reuse on short prompts; eager, as a test has no use for minutes
# of kernel compiling.
TINY_ENGINE_ARGS: dict[str, Any] = {
    "dtype": "float32",
    "gpu_memory_utilization": 0.2,
    "max_model_len": 4096,
    "max_num_seqs": 32,
    "block_size": 32,
    "enforce_eager": True,
    "disable_log_stats": False,  # so that vLLM reports each step's scheduler state to PeakBatch
}
BLOCK: int = TINY_ENGINE_ARGS["block_size"]
NEVER, ALWAYS = 1.01, 0.0


class PeakBatch(StatLoggerBase):
    """Records the most requests vLLM's scheduler ran in one engine step (since the last reset)."""

    peak = 0

    def __init__(self, vllm_config: object, engine_index: int = 0) -> None:
        PeakBatch.peak = 0

    def record(self, scheduler_stats: object, iteration_stats: object, *args: object, **kwargs: object) -> None:
        running = getattr(scheduler_stats, "num_running_reqs", 0)
        PeakBatch.peak = max(PeakBatch.peak, running)

    def log_engine_initialized(self) -> None:
        pass


def frame(stream_time: float, size: tuple[int, int] = (8, 6)) -> Sample:
    width, height = size
    shade = int(stream_time * 37) % 256
    return Sample(stream_time, width, height, bytes([shade, 255 - shade, 128]) * (width * height))


def tick(session: str, seconds: int, first: int = 0, threshold: float = 0.5, **fields: object) -> TickRequest:
    """Tick `seconds` of `session`, its window holding every second from `first` (append-only when 0)."""
    samples = tuple(frame(float(t)) for t in range(first, seconds + 1))
    dialog = tuple(Turn("assistant", SILENCE, float(t)) for t in range(first, seconds))
    return TickRequest(
        session_id=session,
        tick=seconds,
        stream_time=float(seconds),
        samples=samples,
        instructions=(f"Session {session}: tell me when the light changes.",),
        dialog=dialog,
        speak_threshold=threshold,
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def tiny_lm_dir() -> Path:
    from actors.interaction.models.tiny_lm import ensure_tiny_random_lm

    return ensure_tiny_random_lm(TEST_MODELS / "tiny-random-lm")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_lm_dir: Path) -> AsyncIterator[VLLMEngine]:
    engine = VLLMEngine(str(tiny_lm_dir), max_new_tokens=8, engine_args=TINY_ENGINE_ARGS, stat_loggers=[PeakBatch])
    await engine.start()
    print(f"\nvLLM started in {engine.start_seconds:.1f} s")
    yield engine
    engine.close()


@on_module_loop
async def test_start_without_vllm_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tiny_lm_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    with pytest.raises(EngineError, match=r"pip install 'vigil\[vllm\]'"):
        await VLLMEngine(str(tiny_lm_dir)).start()


def test_from_config_takes_the_model_and_always_caches_prefixes() -> None:
    engine = VLLMEngine.from_config(VigilConfig(model="some/model", max_new_tokens=12, short_term_frames=3))
    assert (engine.model_id, engine.max_new_tokens, engine.max_images) == ("some/model", 12, 7)
    assert engine.engine_args["enable_prefix_caching"] is True
    with pytest.raises(ValueError, match="prefix_caching"):
        VLLMEngine("some/model", engine_args={"enable_prefix_caching": False})


def test_vlm_inputs_are_vllm_prompts_with_one_image_per_frame(tiny_random_model_dir: Path) -> None:
    from vllm.inputs import TextPrompt
    from vllm.multimodal.parse import MultiModalDataParser
    from vllm.renderers.inputs.preprocess import parse_dec_only_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    inputs = TickInputs(tokenizer, multimodal=True, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    old = frame(2.0, (16, 12))
    request = tick("vlm", 3, lookback=(old,))
    decide, speak = inputs.build(build_prompt(request))
    texts = []
    for prompt in (decide, speak):
        assert parse_dec_only_prompt(prompt) is prompt
        assert set(prompt) <= TextPrompt.__required_keys__ | TextPrompt.__optional_keys__
        text, data = prompt.get("prompt"), prompt.get("multi_modal_data")
        assert isinstance(text, str) and data is not None
        items = MultiModalDataParser().parse_mm_data(data)
        # Frames 0..3 plus the recalled one, in the order their placeholders appear.
        assert items.get_count("image", strict=True) == 5
        assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 5
        images = cast(list[Image.Image], data["image"])
        assert all(isinstance(image, Image.Image) for image in images)
        assert [image.size for image in images] == [(8, 6)] * 3 + [(16, 12), (8, 6)]
        texts.append(text)
    decide_text, speak_text = texts
    assert decide_text.endswith("<|im_start|>assistant\n</")  # where silence and response part
    assert speak_text == decide_text[: -len("</")] + RESPONSE
    assert "<3.0 seconds>" in decide_text and "<|im_start|>assistant\n</silence><|im_end|>" in decide_text


def test_text_model_inputs_keep_the_time_tags_and_drop_the_images(tiny_lm_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    inputs = TickInputs(tokenizer, multimodal=False)
    decide, speak = (cast(dict[str, Any], prompt) for prompt in inputs.build(build_prompt(tick("text", 2))))
    assert set(decide) == set(speak) == {"prompt_token_ids"}  # a TokensPrompt, tokenized here
    text = tokenizer.decode(decide["prompt_token_ids"])
    assert "<0.0 seconds>" in text and "<2.0 seconds>" in text and "image_pad" not in text
    assert isinstance(text, str) and text.endswith("<|im_start|>assistant\n</")
    shared = len(inputs.decision.shared)
    assert speak["prompt_token_ids"][: -len(inputs.decision.response_prefix)] == decide["prompt_token_ids"][:-shared]
    assert str(tokenizer.decode(speak["prompt_token_ids"])).endswith("assistant\n" + RESPONSE)


@on_module_loop
async def test_a_silent_tick_generates_nothing_after_its_decision(engine: VLLMEngine) -> None:
    await engine.check_health()
    silent = await engine.decide_one(tick("quiet", 3, threshold=NEVER))
    assert (silent.kind, silent.raw, silent.text) == ("silent", SILENCE, "")
    tokens = engine.tick_tokens("quiet")
    assert tokens is not None
    assert (tokens.decision_tokens, tokens.text_tokens, tokens.text_prompt_tokens) == (1, 0, 0)
    assert 0.0 < silent.probability < 1.0

    spoken = await engine.decide_one(tick("loud", 3, threshold=ALWAYS))
    assert spoken.kind in ("respond", "delegate") and spoken.raw.startswith(RESPONSE)
    tokens = engine.tick_tokens("loud")
    assert tokens is not None and 1 <= tokens.text_tokens <= 8
    # The words continue from the decision's prompt: all of it that fills whole blocks came from the cache.
    assert tokens.text_prompt_tokens == tokens.prompt_tokens + 2
    assert tokens.text_cached_tokens >= (tokens.prompt_tokens // BLOCK) * BLOCK
    print(f"speaking: {tokens.text_cached_tokens}/{tokens.text_prompt_tokens} prompt tokens from the cache")


@on_module_loop
async def test_the_speak_threshold_decides_from_vllms_probability(engine: VLLMEngine) -> None:
    request = tick("threshold", 4, threshold=NEVER)
    p_speak = 1.0 - (await engine.decide_one(request)).probability
    below = await engine.decide_one(tick("threshold", 4, threshold=max(p_speak - 0.02, 0.0)))
    above = await engine.decide_one(tick("threshold", 4, threshold=min(p_speak + 0.02, 1.0)))
    assert below.kind in ("respond", "delegate") and below.probability == pytest.approx(p_speak, abs=1e-3)
    assert above.kind == "silent" and above.probability == pytest.approx(1.0 - p_speak, abs=1e-3)
    print(f"P(speak) of the tiny random model: {p_speak:.3f}")


@on_module_loop
async def test_its_processes_may_run_on_every_core(engine: VLLMEngine) -> None:
    # vLLM's CPU build binds an instance to cores counted from the node's first: two replicas on one node would
    # both run on core 0. The engine leaves the placement of its engine core and worker to the operating system.
    cores = list(range(psutil.cpu_count()))
    [core] = [child for child in psutil.Process().children() if child.name() == "VLLM::EngineCore"]
    processes = [core, *core.children(recursive=True)]
    assert any(process.name() == "VLLM::Worker" for process in processes)
    assert {process.name(): process.cpu_affinity() for process in processes} == {
        process.name(): cores for process in processes}


@on_module_loop
async def test_concurrent_sessions_are_batched(engine: VLLMEngine) -> None:
    # Speaking ticks (a decision, then up to 8 words each); distinct sessions (distinct instructions), so that
    # neither run is served from the other's cache.
    await engine.decide_one(tick("warm-up", 2, threshold=ALWAYS))
    PeakBatch.peak = 0
    started = time.perf_counter()
    for index in range(16):
        await engine.decide_one(tick(f"one-by-one-{index}", 2, threshold=ALWAYS))
    one_by_one = time.perf_counter() - started
    assert PeakBatch.peak == 1
    started = time.perf_counter()
    decisions = await asyncio.gather(
        *(engine.decide_one(tick(f"together-{index}", 2, threshold=ALWAYS)) for index in range(16))
    )
    together = time.perf_counter() - started
    assert all(decision.raw.startswith(RESPONSE) for decision in decisions)
    print(
        f"16 speaking ticks: {one_by_one * 1000:.0f} ms one by one, {together * 1000:.0f} ms concurrently, "
        f"up to {PeakBatch.peak} in one vLLM step"
    )
    assert PeakBatch.peak >= 8  # vLLM ran the sessions' requests together, not one after another
    assert together < 0.5 * one_by_one


@on_module_loop
async def test_append_only_ticks_reuse_more_and_more_of_their_prompt(engine: VLLMEngine) -> None:
    append_only: list[tuple[int, int, float]] = []
    sliding: list[tuple[int, int, float]] = []
    for second in range(12):
        await engine.decide_one(tick("growing", second, threshold=NEVER))
        await engine.decide_one(tick("sliding", second, first=max(0, second - 2), threshold=NEVER))
        for name, ratios in (("growing", append_only), ("sliding", sliding)):
            tokens = engine.tick_tokens(name)
            assert tokens is not None
            ratios.append((tokens.cached_tokens, tokens.prompt_tokens, tokens.reuse_ratio))
    cached = [entry[0] for entry in append_only]
    assert cached == sorted(cached) and cached[-1] > cached[0]
    assert append_only[-1][2] >= 0.8 > append_only[0][2]
    # A window that drops its oldest frame changes the prompt right after the instructions every tick.
    assert sliding[-1][2] < append_only[-1][2] - 0.2
    print("reuse, append-only:", " ".join(f"{ratio:.2f}" for _, _, ratio in append_only))
    print("reuse, sliding window:", " ".join(f"{ratio:.2f}" for _, _, ratio in sliding))


@on_module_loop
async def test_a_tick_past_its_deadline_is_refused(engine: VLLMEngine) -> None:
    late = tick("late", 1, deadline=time.time() - 0.05)
    with pytest.raises(Overloaded, match="late"):
        await engine.decide_one(late)
    with pytest.raises(Overloaded):
        await engine.decide([tick("on-time", 1), late])
    assert engine.tick_tokens("late") is None and engine.tick_tokens("on-time") is None
    decided = await engine.decide([tick("on-time", 1, deadline=time.time() + 30.0)])
    assert len(decided) == 1 and engine.tick_tokens("on-time") is not None
