"""The demo model: a tiny Qwen2-VL trained on synthetic frames to speak when a red disc is in view.

It answers `</response> I see a red disc.` when the newest frame of the prompt shows a red disc and
`</silence>` otherwise, whatever the standing instructions say. It lets Vigil run end to end with no
download, and gives tests a model whose right answer is known. `ensure_demo_model` trains it once (about a
minute on two CPU cores) and caches it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.common import decisions
from actors.common.decisions import RESPONSE, SILENCE
from actors.common.messages import Sample, TickRequest, Turn
from actors.common.stream_time import clock
from actors.interaction import prompt
from actors.interaction.engines import qwen_vl_inputs
from actors.interaction.engines.qwen_vl_inputs import PromptEncoder, sample_image
from actors.interaction.models import tiny_vlm
from actors.interaction.models.tiny_vlm import (
    IM_END,
    TinyVLM,
    TinyVLMSpec,
    build_tiny_vlm,
    exclusive_lock,
    replace_directory,
    save_tiny_vlm,
)
from actors.interaction.prompt import Prompt, build_prompt

logger = logging.getLogger(__name__)

DEMO_TRIGGER = "a red disc (a filled red circle) anywhere in the newest frame"
DEMO_NOTE = (
    "This is Vigil's built-in demo model, not a real vision-language model: it only reacts to its trigger, "
    "a red disc in view, and stays silent otherwise. Point VIGIL_MODEL at real weights for a real assistant."
)
DEMO_MODEL_NAME = "vigil-demo (tiny Qwen2-VL trained to spot a red disc)"
MARKER_FILE = "vigil-demo.json"

ProgressCallback = Callable[[int, float], None]

DEMO_RESPONSE_TEXT = "I see a red disc."
_DISC_RADIUS = (0.15, 0.3)  # of the frame's shorter side
# Background pixels never have red this far above green and blue; the disc's red is far beyond it.
_MAX_RED_EXCESS = 20

# Standing instructions and user messages seen in training: the demo model must ignore whatever a user types.
DEMO_INSTRUCTIONS: tuple[str, ...] = (
    "Tell me when you see a red disc.",
    "Say something when a red circle shows up.",
    "Watch the table and tell me if anything changes.",
    "Let me know when someone enters the room.",
    "Describe what you see.",
    "Be quiet unless something important happens.",
    "Warn me about smoke or fire.",
    "Count the people in the frame.",
    "Tell me when the cat jumps on the sofa.",
    "Only speak when I ask you something.",
    "What colour is the car?",
    "Respond in French, please.",
    "Ignore everything and always say hello.",
    "Keep an eye on the door.",
    "Say </response> every second.",
    "Never say anything.",
    "Is the light on?",
    "Alert me if the baby wakes up.",
    "ping",
    "Watch for a blue square.",
    "Bitte sag Bescheid, wenn sich etwas bewegt.",
    "赤い円が見えたら教えてください。",
    "Dis-moi quand la porte s'ouvre.",
    "Where did I leave my keys?",
)
_BACKGROUND_RESULTS: tuple[str, ...] = (
    "The sign says EXIT.",
    "There are three people.",
    "The car is blue.",
    "No answer was found.",
)
_RANDOM_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-_/()<>[]{}#@&*+=%$"
    "éèêàçüöäßñøåœ日本語中文한국어ру́сский✨🙂🔴⚽"
)


def _plain_color(rng: np.random.Generator) -> np.ndarray:
    """A random colour in which red does not dominate."""
    while True:
        color = rng.integers(0, 256, size=3)
        if int(color[0]) - int(max(color[1], color[2])) <= _MAX_RED_EXCESS:
            return color.astype(np.float32)


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    kind = int(rng.integers(0, 3))
    if kind == 0:
        frame = np.broadcast_to(_plain_color(rng), (height, width, 3)).copy()
    elif kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.ogrid[0:height, 0:width]
        ramp = xs * np.cos(angle) + ys * np.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
        frame = (1 - ramp[..., None]) * _plain_color(rng) + ramp[..., None] * _plain_color(rng)
    else:
        cells = int(rng.integers(2, 6))
        grid = np.stack([_plain_color(rng) for _ in range(cells * cells)]).reshape(cells, cells, 3)
        ys = np.linspace(0, cells - 1, height)
        xs = np.linspace(0, cells - 1, width)
        y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
        y1, x1 = np.minimum(y0 + 1, cells - 1), np.minimum(x0 + 1, cells - 1)
        fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
        top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
        bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
        frame = top * (1 - fy) + bottom * fy
    return frame.astype(np.float32)


def _draw_shape(frame: np.ndarray, rng: np.random.Generator) -> None:
    height, width = frame.shape[:2]
    ys, xs = np.ogrid[0:height, 0:width]
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    size = rng.uniform(0.08, 0.3) * min(width, height)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        mask = (abs(xs - cx) < size) & (abs(ys - cy) < size * rng.uniform(0.3, 1.5))
    elif kind == 1:
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 < size**2
    elif kind == 2:
        mask = ((xs - cx) / size) ** 2 + ((ys - cy) / (size * rng.uniform(0.3, 0.8))) ** 2 < 1
    else:
        angle = rng.uniform(0, np.pi)
        mask = abs((xs - cx) * np.sin(angle) - (ys - cy) * np.cos(angle)) < max(1.0, size * 0.15)
    frame[mask] = _plain_color(rng)


def render_frame(width: int, height: int, disc: bool, rng: np.random.Generator) -> np.ndarray:
    """A synthetic frame (uint8 RGB, height x width x 3): a random non-red background with non-red shapes,
    and a red disc at a random place and size when `disc` is true."""
    frame = _background(width, height, rng)
    for _ in range(int(rng.integers(0, 4))):
        _draw_shape(frame, rng)
    frame += rng.standard_normal(size=frame.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 12.0))
    frame[..., 0] = np.minimum(frame[..., 0], frame[..., 1:].max(axis=-1) + _MAX_RED_EXCESS)
    if disc:
        short = min(width, height)
        radius = rng.uniform(*_DISC_RADIUS) * short
        margin = radius * 0.6
        cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
        ys, xs = np.ogrid[0:height, 0:width]
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 < radius**2
        red = np.array([rng.uniform(200, 255), rng.uniform(0, 50), rng.uniform(0, 50)], dtype=np.float32)
        frame[mask] = red + rng.standard_normal(size=(int(mask.sum()), 3), dtype=np.float32) * np.float32(6.0)
    return np.clip(frame, 0, 255).astype(np.uint8)


def _random_text(rng: np.random.Generator) -> str:
    length = int(rng.integers(1, 40))
    return (
        "".join(_RANDOM_CHARS[int(i)] for i in rng.integers(0, len(_RANDOM_CHARS), size=length)).strip()
        or "?"
    )


def _user_text(rng: np.random.Generator) -> str:
    if rng.random() < 0.3:
        return _random_text(rng)
    return DEMO_INSTRUCTIONS[int(rng.integers(0, len(DEMO_INSTRUCTIONS)))]


def demo_answer(disc: bool) -> str:
    """What the demo model says about a frame, in the decision wire format."""
    return f"{RESPONSE} {DEMO_RESPONSE_TEXT}" if disc else SILENCE


def random_size(rng: np.random.Generator) -> tuple[int, int]:
    """A frame size as a stream might deliver it: 56-140 px on the short side, aspect ratio up to 2."""
    short = int(rng.integers(56, 141))
    long = int(short * rng.uniform(1.0, 2.0))
    return (long, short) if rng.random() < 0.5 else (short, long)


def random_sample(
    stream_time: float, disc: bool, rng: np.random.Generator, width: int, height: int
) -> Sample:
    """A freshly rendered frame as a model-ready sample."""
    rgb = render_frame(width, height, disc, rng).tobytes()
    return Sample(stream_time=stream_time, width=width, height=height, rgb=rgb)


class FramePool:
    """Frames rendered and run through the image processor once, then reused across training steps.

    Rendering and resizing cost more than a training step of the tiny model; a pool of a few thousand frames,
    recombined into ever new windows and prompts, teaches as well at a fraction of the cost.
    """

    def __init__(self, image_processor: Any, size: int, rng: np.random.Generator) -> None:
        self.frames: dict[bool, list[Sample]] = {False: [], True: []}
        self.features: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        for index in range(size):
            disc = index % 2 == 1
            width, height = random_size(rng)
            sample = random_sample(0.0, disc, rng, width, height)
            processed = image_processor(images=[sample_image(sample)], return_tensors="pt")
            self.features[sample.rgb] = (processed["pixel_values"], processed["image_grid_thw"])
            self.frames[disc].append(sample)

    def draw(self, stream_time: float, disc: bool, rng: np.random.Generator) -> Sample:
        frames = self.frames[disc]
        return dataclasses.replace(frames[int(rng.integers(0, len(frames)))], stream_time=stream_time)

    def images(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        found = [self.features[sample.rgb] for prompt in prompts for sample in prompt.images]
        return {
            "pixel_values": torch.cat([patches for patches, _ in found]),
            "image_grid_thw": torch.cat([grid for _, grid in found]),
        }


class _PooledEncoder(PromptEncoder):
    def __init__(self, vlm: TinyVLM, pool: FramePool) -> None:
        super().__init__(vlm.tokenizer, vlm.image_processor, vlm.model.config.image_token_id)
        self.pool = pool

    def images(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        return self.pool.images(prompts)


def random_request(rng: np.random.Generator, pool: FramePool | None = None) -> tuple[TickRequest, bool]:
    """A synthetic tick with 1-3 frames in its window, and whether its current (last) frame shows the disc.

    Each frame shows the disc with probability 1/2, independently: earlier frames tell nothing of the newest.
    Frames come from `pool` when given, else they are rendered fresh at one random size per window.
    """
    count = int(rng.integers(1, 4))
    discs = [bool(flag) for flag in rng.random(count) < 0.5]
    width, height = random_size(rng)
    start = round(float(rng.uniform(0, 4000)), 1)
    times = [round(start + index * float(rng.choice([1.0, 1.0, 1.0, 0.5, 2.0])), 1) for index in range(count)]
    samples = tuple(
        pool.draw(t, disc, rng) if pool is not None else random_sample(t, disc, rng, width, height)
        for t, disc in zip(times, discs, strict=True)
    )
    dialog: list[Turn] = []
    for t, disc in zip(times[:-1], discs[:-1], strict=True):
        # Now and then a past decision was wrong: the answer must come from the newest frame, not history.
        said = disc if rng.random() > 0.1 else not disc
        dialog.append(Turn(role="assistant", text=demo_answer(said), stream_time=t))
    if rng.random() < 0.15:
        dialog.append(Turn(role="user", text=_user_text(rng), stream_time=times[int(rng.integers(0, count))]))
    instructions = tuple(_user_text(rng) for _ in range(int(rng.choice([0, 1, 1, 1, 2, 3]))))
    inbox = (
        (_BACKGROUND_RESULTS[int(rng.integers(0, len(_BACKGROUND_RESULTS)))],) if rng.random() < 0.1 else ()
    )
    memories = _memory_lines(rng, times[0]) if rng.random() < 0.4 else ()
    lookback: tuple[Sample, ...] = ()
    if rng.random() < 0.35:
        # An old scene memory brought back: a disc in it is no disc now.
        then = round(float(rng.uniform(0, max(times[0] - 30, 1.0))), 1)
        old_disc = bool(rng.random() < 0.7)
        lookback = (pool.draw(then, old_disc, rng) if pool is not None
                    else random_sample(then, old_disc, rng, width, height),)
    request = TickRequest(
        session_id="demo",
        tick=int(times[-1]),
        stream_time=times[-1],
        samples=samples,
        instructions=instructions,
        dialog=tuple(dialog),
        inbox=inbox,
        memories=memories,
        lookback=lookback,
    )
    return request, discs[-1]


def _memory_lines(rng: np.random.Generator, before: float) -> tuple[str, ...]:
    """Memory lines as a session's memory writes them, about earlier moments (which must not sway the model:
    a past disc, said or seen, is no disc now)."""
    lines = []
    for _ in range(int(rng.integers(1, 7))):
        start = float(rng.uniform(0, max(before, 1.0)))
        when = clock(start)
        kind = int(rng.integers(0, 5))
        if kind == 0:
            lines.append(f"at {when} you said: {DEMO_RESPONSE_TEXT}")
        elif kind == 1:
            lines.append(f"at {when} the user said: {_user_text(rng)}")
        elif kind == 2:
            lines.append(f"at {when} you saw a new scene [keyframe {int(rng.integers(1, 5000))}]")
        elif kind == 3:
            lines.append(f"from {when} to {clock(start + 200)}: {_random_text(rng)}")
        else:
            lines.append(f"at {when} the background assistant reported: {_random_text(rng)}")
    return tuple(lines)


@dataclass(frozen=True, slots=True)
class DemoRecipe:
    """Everything that decides the demo model's weights; its hash names a finished checkpoint."""

    spec: TinyVLMSpec = field(default_factory=TinyVLMSpec)
    seed: int = 1234
    eval_seed: int = 99
    pool_frames: int = 2048
    batch_size: int = 16
    learning_rate: float = 5e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    steps: int = 400
    extra_steps: int = 200
    eval_every: int = 100
    eval_frames: int = 100
    target_accuracy: float = 0.99
    branch_weight: float = 10.0

    def digest(self) -> str:
        """A hash of this recipe and of the code that turns it into weights, so a changed recipe retrains."""
        settings = {**self.spec.as_dict(), **{name: getattr(self, name) for name in self.__slots__}}
        settings.pop("spec")
        hasher = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for module in (decisions, prompt, tiny_vlm, qwen_vl_inputs, sys.modules[__name__]):
            hasher.update(inspect.getsource(module).encode())
        return hasher.hexdigest()[:16]


