"""The demo model: a tiny Qwen2-VL trained on synthetic frames to speak when a red disc is in the current frame.

It answers `</response> I see a red disc.` when the newest frame of the prompt shows a red disc and `</silence>`
otherwise, whatever the standing instructions say. It lets Vigil run end to end with no download, and gives tests a
model whose right answer is known. `ensure_demo_model` trains it once (about a minute on two CPU cores) and caches it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from actors import decisions, prompt, tiny_vlm, vlm_inputs
from actors.decisions import RESPONSE, SILENCE
from actors.messages import Sample, TickRequest, Turn
from actors.prompt import build_prompt
from actors.tiny_vlm import IM_END, TinyVLM, TinyVLMSpec, build_tiny_vlm, save_tiny_vlm
from actors.vlm_inputs import PromptEncoder

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
_DISC_RADIUS = (0.1, 0.25)  # of the frame's shorter side
# Background pixels never have red this far above green and blue; the disc's red is far beyond it.
_MAX_RED_EXCESS = 50

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
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
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
    ys, xs = np.mgrid[0:height, 0:width]
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
    """A synthetic frame (uint8 RGB, height x width x 3): a random non-red background with non-red shapes, and a
    red disc at a random place and size when `disc` is true."""
    frame = _background(width, height, rng)
    for _ in range(int(rng.integers(0, 4))):
        _draw_shape(frame, rng)
    frame += rng.normal(0.0, rng.uniform(0.0, 12.0), size=frame.shape).astype(np.float32)
    frame[..., 0] = np.minimum(frame[..., 0], frame[..., 1:].max(axis=-1) + _MAX_RED_EXCESS)
    if disc:
        short = min(width, height)
        radius = rng.uniform(*_DISC_RADIUS) * short
        margin = radius * 0.6
        cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
        ys, xs = np.mgrid[0:height, 0:width]
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 < radius**2
        red = np.array([rng.uniform(200, 255), rng.uniform(0, 50), rng.uniform(0, 50)], dtype=np.float32)
        frame[mask] = red + rng.normal(0.0, 6.0, size=(int(mask.sum()), 3)).astype(np.float32)
    return np.clip(frame, 0, 255).astype(np.uint8)


def _random_text(rng: np.random.Generator) -> str:
    length = int(rng.integers(1, 40))
    return "".join(_RANDOM_CHARS[int(i)] for i in rng.integers(0, len(_RANDOM_CHARS), size=length)).strip() or "?"


def _user_text(rng: np.random.Generator) -> str:
    if rng.random() < 0.3:
        return _random_text(rng)
    return DEMO_INSTRUCTIONS[int(rng.integers(0, len(DEMO_INSTRUCTIONS)))]


def demo_answer(disc: bool) -> str:
    """What the demo model says about a frame, in the decision wire format."""
    return f"{RESPONSE} {DEMO_RESPONSE_TEXT}" if disc else SILENCE


def random_request(rng: np.random.Generator) -> tuple[TickRequest, bool]:
    """A synthetic tick with 1-3 frames in its window, and whether its current (last) frame shows the disc.

    Each frame shows the disc with probability 1/2, independently, so earlier frames say nothing about the newest.
    """
    count = int(rng.integers(1, 4))
    discs = [bool(flag) for flag in rng.random(count) < 0.5]
    width, height = int(rng.integers(48, 200)), int(rng.integers(48, 200))
    start = round(float(rng.uniform(0, 4000)), 1)
    times = [round(start + index * float(rng.choice([1.0, 1.0, 1.0, 0.5, 2.0])), 1) for index in range(count)]
    samples = tuple(
        Sample(stream_time=t, width=width, height=height, rgb=render_frame(width, height, disc, rng).tobytes())
        for t, disc in zip(times, discs, strict=True)
    )
    dialog: list[Turn] = []
    for t, disc in zip(times[:-1], discs[:-1], strict=True):
        # Now and then a past decision was wrong: the answer must come from the newest frame, not from history.
        said = disc if rng.random() > 0.1 else not disc
        dialog.append(Turn(role="assistant", text=demo_answer(said), stream_time=t))
    if rng.random() < 0.15:
        dialog.append(Turn(role="user", text=_user_text(rng), stream_time=times[int(rng.integers(0, count))]))
    instructions = tuple(_user_text(rng) for _ in range(int(rng.choice([0, 1, 1, 1, 2, 3]))))
    inbox = (_BACKGROUND_RESULTS[int(rng.integers(0, len(_BACKGROUND_RESULTS)))],) if rng.random() < 0.1 else ()
    request = TickRequest(
        session_id="demo",
        tick=int(times[-1]),
        stream_time=times[-1],
        samples=samples,
        instructions=instructions,
        dialog=tuple(dialog),
        inbox=inbox,
    )
    return request, discs[-1]


@dataclass(frozen=True, slots=True)
class DemoRecipe:
    """Everything that decides the demo model's weights; its hash names a finished checkpoint."""

    spec: TinyVLMSpec = TinyVLMSpec()
    seed: int = 1234
    eval_seed: int = 99
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_steps: int = 600
    eval_every: int = 50
    eval_frames: int = 100
    target_accuracy: float = 0.99

    def digest(self) -> str:
        """A hash of this recipe and of the code that turns it into weights, so a changed recipe retrains."""
        hasher = hashlib.sha256(json.dumps({**self.spec.as_dict(), **_scalars(self)}, sort_keys=True).encode())
        for module in (decisions, prompt, tiny_vlm, vlm_inputs, sys.modules[__name__]):
            hasher.update(inspect.getsource(module).encode())
        return hasher.hexdigest()[:16]


