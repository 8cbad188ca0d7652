"""Turns candidate frames into model-ready samples: resize to the model's budget, score change, keep or drop."""

from __future__ import annotations

import numpy as np
from PIL import Image

from actors.common.frame_size import fit_within
from actors.common.messages import Sample, SampleVerdict

SIGNATURE_SIDE = 16


def resize_to_budget(rgb: np.ndarray, longest_side: int) -> np.ndarray:
    """Scale an HxWx3 uint8 image down so that its longest side is at most `longest_side` (never up)."""
    height, width = rgb.shape[:2]
    size = fit_within(width, height, longest_side)
    if size == (width, height):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def signature(rgb: np.ndarray) -> np.ndarray:
    """A 16x16 grey thumbnail in [0, 1]: cheap to compare, blind to sensor noise."""
    grey = Image.fromarray(rgb).convert("L").resize((SIGNATURE_SIDE, SIGNATURE_SIDE), Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.float32) / 255.0


def change_score(current: np.ndarray, previous: np.ndarray | None) -> float:
    """Mean absolute difference of two signatures in [0, 1]; 1.0 when there is nothing to compare with."""
    if previous is None or previous.shape != current.shape:
        return 1.0
    return float(np.abs(current - previous).mean())


class FrameSampler:
    """Stateless: everything it needs about the past comes in as the previous sample's signature.

    A frame is kept when the tick is due (one sample per tick) or when the scene changed by more than
    `change_threshold` since the previous sample (extra samples on sudden change).
    """

    def __init__(self, longest_side: int, change_threshold: float, max_pixels: int) -> None:
        self.longest_side = longest_side
        self.change_threshold = change_threshold
        self.max_pixels = max_pixels

    def sample(
        self, rgb: np.ndarray, stream_time: float, previous_signature: bytes | None, due: bool = True
    ) -> SampleVerdict:
        """Judge the frame, and for a kept one, the sample (resized to the budget)."""
        verdict = self.judge(rgb, previous_signature, due)
        if not verdict.keep:
            return verdict
        small = np.ascontiguousarray(resize_to_budget(rgb, self.longest_side))
        sample = Sample(stream_time=stream_time, width=small.shape[1], height=small.shape[0], rgb=small.tobytes(),
                        change_score=verdict.change_score)
        return SampleVerdict(keep=True, change_score=verdict.change_score, signature=verdict.signature,
                             sample=sample)

    def judge(self, rgb: np.ndarray, previous_signature: bytes | None, due: bool = True) -> SampleVerdict:
        """Keep or drop, the change score and the signature, without the pixels: for a caller that holds the frame
        already at the model's size (the ingest), which makes the sample itself."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 frame, got {rgb.dtype} {rgb.shape}")
        if rgb.shape[0] * rgb.shape[1] > self.max_pixels:
            raise ValueError(f"frame of {rgb.shape[1]}x{rgb.shape[0]} is over the {self.max_pixels}-pixel limit")
        current = signature(rgb)
        previous = None
        if previous_signature is not None:
            previous = np.frombuffer(previous_signature, dtype=np.float32).reshape(SIGNATURE_SIDE, SIGNATURE_SIDE)
        score = change_score(current, previous)
        keep = due or score >= self.change_threshold
        return SampleVerdict(keep=keep, change_score=score, signature=current.tobytes())
