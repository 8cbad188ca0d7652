"""The transformers engine: a Hugging Face VLM with a chat template, on CPU or GPU.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL run through `PromptEncoder` (tokenizer + PIL image processor, no
torchvision); other architectures go through their `AutoProcessor`.

Each batch is decided first and worded second. One forward pass over the batch (the prompts, plus the tokens
that every decision prefix shares, such as `</` in a Qwen tokenizer) gives, at the token where `</silence>` and
`</response>` part, the probability that the model speaks. A row speaks when that probability reaches its
session's threshold; only the rows that speak go on to `generate`, from their prompt plus `</response>`, to
write their words. A silent tick costs its share of one prefill and nothing more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

from actors.common.decisions import DECISION_PREFIXES, RESPONSE, SILENCE, parse_decision
from actors.common.messages import Decision, EngineInfo, TickRequest
from actors.common.model_source import ModelUnavailable, resolve_model
from actors.interaction.engine import Engine, EngineError
from actors.interaction.engines.qwen_vl_inputs import (
    QWEN2_VL_CHAT_TEMPLATE,
    EncodedBatch,
    PromptEncoder,
    sample_image,
)
from actors.interaction.models.demo import DEMO_MODEL_NAME, DEMO_NOTE, ensure_demo_model, is_demo_checkpoint
from actors.interaction.prompt import Prompt, build_prompt

if TYPE_CHECKING:  # the engines import without pydantic (the GPU benchmark machine has none)
    from actors.common.config import VigilConfig

logger = logging.getLogger(__name__)

ENGINE_NAME = "transformers"
# Families whose inputs PromptEncoder builds exactly as their own processor would.
QWEN_VL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"})


def pixel_budget(image_processor: Any) -> int:
    """The most pixels (height times width) a Qwen-VL image processor brings an image down to: its
    `size["longest_edge"]`, which for these processors counts pixels, not a side (0 where it has none)."""
    size = getattr(image_processor, "size", None)
    try:
        return int(size["longest_edge"]) if size is not None else 0
    except (KeyError, TypeError, ValueError):
        return 0


_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

T = TypeVar("T")
_HOW_TO_FIX = (
    "Download it first, point VIGIL_MODEL at a local checkpoint directory, or set "
    "VIGIL_FALLBACK_TO_DEMO=true to run the built-in demo model."
)


@dataclass(frozen=True, slots=True)
class DecisionPoint:
    """Where the decision prefixes part: the tokens they all start with, and the token each continues with.

    In a Qwen tokenizer `</silence>` and `</response>` both start with `</`; the decision is the next token.
    """

    shared: tuple[int, ...]
    silence: int
    response: int

    @classmethod
    def of(cls, prefixes: Mapping[str, Sequence[int]]) -> DecisionPoint:
        silence, response = list(prefixes[SILENCE]), list(prefixes[RESPONSE])
        common = 0
        while common < min(len(silence), len(response)) and silence[common] == response[common]:
            common += 1
        if common == min(len(silence), len(response)):
            raise EngineError(f"the tokenizer spells {SILENCE} and {RESPONSE} so that one starts the other")
        return cls(tuple(silence[:common]), silence[common], response[common])

    def speak_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """P(response) per row, renormalised over the two tokens the decision can take."""
        pair = logits[:, [self.silence, self.response]].double()
        return torch.softmax(pair, dim=-1)[:, 1]


def with_suffix(tensors: Mapping[str, torch.Tensor], suffix: Sequence[int]) -> dict[str, torch.Tensor]:
    """Left-padded inputs with the same text tokens appended to every row (nothing to append: unchanged)."""
    extended = dict(tensors)
    if not suffix:
        return extended
    ids = tensors["input_ids"]
    rows = ids.shape[0]
    tail = torch.tensor(list(suffix), dtype=ids.dtype, device=ids.device).expand(rows, -1)
    extended["input_ids"] = torch.cat([ids, tail], dim=1)
    mask = tensors["attention_mask"]
    extended["attention_mask"] = torch.cat([mask, torch.ones_like(tail, dtype=mask.dtype)], dim=1)
    if "mm_token_type_ids" in tensors:
        types = tensors["mm_token_type_ids"]
        extended["mm_token_type_ids"] = torch.cat([types, torch.zeros_like(tail, dtype=types.dtype)], dim=1)
    return extended


@dataclass(slots=True)
class _TrieNode:
    children: dict[int, _TrieNode] = field(default_factory=dict)
    prefix: str | None = None


class DecisionConstraint(LogitsProcessor):
    """Decide first: the first generated tokens may only spell one of the decision prefixes.

    The prefixes' token sequences form a trie; at each step a row may take only the children of its trie node,
    and greedy search takes the likeliest of them. After the silence prefix the turn must end; after any other
    prefix the model writes freely (but not an empty answer) until it ends its turn or runs out of tokens.
    """

    def __init__(
        self, prefixes: Mapping[str, Sequence[int]], prompt_length: int, stop_ids: Sequence[int]
    ) -> None:
        self.root = _TrieNode()
        for name, ids in prefixes.items():
            if not ids:
                raise ValueError(f"the decision prefix {name!r} has no tokens")
            node = self.root
            for token in ids:
                node = node.children.setdefault(int(token), _TrieNode())
            node.prefix = name
        self.prompt_length = prompt_length
        self.stop_ids = [int(token) for token in stop_ids]
        self.longest = max(len(ids) for ids in prefixes.values())

    def step(self, generated: Sequence[int]) -> tuple[list[int] | None, list[int] | None]:
        """`(allowed, banned)` next tokens of a row that generated `generated`; None where nothing applies."""
        node: _TrieNode | None = self.root
        for token in generated:
            if node is None or node.prefix is not None:
                return None, None  # the decision is made and worded; the row is free (or finished)
            node = node.children.get(token)
        if node is None:
            return None, None
        if node.prefix is None:
            return list(node.children), None
        if node.prefix == SILENCE:
            return self.stop_ids[:1], None
        return None, self.stop_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] > self.longest:
            return scores
        constrained = scores.clone()
        for row, tokens in enumerate(generated.tolist()):
            allowed, banned = self.step(tokens)
            if allowed is not None:
                keep = constrained[row, allowed].clone()
                constrained[row] = float("-inf")
                constrained[row, allowed] = keep
            elif banned is not None:
                constrained[row, banned] = float("-inf")
        return cast(torch.FloatTensor, constrained)


class _ProcessorEncoder:
    """Inputs for architectures outside the Qwen-VL family, through the model's own AutoProcessor."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        processor.tokenizer.padding_side = "left"

    def encode(self, prompts: Sequence[Prompt]) -> EncodedBatch:
        texts = [
            self.processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
            for prompt in prompts
        ]
        images = [[sample_image(sample) for sample in prompt.images] for prompt in prompts]
        tensors = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        return EncodedBatch(tensors=dict(tensors), prompt_length=int(tensors["input_ids"].shape[1]))


