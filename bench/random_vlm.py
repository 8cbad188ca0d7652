"""A Qwen2.5-VL of random weights, built from its config with no download, behind a TransformersEngine.

`QWEN25_VL_7B` holds Qwen2.5-VL-7B-Instruct's published sizes; `SMOKE_SIZES` the same architecture at toy
sizes for the CPU. The tokenizer is `tiny_vlm`'s offline one: its vocabulary is smaller than the model's, and
the model's config points its special token ids at the tokenizer's. Used by `bench.gpu_streams`.
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

# isort: split

from actors.interaction.engines import transformers as engine_module
from actors.interaction.models.tiny_vlm import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    SPECIAL_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    build_tokenizer,
    token_id,
)

Report = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class VLMSizes:
    """The sizes of a Qwen2.5-VL; the defaults are Qwen2.5-VL-7B-Instruct's config.json."""

    name: str = "Qwen2.5-VL-7B-Instruct"
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    max_position_embeddings: int = 128000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # (time, height, width) rotary sections of the 64 frequencies of a 128-wide head.
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    vision_depth: int = 32
    vision_hidden_size: int = 1280
    vision_intermediate_size: int = 3420
    vision_heads: int = 16
    vision_window_size: int = 112
    vision_full_attention_blocks: tuple[int, ...] = (7, 15, 23, 31)
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2
    # The image processor's pixel budget, as in the checkpoint's preprocessor_config.json.
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384


QWEN25_VL_7B = VLMSizes()
# The same architecture at toy sizes (heads 16 wide: 8 rotary frequencies), with a vocabulary larger than the
# tokenizer's as in the 7B, and a small pixel budget so that CPU ticks stay cheap.
SMOKE_SIZES = VLMSizes(
    name="Qwen2.5-VL (tiny)", vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, max_position_embeddings=4096, mrope_section=(2, 3, 3), vision_depth=2, vision_hidden_size=64,
    vision_intermediate_size=128, vision_heads=4, vision_full_attention_blocks=(1,), max_pixels=112 * 112,
)


def amount(value: float) -> str:
    """`value` with a decimal prefix, e.g. 16.6 G or 412 k."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "


def build_config(sizes: VLMSizes, tokenizer: Any) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of `sizes` whose special token ids are the tokenizer's."""
    ids = {token: token_id(tokenizer, token) for token in SPECIAL_TOKENS}
    if len(tokenizer) > sizes.vocab_size:
        raise ValueError(f"the tokenizer ({len(tokenizer)} tokens) does not fit a vocabulary of {sizes.vocab_size}")
    text_config = {
        "vocab_size": sizes.vocab_size,
        "hidden_size": sizes.hidden_size,
        "intermediate_size": sizes.intermediate_size,
        "num_hidden_layers": sizes.num_layers,
        "num_attention_heads": sizes.num_heads,
        "num_key_value_heads": sizes.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": sizes.max_position_embeddings,
        "max_window_layers": sizes.num_layers,
        "use_sliding_window": False,
        "rms_norm_eps": sizes.rms_norm_eps,
        "rope_parameters": {
            "rope_type": "default", "rope_theta": sizes.rope_theta, "mrope_section": list(sizes.mrope_section),
        },
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
    }
    vision_config = {
        "depth": sizes.vision_depth,
        "hidden_size": sizes.vision_hidden_size,
        "intermediate_size": sizes.vision_intermediate_size,
        "num_heads": sizes.vision_heads,
        "hidden_act": "silu",
        "out_hidden_size": sizes.hidden_size,
        "patch_size": sizes.patch_size,
        "spatial_merge_size": sizes.spatial_merge_size,
        "temporal_patch_size": sizes.temporal_patch_size,
        "window_size": sizes.vision_window_size,
        "fullatt_block_indexes": list(sizes.vision_full_attention_blocks),
        "tokens_per_second": sizes.tokens_per_second,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )


