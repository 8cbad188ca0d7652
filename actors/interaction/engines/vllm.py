"""The vllm engine: vLLM's async engine in this process, deciding first and speaking second.

Each tick is two generations at most. The decision is one step over the decision tokens: the prompt ends with
the tokens `</silence>` and `</response>` share (`</` in Qwen2 tokenizers), the one sampled token is limited to
where they part, and vLLM returns the raw log-probabilities of both, so P(speak) is known and the session's
`speak_threshold` decides. A silent tick ends there. A tick that speaks continues from the prompt plus
`</response>`: vLLM's prefix cache already holds the prompt, so only the new tokens are computed before the
words. Concurrent ticks of many sessions are batched by vLLM itself; `decide_one` is the per-tick entry point.

Text-only models see each frame as its `<t seconds>` tag; vision-language models get the frames as vLLM
multimodal data beside a prompt rendered with the model's chat template.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.common.config import VigilConfig
from actors.common.decisions import RESPONSE, SILENCE, parse_decision
from actors.common.messages import Decision, EngineInfo, TickRequest
from actors.common.model_source import ModelUnavailable, resolve_model
from actors.common.replicas import Overloaded
from actors.interaction.engine import Engine, EngineError
from actors.interaction.engines.qwen_vl_inputs import QWEN2_VL_CHAT_TEMPLATE, sample_image
from actors.interaction.prompt import Prompt, build_prompt

if TYPE_CHECKING:
    from typing import TypeAlias

    from vllm import RequestOutput, SamplingParams
    from vllm.inputs import MultiModalDataDict, TextPrompt, TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    VLLMPrompt: TypeAlias = TextPrompt | TokensPrompt

logger = logging.getLogger(__name__)

ENGINE_NAME = "vllm"
INSTALL_HINT = "pip install 'vigil[vllm]'"
# Set for every engine; a caller's `engine_args` adds to or replaces the rest.
DEFAULT_ENGINE_ARGS: dict[str, Any] = {"enable_prefix_caching": True, "disable_log_stats": True}
_QWEN_VL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"})
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")
# How many sessions' last-tick token counts are kept (a replica serves far fewer at once).
_MAX_TRACKED_SESSIONS = 4096


@dataclass(frozen=True, slots=True)
class TickTokens:
    """Token counts of one session's last tick, as vLLM reported them.

    `prompt_tokens`/`cached_tokens` are the decision request's prompt and the part of it served from the
    prefix cache; `text_prompt_tokens`/`text_cached_tokens` the same for the wording request and
    `text_tokens` the words generated (all 0 on a silent tick, which generates nothing after its decision).
    """

    prompt_tokens: int
    cached_tokens: int
    decision_tokens: int = 1
    text_prompt_tokens: int = 0
    text_cached_tokens: int = 0
    text_tokens: int = 0

    @property
    def reuse_ratio(self) -> float:
        """The share of the decision prompt that came from the prefix cache (`vigil_prefix_reuse_ratio`)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True, slots=True)
class DecisionTokens:
    """Where `</silence>` and `</response>` part: the tokens they share, and the first one of each after."""

    shared: tuple[int, ...]
    silence: int
    response: int
    response_prefix: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> DecisionTokens:
        silence = tokenizer.encode(SILENCE, add_special_tokens=False)
        response = tokenizer.encode(RESPONSE, add_special_tokens=False)
        shared = 0
        while shared < min(len(silence), len(response)) and silence[shared] == response[shared]:
            shared += 1
        if shared == min(len(silence), len(response)):
            raise EngineError(f"the tokenizer spells {SILENCE!r} and {RESPONSE!r} so that one begins the other")
        return cls(tuple(silence[:shared]), silence[shared], response[shared], tuple(response))


