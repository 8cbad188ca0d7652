"""The size a frame is brought to before anything else sees it: the model's budget for its longest side."""

from __future__ import annotations


def fit_within(width: int, height: int, longest_side: int) -> tuple[int, int]:
    """`(width, height)` scaled down, aspect kept, so that the longest side is at most `longest_side`; a frame
    already within it keeps its size (never scaled up)."""
    scale = longest_side / max(width, height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))
