"""The summary engine: a causal language model (a tiny random Qwen2 built from a config, saved like a real
checkpoint) writes the memory tiers' summaries in its own thread; its text is what lands in memory, in stream
order, while adds go on; its prompt carries every line with its time and shrinks evenly to fit; a missing
model is a clear error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

from actors.interaction.models.tiny_vlm import build_tokenizer
from actors.memory.embedder import HashingEmbedder
from actors.memory.service import MemoryService
from actors.memory.session import MemoryConfig
from actors.memory.summary_model import ModelSummarizer, SummaryEngineError
from actors.memory.tiers import MemoryItem, extract_summary

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    directory = tmp_path_factory.mktemp("tiny-lm")
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class RecordingSummarizer(ModelSummarizer):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.written: list[tuple[tuple[str, float], str]] = []

    async def summarize(self, items: Sequence[MemoryItem]) -> str:
        text = await super().summarize(items)
        self.written.append(((items[0].kind, items[0].stream_time), text))
        return text


def _items(count: int) -> list[MemoryItem]:
    return [MemoryItem(i + 1, "s", float(i), "caption", f"a person walks past the window, step {i}")
            for i in range(count)]


def test_the_prompt_carries_each_line_with_its_time_and_shrinks_to_fit(tiny_lm_dir: Path) -> None:
    summarizer = ModelSummarizer(str(tiny_lm_dir), max_input_tokens=4096)
    try:
        text = summarizer.tokenizer.decode(summarizer.prompt_ids(_items(3)))
        assert "at 00:00:00 you saw a person walks past the window, step 0" in text
        assert "at 00:00:02 you saw a person walks past the window, step 2" in text
        summarizer.max_input_tokens = 600
        shrunk = summarizer.tokenizer.decode(summarizer.prompt_ids(_items(200)))
        assert len(summarizer.prompt_ids(_items(200))) <= 600
        assert "step 0\n" in shrunk and "step 199" in shrunk, "the oldest and newest lines stay"
    finally:
        summarizer.close()


async def test_model_summaries_land_in_memory_in_order_while_adds_go_on(tiny_lm_dir: Path) -> None:
    summarizer = await asyncio.to_thread(RecordingSummarizer, str(tiny_lm_dir), max_new_tokens=12, min_new_tokens=6)
    config = MemoryConfig(chunk_s=10, summaries_per_block=3)
    try:
        async with MemoryService(HashingEmbedder(), config, summarizer=summarizer) as service:
            memory = await service.create("model-summaries")
            slowest = 0.0
            for second in range(65):
                started = time.perf_counter()
                await service.add("model-summaries", "caption", f"scene {second // 10} holds a cup", float(second))
                slowest = max(slowest, time.perf_counter() - started)
            async with asyncio.timeout(60):
                await service.wait_summaries("model-summaries")
        assert slowest < 0.5, "an add never waits for a summary"
        summaries = [i for i in memory.items() if i.kind == "summary"]
        assert [s.stream_time for s in summaries] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
        written = dict(summarizer.written)
        for summary in summaries:
            assert summary.text == written["caption", summary.stream_time] != "", "the model wrote it"
            chunk = [i for i in memory.items() if i.kind == "caption"
                     and summary.stream_time <= i.stream_time < summary.end_time]
            assert summary.text != extract_summary(chunk, config.summary_chars)
        blocks = [i for i in memory.items() if i.kind == "block"]
        assert len(blocks) == 2 and {b.text for b in blocks} <= set(written.values()), "blocks too"
    finally:
        summarizer.close()


def test_a_missing_summary_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SummaryEngineError, match="no model directory"):
        ModelSummarizer(str(tmp_path / "nowhere"))