class TickInputs:
    """Turns tick prompts into vLLM prompts: one that ends where the decision is made, one that speaks.

    Text-only models get token-id prompts (tokenized here, so both prompts share their tokens exactly);
    vision-language models get text prompts with the images as `multi_modal_data`, which vLLM's own processor
    expands into image tokens.
    """

    def __init__(self, tokenizer: Any, multimodal: bool, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.multimodal = multimodal
        self.chat_template = chat_template
        self.decision = DecisionTokens.from_tokenizer(tokenizer)
        self._shared_text = tokenizer.decode(list(self.decision.shared))

    def render(self, prompt: Prompt) -> str:
        """The chat-templated prompt text up to the start of the assistant's answer."""
        messages = prompt.messages if self.multimodal else _text_only(prompt.messages)
        return str(
            self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
            )
        )

    def build(self, prompt: Prompt) -> tuple[VLLMPrompt, VLLMPrompt]:
        """`(decision prompt, speaking prompt)`: vLLM `TokensPrompt`s for a text model, `TextPrompt`s with
        `multi_modal_data` for a vision-language model."""
        text = self.render(prompt)
        if not self.multimodal:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            decide_ids: TokensPrompt = {"prompt_token_ids": [*ids, *self.decision.shared]}
            speak_ids: TokensPrompt = {"prompt_token_ids": [*ids, *self.decision.response_prefix]}
            return decide_ids, speak_ids
        images = [sample_image(sample) for sample in prompt.images]
        data: MultiModalDataDict | None = {"image": images} if images else None
        decide_text: TextPrompt = {"prompt": text + self._shared_text, "multi_modal_data": data}
        speak_text: TextPrompt = {"prompt": text + RESPONSE, "multi_modal_data": data}
        return decide_text, speak_text


