"""Memory replica loss in a running Vigil: how long until every session's memory answers again.

    python -m bench.memory_failover --url http://127.0.0.1:8000 --sessions 8

Start Vigil on this machine with loopback ICE (and, to see a survivor take over, two memory replicas):
    VIGIL_MEMORY_REPLICAS=2 VIGIL_ICE_HOST_ADDRESSES=127.0.0.1 VIGIL_ICE_ALLOWED_NETWORKS=127.0.0.0/8 make run

N sessions stream synthetic video and each says three notes; once memory has acknowledged them all (each is
recalled), one memory replica's process is killed with SIGKILL. Then every session keeps asking for its
notes; the table shows how long each took to answer with all of them again, and the outcomes of the ticks of
all sessions in the 10 s (or more) after the kill.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from urllib.parse import urlparse

import httpx
import numpy as np

from actors.ingest.ice import restrict_host_addresses
from bench.webrtc_client import SyntheticVideoTrack, VigilClient

NOTES = (
    ("the spare key of house {n} is under the blue flower pot", "where is the spare key of house {n}?"),
    ("parcel {n} arrived at the back door", "what came to the back door, parcel number?"),
    ("the plumber of flat {n} comes back on thursday", "when does the plumber of flat {n} return?"),
)


TICKS_WATCHED_S = 10.0  # tick outcomes are counted for at least this long after the kill


def scene(elapsed: float) -> np.ndarray:
    image = np.full((120, 160, 3), 90, np.uint8)
    image[:, int(elapsed * 40) % 160] = 230
    return image


def memory_replica_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ServeReplica:.*:Memory"], capture_output=True, text=True, check=False)
    return sorted(int(pid) for pid in found.stdout.split())


async def all_recalled(client: VigilClient, index: int) -> bool:
    for note, question in NOTES:
        try:
            lines = await client.recall(question.format(n=index), k=10)
        except httpx.HTTPError:
            return False
        if not any(note.format(n=index) in line for line in lines):
            return False
    return True


async def wait_recalled(client: VigilClient, index: int, timeout_s: float) -> float:
    started = time.monotonic()
    while not await all_recalled(client, index):
        if time.monotonic() - started > timeout_s:
            return float("nan")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def run(url: str, sessions: int, timeout_s: float) -> None:
    clients = [VigilClient(url) for _ in range(sessions)]
    try:
        await asyncio.gather(*(c.connect(SyntheticVideoTrack(scene, fps=3), ["note what you see"]) for c in clients))
        for index, client in enumerate(clients):
            for note, _ in NOTES:
                client.send({"type": "question", "text": note.format(n=index)})
        acknowledged = await asyncio.gather(*(wait_recalled(c, i, timeout_s) for i, c in enumerate(clients)))
        if any(np.isnan(acknowledged)):
            raise SystemExit("memory did not acknowledge every note before the kill")
        pids = memory_replica_pids()
        if not pids:
            raise SystemExit("no memory replica process found on this machine (is Vigil running here?)")
        for client in clients:
            while not client.ticks.empty():
                client.ticks.get_nowait()
        os.kill(pids[0], signal.SIGKILL)
        killed_at = time.monotonic()
        print(f"{len(pids)} memory replica(s); killed pid {pids[0]}", flush=True)
        back = await asyncio.gather(*(wait_recalled(c, i, timeout_s) for i, c in enumerate(clients)))
        await asyncio.sleep(max(0.0, TICKS_WATCHED_S - (time.monotonic() - killed_at)))
        outcomes = Counter(c.ticks.get_nowait()["outcome"] for c in clients for _ in range(c.ticks.qsize()))
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    lost = sum(1 for seconds in back if np.isnan(seconds))
    waited = sorted(seconds for seconds in back if not np.isnan(seconds))
    instant = sum(1 for seconds in waited if seconds < 0.5)
    print("| memory replicas | sessions | answered at once (< 0.5 s) | back after p50 / max (s) | not back | "
          "tick outcomes meanwhile |")
    print("|---|---|---|---|---|---|")
    p50 = float(np.percentile(waited, 50)) if waited else float("nan")
    worst = waited[-1] if waited else float("nan")
    ticks = ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items()))
    print(f"| {len(pids)} | {sessions} | {instant} | {p50:.1f} / {worst:.1f} | {lost} | {ticks} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for memory to answer")
    args = parser.parse_args()
    host = urlparse(args.url).hostname or ""
    if not host.startswith("127.") and host != "localhost":
        raise SystemExit("bench: only a Vigil on this machine (loopback) can have its replica killed")
    if not 1 <= args.sessions <= 64 or not 1 <= args.timeout <= 600:
        raise SystemExit("bench: 1-64 sessions, a timeout of 1-600 s")
    restrict_host_addresses(["127.0.0.1"])
    asyncio.run(run(args.url, args.sessions, args.timeout))


if __name__ == "__main__":
    main()
