"""The size a frame is brought to before anything else sees it: the model's budget for its longest side."""

from __future__ import annotations

import math

# A model's processor that takes at most N pixels is sent frames of about twice that area: it still scales each
# down itself (so its grid of patches is the one it would make of a full-size frame, for aspect ratios up to
# 8:3), from no more pixels than that needs.
PIXEL_MARGIN = 2.0


def fit_within(width: int, height: int, longest_side: int) -> tuple[int, int]:
    """`(width, height)` scaled down, aspect kept, so that the longest side is at most `longest_side`; a frame
    already within it keeps its size (never scaled up)."""
    scale = longest_side / max(width, height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def model_side(longest_side: int, model_pixels: int) -> int:
    """The longest side to bring frames to: `longest_side`, or less for a model whose processor takes at most
    `model_pixels` pixels of a frame (0: not known), so that a 4:3 frame has about PIXEL_MARGIN times that area."""
    if model_pixels <= 0:
        return longest_side
    return min(longest_side, math.ceil(math.sqrt(PIXEL_MARGIN * model_pixels * 4 / 3)))
