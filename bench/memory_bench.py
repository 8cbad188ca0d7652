"""Memory at 12 hours per stream, for 1, 10 and 50 concurrent sessions (bounded in time, loopback Redis only).

    python -m bench.memory_bench                      # 1, 10 and 50 sessions of 43,200 s each
    python -m bench.memory_bench --quick              # 1 and 4 sessions of 1 hour, a few seconds live

What it does, per N:
1. N sessions of 12 hours land on a fresh service ("a replica"): each is restored from a snapshot in an
   embedded Redis. The snapshots come from `--distinct` sessions built once through the real tiers: 43,200
   captions (one a second, from a template vocabulary) with 20 needles (distinctive events at random times)
   and a recurring "keys" caption, summaries and blocks written by the extractive summarizer and embedded with
   MiniLM. Session j is a restored copy of built session j mod `--distinct`.
2. RAM per stream: growth of the process RSS over the N restores, divided by N (and the index + table bytes).
3. Live: every session ticks once a second for `--live-seconds`: one caption added through the whole path
   (embed, Redis log, index) and one top-10 retrieval. Insert and retrieval latencies are wall times of the
   service calls, worker-thread hop included; "core" is `SessionMemory.search` alone, with the query vector
   given.
4. Needle recall@5: each needle's paraphrased question must bring the needle into the top 5.
5. Replica loss: the service is dropped without a final snapshot; a new one restores all N sessions at once
   (snapshot + log tail). Every acknowledged item must be back.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from actors.common.embedded_redis import EmbeddedRedis
from actors.memory.embedder import CachingEmbedder, Embedder, HashingEmbedder, MiniLMEmbedder, normalize_rows
from actors.memory.heap import release_free_heap
from actors.memory.service import MemoryService
from actors.memory.session import MemoryConfig, SessionMemory
from actors.memory.store import MemoryStore, decode_snapshot, encode_snapshot
from actors.memory.tiers import extract_summary

SUBJECTS = (
    "a man",
    "a woman",
    "two people",
    "a child",
    "an older man",
    "a young woman",
    "a person in a grey hoodie",
    "a cyclist",
    "a jogger",
    "a couple",
    "a man with a backpack",
    "a security guard",
)
ACTIONS = (
    "walks past",
    "stands near",
    "sits by",
    "talks on the phone near",
    "waits at",
    "looks around near",
    "reads a newspaper by",
    "drinks coffee at",
    "checks a phone at",
    "stretches next to",
)
PLACES = (
    "the front door",
    "the window",
    "the parking lot",
    "the bus stop",
    "the reception desk",
    "the staircase",
    "the hallway",
    "the bench outside",
)
CAPTIONS: tuple[str, ...] = tuple(f"{s} {a} {p}" for s, a, p in itertools.product(SUBJECTS, ACTIONS, PLACES))

# (what the stream showed once, a paraphrased question about it)
NEEDLES: tuple[tuple[str, str], ...] = (
    ("a dog snatches a sandwich from the picnic table", "when did an animal steal someone's food?"),
    ("a man drops his wallet into the storm drain", "when did the wallet fall down the gutter?"),
    ("a red balloon floats up and gets stuck in a tree", "when did a balloon get caught in the branches?"),
    ("a woman slips on the wet floor and falls down", "did anyone fall over?"),
    ("smoke rises from the toaster in the kitchen", "when was something burning?"),
    ("a courier leaves a large cardboard parcel at the entrance", "when was a package delivered?"),
    ("a police car pulls up with its lights flashing", "when did the cops arrive?"),
    ("a kid kicks a football through the glass pane", "when did a boy shoot a ball through the glass?"),
    ("a pigeon flies indoors and lands on a shelf", "when did a bird get into the building?"),
    ("all the lights in the building go out", "when did the electricity fail?"),
    ("a chef carries in a huge birthday cake", "when did someone bring a cake?"),
    ("water drips from the ceiling onto the carpet", "when was there a leak from the roof?"),
    ("a woman plays the violin in the lobby", "when did someone perform music?"),
    ("an ambulance arrives and paramedics rush inside", "when did the medics come?"),
    ("a cat knocks a vase off the sill and it shatters", "when did the pet break a vase?"),
    ("a worker on a ladder washes the outside windows", "when was the window cleaner here?"),
    ("someone forgets an umbrella on the bench", "when did somebody leave their umbrella behind?"),
    ("a group of tourists poses for a photo", "when did visitors take pictures?"),
    ("the fire alarm starts ringing loudly", "when did the alarm go off?"),
    (
        "a man hands a bouquet of roses to the receptionist",
        "when did someone give flowers to the front desk?",
    ),
)
KEYS_CAPTION = "a set of car keys lies on the kitchen counter"
KEYS_QUESTION = "when did I last see my keys?"
STANDING_QUERY = "tell me when something unusual happens at the door"


@dataclass
class Stream:
    """A synthetic stream: one caption a second, needles and the keys caption at random seconds."""

    captions: list[str]
    needle_times: dict[int, int] = field(default_factory=dict)  # needle index -> second
    keys_times: list[int] = field(default_factory=list)


def synthetic_stream(
    seconds: int = 43_200, seed: int = 0, needles: int = len(NEEDLES), keys: int = 3
) -> Stream:
    rng = random.Random(seed)
    special = rng.sample(range(30, seconds - 30), needles + keys)
    captions = [rng.choice(CAPTIONS) for _ in range(seconds)]
    stream = Stream(captions)
    for index, second in enumerate(special[:needles]):
        captions[second] = NEEDLES[index][0]
        stream.needle_times[index] = second
    for second in sorted(special[needles:]):
        captions[second] = KEYS_CAPTION
        stream.keys_times.append(second)
    return stream


def workload_texts() -> list[str]:
    """Every fixed text of the workload, to embed once."""
    return [
        *CAPTIONS,
        *(n for n, _ in NEEDLES),
        *(q for _, q in NEEDLES),
        KEYS_CAPTION,
        KEYS_QUESTION,
        STANDING_QUERY,
    ]


def build_session(
    session_id: str, embedder: Embedder, config: MemoryConfig, stream: Stream, distinct: bool = True
) -> SessionMemory:
    """A session fed one chunk at a time, its owed summaries written as the service's summary task would.

    With `distinct`, every caption but the needles and the keys is a different text whose vector is its
    template's vector turned by a small random rotation (cosine about 0.96): 43,200 distinct vectors, the
    index's worst case, without embedding 43,200 texts.
    """
    memory = SessionMemory(session_id, embedder, config)
    rng = np.random.default_rng(zlib.crc32(session_id.encode()))
    fixed = {KEYS_CAPTION, *(needle for needle, _ in NEEDLES)}
    chunk = int(config.chunk_s)
    for start in range(0, len(stream.captions), chunk):
        texts = stream.captions[start : start + chunk]
        vectors = embedder.embed(texts)
        if distinct:
            turned = [i for i, text in enumerate(texts) if text not in fixed]
            noise = rng.normal(0.0, 0.3 / np.sqrt(embedder.dim), (len(turned), embedder.dim)).astype(
                np.float32
            )
            vectors[turned] = normalize_rows(vectors[turned] + noise)
            texts = [text if text in fixed else f"{text}, frame {start + i}" for i, text in enumerate(texts)]
        items = [memory.new_item("caption", text, float(start + i)) for i, text in enumerate(texts)]
        memory.add_many(items, vectors)
        while (owed := memory.next_job()) is not None:
            job, job_items = owed
            text = extract_summary(job_items, config.summary_chars)
            memory.add(memory.new_item(job.kind, text, job.start, job.end - job.start, job.seq))
    return memory


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def tick_loop(
    service: MemoryService, session_id: str, seconds: float, offset: float, start_time: float, out: dict
) -> None:
    """One session at 1 Hz: add a caption, retrieve the top 10 for a question."""
    rng = random.Random(session_id)
    await asyncio.sleep(offset)
    questions = [STANDING_QUERY, KEYS_QUESTION, *(q for _, q in NEEDLES)]
    deadline = time.monotonic() + seconds
    tick = 0
    while time.monotonic() < deadline:
        began = time.monotonic()
        started = time.perf_counter()
        caption = f"{rng.choice(CAPTIONS)}, frame {int(start_time) + tick}"
        # A new text: embedding it is timed apart from the insert (log + index) that follows.
        await service.embed(caption)
        out["embed"].append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        await service.add(session_id, "caption", caption, start_time + tick)
        out["insert"].append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        await service.search(session_id, rng.choice(questions), k=10)
        out["search"].append((time.perf_counter() - started) * 1e3)
        tick += 1
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - began)))


def core_search_ms(memory: SessionMemory, vectors: np.ndarray, rounds: int) -> list[float]:
    times = []
    for i in range(rounds):
        started = time.perf_counter()
        memory.search(vectors[i % len(vectors)], k=10)
        times.append((time.perf_counter() - started) * 1e3)
    return times


def recall_at_5(memory: SessionMemory, embedder: Embedder, stream: Stream) -> tuple[int, int]:
    """How many needles the top 5 of their paraphrased question hold, out of how many."""
    found = 0
    for index, second in stream.needle_times.items():
        needle, question = NEEDLES[index]
        needle_ids = {item.id for item in memory.at(float(second), 0.5) if item.text == needle}
        hits = memory.search(embedder.embed([question])[0], k=5)
        found += any(hit.item.id in needle_ids for hit in hits)
    return found, len(stream.needle_times)


async def run_n(
    n: int, url: str, embedder: Embedder, config: MemoryConfig, templates: list[tuple[str, Stream]], args
) -> dict:
    store = MemoryStore.from_config(url, config)
    ids = [f"bench-{n}-{j}" for j in range(n)]
    gc.collect()
    release_free_heap()  # restores trim the heap: start from a trimmed one so that only memory counts
    service = MemoryService(embedder, config, store)
    rss_before = rss_bytes()
    started = time.perf_counter()
    restore_ms: list[float] = []

    async def restore(session_id: str) -> None:
        began = time.perf_counter()
        await service.restore(session_id)
        restore_ms.append((time.perf_counter() - began) * 1e3)

    await asyncio.gather(*(restore(sid) for sid in ids))
    landing_s = time.perf_counter() - started
    gc.collect()
    rss_per_stream = (rss_bytes() - rss_before) / n
    stats = [service.get(sid).stats() for sid in ids]
    held_per_stream = sum(s.held_bytes for s in stats) / n

    queries = embedder.embed([STANDING_QUERY, KEYS_QUESTION, *(q for _, q in NEEDLES)])
    core: list[float] = []
    for sid in ids[: min(n, 10)]:
        core += await asyncio.to_thread(core_search_ms, service.get(sid), queries, args.core_queries)

    found = total = 0
    for j, sid in enumerate(ids):
        _, stream = templates[j % len(templates)]
        f, t = recall_at_5(service.get(sid), embedder, stream)
        found, total = found + f, total + t

    live: dict[str, list[float]] = {"embed": [], "insert": [], "search": []}
    # The stream goes on past 12 hours, so the live ticks pay for eviction too: each session crosses an
    # eviction batch (every `evict_slack_s` of stream) at its own tick.
    end = float(len(templates[0][1].captions))
    slack = config.evict_slack_s
    cpu_began, wall_began = time.process_time(), time.perf_counter()
    await asyncio.gather(
        *(
            tick_loop(service, sid, args.live_seconds, j / n, end + slack * (j + 0.5) / n, live)
            for j, sid in enumerate(ids)
        )
    )
    live_cores = (time.process_time() - cpu_began) / (time.perf_counter() - wall_began)
    acknowledged = {sid: service.get(sid).last_id for sid in ids}
    batches, texts = service.embedding_batches
    mean_batch = texts / max(batches, 1)
    held = {sid: len(service.get(sid)) for sid in ids}

    # Replica loss: no final snapshot, no goodbye; a new replica restores everything from Redis.
    await service.close()
    gc.collect()
    survivor = MemoryService(embedder, config, store)
    loss_ms: list[float] = []

    async def recover(session_id: str) -> None:
        began = time.perf_counter()
        memory = await survivor.restore(session_id)
        loss_ms.append((time.perf_counter() - began) * 1e3)
        assert memory.last_id >= acknowledged[session_id] and len(memory) >= held[session_id], session_id

    started = time.perf_counter()
    await asyncio.gather(*(recover(sid) for sid in ids))
    recover_all_s = time.perf_counter() - started
    await survivor.close()
    for sid in ids:
        await store.forget(sid)
    await store.close()
    return {
        "n": n,
        "items": int(np.mean([s.items for s in stats])),
        "insert": live["insert"],
        "embed": live["embed"],
        "search": live["search"],
        "core": core,
        "rss_mb": rss_per_stream / 2**20,
        "held_mb": held_per_stream / 2**20,
        "index_mb": float(np.mean([s.index_bytes for s in stats])) / 2**20,
        "texts": int(np.mean([s.texts for s in stats])),
        "recall": found / max(total, 1),
        "restore_ms": restore_ms,
        "landing_s": landing_s,
        "loss_ms": loss_ms,
        "recover_all_s": recover_all_s,
        "ticks": len(live["insert"]),
        "mean_batch": mean_batch,
        "live_cores": live_cores,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| sessions | items (distinct vectors) per stream | embed a caption p50 / p99 (ms) "
        "| insert p50 / p99 (ms) "
        "| retrieval top-10 p50 / p99 (ms) | core search p50 / p99 (ms) "
        "| RAM per stream: RSS growth / held / FAISS (MB) | needle recall@5 "
        "| restore after replica loss, per session p50 / max (s) | all sessions back (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['n']} | {r['items']:,} ({r['texts']:,}) "
            f"| {pct(r['embed'], 50):.2f} / {pct(r['embed'], 99):.2f} "
            f"| {pct(r['insert'], 50):.2f} / {pct(r['insert'], 99):.2f} "
            f"| {pct(r['search'], 50):.2f} / {pct(r['search'], 99):.2f} "
            f"| {pct(r['core'], 50):.2f} / {pct(r['core'], 99):.2f} "
            f"| {r['rss_mb']:.1f} / {r['held_mb']:.1f} / {r['index_mb']:.1f} | {r['recall']:.3f} "
            f"| {pct(r['loss_ms'], 50) / 1e3:.2f} / {max(r['loss_ms']) / 1e3:.2f} "
            f"| {r['recover_all_s']:.2f} |"
        )
    return "\n".join(lines)


def make_embedder(kind: str) -> CachingEmbedder:
    inner: Embedder = MiniLMEmbedder() if kind == "minilm" else HashingEmbedder()
    embedder = CachingEmbedder(inner, max_entries=50_000)
    embedder.warm(workload_texts())
    return embedder


async def build_templates(url: str, config: MemoryConfig, args: argparse.Namespace) -> list[str]:
    """Build `--distinct` sessions through the tiers and snapshot them into Redis; returns their ids."""
    embedder = make_embedder(args.embedder)
    store = MemoryStore.from_config(url, config)
    began = time.perf_counter()
    streams = [synthetic_stream(args.seconds, seed=i) for i in range(args.distinct)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        built = list(
            pool.map(
                lambda i: build_session(f"bench-template-{i}", embedder, config, streams[i]),
                range(args.distinct),
            )
        )
    built_s = time.perf_counter() - began
    snapshot_ms, sizes = [], []
    for memory in built:
        began = time.perf_counter()
        state = await asyncio.to_thread(memory.export_state)
        data = await asyncio.to_thread(encode_snapshot, state)
        await store.write_snapshot(memory.session_id, state["last_id"], data)
        snapshot_ms.append((time.perf_counter() - began) * 1e3)
        sizes.append(len(data) / 2**20)
    await store.close()
    print(
        f"built {args.distinct} session(s) of {args.seconds:,} s in {built_s:.0f} s; snapshot "
        f"{np.mean(sizes):.1f} MB, encoded and written in {pct(snapshot_ms, 50):.0f} ms",
        flush=True,
    )
    return [memory.session_id for memory in built]


async def child_async(args: argparse.Namespace) -> dict:
    config = MemoryConfig(index=args.index, embed_workers=args.embed_workers)
    embedder = make_embedder(args.embedder)
    streams = [synthetic_stream(args.seconds, seed=i) for i in range(args.distinct)]
    templates = [(f"bench-template-{i}", stream) for i, stream in enumerate(streams)]
    return await run_n(args.child, args.redis_url, embedder, config, templates, args)


async def copy_templates(url: str, config: MemoryConfig, n: int, distinct: int) -> None:
    """Session j of N becomes a copy of built session j mod `distinct` (a snapshot names its session)."""
    store = MemoryStore.from_config(url, config)
    for j in range(n):
        data, _, _ = await store.load(f"bench-template-{j % distinct}")
        assert data is not None
        state = decode_snapshot(data)
        state["session_id"] = f"bench-{n}-{j}"
        await store.write_snapshot(state["session_id"], state["last_id"], encode_snapshot(state))
    await store.close()


def run_child(n: int, url: str, args: argparse.Namespace) -> dict:
    """One N in a fresh process, so that its RSS growth is its own."""
    command = [
        sys.executable,
        "-m",
        "bench.memory_bench",
        "--child",
        str(n),
        "--redis-url",
        url,
        "--seconds",
        str(args.seconds),
        "--live-seconds",
        str(args.live_seconds),
        "--distinct",
        str(args.distinct),
        "--core-queries",
        str(args.core_queries),
        "--index",
        args.index,
        "--embedder",
        args.embedder,
        "--embed-workers",
        str(args.embed_workers),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench child for {n} sessions failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


async def main_async(args: argparse.Namespace) -> None:
    config = MemoryConfig(index=args.index)
    with tempfile.TemporaryDirectory() as directory:
        server = EmbeddedRedis(directory)
        try:
            await build_templates(server.url, config, args)
            results = []
            for n in args.sessions:
                print(f"running {n} session(s), {args.live_seconds:.0f} s live …", flush=True)
                await copy_templates(server.url, config, n, args.distinct)
                results.append(await asyncio.to_thread(run_child, n, server.url, args))
                print(
                    f"  {n}: landed in {results[-1]['landing_s']:.1f} s, {results[-1]['ticks']} ticks, "
                    f"{results[-1]['mean_batch']:.1f} texts per embedding batch, "
                    f"{results[-1]['live_cores']:.2f} CPUs busy with memory while live, "
                    f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
                    flush=True,
                )
        finally:
            server.shutdown()
    print()
    print(
        f"index {args.index}, embedder {args.embedder}, {args.seconds:,} s per stream, "
        f"{args.live_seconds:.0f} s live at 1 tick/s per stream, {args.distinct} distinct streams"
    )
    print(table(results))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--seconds", type=int, default=43_200, help="stream length per session")
    parser.add_argument("--live-seconds", type=float, default=60.0)
    parser.add_argument("--distinct", type=int, default=4, help="sessions built through the tiers")
    parser.add_argument("--core-queries", type=int, default=200)
    parser.add_argument("--index", choices=["sq8", "fp16", "flat"], default="sq8")
    parser.add_argument("--embedder", choices=["minilm", "hashing"], default="minilm")
    parser.add_argument("--embed-workers", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 and 4 sessions of 1 hour, 5 s live")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child_async(args))))
        return
    if args.quick:
        args.sessions, args.seconds, args.live_seconds, args.distinct = [1, 4], 3600, 5.0, 2
    if args.live_seconds > 300 or max(args.sessions) > 200 or args.seconds > 43_200:
        raise SystemExit("bench: at most 300 s live, 200 sessions and 43,200 s per stream")
    args.distinct = min(args.distinct, max(args.sessions))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
