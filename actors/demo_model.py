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
