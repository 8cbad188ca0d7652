"""The openai engine, against a real HTTP chat-completions server, decides first and words second: a silent tick
costs one short call, a speaking tick a second call for its words; P(speak) from the server's log-probabilities
meets the session's threshold; frames arrive as JPEG data URLs in prompt order with the session id and the
bearer key (which never shows in errors or logs); faults are retried within bounds and the deadline, and a
server that refuses a parameter is met with the next thing down (structured choice, log-probabilities, text)."""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from PIL import Image
from pydantic import SecretStr

from actors.common.config import VigilConfig
from actors.common.messages import EngineInfo, Sample, TickRequest, Turn
from actors.common.replicas import Overloaded
from actors.interaction.engine import EngineError
from actors.interaction.engines.openai import DECIDE_TOKENS, OpenAIEngine
from actors.interaction.engines.openai_wire import TokenLogprob, speak_probability
from tests.fakes import free_port
from tests.openai_server import MODEL, ChatServer

pytestmark = pytest.mark.unit

KEY = "sk-vigil-test-0123456789abcdef"
WORDS = "A man is working on a laptop."
COLOURS = ((220, 30, 30), (30, 200, 40), (40, 60, 220))


@pytest.fixture(scope="module")
def server() -> Iterator[ChatServer]:
    with ChatServer() as running:
        yield running


@pytest.fixture
def chat(server: ChatServer) -> ChatServer:
    server.reset()
    return server


def make_engine(chat: ChatServer, **options: Any) -> OpenAIEngine:
    settings: dict[str, Any] = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.01, "max_new_tokens": 32}
    settings.update(options)
    return OpenAIEngine(chat.base_url, **settings)


@pytest.fixture
async def engine(chat: ChatServer) -> AsyncIterator[OpenAIEngine]:
    started = make_engine(chat)
    await started.start()
    yield started
    await started.close()


def tick(session_id: str = "cam-1", threshold: float = 0.5, deadline: float = 0.0) -> TickRequest:
    """Three seconds of solid red, green and blue frames (so their order can be read back), with a standing
    instruction and the assistant's past answers."""
    samples = tuple(
        Sample(10.0 + i, 64, 48, bytes(colour) * (64 * 48)) for i, colour in enumerate(COLOURS)
    )
    dialog = (Turn("assistant", "</silence>", 10.0), Turn("assistant", "</silence>", 11.0))
    return TickRequest(
        session_id=session_id,
        tick=12,
        stream_time=12.0,
        samples=samples,
        instructions=("Tell me when someone sits down.",),
        dialog=dialog,
        speak_threshold=threshold,
        deadline=deadline,
    )


def mean_colour(jpeg: bytes) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(jpeg)) as image:
        r, g, b = image.convert("RGB").resize((1, 1)).getpixel((0, 0))  # type: ignore[misc]
    return r, g, b


def near(colour: tuple[int, int, int], expected: tuple[int, int, int]) -> bool:
    return all(abs(a - b) < 20 for a, b in zip(colour, expected, strict=True))


# -- decide first, word second


async def test_a_silent_tick_makes_one_short_call(chat: ChatServer, engine: OpenAIEngine) -> None:
    chat.script.p_speak = 0.2

    [decision] = await engine.decide([tick()])

    assert decision.kind == "silent"
    assert decision.raw == "</silence>"
    assert decision.probability == pytest.approx(0.8)
    [call] = chat.calls
    assert call.body["max_tokens"] == DECIDE_TOKENS <= 4
    assert call.body["structured_outputs"] == {"choice": ["</silence>", "</response>"]}
    assert call.body["logprobs"] is True and call.body["top_logprobs"] == 5


async def test_a_speaking_tick_makes_a_second_call_for_the_words(chat: ChatServer, engine: OpenAIEngine) -> None:
    chat.script.p_speak = 0.7

    [decision] = await engine.decide([tick()])

    assert (decision.kind, decision.text) == ("respond", WORDS)
    assert decision.raw == "</response> " + WORDS
    assert decision.probability == pytest.approx(0.7)
    assert decision.model_ms > 0
    deciding, wording = chat.calls
    assert deciding.body["max_tokens"] == DECIDE_TOKENS
    assert wording.body["max_tokens"] == 32
    assert wording.body["messages"][-1] == {"role": "assistant", "content": "</response>"}
    assert wording.body["continue_final_message"] is True and wording.body["add_generation_prompt"] is False
    assert "structured_outputs" not in wording.body


