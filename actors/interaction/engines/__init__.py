"""The engines behind the interaction role; `load_engine` picks the one a config names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from actors.interaction.engine import Engine

if TYPE_CHECKING:  # the engines import without pydantic (the GPU benchmark machine has none)
    from actors.common.config import VigilConfig


def load_engine(config: VigilConfig) -> Engine:
    """The engine `config.engine` names, not yet started (`await engine.start()` loads it)."""
    if config.engine == "vllm":
        from actors.interaction.engines.vllm import VLLMEngine

        return VLLMEngine.from_config(config)
    if config.engine == "openai":
        from actors.interaction.engines.openai import OpenAIEngine

        return OpenAIEngine.from_config(config)
    from actors.interaction.engines.transformers import load_engine as load_transformers

    return load_transformers(config)