def _scalars(recipe: DemoRecipe) -> dict[str, float | int]:
    return {name: getattr(recipe, name) for name in recipe.__slots__ if name != "spec"}


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


def _encoder(vlm: TinyVLM) -> PromptEncoder:
    return PromptEncoder(vlm.tokenizer, vlm.image_processor, vlm.model.config.image_token_id)


def evaluate(vlm: TinyVLM, frames: int, seed: int) -> float:
    """Share of held-out ticks where the decision branch (silence or response) is right."""
    rng = np.random.default_rng(seed)
    silence, respond = completion_ids(vlm, False), completion_ids(vlm, True)
    shared = 0
    while silence[shared] == respond[shared]:
        shared += 1
    encoder = _encoder(vlm)
    correct = 0
    vlm.model.eval()
    with torch.no_grad():
        for start in range(0, frames, 25):
            cases = [random_request(rng) for _ in range(min(25, frames - start))]
            batch = encoder.encode(
                [build_prompt(request) for request, _ in cases], completions=[silence[:shared]] * len(cases)
            )
            tensors = {k: v for k, v in batch.tensors.items() if k != "labels"}
            logits = vlm.model(**tensors).logits
            # Right-padded: each row's next-token logits sit after its own last real token.
            last = tensors["attention_mask"].sum(-1) - 1
            rows = logits[torch.arange(len(cases)), last]
            says_respond = rows[:, respond[shared]] > rows[:, silence[shared]]
            for (_, disc), predicted in zip(cases, says_respond.tolist(), strict=True):
                correct += int(bool(predicted) == disc)
    return correct / frames


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
    encoder = _encoder(vlm)
    answers = {flag: completion_ids(vlm, flag) for flag in (False, True)}
    rng = np.random.default_rng(recipe.seed)
    optimizer = torch.optim.AdamW(
        vlm.model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay, betas=(0.9, 0.98)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / recipe.warmup_steps)
        * max(0.1, 1.0 - step / recipe.max_steps),
    )
    accuracy, loss_value, step = 0.0, float("nan"), 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        for step in range(1, recipe.max_steps + 1):
            vlm.model.train()
            cases = [random_request(rng) for _ in range(recipe.batch_size)]
            batch = encoder.encode(
                [build_prompt(request) for request, _ in cases], completions=[answers[disc] for _, disc in cases]
            )
            loss = vlm.model(**batch.tensors).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vlm.model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            loss_value = float(loss.detach())
            if progress is not None:
                progress(step, loss_value)
            if step % 10 == 0:
                logger.info("demo model step %d loss %.4f", step, loss_value)
            if step % recipe.eval_every == 0 or step == recipe.max_steps:
                accuracy = evaluate(vlm, recipe.eval_frames, recipe.eval_seed)
                logger.info("demo model step %d held-out accuracy %.2f", step, accuracy)
                if accuracy >= recipe.target_accuracy:
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
        "loss": loss_value,
    }
    return vlm, stats


def is_finished(directory: Path, recipe: DemoRecipe = DemoRecipe()) -> bool:
    """True when `directory` holds a demo checkpoint trained with this recipe."""
    try:
        marker = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("recipe") == recipe.digest()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # Several replicas on one host may start together: one trains, the others wait and reuse its result.
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_demo_model(
    directory: str | Path, progress: ProgressCallback | None = None, recipe: DemoRecipe = DemoRecipe()
) -> Path:
    """A directory holding the trained demo checkpoint, training it first unless one with this recipe is there.

    Training writes into a temporary sibling directory, writes the marker file last, then renames it into place,
    so an interrupted run never leaves a checkpoint that looks finished.
    """
    target = Path(directory).resolve()
    if is_finished(target, recipe):
        return target
    with _exclusive(target.parent / f".{target.name}.lock"):
        if is_finished(target, recipe):
            return target
        logger.info("training the demo model into %s (recipe %s)", target, recipe.digest())
        vlm, stats = train_demo_model(recipe, progress)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            save_tiny_vlm(vlm, staging)
            marker = {"recipe": recipe.digest(), "trigger": DEMO_TRIGGER, **stats}
            (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2))
            if target.exists():
                stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
                target.rename(stale / target.name)
                shutil.rmtree(stale, ignore_errors=True)
            staging.rename(target)
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
