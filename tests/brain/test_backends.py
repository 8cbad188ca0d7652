"""The brain's backends against real local HTTP servers: an OpenAI-compatible chat server and a `/v1/solve`
agent service that answer, fail, answer late or hang. A delegation through each ends in its one outcome — done
(with its table or page), failed with the server's reason, timed out, cancelled; frames arrive as JPEG data
URLs; the API key goes only into the Authorization header, never into a reason, a repr or a log line."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from pydantic import SecretStr

from actors.brain.backend import BackendError
from actors.brain.backends.agent import AgentBackend
from actors.brain.backends.chat import SYSTEM_PROMPT, ChatBackend
from actors.brain.backends.engine import EngineBackend
from actors.brain.runner import Brain
from actors.common.messages import RichPart
from actors.interaction.engines.openai import OpenAIEngine
from tests.brain.agent_server import AgentServer
from tests.brain.helpers import Results, delegation, until
from tests.fakes import free_port
from tests.openai_server import MODEL, ChatServer

pytestmark = pytest.mark.unit

SECRET = "sk-brain-test-0123456789abcdef"


@pytest.fixture(scope="module")
def chat_server() -> Iterator[ChatServer]:
    with ChatServer() as running:
        yield running


@pytest.fixture
def chat(chat_server: ChatServer) -> ChatServer:
    chat_server.reset()
    return chat_server


@pytest.fixture(scope="module")
def agent_server() -> Iterator[AgentServer]:
    with AgentServer() as running:
        yield running


@pytest.fixture
def agent(agent_server: AgentServer) -> AgentServer:
    agent_server.reset()
    return agent_server


@pytest.fixture
async def results() -> AsyncIterator[Results]:
    yield Results()


def chat_brain(chat: ChatServer, results: Results, timeout_s: float = 5.0, **options: object) -> Brain:
    backend = ChatBackend(chat.base_url, model=MODEL, api_key=SecretStr(SECRET), timeout_s=timeout_s, max_frames=3)
    return Brain(backend, results, timeout_s=timeout_s, **options)  # type: ignore[arg-type]


# -- openai: any chat-completions server with images

async def test_a_chat_answer_with_a_table_is_done_and_frames_arrive_as_data_urls(
    chat: ChatServer, results: Results
) -> None:
    chat.script.free_text = ("Bread and milk come to 3.50 euros.\n\n```table\n| item | price |\n| --- | --- |\n"
                             "| bread | 2.00 |\n| milk | 1.50 |\n```")
    chat.script.api_key = SECRET
    brain = chat_brain(chat, results)
    request = delegation(frames=5, memories=("at 00:00:04 the user said: the receipt is on the table",))
    assert brain.delegate(request).accepted
    [result] = await results.wait(1)
    assert result.status == "done", result.reason
    assert result.text == "Bread and milk come to 3.50 euros."
    assert result.rich == RichPart("table", "| item | price |\n| --- | --- |\n| bread | 2.00 |\n| milk | 1.50 |")
    [call] = chat.calls
    assert call.headers["authorization"] == f"Bearer {SECRET}"
    assert [frame.format for frame in call.frames] == ["JPEG"] * 3  # the newest max_frames, decoded as images
    assert all(frame.size == (64, 48) for frame in call.frames)
    system, user = call.body["messages"]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    texts = [part["text"] for part in user["content"] if part["type"] == "text"]
    assert "the receipt is on the table" in texts[0] and "Let me check the prices." in texts[0]
    assert texts[1:4] == ["The stream at 00:00:12:", "The stream at 00:00:13:", "The stream at 00:00:14:"]
    assert texts[-1] == "The user's question: what do the prices add up to?"
    urls = [part["image_url"]["url"] for part in user["content"] if part["type"] == "image_url"]
    assert all(url.startswith("data:image/jpeg;base64,") for url in urls)
    assert call.body["model"] == MODEL and call.body["user"] == "s_a"
    await brain.close()


async def test_a_failing_chat_server_gives_its_reason(chat: ChatServer, results: Results) -> None:
    chat.script.always_status = 503
    chat.script.error_message = "the model backend is overloaded"
    brain = chat_brain(chat, results)
    brain.delegate(delegation())
    [result] = await results.wait(1)
    assert (result.status, result.reason) == ("failed", "the chat server answered HTTP 503: the model backend is "
                                                        "overloaded")
    await brain.close()


async def test_a_hanging_chat_server_times_out(chat: ChatServer, results: Results) -> None:
    chat.script.hang = True
    brain = chat_brain(chat, results, timeout_s=0.3)
    started = time.monotonic()
    brain.delegate(delegation())
    [result] = await results.wait(1)
    assert result.status == "timed_out" and time.monotonic() - started < 1.5
    await brain.close()


async def test_a_late_chat_answer_can_be_cancelled(chat: ChatServer, results: Results) -> None:
    chat.script.delay_s = 0.5
    chat.script.free_text = "Too late."
    brain = chat_brain(chat, results)
    brain.delegate(delegation())
    await until(lambda: bool(chat.calls))
    assert brain.cancel("s_a", "d1")
    [result] = await results.wait(1, timeout=0.3)  # at once, not when the server answers
    assert (result.status, result.reason) == ("cancelled", "cancelled by the user")
    await asyncio.sleep(0.6)
    assert len(results.items) == 1
    await brain.close()


async def test_the_chat_server_s_first_model_is_taken_when_none_is_named(chat: ChatServer, results: Results) -> None:
    chat.script.free_text = "Forty-two."
    backend = ChatBackend(chat.base_url, timeout_s=5.0)
    brain = Brain(backend, results)
    brain.delegate(delegation())
    [result] = await results.wait(1)
    assert result.text == "Forty-two." and chat.calls[-1].body["model"] == MODEL
    await backend.check_health()
    await brain.close()


async def test_an_unreachable_server_fails_saying_so(results: Results) -> None:
    backend = ChatBackend(f"http://127.0.0.1:{free_port()}/v1", model="m", timeout_s=2.0)
    brain = Brain(backend, results)
    brain.delegate(delegation())
    [result] = await results.wait(1)
    assert result.status == "failed" and "could not connect" in result.reason
    with pytest.raises(BackendError, match="could not connect"):
        await backend.check_health()
    await brain.close()


async def test_the_key_is_never_shown(
    chat: ChatServer, agent: AgentServer, results: Results, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    agent.script.api_key = "the-right-key"  # it echoes the key it refused in its error body
    echoed = Brain(AgentBackend(agent.base_url, api_key=SecretStr(SECRET)), results)
    echoed.delegate(delegation(delegation_id="d0"))
    await results.wait(1)
    assert results.of("d0").reason == "the agent answered HTTP 401: bad key **********"
    await echoed.close()
    chat.script.api_key = "the-right-key"  # the server echoes the key it refused
    backend = ChatBackend(chat.base_url, model=MODEL, api_key=SecretStr(SECRET), timeout_s=5.0)
    brain = Brain(backend, results)
    brain.delegate(delegation())
    await results.wait(2)
    result = results.of("d1")
    assert result.status == "failed" and result.reason == "the chat server refused the API key (HTTP 401)"
    with pytest.raises(BackendError) as refused:
        await backend.check_health()
    agent_backend = AgentBackend("http://127.0.0.1:1", api_key=SecretStr(SECRET))
    assert "delegation d1 of s_a: failed" in caplog.text
    shown_anywhere = (repr(backend), str(backend), repr(agent_backend), str(refused.value), repr(results.items),
                      caplog.text)
    for shown in shown_anywhere:
        assert SECRET not in shown
    assert "**********" in repr(backend)
    await brain.close()
    await agent_backend.close()


# -- agent: the JoyAI background agent's /v1/solve

def agent_brain(agent: AgentServer, results: Results, timeout_s: float = 5.0, **options: object) -> Brain:
    backend = AgentBackend(agent.base_url, timeout_s=timeout_s, max_frames=4)
    return Brain(backend, results, timeout_s=timeout_s, **options)  # type: ignore[arg-type]


async def test_the_agent_gets_the_solve_shape_and_its_completed_answer_is_done(
    agent: AgentServer, results: Results
) -> None:
    agent.script.text = "Here is the page.\n```html\n<h1>Receipt</h1>\n```"
    brain = agent_brain(agent, results, timeout_s=30.0)
    brain.delegate(delegation(frames=6, memories=("at 00:00:03 a receipt was seen",)))
    [result] = await results.wait(1)
    assert result.status == "done" and result.text == "Here is the page."
    assert result.rich == RichPart("html", "<h1>Receipt</h1>")
    [call] = agent.calls
    body = call.body
    assert set(body) == {"session_id", "task_id", "question", "foreground_text", "frames", "timeout_seconds"}
    assert (body["session_id"], body["task_id"], body["question"]) == ("s_a", "d1", "what do the prices add up to?")
    assert body["foreground_text"].startswith("Let me check the prices.")
    assert "at 00:00:03 a receipt was seen" in body["foreground_text"]
    assert body["timeout_seconds"] == 28
    assert [set(frame) for frame in body["frames"]] == [{"image_url", "timestamp", "timestamp_kind", "pts"}] * 4
    assert [frame["timestamp"] for frame in body["frames"]] == [12.0, 13.0, 14.0, 15.0]
    assert [frame["pts"] for frame in body["frames"]] == [12000, 13000, 14000, 15000]
    assert call.frame_sizes == [(64, 48)] * 4
    await brain.close()


@pytest.mark.parametrize(
    ("status", "error", "outcome", "reason"),
    [
        ("failed", "the browser tool crashed", "failed", "the agent failed: the browser tool crashed"),
        ("timeout", None, "timed_out", "the agent ran out of time"),
        ("thinking", None, "failed", "the agent answered an unknown status 'thinking'"),
    ],
)
async def test_the_agent_s_statuses_map_to_outcomes(
    agent: AgentServer, results: Results, status: str, error: str | None, outcome: str, reason: str
) -> None:
    agent.script.status, agent.script.error = status, error
    brain = agent_brain(agent, results)
    brain.delegate(delegation())
    [result] = await results.wait(1)
    assert (result.status, result.reason) == (outcome, reason)
    await brain.close()


async def test_an_agent_http_error_fails_and_a_hanging_agent_times_out(agent: AgentServer, results: Results) -> None:
    agent.script.http_status = 502
    brain = agent_brain(agent, results, timeout_s=0.3)
    brain.delegate(delegation())
    [failed] = await results.wait(1)
    assert (failed.status, failed.reason) == ("failed", "the agent answered HTTP 502: the agent crashed")
    agent.script.http_status, agent.script.hang = 200, True
    brain.delegate(delegation(delegation_id="d2"))
    await results.wait(2)
    assert results.of("d2").status == "timed_out"
    await AgentBackend(agent.base_url).check_health()
    await brain.close()


async def test_a_session_flooding_a_slow_agent_does_not_hold_up_another(agent: AgentServer, results: Results) -> None:
    agent.script.delay_s = 1.0
    agent.script.delay_by_question = {"quick?": 0.05}
    brain = agent_brain(agent, results, max_in_flight=3, max_in_flight_per_session=2)
    flood = [brain.delegate(delegation(session_id="s_flood", delegation_id=f"d{n}")) for n in range(10)]
    assert sum(receipt.accepted for receipt in flood) == 2
    started = time.monotonic()
    assert brain.delegate(delegation(session_id="s_quiet", question="quick?")).accepted
    await until(lambda: any(r.session_id == "s_quiet" for r in results.items), timeout=3.0)
    assert results.of("d1", "s_quiet").status == "done" and time.monotonic() - started < 0.8
    await results.wait(11)
    assert sorted(r.status for r in results.items if r.session_id == "s_flood") == ["done"] * 2 + ["failed"] * 8
    results.assert_one_each()
    await brain.close()


# -- engine: an interaction engine (a bigger model) answers

async def test_an_interaction_engine_answers_through_its_decision(chat: ChatServer, results: Results) -> None:
    chat.script.words = " The receipt totals 3.50 euros."
    engine = OpenAIEngine(chat.base_url, model=MODEL, timeout_s=5.0)
    await engine.start()
    backend = EngineBackend(engine.decide_one, engine.check_health, timeout_s=5.0, max_frames=2)
    brain = Brain(backend, results)
    brain.delegate(delegation(frames=3))
    [result] = await results.wait(1)
    assert result.status == "done" and result.text == "The receipt totals 3.50 euros.", result.reason
    calls = [call for call in chat.calls if call.status == 200]
    assert calls and all(call.headers["x-streaming-session"] == "s_a.brain" for call in calls)
    assert all(len(call.frames) == 2 and call.frames[0].format == "JPEG" for call in calls)
    assert "what do the prices add up to?" in str(calls[0].body["messages"])
    await backend.check_health()
    with pytest.raises(BackendError, match="at least one frame"):
        await backend.solve(delegation(frames=0))
    await brain.close()
    await engine.close()
