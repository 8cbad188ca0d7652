"""How many 1-decision-per-second streams one GPU holds with a 7-8B VLM, on the transformers or vLLM engine.

On the GPU machine (it needs torch, transformers, numpy, pillow and msgpack, and no download):

    PYTHONUNBUFFERED=1 python -m bench.gpu_streams

and on a CPU, the same code path with a tiny model of the same architecture:

    .venv/bin/python -m bench.gpu_streams --smoke

A Qwen2.5-VL-7B-Instruct of random weights is built from its config (bfloat16, on the GPU), saved with
safetensors and loaded by `TransformersEngine` (`--weights memory` hands the built model to the engine's
loader instead). Then, per frame size, N synthetic sessions tick once a second each (`bench.stream_load`),
batched as `@serve.batch` does, for a warm-up and a measured window, N rising until p99 is far beyond 500 ms.
Latency is from a tick's due time to its decision.

`--engine vllm` (where vLLM is installed on a GPU) runs the same sessions through `VLLMEngine`: each tick is
handed to it as it comes, as the interaction deployment does, and vLLM's scheduler batches them (the batch
columns then read "-"); `--vllm-args` adds engine arguments as JSON. vLLM's memory is its engine core's, so
"peak GiB" reads "-" too; `gpu_memory_utilization` (0.85 by default) is its share.

Results go to stdout (a table, then the streams held at p99 < 500 ms per frame size); progress goes to stderr.

A model of random weights decides at random, and what it decides sets how much each batch decodes: a silent
tick costs its share of the prefill, a response also writes up to `--max-new-tokens` tokens. So by default
`--speak-share 0.1` of the ticks, spread evenly, are made to speak through their `speak_threshold` (0), and the
rest to stay silent (2); `--speak-share model` leaves it to the model. "model ms" is the engine's own
`Decision.model_ms`. The whole run keeps to `--budget-s`, counted from the start of `main` (imports take some
seconds before that); points that do not fit are skipped and named.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

# isort: split

from actors.interaction.engines.qwen_vl_inputs import PromptEncoder
from actors.interaction.models.tiny_vlm import IMAGE_PAD, token_id
from actors.interaction.prompt import build_prompt
from bench.random_vlm import QWEN25_VL_7B, SMOKE_SIZES, start_engine, start_vllm_engine
from bench.stream_load import TARGET_P99_MS, LoadSettings, PointResult, frame_pool, parse_share, run_point

COLUMNS = ("frames", "N", "decided/s", "busy skips", "p50 ms", "p95 ms", "p99 ms", "silent", "mean batch",
           "batch ms p50", "model ms p50", "peak GiB")
SMOKE_DEFAULTS = {"device": "cpu", "dtype": "float32", "sessions": [2, 4], "seconds": 2.0, "warmup_s": 1.0,
                  "budget_s": 60.0}
GPU_DEFAULTS = {"device": "cuda", "dtype": "bfloat16", "sessions": [16, 32, 64, 128, 256, 384], "seconds": 5.0,
                "warmup_s": 2.0, "budget_s": 420.0}


class Budget:
    """Seconds left of the whole run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()

    def left(self) -> float:
        return self.seconds - self.spent()

    def spent(self) -> float:
        return time.monotonic() - self.started


def say(line: str) -> None:
    print(line, flush=True)


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def row(result: PointResult, batching: bool = True) -> str:
    mark = ">" if result.unfinished else ""  # undecided ticks make the tail a lower bound
    batches = result.batches if batching else []  # an engine that batches itself: its batches are unseen
    cells = [
        result.frames, str(result.sessions), f"{result.decided / result.seconds:.1f}", str(result.busy),
        f"{result.p(50):.0f}", f"{mark}{result.p(95):.0f}", f"{mark}{result.p(99):.0f}",
        f"{result.silent / max(1, result.decided):.2f}",
        f"{np.mean([batch.size for batch in batches]):.1f}" if batches else "-",
        f"{np.median([batch.ms for batch in batches]):.0f}" if batches else "-",
        f"{np.median([batch.model_ms for batch in batches]):.0f}" if batches else "-",
        f"{result.peak_gib:.1f}" if result.peak_gib is not None else "-",
    ]
    return "| " + " | ".join(cells) + " |"


