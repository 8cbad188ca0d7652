"""Where a model's files come from: a local checkpoint directory, or a Hugging Face Hub id (cached or not).

Shared by every role that loads weights (the interaction engines, the memory's summary model), so they find,
refuse and explain a missing model the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

_HUB_PROBE_TIMEOUT_S = 5.0


class ModelUnavailable(RuntimeError):
    """The model is neither a local checkpoint nor in the Hugging Face cache, and cannot be downloaded now."""


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(
        flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags
    )


def resolve_model(model: str) -> tuple[str, bool]:
    """Where to load `model` from, and whether offline: `(source, local_files_only)`.

    A local directory or a Hub id already in the cache loads offline. A Hub id that is not cached is tried
    only when the Hub answers within a few seconds, so a missing model fails fast instead of hanging.
    """
    from huggingface_hub import model_info, try_to_load_from_cache

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailable(
                f"{path} is a directory but holds no config.json, so it is not a checkpoint"
            )
        return str(path), True
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or path.exists():
        raise ModelUnavailable(f"there is no model directory at {path}")
    try:
        cached = try_to_load_from_cache(model, "config.json")
    except Exception as exc:  # an id the Hub would refuse, e.g. with spaces
        raise ModelUnavailable(
            f"{model!r} is neither a local directory nor a valid Hub model id ({exc})"
        ) from exc
    if isinstance(cached, str):
        return model, True
    if _hub_offline():
        raise ModelUnavailable(
            f"{model!r} is no local directory, not in the local Hugging Face cache, and the Hub is offline "
            "(HF_HUB_OFFLINE is set)"
        )
    try:
        model_info(model, timeout=_HUB_PROBE_TIMEOUT_S)
    except Exception as exc:
        raise ModelUnavailable(
            f"{model!r} is no local directory, not in the local Hugging Face cache, and the Hub could not be "
            f"reached ({exc})"
        ) from exc
    return model, False
