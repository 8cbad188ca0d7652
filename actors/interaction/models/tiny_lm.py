"""A tiny text-only Qwen2 causal LM, built from a config with no download, for engines that serve text models.

It shares the tiny Qwen2-VL's byte-level tokenizer (Qwen2's pre-tokenizer, special tokens and chat template), so
the decision markers split as they do in real Qwen2 tokenizers: `</silence>` is `</`, `silence`, `>`. Its sizes
are the smallest that vLLM's CPU attention accepts: the kernels refuse a head size of 16, so 256 hidden units
are split over 4 heads of 64. `ensure_tiny_random_lm` keeps one on disk, rebuilt only when its recipe changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from actors.interaction.models import tiny_vlm
from actors.interaction.models.tiny_vlm import (
    ENDOFTEXT,
    IM_END,
    build_tokenizer,
    exclusive_lock,
    replace_directory,
    token_id,
)

logger = logging.getLogger(__name__)

TINY_LM_MARKER_FILE = "vigil-tiny-lm.json"


@dataclass(frozen=True, slots=True)
class TinyLMSpec:
    """Sizes of a tiny Qwen2. `hidden_size // num_heads` is the head size, which vLLM's CPU kernels need ≥ 32."""

    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 640
    max_position_embeddings: int = 4096

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class TinyLM:
    """A tiny Qwen2 causal LM and the tokenizer that belongs to it."""

    model: Qwen2ForCausalLM
    tokenizer: PreTrainedTokenizerFast


def build_lm_config(tokenizer: PreTrainedTokenizerFast, spec: TinyLMSpec = TinyLMSpec()) -> Qwen2Config:
    """A `Qwen2Config` of the given sizes whose special token ids match `tokenizer`."""
    if spec.hidden_size % spec.num_heads:
        raise ValueError(f"hidden_size {spec.hidden_size} does not split over {spec.num_heads} heads")
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        max_window_layers=spec.num_layers,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=token_id(tokenizer, ENDOFTEXT),
        eos_token_id=token_id(tokenizer, IM_END),
        pad_token_id=token_id(tokenizer, ENDOFTEXT),
        tie_word_embeddings=False,
    )


def build_tiny_lm(spec: TinyLMSpec = TinyLMSpec(), seed: int = 0) -> TinyLM:
    """A tiny Qwen2 with random weights drawn from `seed`."""
    tokenizer = build_tokenizer(vocab_size=spec.vocab_size)
    config = build_lm_config(tokenizer, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[token_id(tokenizer, IM_END), token_id(tokenizer, ENDOFTEXT)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.eval()
    return TinyLM(model=model, tokenizer=tokenizer)


def save_tiny_lm(lm: TinyLM, directory: str | Path) -> Path:
    """Write model and tokenizer with `save_pretrained`, so the directory loads like a checkpoint."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    logger.info("saved tiny Qwen2 (%d parameters) to %s", lm.model.num_parameters(), path)
    return path


def _code_hash() -> str:
    # The tokenizer is built by tiny_vlm, so a change there changes this model too.
    digest = hashlib.sha256()
    for source in (Path(__file__), Path(tiny_vlm.__file__)):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def ensure_tiny_random_lm(directory: str | Path, spec: TinyLMSpec = TinyLMSpec(), seed: int = 0) -> Path:
    """A saved tiny random Qwen2 at `directory`, built unless one of this spec, seed and code is there.

    It is written to a temporary sibling and renamed into place, so a half-written directory is never reused.
    """
    path = Path(directory).resolve()
    recipe = {"spec": spec.as_dict(), "seed": seed, "code": _code_hash()}
    marker = path / TINY_LM_MARKER_FILE
    with exclusive_lock(path.parent / f".{path.name}.lock"):
        if marker.is_file() and json.loads(marker.read_text()) == recipe:
            return path
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_tiny_lm(build_tiny_lm(spec, seed), staging)
            (staging / TINY_LM_MARKER_FILE).write_text(json.dumps(recipe))
            replace_directory(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


__all__ = ["TinyLM", "TinyLMSpec", "build_lm_config", "build_tiny_lm", "ensure_tiny_random_lm", "save_tiny_lm"]