async def describe_frames(engine: Any, directory: Path, size: tuple[int, int], settings: LoadSettings) -> None:
    """Print a tick's prompt size, and time one full batch cold and then warm (kernels, allocator)."""
    width, height = size
    frames = frame_pool(width, height)
    requests = [settings.request(index, 10, size, frames) for index in range(settings.max_batch)]
    tokenizer: Any = AutoTokenizer.from_pretrained(directory)
    processor = Qwen2VLImageProcessorPil.from_pretrained(directory)
    encoder = PromptEncoder(tokenizer, processor, token_id(tokenizer, IMAGE_PAD), with_token_types=False)
    started = time.perf_counter()
    encoder.encode([build_prompt(request) for request in requests])
    encode_ms = (time.perf_counter() - started) * 1000  # the engine does this on the CPU before any GPU work
    encoded = encoder.encode([build_prompt(requests[0])])
    image_tokens = int((encoded.tensors["input_ids"] == encoder.image_token_id).sum()) // settings.window
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        decisions = await engine.decide(requests)
        timings.append((time.perf_counter() - started) * 1000)
    silent = sum(decision.kind == "silent" for decision in decisions) / len(decisions)
    say(f"{width}x{height}: {image_tokens} image tokens a frame, {settings.window} frames a tick, "
        f"{encoded.prompt_length} prompt tokens; a batch of {settings.max_batch}: encoded in {encode_ms:.0f} ms, "
        f"decided in {timings[0]:.0f} ms cold, {timings[1]:.0f} ms warm, silent share {silent:.2f}")


def held_line(results: list[PointResult], stop: str) -> str:
    """The largest N held; `>=` when no larger N was tried, or it was not held for want of budget."""
    if not results:
        return f"not measured ({stop or 'no N given'})"
    held = [result.sessions for result in results if result.held]
    if not held:
        return "none of the N tried" + (f" ({stop})" if stop else "")
    best = max(held)
    if best == max(result.sessions for result in results):
        return f">= {best} (the largest N measured{'; ' + stop if stop else ''})"
    return str(best)


async def sweep(
    engine: Any, directory: Path, args: argparse.Namespace, settings: LoadSettings, budget: Budget
) -> dict[str, str]:
    """Every frame size's sweep within the budget; returns each size's "streams held" line."""
    point_s = settings.warmup_s + settings.seconds + settings.drain_s + 1.0  # the drain and close, at most
    names = [f"{width}x{height}" for width, height in args.frames]
    held = {name: "not measured (budget ran out)" for name in names}
    ready = []
    for name, size in zip(names, args.frames, strict=True):
        if budget.left() < point_s:
            say(f"budget: {budget.left():.0f} s left, {name} not measured")
            continue
        await describe_frames(engine, directory, size, settings)
        ready.append((name, size))
    say("")
    say("| " + " | ".join(COLUMNS) + " |")
    say("|" + "---|" * len(COLUMNS))
    for index, (name, size) in enumerate(ready):
        # Each frame size gets an even share of what is left, so the first cannot starve the last.
        share_ends = time.monotonic() + budget.left() / (len(ready) - index)
        results: list[PointResult] = []
        stop = ""
        for position, sessions in enumerate(args.sessions):
            if min(budget.left(), share_ends - time.monotonic()) < point_s:
                skipped = ", ".join(map(str, args.sessions[position:]))
                stop = f"budget: N = {skipped} skipped with {budget.left():.0f} s left"
                break
            progress(f"{name}: {sessions} sessions, {settings.warmup_s:g} s warm-up + {settings.seconds:g} s")
            result = await run_point(engine, settings, size, sessions)
            results.append(result)
            say(row(result, not getattr(engine, "batches_itself", False)))
            # Past this, a larger N only takes longer to say the same; a quarter of ticks skipped is as far.
            overloaded = result.p(99) > args.stop_p99_ms or result.busy > 0.25 * sessions * settings.seconds
            if overloaded and not args.sweep_all:
                stop = f"stopped after N = {sessions}: p99 {result.p(99):.0f} ms is far beyond {TARGET_P99_MS:.0f} ms"
                break
        if stop:
            progress(f"{name}: {stop}")
        held[name] = held_line(results, stop)
    return held


