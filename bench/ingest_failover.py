"""Ingest replica loss in a running Vigil: how long until every session of the killed replica ticks again.

    python -m bench.ingest_failover --url http://127.0.0.1:8000 --sessions 8

Start Vigil on this machine with two ingest replicas and loopback ICE:
    VIGIL_INGEST_REPLICAS=2 VIGIL_ICE_HOST_ADDRESSES=127.0.0.1 VIGIL_ICE_ALLOWED_NETWORKS=127.0.0.0/8 make run

N sessions stream synthetic video with a standing instruction; once each has ticked a few times, the process of
the ingest replica holding the first session is killed with SIGKILL. Each client does what the page does: when
no message has come for `--silence-s` (4 s, the page's figure) it connects again with the same session until it
is answered. The table shows, per replica, how long after the kill its sessions were ticking again (a decided
tick after the resume), how long the survivors' sessions went without a tick, and whether the resumed logs
kept one outcome per tick number.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time
from itertools import pairwise

import httpx
import numpy as np

from actors.ingest.ice import restrict_host_addresses
from bench.webrtc_client import SyntheticVideoTrack, VigilClient

DECIDED = ("silent", "respond", "delegate")


def scene(elapsed: float) -> np.ndarray:
    image = np.full((120, 160, 3), 90, np.uint8)
    image[:, int(elapsed * 40) % 160] = 230
    return image


class Watched:
    """One session's client, and when its ticks came."""

    def __init__(self, client: VigilClient) -> None:
        self.client = client
        self.tick_times: list[float] = []
        self.back_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            tick = await self.client.ticks.get()
            self.tick_times.append(time.monotonic())
            if self.back_at is None and tick["outcome"] in DECIDED and self.resumed:
                self.back_at = time.monotonic()

    @property
    def resumed(self) -> bool:
        return any(m["type"] == "hello" and m.get("resumed") for m in self.client.messages)

    def longest_gap_after(self, since: float) -> float:
        times = [since, *(at for at in self.tick_times if at >= since)]
        return max((later - earlier for earlier, later in pairwise(times)), default=float("inf"))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.client.close()


async def reconnect_when_silent(watched: Watched, silence_s: float, until: float) -> None:
    """The page's rule: no message for `silence_s`, connect again (same session) until answered."""
    client = watched.client
    while time.monotonic() < until:
        last = max((m["received_at"] for m in client.messages), default=time.monotonic())
        if time.monotonic() - last < silence_s:
            await asyncio.sleep(0.2)
            continue
        try:
            await client.reconnect(SyntheticVideoTrack(scene, fps=5))
        except (httpx.HTTPError, TimeoutError, OSError):
            await asyncio.sleep(0.5)


async def run(url: str, sessions: int, silence_s: float, watch_s: float) -> None:
    restrict_host_addresses(["127.0.0.1"])
    clients = [VigilClient(url) for _ in range(sessions)]
    watched = [Watched(client) for client in clients]
    try:
        for client in clients:
            await client.connect(SyntheticVideoTrack(scene, fps=5), ["say when something red shows"])
        for item in watched:
            item.start()
        await asyncio.sleep(4.0)
        replicas = {client.replica for client in clients}
        victim = clients[0].replica
        doomed = [item for item in watched if item.client.replica == victim]
        kept = [item for item in watched if item.client.replica != victim]
        print(f"{sessions} sessions on {len(replicas)} ingest replicas; killing {victim} ({len(doomed)} sessions)")
        os.kill(int(victim.rpartition("@")[2]), signal.SIGKILL)
        killed_at = time.monotonic()
        until = killed_at + watch_s
        reconnectors = [asyncio.create_task(reconnect_when_silent(item, silence_s, until)) for item in watched]
        while time.monotonic() < until and not all(item.back_at for item in doomed):  # noqa: ASYNC110 (a poll)
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)
        for task in reconnectors:
            task.cancel()
        back = [item.back_at - killed_at for item in doomed if item.back_at is not None]
        duplicates = 0
        for item in doomed:
            ticks = [event["tick"] for event in await item.client.events(limit=1000)]
            duplicates += len(ticks) - len(set(ticks))
        print("| sessions | on the killed replica | ticking again after p50 / max (s) | not back | "
              "longest tick gap of the others (s) | tick numbers logged twice |")
        print("|---|---|---|---|---|---|")
        others = max((item.longest_gap_after(killed_at) for item in kept), default=float("nan"))
        spread = f"{statistics.median(back):.1f} / {max(back):.1f}" if back else "-"
        print(f"| {sessions} | {len(doomed)} | {spread} | {len(doomed) - len(back)} | {others:.1f} | {duplicates} |")
        print(f"(clients reconnect after {silence_s:g} s without a message; that much of each figure is detection)")
    finally:
        await asyncio.gather(*(item.stop() for item in watched), return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--silence-s", type=float, default=4.0, help="no message this long: connect again")
    parser.add_argument("--watch-s", type=float, default=60.0, help="give up on sessions not back by then")
    args = parser.parse_args()
    asyncio.run(run(args.url, args.sessions, args.silence_s, args.watch_s))


if __name__ == "__main__":
    main()
