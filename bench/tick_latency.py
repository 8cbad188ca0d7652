"""Tick latency under N concurrent WebRTC clients against a running Vigil (loopback only, bounded in time).

    python -m bench.tick_latency --url http://127.0.0.1:8000 --clients 1 8 --seconds 30

Start Vigil for it on loopback ICE, e.g.
    VIGIL_ICE_HOST_ADDRESSES=127.0.0.1 VIGIL_ICE_ALLOWED_NETWORKS=127.0.0.0/8 make run

Prints, per N: per-stage p50/p99 in ms (wait = frame age when the tick starts; sample; decide; total = frame
arrival to sent; overhead = total - wait - decide, i.e. everything but the model), decided ticks per second
held across all clients, and the outcome counts.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from urllib.parse import urlparse

import numpy as np

from actors.ingest.ice import restrict_host_addresses
from bench.webrtc_client import SyntheticVideoTrack, VigilClient

STAGES = ("wait", "sample", "decide", "total", "overhead")


def scene(trigger_every_s: float):
    """A moving bar, and a red disc for one second every `trigger_every_s` (so some ticks respond)."""
    yy, xx = np.mgrid[0:240, 0:320]
    disc = (yy - 120) ** 2 + (xx - 160) ** 2 < 60**2

    def render(elapsed: float) -> np.ndarray:
        image = np.full((240, 320, 3), 90, np.uint8)
        image[:, int(elapsed * 40) % 320] = 230
        if int(elapsed) % int(trigger_every_s) == int(trigger_every_s) - 1:
            image[disc] = (220, 20, 20)
        return image

    return render


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run_clients(url: str, clients: int, seconds: float, fps: float, api_key: str | None) -> dict:
    sessions = [VigilClient(url, api_key=api_key) for _ in range(clients)]
    try:
        await asyncio.gather(*(c.connect(SyntheticVideoTrack(scene(5), fps=fps), ["tell me when a red disc shows"])
                               for c in sessions))
        await asyncio.sleep(2.0)  # warm-up: not measured
        for c in sessions:
            while not c.ticks.empty():
                c.ticks.get_nowait()
        started = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - started
        ticks = [c.ticks.get_nowait() for c in sessions for _ in range(c.ticks.qsize())]
    finally:
        await asyncio.gather(*(c.close() for c in sessions), return_exceptions=True)
    outcomes = Counter(t["outcome"] for t in ticks)
    decided = [t for t in ticks if not t["outcome"].startswith("skipped:")]
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    for tick in decided:
        s = tick["stages_ms"]
        for name in ("wait", "sample", "decide", "total"):
            if name in s:
                stages[name].append(s[name])
        if "total" in s:
            stages["overhead"].append(s["total"] - s.get("wait", 0.0) - s.get("decide", 0.0))
    return {"clients": clients, "seconds": elapsed, "decided_per_s": len(decided) / elapsed,
            "outcomes": outcomes, "stages": stages}


def table(results: list[dict]) -> str:
    header = "| N | " + " | ".join(f"{s} p50 / p99 (ms)" for s in STAGES) + " | decided ticks/s | outcomes |"
    lines = [header, "|" + "---|" * (len(STAGES) + 3)]
    for r in results:
        cells = [f"{percentile(r['stages'][s], 50):.1f} / {percentile(r['stages'][s], 99):.1f}" for s in STAGES]
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
        lines.append(f"| {r['clients']} | " + " | ".join(cells) + f" | {r['decided_per_s']:.2f} | {outcomes} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    host = urlparse(args.url).hostname or ""
    if not host.startswith("127.") and host != "localhost":
        raise SystemExit("bench: only loopback targets (127.0.0.0/8, localhost) are allowed")
    restrict_host_addresses(["127.0.0.1"])
    results = []
    for n in args.clients:
        print(f"running {n} client(s) for {args.seconds:.0f} s …", flush=True)
        results.append(await run_clients(args.url, n, args.seconds, args.fps, args.api_key))
    print(table(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--fps", type=float, default=5.0)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    if args.seconds > 600 or max(args.clients) > 256:
        raise SystemExit("bench: at most 600 s and 256 clients per run")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
