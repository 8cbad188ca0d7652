"""The engines behind the interaction role; `load_engine` picks the one a config names."""

from __future__ import annotations

from actors.common.config import VigilConfig
from actors.interaction.engine import Engine


def load_engine(config: VigilConfig) -> Engine:
    """The engine `config.engine` names, not yet started (`await engine.start()` loads it)."""
    if config.engine == "openai":
        from actors.interaction.engines.openai import OpenAIEngine

        return OpenAIEngine.from_config(config)
    from actors.interaction.engines.transformers import load_engine as load_transformers

    return load_transformers(config)