@pytest.mark.parametrize(("threshold", "kind", "probability", "calls"), [
    (0.5, "respond", 0.7, 2),
    (0.9, "silent", 0.3, 1),
])
async def test_the_threshold_decides_on_the_same_probability(
    chat: ChatServer, engine: OpenAIEngine, threshold: float, kind: str, probability: float, calls: int
) -> None:
    chat.script.p_speak = 0.7

    [decision] = await engine.decide([tick(threshold=threshold)])

    assert decision.kind == kind
    assert decision.probability == pytest.approx(probability)
    assert len(chat.calls) == calls


async def test_a_low_threshold_speaks_where_greedy_decoding_would_stay_silent(
    chat: ChatServer, engine: OpenAIEngine
) -> None:
    chat.script.p_speak = 0.3

    [decision] = await engine.decide([tick(threshold=0.25)])

    assert (decision.kind, decision.text) == ("respond", WORDS)
    assert decision.probability == pytest.approx(0.3)


async def test_ticks_of_many_sessions_are_decided_concurrently_and_answered_in_order(
    chat: ChatServer, engine: OpenAIEngine
) -> None:
    chat.script.p_by_session = {"a": 0.9, "b": 0.1, "c": 0.6}
    chat.script.delay_s = 0.3

    started = time.monotonic()
    decisions = await engine.decide([tick("a"), tick("b"), tick("c")])

    # Serially this would be five delayed calls (two each for a and c, one for b): 1.5 s.
    assert time.monotonic() - started < 1.0
    assert [d.kind for d in decisions] == ["respond", "silent", "respond"]
    assert [round(d.probability, 3) for d in decisions] == [0.9, 0.9, 0.6]


# -- what goes on the wire


async def test_frames_arrive_as_jpeg_data_urls_in_order_after_their_time_tags(
    chat: ChatServer, engine: OpenAIEngine
) -> None:
    await engine.decide([tick()])

    [call] = chat.calls
    assert [frame.format for frame in call.frames] == ["JPEG"] * 3
    assert [frame.size for frame in call.frames] == [(64, 48)] * 3
    assert all(near(mean_colour(f.jpeg), c) for f, c in zip(call.frames, COLOURS, strict=True))
    users = [m for m in call.body["messages"] if m["role"] == "user"]
    for message, seconds in zip(users, ("10.0", "11.0", "12.0"), strict=True):
        tag, image = message["content"][:2]
        assert tag == {"type": "text", "text": f"<{seconds} seconds>"}
        assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/jpeg;base64,")
    system, first_user, past_answer = call.body["messages"][:3]
    assert system["role"] == "system" and "Tell me when someone sits down." in system["content"]
    assert past_answer == {"role": "assistant", "content": "</silence>"}
    assert first_user["role"] == "user"


async def test_a_text_only_model_gets_the_time_tags_and_no_images(chat: ChatServer) -> None:
    engine = make_engine(chat, images=False)
    await engine.start()
    try:
        await engine.decide([tick()])
    finally:
        await engine.close()
    [call] = chat.calls
    assert call.frames == []
    users = [m for m in call.body["messages"] if m["role"] == "user"]
    assert [m["content"] for m in users] == [[{"type": "text", "text": f"<{s} seconds>"}] for s in ("10.0", "11.0",
                                                                                                   "12.0")]


async def test_the_session_id_travels_in_the_header_and_as_the_user(chat: ChatServer) -> None:
    engine = make_engine(chat, session_header="x-session-id")
    await engine.start()
    try:
        chat.script.p_speak = 0.9
        await engine.decide([tick("kitchen-cam")])
    finally:
        await engine.close()

    assert len(chat.calls) == 2
    for call in chat.calls:
        assert call.headers["x-session-id"] == "kitchen-cam"
        assert call.body["user"] == "kitchen-cam"
        assert call.body["model"] == MODEL


