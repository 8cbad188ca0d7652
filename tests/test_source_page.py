"""The page with a source Vigil plays itself, in real headless Chromium against the real gateway (scripted engine):
an uploaded file and a stream URL each feed the session, the page shows the source's state and the response to
the red disc; a URL Vigil may not open is refused on the page with the server's reason, and nothing is left
playing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import chromium_page
from tests.fixtures_gateway import LocalVigil, start_local_vigil
from tests.video_sources import MjpegCamera, write_disc_video

pytestmark = pytest.mark.e2e


@pytest.fixture
def vigil(redis_server, tmp_path: Path) -> Iterator[LocalVigil]:  # type: ignore[no-untyped-def]
    server, local = start_local_vigil(
        redis_server, tick_interval_s=0.5, sources_allowed_schemes=["http"],
        sources_allowed_networks=["127.0.0.0/8"], sources_max_upload_bytes=1_000_000,
        sources_upload_dir=str(tmp_path / "uploads"))
    with server:
        local.url = server.url
        yield local


async def _start(page, instruction: str = "tell me when a red disc appears") -> None:  # type: ignore[no-untyped-def]
    await page.fill("#instruction-input", instruction)
    await page.click("#add-instruction")
    await page.click("#start")


async def test_the_page_plays_an_upload_and_a_stream_url_and_shows_their_state(
    vigil: LocalVigil, tmp_path: Path
) -> None:
    video = write_disc_video(tmp_path / "disc.mp4", seconds=3.0, disc_at_s=1.0)
    camera = MjpegCamera(fps=5.0)
    camera.disc = True
    camera.start()
    try:
        async with chromium_page(origin=vigil.url) as browser:
            page = browser.page
            await page.goto(vigil.url + "/")
            assert await page.locator("#source-options").is_hidden()
            await page.check("#source-file")
            assert await page.locator("#source-file-input").is_visible()
            assert await page.locator("#source-url-input").is_hidden()
            await page.set_input_files("#source-file-input", str(video))
            await _start(page)
            await page.wait_for_selector('#source-state[data-state="playing"]', timeout=15_000)
            assert (await page.inner_text("#source-state")).startswith("disc.mp4: playing")
            response = page.locator("#responses .response").first
            await response.wait_for(timeout=15_000)
            assert "I see red." in await response.inner_text()
            await page.wait_for_selector('#source-state[data-state="ended"]', timeout=15_000)
            assert await page.locator("#status").get_attribute("data-state") == "live"  # the session goes on
            await page.click("#stop")
            await page.wait_for_selector('#status[data-state="stopped"]', timeout=10_000)

            await page.check("#source-url")
            await page.fill("#source-url-input", camera.url)
            before = await page.locator("#responses .response").count()
            await _start(page)
            await page.wait_for_selector('#source-state[data-state="playing"]', timeout=15_000)
            await page.wait_for_function(f"document.querySelectorAll('#responses .response').length > {before}",
                                         timeout=15_000)
            await page.click("#stop")
            await page.wait_for_selector('#source-state[data-state="stopped"]', timeout=10_000)
            assert browser.console_errors() == [], browser.log()

            await page.fill("#source-url-input", "http://10.20.30.40/camera")
            await _start(page)
            await page.wait_for_selector("#error:not([hidden])", timeout=15_000)
            assert "outside the networks" in await page.inner_text("#error")
            await page.wait_for_selector('#status[data-state="error"]', timeout=10_000)
            assert await page.locator("#start").is_enabled()
    finally:
        camera.stop()
    deadline = time.monotonic() + 5
    while [t for t in threading.enumerate() if t.name.startswith("vigil-source-")]:
        assert time.monotonic() < deadline, "a source thread was left playing"
        await asyncio.sleep(0.05)
    assert not list((tmp_path / "uploads").iterdir())
