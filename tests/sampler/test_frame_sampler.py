"""The sampler keeps what changed and drops what did not, at the size the model needs, and refuses bad frames."""

from __future__ import annotations

import numpy as np
import pytest

from actors.sampler.frame_sampler import FrameSampler

pytestmark = pytest.mark.unit


def test_sampler_resizes_to_budget_and_scores_change() -> None:
    sampler = FrameSampler(longest_side=64, change_threshold=0.1, max_pixels=10**6)
    dark = np.zeros((120, 160, 3), np.uint8)
    first = sampler.sample(dark, 0.0, None)
    assert first.keep and first.sample is not None
    assert (first.sample.width, first.sample.height) == (64, 48)
    assert len(first.sample.rgb) == 64 * 48 * 3
    same = sampler.sample(dark, 0.5, first.signature, due=False)
    assert not same.keep and same.change_score == 0.0 and same.sample is None
    bright = sampler.sample(np.full_like(dark, 255), 0.6, first.signature, due=False)
    assert bright.keep and bright.change_score > 0.9


def test_sampler_refuses_bad_frames() -> None:
    sampler = FrameSampler(longest_side=64, change_threshold=0.1, max_pixels=100)
    with pytest.raises(ValueError, match="pixel limit"):
        sampler.sample(np.zeros((20, 20, 3), np.uint8), 0.0, None)
    with pytest.raises(ValueError, match="HxWx3"):
        sampler.sample(np.zeros((5, 5), np.uint8), 0.0, None)



def test_judging_a_frame_sends_no_pixels_back_and_agrees_with_sampling() -> None:
    sampler = FrameSampler(longest_side=64, change_threshold=0.1, max_pixels=10**6)
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[10:30, 10:30] = 200
    judged = sampler.judge(frame, None, due=True)
    sampled = sampler.sample(frame, 1.0, None)
    assert judged.sample is None and judged.keep
    assert (judged.change_score, judged.signature) == (sampled.change_score, sampled.signature)
    assert not sampler.judge(frame, judged.signature, due=False).keep