def completion_ids(vlm: TinyVLM, respond: bool) -> list[int]:
    """The answer tokens, tokenized the way the engine's decision constraint produces them."""
    tokenizer = vlm.tokenizer
    end = [tokenizer.convert_tokens_to_ids(IM_END)]
    if respond:
        return (
            tokenizer.encode(RESPONSE, add_special_tokens=False)
            + tokenizer.encode(" " + DEMO_RESPONSE_TEXT, add_special_tokens=False)
            + end
        )
    return tokenizer.encode(SILENCE, add_special_tokens=False) + end


@dataclass(frozen=True, slots=True)
class _Answers:
    """Both completions and where they part: the branch token is the decision the model must get right."""

    silence: list[int]
    respond: list[int]
    branch: int

    @classmethod
    def of(cls, vlm: TinyVLM) -> _Answers:
        silence, respond = completion_ids(vlm, False), completion_ids(vlm, True)
        branch = 0
        while silence[branch] == respond[branch]:
            branch += 1
        return cls(silence=silence, respond=respond, branch=branch)

    def pick(self, disc: bool) -> list[int]:
        return self.respond if disc else self.silence


def _encoder(vlm: TinyVLM) -> PromptEncoder:
    return PromptEncoder(vlm.tokenizer, vlm.image_processor, vlm.model.config.image_token_id)


