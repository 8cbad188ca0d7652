"""The page on a bad network, in real headless Chromium against a local Vigil: when its connection's media path goes
dark, or its data channel is closed from Vigil's end, the page connects again by itself on the same session and
token (a new offer: Vigil's aiortc cannot take an ICE restart) and the tick numbers go on; and when Vigil cannot be
reached at all for longer than a failing connection takes to fail, the page keeps trying and comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import httpx
import pytest

from actors.ingest.peer import PeerSession
from tests.browser import chromium_page
from tests.fixtures_gateway import LocalVigil
from tests.impaired_network import ImpairedPath

pytestmark = pytest.mark.e2e

# The page reconnects after 4 s without a message (SILENCE_MS in web/app.js); its new connection opens in well
# under a second here.
BACK_WITHIN_S = 10.0
OUTAGE_S = 20.0  # Vigil out of reach, offers refused included: more than the page used to keep trying (~18 s)
MARKS_JS = "() => Array.from(document.querySelectorAll('#timeline .mark')).map((mark) => Number(mark.dataset.tick))"
SESSION_JS = "() => state.session && [state.session.session_id, state.session.token]"


def _on_gateway(vigil: LocalVigil, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run `coro` on the event loop of the gateway's peers (its server thread's), and wait for it."""
    peer = next(iter(vigil.gateway.peers.values()))
    loop = peer.loop._scheduler.get_loop()  # type: ignore[union-attr]
    return asyncio.run_coroutine_threadsafe(coro, loop).result(10)


async def _black_out(peer: PeerSession) -> ImpairedPath:
    path = ImpairedPath()
    path.attach(peer.pc)
    path.black_out()
    return path


async def _close_channel(peer: PeerSession) -> None:
    assert peer.channel is not None
    peer.channel.close()


async def _start(page: Any, url: str) -> tuple[str, str]:
    await page.goto(url)
    await page.fill("#instruction-input", "tell me when a red disc appears")
    await page.click("#add-instruction")
    await page.click("#start")
    await page.wait_for_selector('#status[data-state="live"]', timeout=30_000)
    await page.wait_for_function("document.querySelectorAll('#timeline .mark').length >= 2", timeout=15_000)
    return tuple(await page.evaluate(SESSION_JS))  # type: ignore[return-value]


async def _resumed(page: Any, count: int, timeout_s: float) -> float:
    """Wait until the page shows its `count`-th "reconnected" note and is live again; returns when."""
    await page.wait_for_function(f"document.querySelectorAll('#responses .resumed').length >= {count}",
                                 timeout=timeout_s * 1000)
    await page.wait_for_selector('#status[data-state="live"]', timeout=timeout_s * 1000)
    return time.monotonic()


async def _ticks_go_on(page: Any) -> list[int]:
    count = len(await page.evaluate(MARKS_JS))
    await page.wait_for_function(f"document.querySelectorAll('#timeline .mark').length >= {count + 2}",
                                 timeout=10_000)
    numbers = list(await page.evaluate(MARKS_JS))
    assert numbers == sorted(set(numbers)), f"tick numbers go on, none twice: {numbers}"
    return numbers


async def test_the_page_reconnects_on_the_same_session_when_its_connection_breaks(local_vigil: LocalVigil) -> None:
    async with chromium_page(origin=local_vigil.url) as browser:
        page = browser.page
        session = await _start(page, local_vigil.url)
        peers = local_vigil.gateway.peers
        first = peers[session[0]]

        blackout_at = time.monotonic()
        _on_gateway(local_vigil, _black_out(first))
        back_at = await _resumed(page, 1, BACK_WITHIN_S)
        assert tuple(await page.evaluate(SESSION_JS)) == session, "the same session and token"
        assert list(peers) == [session[0]] and peers[session[0]] is not first, "a new peer connection"
        await _ticks_go_on(page)

        second = peers[session[0]]
        closed_at = time.monotonic()
        _on_gateway(local_vigil, _close_channel(second))
        reopened_at = await _resumed(page, 2, BACK_WITHIN_S)
        assert tuple(await page.evaluate(SESSION_JS)) == session
        assert list(peers) == [session[0]] and peers[session[0]] is not second
        numbers = await _ticks_go_on(page)
        events = [e["outcome"] for e in (await _events(local_vigil, session))]
        assert events.count("skipped:reconnect") == 2 and len(events) >= max(numbers)
        assert not browser.console_errors(), browser.log()
        print(f"page live again {back_at - blackout_at:.1f} s after its media path went dark, "
              f"{reopened_at - closed_at:.1f} s after Vigil closed its data channel")
        await page.click("#stop")


async def test_the_page_keeps_trying_while_vigil_is_out_of_reach(local_vigil: LocalVigil) -> None:
    async with chromium_page(origin=local_vigil.url) as browser:
        page = browser.page
        session = await _start(page, local_vigil.url)

        async def refuse(route: Any) -> None:
            await route.abort("addressunreachable")

        await page.route("**/v1/sessions/*/offer", refuse)
        outage_at = time.monotonic()
        path = _on_gateway(local_vigil, _black_out(local_vigil.gateway.peers[session[0]]))
        await page.wait_for_selector('#status[data-state="reconnecting"]', timeout=10_000)
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_at)))
        assert await page.evaluate("state.running"), f"the page gave up: {await page.inner_text('#error')}"
        await page.unroute("**/v1/sessions/*/offer", refuse)
        path.restore()
        ended_at = time.monotonic()
        back_at = await _resumed(page, 1, 15)
        assert tuple(await page.evaluate(SESSION_JS)) == session, "the same session and token"
        await _ticks_go_on(page)
        print(f"page live again {back_at - ended_at:.1f} s after a {OUTAGE_S:.0f} s outage ended")
        await page.click("#stop")


async def _events(vigil: LocalVigil, session: tuple[str, str]) -> list[dict]:
    async with httpx.AsyncClient(base_url=vigil.url) as http:
        reply = await http.get(f"/v1/sessions/{session[0]}/events",
                               headers={"Authorization": f"Bearer {session[1]}", "x-session-id": session[0]})
    reply.raise_for_status()
    return list(reply.json()["events"])
