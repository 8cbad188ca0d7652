"""The clip every stream replays: what it shows, when its trigger (a red disc) is in view, and its frames.

The frames are drawn by `tests/clips.py`, the scene the fake-camera browser tests stream and the demo model
was trained on: a still background, a gliding block, light noise, and a solid red disc in the middle while a
trigger is on. The clip loops, so a trigger at clip second 4 is on again at 4 + clip length, and so on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

# Bump when the drawing or the encoding changes: cached clips of an older recipe are not reused.
RECIPE_VERSION = 2


@dataclass(frozen=True, slots=True)
class TriggerWindow:
    """A trigger in stream seconds: the disc shows from `onset` to `end`; a response counts until `due`."""

    onset: float
    end: float
    due: float

    def holds(self, stream_time: float) -> bool:
        return self.onset <= stream_time < self.due


@dataclass(frozen=True, slots=True)
class ClipSpec:
    """A looping clip of `seconds` at `fps`, with the disc on from each of `triggers` for `trigger_s`."""

    width: int = 640
    height: int = 480
    fps: int = 5
    seconds: float = 10.0
    triggers: tuple[float, ...] = (4.0,)
    trigger_s: float = 2.0
    keyframe_s: float = 2.0
    bitrate_kbps: int = 400  # what the page sends: Vigil caps video at 400 kbit/s
    temporal_layers: int = 2  # what the page sends (L1T2); 1: every frame in one layer
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width % 2 or self.height % 2 or min(self.width, self.height) < 16:
            raise ValueError(f"size {self.width}x{self.height}: width and height must be even and at least 16")
        if not 1 <= self.fps <= 30:
            raise ValueError(f"fps {self.fps}: must be 1 to 30")
        if not 1.0 <= self.seconds <= 120.0:
            raise ValueError(f"clip of {self.seconds} s: must be 1 to 120 s")
        if self.temporal_layers not in (1, 2):
            raise ValueError(f"temporal_layers {self.temporal_layers}: must be 1 or 2")
        if self.trigger_s <= 0 or self.keyframe_s <= 0 or self.bitrate_kbps <= 0:
            raise ValueError("trigger_s, keyframe_s and bitrate_kbps must be positive")
        ordered = sorted(self.triggers)
        for onset in ordered:
            if onset < 0 or onset + self.trigger_s > self.seconds:
                raise ValueError(f"trigger at {onset} s lasting {self.trigger_s} s does not fit a "
                                 f"{self.seconds} s clip")
        for first, second in itertools.pairwise(ordered):
            if second < first + self.trigger_s:
                raise ValueError(f"triggers at {first} s and {second} s overlap")

    @property
    def frame_count(self) -> int:
        return max(1, round(self.seconds * self.fps))

    @property
    def key(self) -> str:
        """Names the clip's cached packets: the same parameters and recipe give the same packets."""
        text = json.dumps({"recipe": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def disc_at(self, clip_time: float) -> bool:
        return any(onset <= clip_time < onset + self.trigger_s for onset in self.triggers)

    def windows(self, start: float, end: float, grace_s: float) -> list[TriggerWindow]:
        """The trigger windows whose onset is in [start, end) stream seconds, the clip looping from 0."""
        found = []
        loop = int(max(0.0, start) // self.seconds)
        while loop * self.seconds < end:
            for onset in sorted(self.triggers):
                at = loop * self.seconds + onset
                if start <= at < end:
                    found.append(TriggerWindow(onset=at, end=at + self.trigger_s, due=at + self.trigger_s + grace_s))
            loop += 1
        return found


def render_frames(spec: ClipSpec) -> Iterator[np.ndarray]:
    """The clip's frames as RGB arrays (H, W, 3), in order."""
    # Imported here: the background comes from the demo model's renderer, whose module loads torch.
    from tests.clips import render_clip_frame, scene_background

    background = scene_background(spec.width, spec.height, spec.seed)
    rng = np.random.default_rng(spec.seed + 1)
    for index in range(spec.frame_count):
        yield render_clip_frame(background, index, spec.fps, spec.disc_at(index / spec.fps), rng)