def build_checkpoint(sizes: VLMSizes, directory: Path, device: str, dtype: torch.dtype, report: Report = print) -> Any:
    """Write config, generation config, tokenizer and image processor to `directory`, and return the model.

    The model is built on `device`: random initialisation there is far faster than on the CPU.
    """
    tokenizer = build_tokenizer()
    config = build_config(sizes, tokenizer)
    started = time.perf_counter()
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=[token_id(tokenizer, IM_END), token_id(tokenizer, ENDOFTEXT)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.eval()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    report(f"built {sizes.name} of random weights on {device}: {amount(model.num_parameters())} parameters "
           f"in {time.perf_counter() - started:.1f} s")
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=sizes.min_pixels, max_pixels=sizes.max_pixels, patch_size=sizes.patch_size,
        temporal_patch_size=sizes.temporal_patch_size, merge_size=sizes.spatial_merge_size,
    )
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    return model


def save_weights(model: Any, directory: Path, report: Report = print) -> bool:
    """Save the weights as safetensors, timed; False (and nothing written) where the disk lacks the room."""
    needed = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    free = shutil.disk_usage(directory).free
    if free < needed * 1.1:
        report(f"{directory} has {amount(free)}B free, the weights need {amount(needed)}B: not saved")
        return False
    started = time.perf_counter()
    model.save_pretrained(directory)
    seconds = time.perf_counter() - started
    size = sum(path.stat().st_size for path in directory.glob("*.safetensors"))
    report(f"saved {amount(size)}B of safetensors in {seconds:.1f} s ({amount(size / seconds)}B/s)")
    return True


class _BuiltModel:
    """Answers the engine's `AutoModelForImageTextToText.from_pretrained` with a model built in memory."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        return self.model


async def start_engine(
    sizes: VLMSizes,
    directory: Path,
    device: str,
    dtype: str,
    max_new_tokens: int,
    weights: str = "disk",
    report: Report = print,
) -> Any:
    """A started TransformersEngine on a random `sizes` model; `report` gets one line per timed step.

    `weights="disk"` saves the weights and lets the engine load them as any checkpoint (where the disk has
    room); `"memory"` writes everything but the weights and hands the built model to the engine's loader.
    """
    model = build_checkpoint(sizes, directory, device, getattr(torch, dtype), report)
    if weights == "disk" and not save_weights(model, directory, report):
        weights = "memory"
    engine = engine_module.TransformersEngine(
        str(directory), device=device, max_new_tokens=max_new_tokens, dtype=dtype
    )
    started = time.perf_counter()
    if weights == "disk":
        # The engine loads its own copy: free this one first, or the GPU holds two.
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        await engine.start()
    else:
        if not hasattr(engine_module, "AutoModelForImageTextToText"):
            raise RuntimeError("the engine no longer loads through AutoModelForImageTextToText: use disk weights")
        with mock.patch.object(engine_module, "AutoModelForImageTextToText", _BuiltModel(model)):
            await engine.start()
    report(f"engine started from {weights} in {time.perf_counter() - started:.1f} s")
    return engine


async def start_vllm_engine(
    sizes: VLMSizes,
    directory: Path,
    dtype: str,
    max_new_tokens: int,
    engine_args: dict[str, Any],
    max_images: int,
    report: Report = print,
) -> Any:
    """A started VLLMEngine on a random `sizes` checkpoint written to `directory` (vLLM loads from disk only)."""
    from actors.interaction.engines.vllm import VLLMEngine  # only where vLLM is installed

    model = build_checkpoint(sizes, directory, "cuda", getattr(torch, dtype), report)
    if not save_weights(model, directory, report):
        raise RuntimeError(f"the vllm engine loads weights from disk, and {directory} has no room for them")
    del model  # vLLM loads its own copy in its engine core
    gc.collect()
    torch.cuda.empty_cache()
    engine = VLLMEngine(str(directory), max_new_tokens=max_new_tokens, engine_args={"dtype": dtype, **engine_args},
                        max_images=max_images)
    started = time.perf_counter()
    await engine.start()
    report(f"vLLM engine started in {time.perf_counter() - started:.1f} s")
    return engine
