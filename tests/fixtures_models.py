"""Model fixtures: a tiny random Qwen2-VL (plumbing) and the trained demo model (behaviour), cached on disk.

Both live under `.cache/test-models` in the project and are built once: the random model in a fraction of a
second, the demo model in about a minute of CPU training; later runs reuse them. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TEST_MODELS = Path(__file__).resolve().parent.parent / ".cache" / "test-models"


@pytest.fixture(scope="session")
def tiny_random_model_dir() -> Path:
    """A tiny Qwen2-VL checkpoint with random weights, saved like a real one."""
    from actors.interaction.models.tiny_vlm import ensure_tiny_random_vlm

    return ensure_tiny_random_vlm(TEST_MODELS / "tiny-random")


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo model checkpoint (trained on first use, then cached; retrained when its recipe changes)."""
    from actors.interaction.models.demo import ensure_demo_model

    return ensure_demo_model(TEST_MODELS / "demo")


@pytest.fixture(scope="session")
def minilm():  # type: ignore[no-untyped-def]
    """all-MiniLM-L6-v2 from its package (offline), with an embedding cache; loaded once per test run."""
    from actors.memory.embedder import CachingEmbedder, MiniLMEmbedder

    return CachingEmbedder(MiniLMEmbedder())