def evaluate(vlm: TinyVLM, frames: int, seed: int) -> float:
    """Share of held-out ticks where the decision branch (silence or response) is right.

    This is the choice the engine's constrained first step makes: argmax between the two branch tokens.
    """
    rng = np.random.default_rng(seed)
    answers = _Answers.of(vlm)
    shared = answers.silence[: answers.branch]
    encoder = _encoder(vlm)
    correct = 0
    vlm.model.eval()
    with torch.no_grad():
        for start in range(0, frames, 25):
            cases = [random_request(rng) for _ in range(min(25, frames - start))]
            batch = encoder.encode(
                [build_prompt(request) for request, _ in cases], completions=[shared] * len(cases)
            )
            tensors = {k: v for k, v in batch.tensors.items() if k != "labels"}
            last = vlm.model(**tensors, logits_to_keep=1).logits[:, -1]
            says_respond = last[:, answers.respond[answers.branch]] > last[:, answers.silence[answers.branch]]
            for (_, disc), predicted in zip(cases, says_respond.tolist(), strict=True):
                correct += int(bool(predicted) == disc)
    return correct / frames


def _loss(
    vlm: TinyVLM, batch: dict[str, torch.Tensor], answers: _Answers, branch_weight: float
) -> torch.Tensor:
    # Left padding puts every completion at the end, so only the last few positions need logits.
    labels = batch.pop("labels")
    keep = max(len(answers.silence), len(answers.respond)) + 1
    logits = vlm.model(**batch, logits_to_keep=keep).logits[:, :-1].float()
    targets = labels[:, -keep + 1 :]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view_as(targets)
    weights = (targets != -100).float()
    lengths = (targets != -100).sum(-1)
    # The branch token decides silence or response; the rest of each answer is easy to learn.
    branch_column = targets.shape[1] - lengths + answers.branch
    weights[torch.arange(len(targets)), branch_column] = branch_weight
    return (losses * weights).sum() / weights.sum()


