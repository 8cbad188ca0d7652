"""The openai engine: ticks decided by any OpenAI-compatible chat-completions server (vllm serve, SGLang, the
hosted JoyAI API).

Decide first, word second. The first call of a tick generates only the decision, a couple of tokens, so that a
silent second costs one short call; only a tick that speaks makes a second call for the words. The deciding
call uses the best the server offers, falling back for good when the server refuses a parameter with a 400:

1. vLLM's `structured_outputs` choice between `</silence>` and `</response>`, with log-probabilities, so that
   P(speak) is read off the deciding token and compared with the session's threshold;
2. log-probabilities without the constraint;
3. plain text, whose decision counts as certain.

The words are asked for with the assistant turn prefilled with `</response>` (vLLM's
`continue_final_message`), or, where that is refused, as an ordinary reply parsed whole.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Literal

import httpx
from pydantic import SecretStr

from actors.common.config import VigilConfig
from actors.common.decisions import RESPONSE, parse_decision
from actors.common.error_body import error_message_of
from actors.common.messages import Decision, EngineInfo, TickRequest
from actors.common.replicas import Overloaded
from actors.interaction.engine import Engine, EngineError
from actors.interaction.engines.openai_wire import (
    DECISION_CHOICES,
    ChatReply,
    FrameUrls,
    WireError,
    lean,
    openai_messages,
    parse_reply,
    speak_probability,
)
from actors.interaction.prompt import build_prompt

logger = logging.getLogger(__name__)

ENGINE_NAME = "openai"
# Enough for either decision prefix in the tokenizers we know (`</`, `silence`, `>` in Qwen2's).
DECIDE_TOKENS = 4
TOP_LOGPROBS = 5

DecideMode = Literal["structured", "logprobs", "plain"]
_FALLBACK: dict[DecideMode, DecideMode | None] = {"structured": "logprobs", "logprobs": "plain", "plain": None}
_ORDER: tuple[DecideMode, ...] = ("structured", "logprobs", "plain")


class _Refused(Exception):
    """The server answered 400: the request, or one of its parameters, is not accepted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OpenAIEngine(Engine):
    """Decides ticks through an OpenAI-compatible server; the ticks of many sessions run as concurrent calls.

    `base_url` ends in the API root (e.g. `http://127.0.0.1:8001/v1`); an empty `model` takes the first one the
    server lists. `session_header` carries the session id (JoyAI's adapter keys its memory on it). Each call
    has `timeout_s`; connection errors, timeouts, 429 and 5xx are retried `retries` times after `backoff_s`
    (doubling). The API key is sent as a bearer token and is never logged or shown.
    """

    batches_itself = True

    def __init__(
        self,
        base_url: str,
        model: str = "",
        api_key: SecretStr | str | None = None,
        timeout_s: float = 10.0,
        retries: int = 1,
        session_header: str = "x-streaming-session",
        max_new_tokens: int = 40,
        backoff_s: float = 0.1,
        jpeg_quality: int = 85,
        images: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = SecretStr(api_key) if isinstance(api_key, str) else api_key
        self.timeout_s = timeout_s
        self.retries = retries
        self.session_header = session_header
        self.max_new_tokens = max_new_tokens
        self.backoff_s = backoff_s
        self._frames = FrameUrls(quality=jpeg_quality)
        self.images = images  # False: a text-only model, which gets each frame as its time tag only
        self._client: httpx.AsyncClient | None = None
        # What the server accepts, learned from its 400s and kept for later calls.
        self.decide_mode: DecideMode = "structured"
        self.prefill = True

    @classmethod
    def from_config(cls, config: VigilConfig) -> OpenAIEngine:
        """An engine for the `openai_*` settings; nothing is contacted until `await engine.start()`."""
        return cls(
            config.openai_base_url,
            model=config.openai_model,
            api_key=config.openai_api_key,
            timeout_s=config.openai_timeout_s,
            retries=config.openai_retries,
            session_header=config.openai_session_header,
            max_new_tokens=config.max_new_tokens,
            images=config.openai_images,
        )

    def __repr__(self) -> str:
        key = "'**********'" if self._api_key is not None else "None"
        return f"OpenAIEngine(base_url={self.base_url!r}, model={self.model!r}, api_key={key})"

    # -- lifecycle

    async def start(self) -> None:
        """Open the connection pool and check that the server answers `GET {base_url}/models` and accepts the
        key; an empty model name becomes the first model listed. Raises EngineError saying what is wrong."""
        if not self.base_url:
            raise EngineError("the openai engine needs a server: set VIGIL_OPENAI_BASE_URL (e.g. http://host:8001/v1)")
        if self._client is None:
            headers = {"Authorization": f"Bearer {self._api_key.get_secret_value()}"} if self._api_key else {}
            self._client = httpx.AsyncClient(
                headers=headers,
                timeout=httpx.Timeout(self.timeout_s),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
        try:
            self.model = self._served_model(await self._models(self.retries))
        except BaseException:
            # An engine that cannot start leaves no connection pool behind.
            await self.close()
            raise
        logger.info("openai engine: %s at %s", self.model, self.base_url)

    def _served_model(self, served: list[str]) -> str:
        if not self.model:
            if not served:
                raise EngineError(f"{self.base_url}/models lists no model; set VIGIL_OPENAI_MODEL")
            return served[0]
        if served and self.model not in served:
            raise EngineError(
                f"{self.base_url} does not serve the model {self.model!r} (it serves {', '.join(served[:8])}); "
                "check VIGIL_OPENAI_MODEL"
            )
        return self.model

    async def check_health(self) -> None:
        """Raise EngineError unless the server answers `GET /models` now (one try)."""
        await self._models(retries=0)

    async def close(self) -> None:
        """Close the connection pool."""
        client, self._client = self._client, None
        if client is not None:
            await asyncio.wait_for(client.aclose(), self.timeout_s)

    def info(self) -> EngineInfo:
        return EngineInfo(engine=ENGINE_NAME, model=self.model or "unknown")

    async def _models(self, retries: int) -> list[str]:
        url = f"{self.base_url}/models"
        client = self._require_client()
        last = ""
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                async with asyncio.timeout(self.timeout_s):
                    response = await client.get(url)
            except (httpx.TransportError, TimeoutError) as exc:
                last = f"no answer: {_transport_reason(exc, self.timeout_s)}"
                continue
            if response.status_code in (401, 403):
                raise EngineError(self._refused_key(url, response.status_code))
            if response.status_code != 200:
                last = f"it answered HTTP {response.status_code}"
                if response.status_code == 429 or response.status_code >= 500:
                    continue
                break
            try:
                data = json.loads(response.content)
                return [str(model["id"]) for model in data["data"]]
            except (ValueError, KeyError, TypeError):
                raise EngineError(f"{url} did not answer with a model list") from None
        raise EngineError(
            f"the OpenAI-compatible server at {url} is not usable ({last}); is it running, and is "
            "VIGIL_OPENAI_BASE_URL its API root (e.g. http://host:8001/v1)?"
        )

    def _require_client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise EngineError(f"the openai engine for {self.base_url or '(no server)'} has not been started")
        return self._client

    def _refused_key(self, url: str, status: int) -> str:
        if self._api_key is None:
            return f"{url} needs an API key (HTTP {status}): set VIGIL_OPENAI_API_KEY"
        return f"the server at {url} refused the API key (HTTP {status}); check VIGIL_OPENAI_API_KEY"

    # -- deciding

    async def decide(self, requests: list[TickRequest]) -> list[Decision]:
        """Decide each request with its own calls, all at once; one Decision per request, in order.

        A request that fails fails the batch (EngineError, or Overloaded when its deadline had passed before
        its first call); the other requests' calls are cancelled then.
        """
        self._require_client()
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.decide_one(request)) for request in requests]
        except BaseExceptionGroup as group_error:
            first = group_error.exceptions[0]
            if isinstance(first, EngineError | Overloaded):
                raise first from None
            raise EngineError(f"{self.model}: {type(first).__name__}: {first}") from first
        return [task.result() for task in tasks]

    async def decide_one(self, request: TickRequest) -> Decision:
        """Decide one tick: a short deciding call, then, only when it speaks, a call for the words."""
        if request.deadline and time.time() >= request.deadline:
            raise Overloaded(f"tick {request.tick} of {request.session_id}: its deadline passed before the call")
        try:
            prompt = build_prompt(request)
            urls: list[str] | None = None
            if self.images:
                async with asyncio.timeout(self.timeout_s):
                    urls = await asyncio.to_thread(self._frames.urls, prompt.images)
            messages = openai_messages(prompt.messages, urls)
        except (ValueError, TimeoutError) as exc:
            raise EngineError(f"could not lay out tick {request.tick} of {request.session_id}: {exc}") from exc

        first, first_ms = await self._decide_call(request, messages)
        p_speak = speak_probability(first.tokens)
        if p_speak is None:
            # No log-probabilities (or none that reach the decision): the text's decision counts as certain.
            p_speak = 1.0 if lean(first.text) == "speak" else 0.0
        if p_speak < request.speak_threshold:
            return Decision(kind="silent", raw=first.text, model_ms=first_ms, probability=1.0 - p_speak,
                            prompt_tokens=first.prompt_tokens, cached_tokens=first.cached_tokens)

        decision = parse_decision(first.text)
        if decision.kind != "silent" and first.finish_reason == "stop":
            # A server that words its answer anyway (JoyAI's adapter) has already said everything.
            raw, model_ms = first.text, first_ms
        else:
            raw, words_ms = await self._words_call(request, messages)
            model_ms = first_ms + words_ms
            decision = parse_decision(raw)
        if decision.kind == "silent":
            return Decision(kind="silent", raw=raw, model_ms=model_ms, probability=1.0 - p_speak,
                            prompt_tokens=first.prompt_tokens, cached_tokens=first.cached_tokens)
        return Decision(
            kind=decision.kind,
            text=decision.text,
            question=decision.question,
            raw=raw,
            model_ms=model_ms,
            probability=p_speak,
            prompt_tokens=first.prompt_tokens,
            cached_tokens=first.cached_tokens,
        )

    async def _decide_call(self, request: TickRequest, messages: list[dict[str, Any]]) -> tuple[ChatReply, float]:
        mode: DecideMode | None = self.decide_mode
        first_call, reason = True, ""
        while mode is not None:
            body = self._body(request, messages, DECIDE_TOKENS)
            if mode != "plain":
                body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
            if mode == "structured":
                body["structured_outputs"] = {"choice": list(DECISION_CHOICES)}
            try:
                result = await self._chat(request, body, first_call=first_call)
            except _Refused as refused:
                first_call, reason, mode = False, refused.reason, _FALLBACK[mode]
                continue
            self._learn_mode(mode)
            return result
        raise EngineError(f"{self.base_url} refused the deciding call (HTTP 400: {reason})")

    def _learn_mode(self, mode: DecideMode) -> None:
        if _ORDER.index(mode) > _ORDER.index(self.decide_mode):
            logger.warning(
                "%s refused the %s deciding call; deciding with %s from now on", self.base_url, self.decide_mode, mode
            )
            self.decide_mode = mode

    async def _words_call(self, request: TickRequest, messages: list[dict[str, Any]]) -> tuple[str, float]:
        """The wire text of a tick that speaks, and the model time it took."""
        body = self._body(request, messages, self.max_new_tokens)
        if self.prefill:
            prefilled = {
                **body,
                "messages": [*messages, {"role": "assistant", "content": RESPONSE}],
                "continue_final_message": True,
                "add_generation_prompt": False,
            }
            try:
                reply, model_ms = await self._chat(request, prefilled)
            except _Refused:
                pass
            else:
                text = reply.text
                # A server that ignored the prefill starts a fresh turn with its own decision.
                return (text if lean(text) in ("speak", "silent") else RESPONSE + text), model_ms
        try:
            reply, model_ms = await self._chat(request, body)
        except _Refused as refused:
            raise EngineError(f"{self.base_url} refused the call for words (HTTP 400: {refused.reason})") from None
        if self.prefill:
            logger.warning("%s refused a prefilled reply; asking for whole replies from now on", self.base_url)
            self.prefill = False
        return reply.text, model_ms

    def _body(self, request: TickRequest, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": False,
            "user": request.session_id,
        }

    # -- one call, with timeouts and bounded retries

    async def _chat(
        self, request: TickRequest, body: dict[str, Any], first_call: bool = False
    ) -> tuple[ChatReply, float]:
        """POST one chat completion: the reply and its model time. Raises _Refused on a 400, Overloaded when
        `first_call` cannot start before the deadline, EngineError on anything else."""
        client = self._require_client()
        url = f"{self.base_url}/chat/completions"
        headers = {self.session_header: request.session_id}
        last, attempts, out_of_time = "", 0, False
        for attempt in range(self.retries + 1):
            if attempt:
                pause = self.backoff_s * 2 ** (attempt - 1)
                if request.deadline and time.time() + pause >= request.deadline:
                    out_of_time = True
                    break
                await asyncio.sleep(pause)
            timeout = self.timeout_s
            if request.deadline:
                timeout = min(timeout, request.deadline - time.time())
                if timeout <= 0:
                    if first_call and attempt == 0:
                        raise Overloaded(f"tick {request.tick} of {request.session_id}: its deadline passed")
                    out_of_time = True
                    break
            attempts += 1
            started = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    response = await client.post(url, json=body, headers=headers, timeout=timeout)
            except (httpx.TransportError, TimeoutError) as exc:
                last = _transport_reason(exc, timeout)
                logger.debug("chat call %d for %s failed: %s", attempt + 1, request.session_id, last)
                continue
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            status = response.status_code
            if status == 200:
                try:
                    reply = parse_reply(response.content)
                except WireError as exc:
                    raise EngineError(f"{url}: {exc}") from None
                return reply, reply.server_ms if reply.server_ms is not None else elapsed_ms
            reason = self._error_reason(response)
            if status == 400:
                raise _Refused(reason)
            if status in (401, 403):
                raise EngineError(self._refused_key(url, status))
            last = f"HTTP {status}: {reason}" if reason else f"HTTP {status}"
            if status != 429 and status < 500:
                raise EngineError(f"{url} answered {last}")
            logger.debug("chat call %d for %s failed: %s", attempt + 1, request.session_id, last)
        when = " before the tick's deadline" if out_of_time else ""
        raise EngineError(f"{url} failed{when} after {attempts} attempt(s): {last or 'no time left for a call'}")

    def _error_reason(self, response: httpx.Response) -> str:
        """A short reason from an error body, with the API key blanked (some servers echo what they refused)."""
        try:
            data = json.loads(response.content)
        except ValueError:
            reason = response.content[:200].decode("utf-8", errors="replace")
        else:
            reason = error_message_of(data)
        reason = " ".join(reason.split())[:200]
        if self._api_key is not None:
            reason = reason.replace(self._api_key.get_secret_value(), "**********")
        return reason


def _transport_reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return f"no answer within {timeout:.1f} s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = ["DECIDE_TOKENS", "ENGINE_NAME", "OpenAIEngine"]
