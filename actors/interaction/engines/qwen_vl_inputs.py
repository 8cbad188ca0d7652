"""Model inputs for Qwen2-VL-family models, built from tick prompts without the full (torchvision) processor.

What `Qwen2VLProcessor` does, done with only a tokenizer and the PIL image processor: render the chat
template, run the image processor on the frames, and expand each `<|image_pad|>` to
`grid_thw.prod() // merge_size**2` tokens. User text is tokenized with control tokens sanitized, so a
typed `<|im_end|>` stays text, and so do two texts that spell one only where the template joins them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from actors.common.messages import Sample
from actors.interaction.prompt import Prompt

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Qwen2-VL-Instruct's chat template: a content list renders `{"type": "image"}` as a vision block in place.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def sample_image(sample: Sample) -> Image.Image:
    """A sample's raw RGB bytes as a PIL image."""
    expected = sample.width * sample.height * 3
    if len(sample.rgb) != expected:
        raise ValueError(
            f"sample has {len(sample.rgb)} bytes, expected {expected} for {sample.width}x{sample.height} RGB"
        )
    return Image.frombytes("RGB", (sample.width, sample.height), sample.rgb)


def join_adjacent_texts(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with each run of adjacent text parts joined into one part: the chat renders the same.

    The tokenizer sanitizes the control tokens inside each string; two texts that the template writes side by
    side (two questions of one second: `<|image_` then `pad|>`) would spell a real one between them.
    """
    joined: list[dict[str, Any]] = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            joined.append(message)
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if part.get("type") == "text" and parts and parts[-1].get("type") == "text":
                parts[-1] = {"type": "text", "text": parts[-1]["text"] + part["text"]}
            else:
                parts.append(part)
        joined.append({**message, "content": parts})
    return joined


@dataclass(slots=True)
class EncodedBatch:
    """Tensors for one forward or generate call, and the padded prompt length (where generation starts)."""

    tensors: dict[str, torch.Tensor]
    prompt_length: int

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> EncodedBatch:
        moved = {}
        for name, tensor in self.tensors.items():
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            moved[name] = tensor.to(device)
        return EncodedBatch(tensors=moved, prompt_length=self.prompt_length)


class PromptEncoder:
    """Turns tick prompts into Qwen2-VL inputs: input_ids, attention_mask, pixel_values, image_grid_thw.

    `with_token_types` adds `mm_token_type_ids` (1 on image tokens), which Qwen2-VL uses for its 3D positions.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        image_token_id: int,
        chat_template: str | None = None,
        with_token_types: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        own_template = getattr(tokenizer, "chat_template", None)
        self.chat_template = chat_template or own_template or QWEN2_VL_CHAT_TEMPLATE
        self.with_token_types = with_token_types
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else tokenizer.eos_token_id)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of the rendered chat, ending with the assistant header; one image pad per image."""
        ids = self.tokenizer.apply_chat_template(
            join_adjacent_texts(prompt.messages),
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
        )
        return list(ids)

    def images(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Pixel patches and grids of every image of every prompt, in order."""
        frames = [sample_image(sample) for prompt in prompts for sample in prompt.images]
        if not frames:
            return {}
        processed = self.image_processor(images=frames, return_tensors="pt")
        return {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}

    def expand_image_pads(self, ids: list[int], token_counts: Sequence[int]) -> list[int]:
        """Repeat the i-th image pad `token_counts[i]` times, as the Qwen2-VL processor does."""
        expanded: list[int] = []
        counts = iter(token_counts)
        for token in ids:
            if token == self.image_token_id:
                try:
                    expanded.extend([token] * next(counts))
                except StopIteration as exc:
                    raise ValueError("the prompt has more image placeholders than images") from exc
            else:
                expanded.append(token)
        if next(counts, None) is not None:
            raise ValueError("the prompt has fewer image placeholders than images")
        return expanded

    def encode(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Sequence[int]] | None = None,
    ) -> EncodedBatch:
        """Encode prompts, left-padded so that every row ends where generation starts.

        With `completions` (for training) each row is its prompt then its completion, and `labels` hold the
        completion tokens only, so all completions end at the last column.
        """
        images = self.images(prompts)
        grids = images.get("image_grid_thw")
        counts = [] if grids is None else (grids.prod(-1) // self.merge_size**2).tolist()
        rows: list[list[int]] = []
        labels: list[list[int]] = []
        offset = 0
        for index, prompt in enumerate(prompts):
            own = counts[offset : offset + len(prompt.images)]
            offset += len(prompt.images)
            ids = self.expand_image_pads(self.prompt_ids(prompt), own)
            if completions is None:
                rows.append(ids)
            else:
                completion = list(completions[index])
                rows.append(ids + completion)
                labels.append([IGNORE_INDEX] * len(ids) + completion)
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        label_tensor = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, length - len(ids) :] = 1
            if labels:
                label_tensor[row, length - len(ids) :] = torch.tensor(labels[row], dtype=torch.long)
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask, **images}
        if self.with_token_types:
            is_image = (input_ids == self.image_token_id) & attention_mask.bool()
            tensors["mm_token_type_ids"] = is_image.to(torch.int32)
        if labels:
            tensors["labels"] = label_tensor
        return EncodedBatch(tensors=tensors, prompt_length=length)