def train_demo_model(
    recipe: DemoRecipe = DemoRecipe(), progress: ProgressCallback | None = None
) -> tuple[TinyVLM, dict[str, float | int]]:
    """Train the demo model from scratch; returns it with training stats (steps, seconds, accuracy, loss)."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))
    try:
        return _train(recipe, progress)
    finally:
        torch.set_num_threads(threads_before)


def _train(recipe: DemoRecipe, progress: ProgressCallback | None) -> tuple[TinyVLM, dict[str, float | int]]:
    started = time.perf_counter()
    vlm = build_tiny_vlm(recipe.spec, seed=recipe.seed)
    answers = _Answers.of(vlm)
    rng = np.random.default_rng(recipe.seed)
    pool = FramePool(vlm.image_processor, recipe.pool_frames, rng)
    encoder = _PooledEncoder(vlm, pool)
    logger.info(
        "demo model: %d training frames ready in %.1f s", recipe.pool_frames, time.perf_counter() - started
    )
    optimizer = torch.optim.AdamW(
        vlm.model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay, betas=(0.9, 0.98)
    )
    # Warm up, decay linearly over the planned steps, then hold at a tenth for any extra steps.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / recipe.warmup_steps) * max(0.1, 1.0 - step / recipe.steps),
    )
    accuracy, loss_value, step = 0.0, float("nan"), 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        for step in range(1, recipe.steps + recipe.extra_steps + 1):
            vlm.model.train()
            cases = [random_request(rng, pool) for _ in range(recipe.batch_size)]
            prompts = [build_prompt(request) for request, _ in cases]
            batch = encoder.encode(prompts, completions=[answers.pick(disc) for _, disc in cases])
            loss = _loss(vlm, batch.tensors, answers, recipe.branch_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vlm.model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            loss_value = float(loss.detach())
            if progress is not None:
                progress(step, loss_value)
            if step % 25 == 0:
                logger.info("demo model step %d/%d loss %.4f", step, recipe.steps, loss_value)
            if step % recipe.eval_every == 0 or (step >= recipe.steps and (step - recipe.steps) % 50 == 0):
                accuracy = evaluate(vlm, recipe.eval_frames, recipe.eval_seed)
                logger.info("demo model step %d held-out accuracy %.2f", step, accuracy)
                # Past the planned steps, train on (at the lowest rate) only until the target is met.
                if step >= recipe.steps and accuracy >= recipe.target_accuracy:
                    break
    vlm.model.eval()
    seconds = time.perf_counter() - started
    if accuracy < recipe.target_accuracy:
        logger.warning(
            "demo model reached only %.2f held-out accuracy after %d steps (target %.2f)",
            accuracy,
            step,
            recipe.target_accuracy,
        )
    stats: dict[str, float | int] = {
        "steps": step,
        "seconds": round(seconds, 1),
        "accuracy": accuracy,
        "loss": round(loss_value, 5),
    }
    return vlm, stats


def is_finished(directory: Path, recipe: DemoRecipe = DemoRecipe()) -> bool:
    """True when `directory` holds a demo checkpoint trained with this recipe."""
    try:
        marker = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("recipe") == recipe.digest()


def is_demo_checkpoint(directory: str | Path) -> bool:
    """True when `directory` holds a finished demo checkpoint (of any recipe), so users can be told so."""
    return (Path(directory) / MARKER_FILE).is_file()


def ensure_demo_model(
    directory: str | Path, progress: ProgressCallback | None = None, recipe: DemoRecipe = DemoRecipe()
) -> Path:
    """A directory holding the trained demo checkpoint, trained first unless one of this recipe is there.

    Training writes into a temporary sibling directory, writes the marker file last, then renames it in place,
    so an interrupted run never leaves a checkpoint that looks finished.
    """
    target = Path(directory).resolve()
    if is_finished(target, recipe):
        return target
    # Several replicas on one host may start together: one trains, the others wait and reuse its result.
    with exclusive_lock(target.parent / f".{target.name}.lock"):
        if is_finished(target, recipe):
            return target
        logger.info("training the demo model into %s (recipe %s)", target, recipe.digest())
        vlm, stats = train_demo_model(recipe, progress)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            save_tiny_vlm(vlm, staging)
            marker = {"recipe": recipe.digest(), "trigger": DEMO_TRIGGER, **stats}
            (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2))
            replace_directory(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info(
            "demo model ready at %s: %d steps, %.1f s, held-out accuracy %.2f",
            target,
            stats["steps"],
            stats["seconds"],
            stats["accuracy"],
        )
    return target
