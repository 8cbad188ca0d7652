"""The Vigil page in real headless Chromium, served over HTTP from `web/` with no Vigil behind it.

Pins down what needs no backend: the page loads cleanly and shows every control under its stable id; a
refused session (401 with the documented error body) is shown to the user and leaves nothing running;
instructions typed before Start travel in the session request; the fake camera plays the clip; and the page
draws ticks (a tick sent again, by its key, once), responses, latency, errors and the demo-model note from
data-channel messages as the protocol describes them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from tests.browser import chromium_page
from tests.clips import write_trigger_clip

pytestmark = pytest.mark.e2e

WEB = Path(__file__).resolve().parent.parent / "web"
SCREENSHOT = Path("/tmp/vigil-page.png")
UNAUTHORIZED = {"error": {"code": "unauthorized", "message": "Missing or wrong API key."}}
CONTROL_IDS = (
    "source-camera",
    "source-screen",
    "start",
    "stop",
    "instruction-input",
    "add-instruction",
    "ask",
    "instructions",
    "timeline",
    "responses",
    "latency",
    "model-banner",
    "status",
    "speak-toggle",
    "recall-input",
    "recall",
)


@dataclass
class StaticServer:
    """`web/` over HTTP on 127.0.0.1, refusing every session with 401; remembers the session requests."""

    url: str
    session_requests: list[dict] = field(default_factory=list)


def _app(server: StaticServer) -> Starlette:
    def static(name: str, media_type: str):
        async def endpoint(request: Request) -> Response:
            return FileResponse(WEB / name, media_type=media_type, headers={"Cache-Control": "no-store"})

        return endpoint

    async def create_session(request: Request) -> Response:
        body = await request.body()
        server.session_requests.append(
            {"authorization": request.headers.get("authorization"), "body": json.loads(body or b"{}")}
        )
        return JSONResponse(UNAUTHORIZED, status_code=401)

    return Starlette(
        routes=[
            Route("/", static("index.html", "text/html")),
            Route("/app.js", static("app.js", "text/javascript")),
            Route("/style.css", static("style.css", "text/css")),
            Route("/v1/sessions", create_session, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="module")
def web_server() -> Iterator[StaticServer]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    state = StaticServer(url=f"http://127.0.0.1:{port}/")
    server = uvicorn.Server(uvicorn.Config(_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test HTTP server did not start")
        time.sleep(0.02)
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_trigger_clip(tmp_path_factory.mktemp("clips") / "camera.y4m", seconds=3, trigger_at_s=1.5)


async def test_page_loads_cleanly_with_every_control(web_server: StaticServer) -> None:
    async with chromium_page(origin=web_server.url.rstrip("/")) as browser:
        page = browser.page
        await page.goto(web_server.url)
        await page.wait_for_load_state("networkidle")
        for element_id in CONTROL_IDS:
            assert await page.locator(f"#{element_id}").count() == 1, element_id
        for element_id in ("start", "source-camera", "source-screen", "instruction-input", "timeline"):
            assert await page.locator(f"#{element_id}").is_visible(), element_id
        assert await page.locator("#source-camera").is_checked()
        assert await page.locator("#start").is_enabled()
        assert await page.locator("#stop").is_disabled()
        assert await page.locator("#error").is_hidden()
        assert await page.locator("#demo-note").is_hidden()
        assert await page.locator("#status").get_attribute("data-state") == "idle"
        await page.locator("summary").click()
        assert await page.locator("#api-key").get_attribute("type") == "password"
        assert browser.console_errors() == [], browser.log()


async def test_refused_session_shows_the_error_and_releases_the_camera(
    web_server: StaticServer, clip: Path
) -> None:
    async with chromium_page(clip, origin=web_server.url.rstrip("/")) as browser:
        page = browser.page
        await page.goto(web_server.url)
        await page.fill("#instruction-input", "tell me when a red disc appears")
        await page.click("#add-instruction")
        assert await page.locator("#instructions li").all_inner_texts() == ["tell me when a red disc appears"]
        await page.locator("summary").click()
        await page.fill("#api-key", "wrong-key")
        before = len(web_server.session_requests)

        await page.click("#start")

        error = page.locator("#error")
        await error.wait_for(state="visible", timeout=10_000)
        assert UNAUTHORIZED["error"]["message"] in await error.inner_text()
        assert "unauthorized" in await error.inner_text()
        assert web_server.session_requests[before:] == [
            {
                "authorization": "Bearer wrong-key",
                "body": {"instructions": ["tell me when a red disc appears"]},
            }
        ]
        await page.wait_for_function("document.getElementById('status').dataset.state === 'error'")
        assert await page.locator("#start").is_enabled()
        assert await page.locator("#stop").is_disabled()
        assert await page.evaluate("document.getElementById('preview').srcObject") is None
        unexpected = [e for e in browser.console_errors() if "401" not in e]
        assert unexpected == [], browser.log()
        await page.screenshot(path="/tmp/vigil-page-error.png", full_page=True)


async def test_fake_camera_plays_the_clip(web_server: StaticServer, clip: Path) -> None:
    async with chromium_page(clip, origin=web_server.url.rstrip("/")) as browser:
        page = browser.page
        await page.goto(web_server.url)
        size = await page.evaluate(
            """async () => {
                const stream = await navigator.mediaDevices.getUserMedia({video: true});
                const video = document.getElementById('preview');
                video.srcObject = stream;
                await new Promise((resolve) => { video.onloadedmetadata = resolve; });
                const size = [video.videoWidth, video.videoHeight];
                stream.getTracks().forEach((track) => track.stop());
                return size;
            }"""
        )
        assert size == [320, 240]


async def test_ticks_responses_latency_and_demo_note_render(web_server: StaticServer) -> None:
    ticks = [
        {"tick": 1, "stream_time": 1.0, "outcome": "skipped:no_frame", "latency_ms": None},
        *(
            {"tick": t, "stream_time": float(t), "outcome": "silent", "latency_ms": 100.0 + t}
            for t in range(2, 40)
        ),
        {
            "tick": 40,
            "stream_time": 83.4,
            "outcome": "respond",
            "text": "A red disc just appeared.",
            "latency_ms": 212.0,
        },
        {"tick": 41, "stream_time": 84.4, "outcome": "skipped:busy", "latency_ms": 950.0},
        {
            "tick": 42,
            "stream_time": 85.4,
            "outcome": "delegate",
            "text": "Let me look into that.",
            "question": "What is the disc made of?",
            "latency_ms": 230.0,
        },
    ]
    hello = {
        "type": "hello",
        "session_id": "s_test",
        "tick_interval_s": 1.0,
        "model": {
            "engine": "transformers",
            "model": "vigil-demo",
            "demo": True,
            "note": "Demo model: it only reacts to a large red disc.",
        },
        "instructions": ["tell me when a red disc appears", "say when the scene goes dark"],
    }
    async with chromium_page(origin=web_server.url.rstrip("/")) as browser:
        page = browser.page
        await page.goto(web_server.url)
        await page.evaluate(
            "(messages) => messages.forEach((m) => onMessage(JSON.stringify(m)))",
            [hello, *({"type": "tick", "text": "", "question": "", **t} for t in ticks)],
        )
        await page.evaluate("setStatus('live', 'Live · heartbeat 3 ms')")

        assert await page.locator("#demo-note").is_visible()
        assert "only reacts to a large red disc" in await page.locator("#demo-note").inner_text()
        assert "vigil-demo" in await page.locator("#model-banner").inner_text()
        assert await page.locator("#instructions li").count() == 2

        marks = page.locator("#timeline .mark")
        assert await marks.count() == len(ticks)
        outcomes = [await marks.nth(i).get_attribute("data-outcome") for i in (0, 1, 39, 40, 41)]
        assert outcomes == ["skipped:no_frame", "silent", "respond", "skipped:busy", "delegate"]
        assert "00:01:23" in await marks.nth(39).get_attribute("title")

        responses = page.locator("#responses .response")
        assert await responses.count() == 2
        first = responses.nth(0)
        assert await first.get_attribute("data-stream-time") == "83.4"
        assert "00:01:23" in await first.inner_text()
        assert "212 ms" in await first.inner_text()
        assert "A red disc just appeared." in await first.inner_text()
        delegated = responses.nth(1)
        assert "delegate" in (await delegated.get_attribute("class") or "")
        assert "What is the disc made of?" in await delegated.inner_text()

        latency = await page.locator("#latency").inner_text()
        assert "last 230 ms" in latency
        assert "p50 121 ms" in latency  # skipped ticks stay out of the latency figures

        await asyncio.sleep(0.2)
        await page.screenshot(path=str(SCREENSHOT), full_page=True)

        await page.evaluate(
            "onMessage(JSON.stringify({type: 'error', code: 'invalid_message', message: 'Unknown type.'}))"
        )
        assert "Unknown type." in await page.locator("#error").inner_text()
        assert browser.console_errors() == [], browser.log()


async def test_delegation_results_fill_their_card_and_rich_parts_are_sandboxed(web_server: StaticServer) -> None:
    delegate = {"type": "tick", "tick": 7, "stream_time": 7.0, "outcome": "delegate", "text": "Let me check.",
                "question": "What do the prices add up to?", "latency_ms": 200.0}
    done = {"type": "delegation", "id": "7", "status": "done", "question": "What do the prices add up to?",
            "text": "They add up to 42 euros.", "full_text": "", "reason": "", "duration_s": 3.2,
            "stream_time": 7.0, "rich": {"kind": "html", "content": "<table><tr><td>milk</td><td>2</td></tr></table>"
                                         "<script>parent.document.title='escaped'</script>"}}
    lost = {"type": "delegation", "id": "9", "status": "timed_out", "question": "Which shelf?", "text": "",
            "full_text": "", "reason": "no answer in 120 s", "duration_s": 120.0, "stream_time": 9.0, "rich": None}
    async with chromium_page(origin=web_server.url.rstrip("/")) as browser:
        page = browser.page
        await page.goto(web_server.url)
        await page.evaluate("(m) => onMessage(JSON.stringify(m))", delegate)
        card = page.locator('#responses li[data-delegation="7"]')
        assert "Working on it" in await card.inner_text()
        sent = await page.evaluate("""() => { const out = []; window.send = (m) => out.push(m);
                                              document.querySelector('.cancel-delegation').click(); return out; }""")
        assert sent == [{"type": "cancel", "delegation": "7"}], "the cancel button names the delegation"
        await page.evaluate("(ms) => ms.forEach((m) => onMessage(JSON.stringify(m)))", [done, lost])
        assert await page.locator('#responses li[data-delegation]').count() == 2, "one card per delegation"
        text = await card.inner_text()
        assert "Answered" in text and "42 euros" in text and "Working on it" not in text
        assert await card.locator(".cancel-delegation").count() == 0
        frame = card.locator("iframe.rich")
        assert await frame.get_attribute("sandbox") == "", "HTML from the brain runs with no scripts"
        await asyncio.sleep(0.3)
        assert await page.title() != "escaped"
        assert "milk" in await page.frame_locator("iframe.rich").locator("table").inner_text()
        other = page.locator('#responses li[data-delegation="9"]')
        assert "No answer in time: no answer in 120 s" in await other.inner_text()
        unexpected = [e for e in browser.console_errors() if "sandboxed" not in e and "script" not in e.lower()]
        assert unexpected == [], browser.log()


async def test_a_tick_whose_key_was_shown_is_not_shown_again(web_server: StaticServer) -> None:
    def tick(number: int, outcome: str = "silent", text: str = "") -> dict:
        return {"type": "tick", "tick": number, "key": f"s_test:{number}", "stream_time": float(number),
                "outcome": outcome, "text": text, "question": "", "latency_ms": 90.0}

    sent = [tick(1), tick(2, "respond", "A red disc."), tick(2, "respond", "A red disc."), tick(3), tick(1)]
    async with chromium_page(origin=web_server.url.rstrip("/")) as browser:
        page = browser.page
        await page.goto(web_server.url)
        await page.evaluate("(ms) => ms.forEach((m) => onMessage(JSON.stringify(m)))", sent)
        marks = page.locator("#timeline .mark")
        assert [await marks.nth(i).get_attribute("data-tick") for i in range(await marks.count())] == ["1", "2", "3"]
        assert await page.locator("#responses .response").count() == 1, "a response sent again is shown once"
        assert browser.console_errors() == [], browser.log()