class TransformersEngine(Engine):
    """Decides ticks with a Hugging Face VLM. All torch work runs on one worker thread, one batch at a time.

    `model` is a Hub id or a local checkpoint directory; `dtype` is "float32", "bfloat16", "float16" or None
    (float32 on CPU, bfloat16 on GPU); `info` overrides what users are told about the model. With
    `fallback_demo_dir`, a model that cannot be loaded is replaced by the demo model kept (or trained) there.
    """

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        max_new_tokens: int = 40,
        dtype: str | None = None,
        info: EngineInfo | None = None,
        fallback_demo_dir: str | Path | None = None,
    ) -> None:
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or None, not {dtype!r}")
        self.model_id = model
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.dtype = _DTYPES[dtype] if dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
        self._info = info or EngineInfo(engine=ENGINE_NAME, model=model)
        self.fallback_demo_dir = Path(fallback_demo_dir) if fallback_demo_dir is not None else None
        self.loaded_from: str | None = None
        # One worker thread: the model is used by one batch at a time and never blocks the event loop.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vigil-engine")
        self._model: Any = None
        self._tokenizer: Any = None
        self._encoder: PromptEncoder | _ProcessorEncoder | None = None
        self._prefixes: dict[str, list[int]] = {}
        self._point: DecisionPoint | None = None
        self._keep_last_logits = False
        self._stop_ids: list[int] = []
        self._pad_id = 0

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, work)

    async def start(self) -> None:
        """Load tokenizer, image processor and weights (offline for local directories and cached Hub models).

        Raises EngineError saying what was tried when the model cannot be loaded and there is no fallback.
        """
        if self._model is None:
            await self._run(self._load_or_fall_back)

    def _load_or_fall_back(self) -> None:
        try:
            self._load(self.model_id)
            return
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if self.fallback_demo_dir is None:
                raise EngineError(
                    f"could not load the model {self.model_id!r} ({reason}). {_HOW_TO_FIX}"
                ) from exc
            logger.warning(
                "could not load the model %r (%s); falling back to the built-in demo model in %s. %s",
                self.model_id,
                reason,
                self.fallback_demo_dir,
                DEMO_NOTE,
            )
        self._load(str(ensure_demo_model(self.fallback_demo_dir)))

    def _load(self, name: str) -> None:
        started = time.perf_counter()
        source, local_only = resolve_model(name)
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        qwen_vl = config.model_type in QWEN_VL_TYPES
        if qwen_vl:
            # Qwen-VL's full processor needs torchvision for its video half; the PIL image processor does not.
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            image_processor = AutoImageProcessor.from_pretrained(
                source, backend="pil", local_files_only=local_only
            )
        else:
            processor = AutoProcessor.from_pretrained(source, backend="pil", local_files_only=local_only)
            tokenizer = processor.tokenizer
        model: Any = AutoModelForImageTextToText.from_pretrained(
            source, dtype=self.dtype, local_files_only=local_only
        )
        model.to(self.device).eval()
        encoder: PromptEncoder | _ProcessorEncoder
        image_pixels = 0  # the processor's budget, where it says one
        if qwen_vl:
            image_pixels = pixel_budget(image_processor)
            image_token_id = getattr(config, "image_token_id", None)
            if image_token_id is None:
                image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
            encoder = PromptEncoder(
                tokenizer,
                image_processor,
                cast(int, image_token_id),
                _vision_chat_template(tokenizer),
                with_token_types="mm_token_type_ids" in inspect.signature(model.forward).parameters,
            )
        else:
            encoder = _ProcessorEncoder(processor)
        self._prefixes = {
            prefix: tokenizer.encode(prefix, add_special_tokens=False) for prefix in DECISION_PREFIXES
        }
        self._point = DecisionPoint.of(self._prefixes)
        self._keep_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._stop_ids = _stop_token_ids(tokenizer, model.generation_config)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._stop_ids[0]
        self._tokenizer, self._encoder, self._model = tokenizer, encoder, model
        self.loaded_from = source
        if is_demo_checkpoint(source):
            self._info = EngineInfo(engine=ENGINE_NAME, model=DEMO_MODEL_NAME, demo=True, note=DEMO_NOTE)
        self._info = dataclasses.replace(self._info, image_pixels=image_pixels)
        logger.info(
            "loaded %s (%s, %d parameters) on %s in %.1f s",
            source,
            config.model_type,
            model.num_parameters(),
            self.device,
            time.perf_counter() - started,
        )

    async def check_health(self) -> None:
        """Raise unless the model is loaded and the worker accepts work."""
        if self._model is None:
            raise EngineError(f"the transformers engine for {self.model_id} has not been started")
        await self._run(lambda: None)

    def info(self) -> EngineInfo:
        return self._info

    async def decide(self, requests: list[TickRequest]) -> list[Decision]:
        """Decide all requests in one left-padded batch; one Decision per request, in order."""
        if not requests:
            return []
        if self._model is None:
            raise EngineError(f"the transformers engine for {self.model_id} has not been started")
        prompts = [build_prompt(request) for request in requests]
        thresholds = [request.speak_threshold for request in requests]
        try:
            return await self._run(lambda: self._decide_batch(prompts, thresholds))
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"{self.model_id} failed on a batch of {len(prompts)}: {exc}") from exc

    def _decide_batch(self, prompts: list[Prompt], thresholds: list[float]) -> list[Decision]:
        assert self._encoder is not None and self._point is not None
        started = time.perf_counter()
        batch = self._encoder.encode(prompts).to(self.device, self._model.dtype)
        p_speak = self._speak_probabilities(batch)
        prompt_tokens = batch.tensors["attention_mask"].sum(dim=1).tolist()
        speakers = [row for row, p in enumerate(p_speak) if p >= thresholds[row]]
        words = self._words([prompts[row] for row in speakers]) if speakers else []
        model_ms = (time.perf_counter() - started) * 1000.0
        spoken = dict(zip(speakers, words, strict=True))
        decisions = []
        for row, p in enumerate(p_speak):
            decision = parse_decision(spoken.get(row, SILENCE), model_ms=model_ms)
            probability = p if decision.kind != "silent" else 1.0 - p
            # No prefix cache here: every tick's prompt is computed in full (cached_tokens stays 0).
            decisions.append(dataclasses.replace(decision, probability=probability, prompt_tokens=prompt_tokens[row]))
        return decisions

    def _speak_probabilities(self, batch: EncodedBatch) -> list[float]:
        """P(the row's decision is a response), from one forward pass at the token where the prefixes part."""
        assert self._point is not None
        tensors = with_suffix(batch.tensors, self._point.shared)
        extra = {"logits_to_keep": 1} if self._keep_last_logits else {}
        with torch.inference_mode():
            logits = self._model(**tensors, **extra).logits[:, -1, :].float()
        return self._point.speak_probability(logits).tolist()

    def _words(self, prompts: list[Prompt]) -> list[str]:
        """The wire text of rows that speak: `</response>` and what the model writes after it."""
        assert self._encoder is not None
        response = self._prefixes[RESPONSE]
        batch = self._encoder.encode(prompts).to(self.device, self._model.dtype)
        tensors = with_suffix(batch.tensors, response)
        # Walking the prefix through the constraint leaves it at the response: the first free token may not end
        # the turn, so a response always says something.
        constraint = DecisionConstraint({RESPONSE: response}, batch.prompt_length, self._stop_ids)
        generation = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self._stop_ids,
            pad_token_id=self._pad_id,
        )
        with torch.inference_mode():
            output = self._model.generate(
                **tensors, generation_config=generation, logits_processor=LogitsProcessorList([constraint])
            )
        start = batch.prompt_length + len(response)
        texts = self._tokenizer.batch_decode(output[:, start:], skip_special_tokens=True)
        return [f"{RESPONSE}{text}" for text in texts]

    def close(self) -> None:
        """Stop the worker thread once the batch in progress (if any) is done."""
        self._worker.shutdown(wait=True, cancel_futures=True)