async def test_the_default_header_is_joyais(chat: ChatServer, engine: OpenAIEngine) -> None:
    await engine.decide([tick("porch")])
    assert chat.calls[0].headers["x-streaming-session"] == "porch"
    assert "authorization" not in chat.calls[0].headers


# -- the API key


async def test_the_key_is_sent_as_bearer_and_never_shown(chat: ChatServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    chat.script.api_key = KEY
    engine = make_engine(chat, api_key=KEY)
    await engine.start()
    try:
        [decision] = await engine.decide([tick()])
        assert decision.kind == "silent"
        assert chat.calls[0].headers["authorization"] == f"Bearer {KEY}"

        # A backend error that echoes the key is reported with the key blanked.
        chat.script.always_status = 500
        chat.script.error_message = f"upstream rejected {KEY}"
        with pytest.raises(EngineError) as failed:
            await engine.decide([tick()])
        assert "HTTP 500" in str(failed.value) and "**********" in str(failed.value)
        assert KEY not in str(failed.value)

        # The server stops accepting the key mid-stream.
        chat.script.always_status = None
        chat.script.api_key = "sk-another"
        with pytest.raises(EngineError, match="refused the API key") as refused:
            await engine.decide([tick()])
        assert KEY not in str(refused.value)
    finally:
        await engine.close()

    assert KEY not in repr(engine)
    configured = VigilConfig(openai_base_url=chat.base_url, openai_api_key=SecretStr(KEY))
    assert KEY not in repr(OpenAIEngine.from_config(configured))
    assert caplog.records, "the engine logs nothing at all; this test would prove nothing"
    for record in caplog.records:
        assert KEY not in record.getMessage() and KEY not in (record.exc_text or "")


async def test_a_wrong_key_fails_start_saying_so(chat: ChatServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    chat.script.api_key = "sk-the-right-one"
    engine = make_engine(chat, api_key=KEY)
    with pytest.raises(EngineError, match="refused the API key") as failed:
        await engine.start()
    await engine.close()
    assert chat.base_url in str(failed.value)
    assert KEY not in str(failed.value) and KEY not in repr(failed.value)
    assert all(KEY not in record.getMessage() for record in caplog.records)


async def test_no_key_where_one_is_needed_says_which_setting(chat: ChatServer) -> None:
    chat.script.api_key = KEY
    engine = make_engine(chat)
    with pytest.raises(EngineError, match="VIGIL_OPENAI_API_KEY"):
        await engine.start()
    await engine.close()


# -- start-up and health


async def test_start_names_the_url_when_nothing_answers() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = OpenAIEngine(url, timeout_s=1.0, retries=1, backoff_s=0.01)
    with pytest.raises(EngineError, match="not usable") as failed:
        await engine.start()
    await engine.close()
    assert f"{url}/models" in str(failed.value)


async def test_start_takes_the_served_model_and_refuses_an_unknown_one(chat: ChatServer) -> None:
    engine = make_engine(chat)
    await engine.start()
    assert engine.info() == EngineInfo(engine="openai", model=MODEL)
    await engine.check_health()
    await engine.close()
    with pytest.raises(EngineError, match="has not been started"):
        await engine.check_health()

    unknown = make_engine(chat, model="no-such-model")
    with pytest.raises(EngineError, match="does not serve the model 'no-such-model'"):
        await unknown.start()
    await unknown.close()


def test_from_config_reads_the_openai_settings() -> None:
    config = VigilConfig(
        engine="openai",
        openai_base_url="http://127.0.0.1:9/v1/",
        openai_model="m",
        openai_api_key=SecretStr(KEY),
        openai_timeout_s=3.0,
        openai_retries=4,
        openai_session_header="x-session-id",
        max_new_tokens=12,
    )
    engine = OpenAIEngine.from_config(config)
    assert (engine.base_url, engine.model, engine.timeout_s, engine.retries) == ("http://127.0.0.1:9/v1", "m", 3.0, 4)
    assert (engine.session_header, engine.max_new_tokens) == ("x-session-id", 12)
    assert engine.info() == EngineInfo(engine="openai", model="m")


# -- faults: retries, timeouts, deadlines, garbage


async def test_a_past_deadline_is_overloaded_without_a_call(chat: ChatServer, engine: OpenAIEngine) -> None:
    with pytest.raises(Overloaded):
        await engine.decide([tick(deadline=time.time() - 0.1)])
    assert chat.calls == []


@pytest.mark.parametrize("status", [503, 429])
async def test_busy_answers_are_retried(chat: ChatServer, engine: OpenAIEngine, status: int) -> None:
    chat.script.fail_times, chat.script.fail_status = 2, status

    [decision] = await engine.decide([tick()])

    assert decision.kind == "silent"
    assert [call.status for call in chat.calls] == [status, status, 200]


async def test_a_failing_server_fails_after_bounded_retries(chat: ChatServer, engine: OpenAIEngine) -> None:
    chat.script.always_status = 500

    with pytest.raises(EngineError, match=r"after 3 attempt\(s\): HTTP 500: the model backend failed"):
        await engine.decide([tick()])

    assert len(chat.calls) == 1 + engine.retries


async def test_a_client_error_is_not_retried(chat: ChatServer, engine: OpenAIEngine) -> None:
    chat.script.always_status = 422

    with pytest.raises(EngineError, match="HTTP 422"):
        await engine.decide([tick()])

    assert len(chat.calls) == 1


async def test_a_slow_server_times_out_within_bounds(chat: ChatServer) -> None:
    engine = make_engine(chat, timeout_s=0.2, retries=1)
    await engine.start()
    chat.script.delay_s = 1.0
    started = time.monotonic()
    try:
        with pytest.raises(EngineError, match=r"no answer within 0\.2 s"):
            await engine.decide([tick()])
    finally:
        await engine.close()
    assert time.monotonic() - started < 0.9
    assert len(chat.calls) == 2


async def test_retries_stop_at_the_deadline(chat: ChatServer) -> None:
    engine = make_engine(chat, retries=5, backoff_s=0.2)
    await engine.start()
    chat.script.always_status = 503
    started = time.monotonic()
    try:
        with pytest.raises(EngineError, match="before the tick's deadline"):
            await engine.decide([tick(deadline=time.time() + 0.3)])
    finally:
        await engine.close()
    assert time.monotonic() - started < 0.5
    assert 1 <= len(chat.calls) < 6


@pytest.mark.parametrize(("garbage", "reason"), [("not_json", "not JSON"), ("no_choices", "no choices")])
async def test_a_garbage_body_is_an_engine_error(
    chat: ChatServer, engine: OpenAIEngine, garbage: str, reason: str
) -> None:
    chat.script.garbage = garbage

    with pytest.raises(EngineError, match=reason):
        await engine.decide([tick()])

    assert len(chat.calls) == 1


async def test_one_failing_request_fails_the_batch(chat: ChatServer, engine: OpenAIEngine) -> None:
    chat.script.p_by_session = {"ok": 0.1}
    chat.script.api_key = KEY  # the engine has no key: every call is refused
    with pytest.raises(EngineError):
        await engine.decide([tick("ok"), tick("other")])


# -- what the server offers: the fallback chain


async def test_without_structured_outputs_logprobs_still_give_the_probability(
    chat: ChatServer, engine: OpenAIEngine
) -> None:
    chat.script.refuse = {"structured_outputs"}
    chat.script.p_speak = 0.7

    [decision] = await engine.decide([tick()])

    assert (decision.kind, decision.text) == ("respond", WORDS)
    assert decision.probability == pytest.approx(0.7)
    refused, deciding, wording = chat.calls
    assert refused.status == 400 and deciding.status == 200
    assert "structured_outputs" not in deciding.body and deciding.body["logprobs"] is True
    assert wording.body["continue_final_message"] is True
    assert engine.decide_mode == "logprobs"

    # The fallback is remembered: the next silent tick is one call again.
    chat.calls.clear()
    chat.script.p_speak = 0.2
    [decision] = await engine.decide([tick()])
    assert decision.kind == "silent" and decision.probability == pytest.approx(0.8)
    [call] = chat.calls
    assert "structured_outputs" not in call.body and call.body["max_tokens"] == DECIDE_TOKENS


@pytest.mark.parametrize(("p_speak", "kind"), [(0.7, "respond"), (0.2, "silent")])
async def test_without_logprobs_the_text_decides_with_certainty(
    chat: ChatServer, engine: OpenAIEngine, p_speak: float, kind: str
) -> None:
    chat.script.refuse = {"structured_outputs", "logprobs"}
    chat.script.p_speak = p_speak

    [decision] = await engine.decide([tick(threshold=0.9)])

    assert decision.kind == kind
    assert decision.probability == 1.0
    assert engine.decide_mode == "plain"
    assert [call.status for call in chat.calls][:3] == [400, 400, 200]
    assert "logprobs" not in chat.calls[2].body and chat.calls[2].body["max_tokens"] == DECIDE_TOKENS
    if kind == "respond":
        assert decision.text == WORDS and len(chat.calls) == 4


async def test_a_bad_request_is_not_mistaken_for_a_missing_feature(chat: ChatServer, engine: OpenAIEngine) -> None:
    chat.script.always_status = 400

    with pytest.raises(EngineError, match="refused the deciding call"):
        await engine.decide([tick()])

    assert len(chat.calls) == 3
    assert engine.decide_mode == "structured"


async def test_without_prefill_the_whole_reply_is_parsed(chat: ChatServer, engine: OpenAIEngine) -> None:
    chat.script.refuse = {"continue_final_message"}
    chat.script.p_speak = 0.7

    [decision] = await engine.decide([tick()])

    assert (decision.kind, decision.text, decision.raw) == ("respond", WORDS, "</response> " + WORDS)
    assert [call.status for call in chat.calls] == [200, 400, 200]
    assert chat.calls[2].body["messages"][-1]["role"] == "user"
    assert engine.prefill is False


async def test_a_whole_reply_that_turns_silent_is_silence(chat: ChatServer, engine: OpenAIEngine) -> None:
    chat.script.refuse = {"continue_final_message"}
    chat.script.p_speak = 0.7
    chat.script.free_text = "</silence>"

    [decision] = await engine.decide([tick()])

    assert decision.kind == "silent"
    assert decision.probability == pytest.approx(0.3)


async def test_a_server_that_words_its_answer_anyway_is_called_once(chat: ChatServer, engine: OpenAIEngine) -> None:
    # JoyAI's adapter answers in full whatever max_tokens says, and reports its model time.
    chat.script.refuse = {"structured_outputs", "logprobs"}
    chat.script.ignore_max_tokens = True
    chat.script.p_speak = 0.9
    chat.script.extra = {"streamingharness": {"timing": {"adapter_total_ms": 150.3, "vllm_inference_ms": 115.0}}}

    [decision] = await engine.decide([tick()])

    assert (decision.kind, decision.text) == ("respond", WORDS)
    assert decision.model_ms == 115.0
    assert [call.status for call in chat.calls] == [400, 400, 200]


# -- reading P(speak) off log-probabilities


def test_the_probability_is_read_where_the_choices_part() -> None:
    two_tokens = [
        TokenLogprob("</", -0.01, (("</", -0.01), ("<", -5.0))),
        TokenLogprob("silence", -1.0, (("silence", -1.0), ("response", -2.0), ("think", -1.5))),
        TokenLogprob(">", 0.0),
    ]
    one_token = [TokenLogprob("</response>", -0.5, (("</silence>", -1.5),))]

    assert speak_probability(two_tokens) == pytest.approx(math.exp(-2.0) / (math.exp(-2.0) + math.exp(-1.0)))
    assert speak_probability(one_token) == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert speak_probability([TokenLogprob("Hello", -0.1)]) is None
    assert speak_probability([TokenLogprob("</", -0.1)]) is None
    assert speak_probability([]) is None


async def test_the_servers_prompt_and_cache_counters_reach_the_decision(chat: ChatServer, engine: OpenAIEngine) -> None:
    chat.script.extra = {"usage": {"prompt_tokens": 640, "completion_tokens": 2,
                                   "prompt_tokens_details": {"cached_tokens": 512}}}
    [decision] = await engine.decide([tick()])
    assert (decision.prompt_tokens, decision.cached_tokens) == (640, 512)
    chat.script.extra = {"usage": {"prompt_tokens": "many"}}
    [decision] = await engine.decide([tick()])
    assert (decision.prompt_tokens, decision.cached_tokens) == (0, 0)  # malformed counters are left out
