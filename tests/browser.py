"""Real headless Chromium for browser tests: Debian's `/usr/bin/chromium` via Playwright, with a fake camera.

The camera shows a `.y4m` clip (see `clips.py`) when one is given, Chromium's own test pattern otherwise.
Every console message and page error is kept on the returned `BrowserPage` so a failing test can print them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from playwright.async_api import ConsoleMessage, Page, async_playwright

CHROMIUM = "/usr/bin/chromium"

CHROMIUM_FLAGS: tuple[str, ...] = (
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@dataclass
class BrowserPage:
    """A page in a fresh Chromium profile, with what it logged."""

    page: Page
    console: list[ConsoleMessage] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def console_errors(self) -> list[str]:
        """Console errors and uncaught exceptions, as text."""
        return [m.text for m in self.console if m.type == "error"] + self.page_errors

    def log(self) -> str:
        """Everything the page logged, one line each, for assertion messages."""
        lines = [f"[{m.type}] {m.text}" for m in self.console]
        lines += [f"[pageerror] {e}" for e in self.page_errors]
        return "\n".join(lines)


def chromium_args(clip: str | Path | None = None) -> list[str]:
    """The command-line flags for a fake-camera Chromium; `clip` is a `.y4m` file for the camera to show."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is not installed")
    args = list(CHROMIUM_FLAGS)
    if clip is not None:
        args.append(f"--use-file-for-fake-video-capture={Path(clip).resolve()}")
    return args


@asynccontextmanager
async def chromium_page(
    clip: str | Path | None = None,
    *,
    origin: str | None = None,
    viewport: tuple[int, int] = (1280, 860),
    headless: bool = True,
) -> AsyncIterator[BrowserPage]:
    """Launch Chromium in a fresh `--user-data-dir`, grant the camera (to `origin` if given), yield a page."""
    args = chromium_args(clip)
    profile = tempfile.mkdtemp(prefix="vigil-chromium-")
    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=headless,
                args=args,
                viewport={"width": viewport[0], "height": viewport[1]},
            )
            try:
                await context.grant_permissions(["camera"], **({"origin": origin} if origin else {}))
                page = context.pages[0] if context.pages else await context.new_page()
                browser_page = BrowserPage(page)
                page.on("console", lambda message: browser_page.console.append(message))
                page.on("pageerror", lambda error: browser_page.page_errors.append(str(error)))
                yield browser_page
            finally:
                await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