def _vision_chat_template(tokenizer: Any) -> str:
    # Some checkpoints keep the image-aware template only with their processor, and a text-only one (or none)
    # with the tokenizer; Qwen2-VL's own template serves the whole family then.
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "image" in template:
        return template
    return QWEN2_VL_CHAT_TEMPLATE


def _stop_token_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """End-of-turn first (it is what a silent turn is closed with), then every other end-of-sequence id."""
    ids: list[int] = []
    vocabulary = tokenizer.get_vocab()
    for token in _END_OF_TURN:
        if token in vocabulary:
            ids.append(vocabulary[token])
    configured = getattr(generation_config, "eos_token_id", None)
    for value in [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]:
        if value is not None and value not in ids:
            ids.append(int(value))
    if not ids:
        raise EngineError("the model's tokenizer has no end-of-turn or end-of-sequence token")
    return ids


def load_engine(config: VigilConfig) -> TransformersEngine:
    """An engine for `config.model` that, when `config.fallback_to_demo` is set, falls back to the demo model
    if the model cannot be loaded. Nothing loads until `await engine.start()`; `engine.info()` then says
    plainly which model runs."""
    fallback = config.demo_model_dir if config.fallback_to_demo else None
    return TransformersEngine(
        config.model, device=config.device, max_new_tokens=config.max_new_tokens, fallback_demo_dir=fallback
    )


def prepare_model(config: VigilConfig) -> VigilConfig:
    """Run once at start-up, before any replica: make sure the model that will run is on disk.

    When `config.model` cannot be found and the demo fallback is on, the demo model is trained now (about a
    minute on a laptop) so that replicas start at once; without the fallback this raises EngineError saying
    what was tried. Returns `config` unchanged.
    """
    try:
        resolve_model(config.model)
        return config
    except ModelUnavailable as exc:
        if not config.fallback_to_demo:
            raise EngineError(f"could not find the model {config.model!r} ({exc}). {_HOW_TO_FIX}") from exc
        logger.warning("%s; Vigil will run the built-in demo model. %s", exc, DEMO_NOTE)
    ensure_demo_model(config.demo_model_dir)
    return config


__all__ = [
    "QWEN_VL_TYPES",
    "DecisionConstraint",
    "TransformersEngine",
    "load_engine",
    "prepare_model",
]
