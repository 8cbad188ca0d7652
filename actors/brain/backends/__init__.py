"""The brain's backends; `load_backend` makes the one a config names."""

from __future__ import annotations

from actors.brain.backend import BrainBackend, DisabledBackend
from actors.brain.backends.engine import Decide, Health
from actors.common.config import BrainConfig


def load_backend(config: BrainConfig, decide: Decide | None = None, health: Health | None = None) -> BrainBackend:
    """The backend `config.backend` names; nothing is contacted yet. The `engine` backend needs `decide` (the
    interaction client of the brain's own interaction deployment) and uses `health` as its health check."""
    if config.backend == "openai":
        from actors.brain.backends.chat import ChatBackend
        from actors.brain.backends.http import read_api_key

        return ChatBackend(config.base_url, model=config.model, api_key=read_api_key(config.api_key_env),
                           timeout_s=config.timeout_s, max_tokens=config.max_tokens, max_frames=config.max_frames)
    if config.backend == "agent":
        from actors.brain.backends.agent import AgentBackend
        from actors.brain.backends.http import read_api_key

        return AgentBackend(config.base_url, api_key=read_api_key(config.api_key_env), timeout_s=config.timeout_s,
                            max_frames=config.max_frames)
    if config.backend == "engine":
        from actors.brain.backends.engine import EngineBackend

        if decide is None:
            raise ValueError("brain.backend 'engine' needs an interaction deployment for the brain to call")
        return EngineBackend(decide, health, timeout_s=config.timeout_s, max_frames=config.max_frames)
    return DisabledBackend()