def hardware(device: str) -> str:
    software = f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
    if not device.startswith("cuda"):
        return f"CPU: {platform.machine()}, {torch.get_num_threads()} torch threads\n{software}"
    props = torch.cuda.get_device_properties(torch.device(device))
    return (f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}, "
            f"{props.multi_processor_count} SMs; CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}\n"
            f"{software}")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        width, _, height = item.strip().lower().partition("x")
        sizes.append((int(width), int(height)))
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny model of the same architecture, on the CPU")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                        help="vllm: where it is installed, on a GPU")
    parser.add_argument("--vllm-args", type=json.loads, default={}, help="vLLM engine arguments as a JSON object")
    parser.add_argument("--device", default=None, help="cuda (default), or cpu (--smoke)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--frames", type=parse_sizes, default=parse_sizes("256x192,448x448"), help="WxH,WxH")
    parser.add_argument("--sessions", type=lambda text: [int(n) for n in text.split(",")], default=None,
                        help="the N to sweep, e.g. 16,32,64")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per point")
    parser.add_argument("--warmup-s", type=float, default=None, help="unmeasured seconds before each point")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="as the interaction deployment's")
    parser.add_argument("--window", type=int, default=4, help="frames a tick carries (short_term_frames)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="the engine's default is 40")
    parser.add_argument("--speak-share", type=parse_share, default=0.1,
                        help="share of ticks made to speak, or 'model' to let the model decide")
    parser.add_argument("--weights", choices=["disk", "memory"], default="disk")
    parser.add_argument("--workdir", default=None, help="where the checkpoint is written (a temporary folder)")
    parser.add_argument("--budget-s", type=float, default=None, help="for the whole run: 420 (60 with --smoke)")
    parser.add_argument("--stop-p99-ms", type=float, default=2000.0, help="a sweep stops past this p99")
    parser.add_argument("--sweep-all", action="store_true", help="measure every N, however far past the target")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (2 on a CPU device)")
    args = parser.parse_args(argv)
    for name, value in (SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.engine == "vllm":
        if args.smoke or not args.device.startswith("cuda"):
            parser.error("--engine vllm runs on a GPU only: vLLM has no vision-language models on this CPU build")
        if importlib.util.find_spec("vllm") is None:
            parser.error("--engine vllm needs vLLM installed (pip install 'vigil[vllm]')")
        if not isinstance(args.vllm_args, dict):
            parser.error("--vllm-args is a JSON object")
    if args.max_batch < 1 or args.window < 1 or args.seconds <= 0 or not args.sessions or min(args.sessions) < 1:
        parser.error("--max-batch, --window, --seconds and every N of --sessions must be positive")
    return args


async def main_async(args: argparse.Namespace, budget: Budget) -> None:
    sizes = SMOKE_SIZES if args.smoke else QWEN25_VL_7B
    settings = LoadSettings(warmup_s=args.warmup_s, seconds=args.seconds, max_batch=args.max_batch,
                            batch_wait_s=args.batch_wait_ms / 1000, window=args.window,
                            speak_share=args.speak_share)
    say(hardware(args.device))
    say(f"model: {sizes.name} architecture, random weights, {args.dtype} on {args.device}, {args.engine} "
        f"engine; max batch "
        f"{args.max_batch}, batch wait {args.batch_wait_ms:g} ms, {args.window} frames a tick, speaking: "
        f"{'as the model decides' if args.speak_share is None else f'{args.speak_share:g} of ticks'}, at most "
        f"{args.max_new_tokens} new tokens; budget {args.budget_s:g} s")
    directory = Path(tempfile.mkdtemp(prefix="vigil-gpu-streams-", dir=args.workdir))
    engine = None
    try:
        if args.engine == "vllm":
            engine_args = {"gpu_memory_utilization": 0.85, "max_num_seqs": min(512, max(args.sessions)),
                           "max_model_len": 8192, **args.vllm_args}
            say(f"vLLM engine arguments: {json.dumps(engine_args, sort_keys=True)}")
            engine = await start_vllm_engine(sizes, directory, args.dtype, args.max_new_tokens, engine_args,
                                             args.window, say)
        else:
            engine = await start_engine(sizes, directory, args.device, args.dtype, args.max_new_tokens,
                                        args.weights, say)
        held = await sweep(engine, directory, args, settings, budget)
    finally:
        if engine is not None:
            engine.close()
        shutil.rmtree(directory, ignore_errors=True)
    say("")
    say(f"streams held at p99 < {TARGET_P99_MS:.0f} ms, every due tick decided:")
    for name, line in held.items():
        say(f"  {name}: {line}")
    say(f"total {budget.spent():.0f} s of a {args.budget_s:g} s budget")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    transformers.utils.logging.disable_progress_bar()  # per-shard bars would bury the results
    if args.threads or not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads or 2)  # the CPU is shared; two threads keep a smoke run polite
    elif not torch.cuda.is_available():
        raise SystemExit("bench: no CUDA device here; use --smoke (or --device cpu) on a CPU machine")
    asyncio.run(main_async(args, budget))


if __name__ == "__main__":
    main()
