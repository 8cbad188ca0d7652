"""Tiny models of the real Qwen2-VL architecture, built from a config with no download.

A byte-level BPE tokenizer trained on a small built-in corpus (so it encodes any text) carries the Qwen2-VL
special tokens and chat template; the model is a `Qwen2VLForConditionalGeneration` of a few hundred thousand
parameters; the image processor is the PIL one with a small pixel budget. `save_tiny_vlm` writes all three
with `save_pretrained`, so the directory loads like a real checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from actors.common.decisions import DELEGATION, RESPONSE, SILENCE
from actors.interaction.engines.qwen_vl_inputs import QWEN2_VL_CHAT_TEMPLATE
from actors.interaction.prompt import SYSTEM_PROMPT

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
RANDOM_MARKER_FILE = "vigil-tiny.json"
# Qwen2-VL's order: the special tokens follow the byte-level vocabulary as they do in the real tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
)

# Qwen2's pre-tokenizer: the same split as the real tokenizer, so token boundaries behave alike.
_QWEN2_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

TOKENIZER_CORPUS: tuple[str, ...] = (
    SYSTEM_PROMPT,
    f"{SILENCE}",
    f"{RESPONSE} I see a red disc.",
    f"{RESPONSE} The person waved. {DELEGATION} What is written on the sign?",
    "Standing instructions:",
    "Memory:",
    "Background result:",
    "<0.0 seconds> <1.0 seconds> <12.5 seconds> <3599.0 seconds> 00:00:00 01:23:45 12:00:00",
    "Tell me when someone enters the room. Say hello when you see a cat. Describe what changes.",
    "Let me know if the door opens, if a car stops, or if anything red shows up on the table.",
    "What is happening now? Where is the ball? Who is talking? How many people are in the frame?",
    "The quick brown fox jumps over the lazy dog. A small white boat sails past the old lighthouse.",
    "Please keep quiet unless something important happens, and then say it in one short sentence.",
    "Watch the kitchen and warn me about smoke, fire, water on the floor, or a pot boiling over.",
    "0123456789 + - * / = % # @ & ( ) [ ] { } < > | ! ? , . ; : ' \" _ ~ ^ $",
)


@dataclass(frozen=True, slots=True)
class TinyVLMSpec:
    """Sizes of a tiny Qwen2-VL. The pixel budget keeps images between 56x56 and 112x112 equivalents."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_depth: int = 2
    vision_embed_dim: int = 64
    vision_heads: int = 4
    vision_mlp_ratio: int = 2
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    vocab_size: int = 640

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class TinyVLM:
    """A tiny Qwen2-VL: model, tokenizer and image processor that belong together."""

    model: Qwen2VLForConditionalGeneration
    tokenizer: PreTrainedTokenizerFast
    image_processor: Qwen2VLImageProcessorPil


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """The id of a single token in the vocabulary."""
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int):
        raise KeyError(f"{token!r} is not one token of this tokenizer")
    return found


def build_tokenizer(
    corpus: Iterable[str] = TOKENIZER_CORPUS, vocab_size: int = 640
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` and wrap it with the Qwen2-VL special tokens and chat template.

    Byte-level means any text encodes (unknown characters fall back to their UTF-8 bytes) and decodes exactly.
    Training is deterministic for a given corpus.
    """
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    # Qwen2-VL pads on the left for generation; the engine and the trainer set the side they need explicitly.
    tokenizer.padding_side = "left"
    return tokenizer


def build_image_processor(spec: TinyVLMSpec = TinyVLMSpec()) -> Qwen2VLImageProcessorPil:
    """The PIL/numpy Qwen2-VL image processor (no torchvision) with the spec's small pixel budget."""
    return Qwen2VLImageProcessorPil(
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        patch_size=spec.patch_size,
        temporal_patch_size=spec.temporal_patch_size,
        merge_size=spec.spatial_merge_size,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, spec: TinyVLMSpec = TinyVLMSpec()) -> Qwen2VLConfig:
    """A `Qwen2VLConfig` of the given sizes whose special token ids match `tokenizer`."""
    ids = {token: token_id(tokenizer, token) for token in SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_heads
    # M-RoPE splits head_dim / 2 rotary frequencies over (time, height, width) in Qwen2-VL's 2:3:3 proportion.
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    mrope_section = [temporal, height, half - temporal - height]
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 4096,
        "max_window_layers": spec.num_layers,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
    }
    vision_config = {
        "depth": spec.vision_depth,
        "embed_dim": spec.vision_embed_dim,
        "hidden_size": spec.hidden_size,
        "mlp_ratio": spec.vision_mlp_ratio,
        "num_heads": spec.vision_heads,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
    }
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )


def build_tiny_vlm(spec: TinyVLMSpec = TinyVLMSpec(), seed: int = 0) -> TinyVLM:
    """A tiny Qwen2-VL with random weights drawn from `seed`."""
    tokenizer = build_tokenizer(vocab_size=spec.vocab_size)
    config = build_config(tokenizer, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.eval()
    return TinyVLM(model=model, tokenizer=tokenizer, image_processor=build_image_processor(spec))


def save_tiny_vlm(vlm: TinyVLM, directory: str | Path) -> Path:
    """Write model, tokenizer and image processor with `save_pretrained`, so the directory loads like a
    checkpoint."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    vlm.model.save_pretrained(path)
    vlm.tokenizer.save_pretrained(path)
    vlm.image_processor.save_pretrained(path)
    logger.info("saved tiny Qwen2-VL (%d parameters) to %s", vlm.model.num_parameters(), path)
    return path


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (a file, created if missing) across processes on this host."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def replace_directory(staging: Path, target: Path) -> None:
    """Move the fully written directory `staging` to `target`, replacing whatever was there."""
    staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is for every user of the host
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        target.rename(stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)
    staging.rename(target)


def ensure_tiny_random_vlm(directory: str | Path, spec: TinyVLMSpec = TinyVLMSpec(), seed: int = 0) -> Path:
    """A saved tiny random Qwen2-VL at `directory`, built unless one of this spec, seed and code is there.

    It is written to a temporary sibling and renamed into place, so a half-written directory is never reused.
    """
    path = Path(directory).resolve()
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    recipe = {"spec": spec.as_dict(), "seed": seed, "code": code}
    marker = path / RANDOM_MARKER_FILE
    with exclusive_lock(path.parent / f".{path.name}.lock"):
        if marker.is_file() and json.loads(marker.read_text()) == recipe:
            return path
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_tiny_vlm(build_tiny_vlm(spec, seed), staging)
            (staging / RANDOM_MARKER_FILE).write_text(json.dumps(recipe))
            replace_directory(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path