def _text_only(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    # A text model sees each frame as its time tag alone: the image parts are dropped, the text parts kept.
    flat = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = "\n".join(part["text"] for part in content if part.get("type") == "text")
        flat.append({"role": message["role"], "content": content})
    return flat


class VLLMEngine(Engine):
    """Decides ticks with vLLM's `AsyncLLM` in this process (its engine core runs in a child process).

    `model` is a local checkpoint directory or a Hub id already in the local cache. `engine_args` are
    vLLM's `AsyncEngineArgs` (e.g. `max_num_seqs`, `max_num_batched_tokens`, `max_model_len`, `dtype`,
    `gpu_memory_utilization`, `limit_mm_per_prompt`, `block_size`); prefix caching is always on.
    `max_images` caps the frames of one prompt when `limit_mm_per_prompt` is not given. `stat_loggers` are
    vLLM stat logger factories (`vllm.v1.metrics.loggers.StatLoggerBase` subclasses), called every engine
    step when `engine_args` has `disable_log_stats=False`.
    """

    batches_itself = True

    def __init__(
        self,
        model: str,
        *,
        max_new_tokens: int = 40,
        engine_args: Mapping[str, Any] | None = None,
        max_images: int = 8,
        info: EngineInfo | None = None,
        stat_loggers: Sequence[Any] = (),
    ) -> None:
        args = {**DEFAULT_ENGINE_ARGS, **(engine_args or {})}
        if not args["enable_prefix_caching"]:
            raise ValueError("the vllm engine needs enable_prefix_caching: speaking reuses the decision's prefill")
        self.model_id = model
        self.max_new_tokens = max_new_tokens
        self.engine_args = args
        self.max_images = max_images
        self._info = info or EngineInfo(engine=ENGINE_NAME, model=model)
        self.stat_loggers = list(stat_loggers)
        self._llm: AsyncLLM | None = None
        self._inputs: TickInputs | None = None
        self._decide_params: SamplingParams | None = None
        self._speak_params: SamplingParams | None = None
        self._ticks: OrderedDict[str, TickTokens] = OrderedDict()
        self.start_seconds = 0.0

    @classmethod
    def from_config(cls, config: VigilConfig) -> VLLMEngine:
        """An engine for `config.model`, with `config.vllm_engine_args` (a dict) passed to vLLM."""
        return cls(
            config.model,
            max_new_tokens=config.max_new_tokens,
            engine_args=dict(config.vllm_engine_args),
            max_images=config.short_term_frames + config.vllm_max_lookback_images,
        )

    async def start(self) -> None:
        """Load tokenizer and model and start vLLM's engine core (tens of seconds: it compiles and warms up).

        Raises EngineError when vLLM is not installed or the model cannot be loaded.
        """
        if self._llm is not None:
            return
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise EngineError(f"the vllm engine needs vLLM, which is not installed: {INSTALL_HINT}") from exc
        started = time.perf_counter()
        try:
            self._llm = await asyncio.to_thread(self._load)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"vLLM could not load {self.model_id!r}: {type(exc).__name__}: {exc}") from exc
        self.start_seconds = time.perf_counter() - started
        kind = "vision-language" if self.multimodal else "text only"
        logger.info("vLLM serves %s (%s) after %.1f s", self.model_id, kind, self.start_seconds)

    def _load(self) -> AsyncLLM:
        from transformers import AutoConfig, AutoTokenizer
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        source, local_only = _local_source(self.model_id)
        hf_config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        multimodal = getattr(hf_config, "vision_config", None) is not None
        template = _vision_chat_template(tokenizer, hf_config.model_type, source, local_only) if multimodal else None
        self._inputs = inputs = TickInputs(tokenizer, multimodal, template)
        args = dict(self.engine_args)
        if multimodal:
            args.setdefault("limit_mm_per_prompt", {"image": self.max_images, "video": 0})
        candidates = [inputs.decision.silence, inputs.decision.response]
        # One step; its raw log-probabilities of both candidates give P(speak). The mask only keeps the
        # sampled token one of them, so the output is always a decision.
        self._decide_params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            allowed_token_ids=candidates,
            logprob_token_ids=candidates,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        stop_ids = _stop_token_ids(tokenizer)
        self._speak_params = SamplingParams(
            max_tokens=self.max_new_tokens,
            temperature=0.0,
            min_tokens=1,  # a tick that decided to speak says something
            stop_token_ids=stop_ids,
            # Control tokens decode to nothing: words made of them would turn a decision to speak into silence.
            logit_bias={token: -100.0 for token in _control_token_ids(tokenizer) if token not in stop_ids},
            skip_special_tokens=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        # vLLM's CPU build binds an instance's threads to cores counted from the node's first ("auto"): every
        # replica on a node would then run on core 0. The operating system places them instead, unless the
        # operator chose a binding. (Only the CPU build reads this.)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        return AsyncLLM.from_engine_args(AsyncEngineArgs(model=source, **args), stat_loggers=self.stat_loggers or None)

    @property
    def multimodal(self) -> bool:
        return self._inputs is not None and self._inputs.multimodal

    async def check_health(self) -> None:
        """Raise unless vLLM's engine core is up and answering."""
        if self._llm is None:
            raise EngineError(f"the vllm engine for {self.model_id} has not been started")
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineError(f"vLLM's engine for {self.model_id} is unhealthy: {exc}") from exc

    def info(self) -> EngineInfo:
        return self._info

    async def decide(self, requests: list[TickRequest]) -> list[Decision]:
        """Decide all requests concurrently; one Decision per request, in order.

        Raises Overloaded, deciding none of them, when any request's deadline has passed: callers whose
        requests carry different deadlines call `decide_one` per request (vLLM batches them anyway).
        """
        now = time.time()
        for request in requests:
            _check_deadline(request, now)
        # Every tick runs to its end before a failure is raised, so none is left running unowned.
        results = await asyncio.gather(*(self.decide_one(request) for request in requests), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [result for result in results if isinstance(result, Decision)]

    async def decide_one(self, request: TickRequest) -> Decision:
        """Decide one tick; Overloaded when its deadline passed before it could start."""
        _check_deadline(request, time.time())
        if self._llm is None or self._inputs is None:
            raise EngineError(f"the vllm engine for {self.model_id} has not been started")
        started = time.perf_counter()
        inputs = self._inputs
        decide_prompt, speak_prompt = await asyncio.to_thread(inputs.build, build_prompt(request))
        decided = await self._generate(decide_prompt, self._decide_params, request)
        p_speak = _speak_probability(decided, inputs.decision)
        tokens = TickTokens(len(decided.prompt_token_ids or ()), decided.num_cached_tokens or 0)
        if p_speak < request.speak_threshold:
            self._record(request.session_id, tokens)
            model_ms = (time.perf_counter() - started) * 1000.0
            return Decision(kind="silent", raw=SILENCE, model_ms=model_ms, probability=1.0 - p_speak,
                            prompt_tokens=tokens.prompt_tokens, cached_tokens=tokens.cached_tokens)
        spoken = await self._generate(speak_prompt, self._speak_params, request)
        words = spoken.outputs[0]
        self._record(
            request.session_id,
            TickTokens(
                tokens.prompt_tokens,
                tokens.cached_tokens,
                text_prompt_tokens=len(spoken.prompt_token_ids or ()),
                text_cached_tokens=spoken.num_cached_tokens or 0,
                text_tokens=len(words.token_ids),
            ),
        )
        decision = parse_decision(RESPONSE + words.text, model_ms=(time.perf_counter() - started) * 1000.0)
        # Words that say nothing leave the tick silent, with the probability silence had.
        probability = 1.0 - p_speak if decision.kind == "silent" else p_speak
        return dataclasses.replace(decision, probability=probability, prompt_tokens=tokens.prompt_tokens,
                                   cached_tokens=tokens.cached_tokens)

    async def _generate(self, prompt: VLLMPrompt, params: Any, request: TickRequest) -> RequestOutput:
        assert self._llm is not None
        request_id = f"{request.session_id}-{request.tick}-{uuid.uuid4().hex[:12]}"
        final: RequestOutput | None = None
        try:
            # vLLM's renderer turns the prompt into engine input (tokenizing text, processing images) the way
            # its own servers do, instead of the deprecated raw-prompt path of `generate`.
            (engine_input,) = await self._llm.renderer.render_cmpl_async([prompt])
            async for output in self._llm.generate(engine_input, params, request_id):
                final = output
        except Exception as exc:
            raise EngineError(f"vLLM failed on tick {request.tick} of {request.session_id}: {exc}") from exc
        if final is None or not final.outputs:
            raise EngineError(f"vLLM returned nothing for tick {request.tick} of {request.session_id}")
        return final

    def _record(self, session_id: str, tokens: TickTokens) -> None:
        self._ticks[session_id] = tokens
        self._ticks.move_to_end(session_id)
        while len(self._ticks) > _MAX_TRACKED_SESSIONS:
            self._ticks.popitem(last=False)

    def last_tick_tokens(self) -> dict[str, TickTokens]:
        """Each recent session's last tick: prompt and cached tokens (for `vigil_prefix_reuse_ratio`)."""
        return dict(self._ticks)

    def tick_tokens(self, session_id: str) -> TickTokens | None:
        """The token counts of `session_id`'s last tick, if it had one here."""
        return self._ticks.get(session_id)

    def forget(self, session_id: str) -> None:
        """Drop an ended session's counts."""
        self._ticks.pop(session_id, None)

    def close(self) -> None:
        """Stop vLLM's engine core (its child processes exit; requests in flight fail)."""
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


def _check_deadline(request: TickRequest, now: float) -> None:
    if request.deadline and now > request.deadline:
        late_ms = (now - request.deadline) * 1000.0
        raise Overloaded(f"tick {request.tick} of {request.session_id} reached vLLM {late_ms:.0f} ms late")


def _speak_probability(output: RequestOutput, decision: DecisionTokens) -> float:
    """P(respond) renormalised over the two decision tokens, from their raw log-probabilities."""
    logprobs = output.outputs[0].logprobs
    if not logprobs or decision.silence not in logprobs[0] or decision.response not in logprobs[0]:
        raise EngineError("vLLM returned no log-probabilities for the decision tokens")
    silence, response = logprobs[0][decision.silence].logprob, logprobs[0][decision.response].logprob
    if math.isinf(silence) and math.isinf(response):
        return 0.0
    # The logistic of the difference: exp(r) / (exp(s) + exp(r)) without overflow.
    gap = silence - response
    return 1.0 / (1.0 + math.exp(gap)) if gap < 700 else 0.0


def _local_source(model: str) -> tuple[str, bool]:
    """Where vLLM loads `model` from, and whether offline: a Hub id already cached becomes its snapshot
    directory, so that vLLM does not reach the Hub for it."""
    try:
        source, local_only = resolve_model(model)
    except ModelUnavailable as exc:
        raise EngineError(f"could not find the model {model!r} ({exc})") from exc
    if not local_only or Path(source).is_dir():
        return source, local_only
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(model, local_files_only=True)), True
    except Exception as exc:
        raise EngineError(f"{model!r} is not fully in the local Hugging Face cache ({exc})") from exc


def _vision_chat_template(tokenizer: Any, model_type: str, source: str, local_only: bool) -> str:
    # Some checkpoints keep the image-aware template only with their processor.
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "image" in template:
        return template
    if model_type in _QWEN_VL_TYPES:
        return QWEN2_VL_CHAT_TEMPLATE
    from transformers import AutoProcessor

    processor_template = getattr(
        AutoProcessor.from_pretrained(source, local_files_only=local_only), "chat_template", None
    )
    if not isinstance(processor_template, str):
        raise EngineError(f"{source} has no chat template that places images")
    return processor_template


def _stop_token_ids(tokenizer: Any) -> list[int]:
    vocabulary = tokenizer.get_vocab()
    ids = [vocabulary[token] for token in _END_OF_TURN if token in vocabulary]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise EngineError("the model's tokenizer has no end-of-turn or end-of-sequence token")
    return ids


def _control_token_ids(tokenizer: Any) -> list[int]:
    return sorted(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)


def load_engine(config: VigilConfig) -> VLLMEngine:
    """The vllm engine for `config`; nothing loads until `await engine.start()`."""
    return VLLMEngine.from_config(config)


__all__ = ["DEFAULT_ENGINE_ARGS", "DecisionTokens", "TickInputs", "TickTokens", "VLLMEngine", "load_engine"]
