"""The demo model's frames and cache: frames show red only in the disc, a finished checkpoint is reused as is,
and a checkpoint of another recipe (or a half-written one) is replaced by a fresh training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from actors.interaction.models import demo as demo_model
from actors.interaction.models.demo import MARKER_FILE, DemoRecipe, ensure_demo_model, is_finished, render_frame
from actors.interaction.models.tiny_vlm import TinyVLM, build_tiny_vlm

pytestmark = pytest.mark.unit


def red_excess(frame: np.ndarray) -> np.ndarray:
    pixels = frame.astype(np.int16)
    return pixels[..., 0] - pixels[..., 1:].max(axis=-1)


@pytest.mark.parametrize("size", [(56, 56), (448, 252), (120, 300)])
def test_frames_show_strong_red_only_in_the_disc(size: tuple[int, int]) -> None:
    width, height = size
    rng = np.random.default_rng(5)
    for _ in range(10):
        plain = render_frame(width, height, False, rng)
        assert plain.shape == (height, width, 3) and plain.dtype == np.uint8
        assert red_excess(plain).max() <= 60
        with_disc = render_frame(width, height, True, rng)
        # At least most of a disc whose radius is 15% of the short side, in strong red.
        smallest_disc = np.pi * (0.15 * min(width, height)) ** 2
        assert (red_excess(with_disc) > 120).sum() > 0.6 * smallest_disc


def fake_training(calls: list[DemoRecipe]):  # type: ignore[no-untyped-def]
    def train(recipe: DemoRecipe, progress: object = None) -> tuple[TinyVLM, dict[str, float | int]]:
        calls.append(recipe)
        return build_tiny_vlm(recipe.spec), {"steps": 1, "seconds": 0.0, "accuracy": 1.0, "loss": 0.0}

    return train


def test_a_finished_checkpoint_is_reused_and_another_recipe_retrains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[DemoRecipe] = []
    monkeypatch.setattr(demo_model, "train_demo_model", fake_training(calls))
    target = tmp_path / "demo"
    first = DemoRecipe()
    assert ensure_demo_model(target, recipe=first) == target.resolve()
    assert ensure_demo_model(target, recipe=first) == target.resolve()
    assert len(calls) == 1 and is_finished(target, first)
    assert json.loads((target / MARKER_FILE).read_text())["recipe"] == first.digest()

    changed = DemoRecipe(steps=first.steps + 1)
    assert changed.digest() != first.digest() and not is_finished(target, changed)
    ensure_demo_model(target, recipe=changed)
    assert len(calls) == 2 and is_finished(target, changed)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".demo.") and p.is_dir()] == []


def test_a_checkpoint_without_its_marker_is_trained_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[DemoRecipe] = []
    monkeypatch.setattr(demo_model, "train_demo_model", fake_training(calls))
    target = tmp_path / "demo"
    target.mkdir()
    (target / "config.json").write_text("{}")  # an interrupted copy, say
    ensure_demo_model(target)
    assert len(calls) == 1 and is_finished(target, DemoRecipe())
    assert (target / "model.safetensors").is_file()
