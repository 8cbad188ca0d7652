"""Summaries written by a language model: the separate summary engine of the memory tiers.

`ModelSummarizer` runs any Hugging Face causal language model with a chat template (Qwen2.5-0.5B-Instruct on a
CPU, a larger one on a GPU) inside the memory replica, on a worker thread of its own: it never holds up a tick,
and `MemoryService` asks it for one summary per session at a time, in stream order, so summaries land in order.
Without a summary model, memory uses the extractive summarizer (`actors.memory.tiers.ExtractiveSummarizer`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.common.model_source import ModelUnavailable, resolve_model
from actors.memory.tiers import MemoryItem, Summarizer, memory_line

log = logging.getLogger(__name__)

SUMMARY_INSTRUCTIONS = (
    "You keep the memory of a live video stream. Summarise what happened in the lines below in at most three "
    "short sentences, in the past tense. Keep the times (HH:MM:SS) of what matters."
)


class SummaryEngineError(RuntimeError):
    """The summary model could not be loaded."""


def summary_messages(items: Sequence[MemoryItem]) -> list[dict[str, str]]:
    """The chat a summary is asked with: the instructions, then one line per item with its time."""
    lines = "\n".join(memory_line(item) for item in items)
    return [{"role": "system", "content": SUMMARY_INSTRUCTIONS}, {"role": "user", "content": lines}]


class ModelSummarizer(Summarizer):
    """Summaries from a causal language model; loading happens in the constructor (call it off the loop)."""

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        max_new_tokens: int = 96,
        max_input_tokens: int = 2048,
        min_new_tokens: int = 0,
    ) -> None:
        try:
            source, local_only = resolve_model(model)
        except ModelUnavailable as exc:
            raise SummaryEngineError(f"summary model {model!r} not found: {exc}") from exc
        started = time.perf_counter()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        loaded: Any = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only)
        self.model: Any = loaded.to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.max_input_tokens = max_input_tokens
        self.min_new_tokens = min_new_tokens
        self.name = model
        # A summary is plain text: no vision or other special tokens but the end of the turn.
        ends = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        self._suppress = [int(i) for i in self.tokenizer.all_special_ids if i not in ends]
        # One generation at a time, on a thread of its own: the event loop and the FAISS workers stay free.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="summary-engine")
        log.info("summary engine %s loaded in %.1f s", model, time.perf_counter() - started)

    async def summarize(self, items: Sequence[MemoryItem]) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self._generate, list(items))

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def prompt_ids(self, items: Sequence[MemoryItem]) -> list[int]:
        """The prompt's token ids; when the lines are too long for `max_input_tokens`, every other line goes
        (evenly spread, oldest and newest kept) until they fit."""
        kept = list(items)
        while True:
            ids = self._encode(summary_messages(kept))
            if len(ids) <= self.max_input_tokens or len(kept) <= 2:
                return ids[-self.max_input_tokens :]
            kept = [*kept[:-1:2], kept[-1]]

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
            return [int(i) for i in ids]
        text = "\n\n".join(m["content"] for m in messages) + "\n\nSummary:"
        return [int(i) for i in self.tokenizer.encode(text)]

    def _generate(self, items: list[MemoryItem]) -> str:
        ids = torch.tensor([self.prompt_ids(items)], device=self.device)
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_new_tokens,
                min_new_tokens=self.min_new_tokens,
                do_sample=False,
                suppress_tokens=self._suppress or None,
                no_repeat_ngram_size=3,  # greedy decoding of small models loops otherwise
                pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id,
            )
        text = self.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
        return " ".join(str(text).split())
