"""Model fixtures: a tiny random Qwen2-VL (plumbing) and the trained demo model (behaviour), cached on disk.

Both live under `.cache/test-models` in the project and are built once: the random model in a fraction of a
second, the demo model in about two minutes of CPU training, started in the background as the run starts
(tests/demo_training.py); later runs reuse them. Nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.demo_training import BackgroundTraining

TEST_MODELS = Path(__file__).resolve().parent.parent / ".cache" / "test-models"
DEMO_MODEL = TEST_MODELS / "demo"
DEMO_TRAINING = BackgroundTraining()  # started by conftest.py when a collected test needs the demo model


@pytest.fixture(scope="session")
def tiny_random_model_dir() -> Path:
    """A tiny Qwen2-VL checkpoint with random weights, saved like a real one."""
    from actors.interaction.models.tiny_vlm import ensure_tiny_random_vlm

    return ensure_tiny_random_vlm(TEST_MODELS / "tiny-random")


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo model checkpoint (trained on first use, then cached; retrained when its recipe changes)."""
    from actors.interaction.models.demo import ensure_demo_model

    if DEMO_TRAINING.running():
        print(f"\nwaiting for the demo model's training in the background (log: {DEMO_TRAINING.log_path})",
              file=sys.stderr)
    return ensure_demo_model(DEMO_MODEL)


@pytest.fixture(scope="session")
def minilm():  # type: ignore[no-untyped-def]
    """all-MiniLM-L6-v2 from its package (offline), with an embedding cache; loaded once per test run."""
    from actors.memory.embedder import CachingEmbedder, MiniLMEmbedder

    return CachingEmbedder(MiniLMEmbedder())
