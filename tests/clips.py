"""Synthetic video clips for Chromium's fake camera (`--use-file-for-fake-video-capture`).

A clip is a YUV4MPEG2 file (`C420`, planar 4:2:0, BT.601 studio range). It shows a plain moving scene with
no red in it and, from `trigger_at_s` on, a large red disc in the middle: the visual trigger the demo model
is trained to answer. Chromium plays the file in a loop, so after its last frame a clip starts again with
its disc-free part: make it longer than the test that uses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DISC_RGB = (220, 20, 20)
BLOCK_RGB = (48, 64, 84)
Y4M_MAGIC = b"YUV4MPEG2"
FRAME_TAG = b"FRAME"


def _fallback_background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A blue-green gradient with a few muted patches: the background when the demo renderer is missing."""
    ys, xs = np.mgrid[0:height, 0:width]
    frame = np.empty((height, width, 3), dtype=np.float32)
    frame[..., 0] = 70 + 40 * xs / max(width - 1, 1)
    frame[..., 1] = 110 + 40 * ys / max(height - 1, 1)
    frame[..., 2] = 150
    for _ in range(3):
        w, h = int(rng.integers(width // 10, width // 4)), int(rng.integers(height // 10, height // 4))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        frame[y : y + h, x : x + w] = rng.integers(60, 200, size=3) * (0.6, 1.0, 1.0)
    return np.clip(frame, 0, 255).astype(np.uint8)


def scene_background(width: int, height: int, seed: int = 0) -> np.ndarray:
    """The clip's still background (uint8 RGB): a disc-free frame of the demo model's own renderer when it is
    importable, so the clip looks like what that model learned from, else a similar plain scene."""
    rng = np.random.default_rng(seed)
    try:
        from actors.interaction.models.demo import render_frame
    except ImportError:
        return _fallback_background(width, height, rng)
    return np.ascontiguousarray(render_frame(width, height, False, rng))


def render_clip_frame(
    background: np.ndarray, index: int, fps: int, disc: bool, rng: np.random.Generator
) -> np.ndarray:
    """One frame: the background, a slate block gliding back and forth (the motion), light noise, and with
    `disc` a solid red disc in the middle whose diameter is a third of the frame height."""
    height, width = background.shape[:2]
    frame = background.astype(np.float32)
    bw, bh = width // 5, height // 5
    travel = width - bw
    step = (index * travel / (2 * fps)) % (2 * travel)  # one crossing every two seconds
    bx = int(step if step <= travel else 2 * travel - step)
    by = height - bh - height // 10
    frame[by : by + bh, bx : bx + bw] = BLOCK_RGB
    frame += rng.normal(0.0, 2.0, frame.shape).astype(np.float32)
    if disc:
        ys, xs = np.mgrid[0:height, 0:width]
        radius = height / 6
        frame[(xs - width / 2) ** 2 + (ys - height / 2) ** 2 <= radius**2] = DISC_RGB
    return np.clip(frame, 0, 255).astype(np.uint8)


def rgb_to_i420(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB (H, W, 3) uint8 with even H and W to BT.601 studio-range Y, U, V planes (U and V at half size)."""
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    h, w = y.shape
    u = u.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    v = v.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    planes = (y, u, v)
    return tuple(np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in planes)  # type: ignore[return-value]


def i420_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """BT.601 studio-range planes back to RGB (H, W, 3) uint8; chroma is upsampled by repetition."""
    yf = y.astype(np.float32) - 16
    uf = np.repeat(np.repeat(u.astype(np.float32) - 128, 2, axis=0), 2, axis=1)
    vf = np.repeat(np.repeat(v.astype(np.float32) - 128, 2, axis=0), 2, axis=1)
    r = 1.164 * yf + 1.596 * vf
    g = 1.164 * yf - 0.392 * uf - 0.813 * vf
    b = 1.164 * yf + 2.017 * uf
    return np.clip(np.rint(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


def write_trigger_clip(
    path: str | Path,
    seconds: float,
    trigger_at_s: float,
    fps: int = 10,
    width: int = 320,
    height: int = 240,
    seed: int = 0,
) -> Path:
    """Write `seconds` of clip at `fps` that shows the red disc from `trigger_at_s` on; returns the path."""
    if width % 2 or height % 2:
        raise ValueError("4:2:0 needs an even width and height")
    if fps <= 0 or seconds <= 0:
        raise ValueError("seconds and fps must be positive")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    background = scene_background(width, height, seed)
    rng = np.random.default_rng(seed + 1)
    frames = round(seconds * fps)
    with path.open("wb") as out:
        out.write(b"YUV4MPEG2 W%d H%d F%d:1 Ip A1:1 C420\n" % (width, height, fps))
        for index in range(frames):
            disc = index / fps >= trigger_at_s
            rgb = render_clip_frame(background, index, fps, disc, rng)
            out.write(FRAME_TAG + b"\n")
            for plane in rgb_to_i420(rgb):
                out.write(plane.tobytes())
    return path


@dataclass(frozen=True)
class Y4MHeader:
    width: int
    height: int
    fps: float
    colorspace: str
    interlace: str


def read_y4m(path: str | Path) -> tuple[Y4MHeader, Iterator[np.ndarray]]:
    """Parse a 4:2:0 YUV4MPEG2 file: its header and an iterator over its frames as RGB arrays."""
    data = Path(path).read_bytes()
    end = data.index(b"\n")
    tokens = data[:end].split()
    if tokens[0] != Y4M_MAGIC:
        raise ValueError("not a YUV4MPEG2 file")
    fields = {t[:1].decode(): t[1:].decode() for t in tokens[1:]}
    num, _, den = fields["F"].partition(":")
    header = Y4MHeader(
        width=int(fields["W"]),
        height=int(fields["H"]),
        fps=int(num) / int(den or 1),
        colorspace=fields.get("C", "420jpeg"),
        interlace=fields.get("I", "?"),
    )

    def frames() -> Iterator[np.ndarray]:
        w, h = header.width, header.height
        size_y, size_c = w * h, (w // 2) * (h // 2)
        pos = end + 1
        while pos < len(data):
            line_end = data.index(b"\n", pos)
            if not data[pos:line_end].startswith(FRAME_TAG):
                raise ValueError(f"expected FRAME at byte {pos}")
            pos = line_end + 1
            y = np.frombuffer(data, np.uint8, size_y, pos).reshape(h, w)
            u = np.frombuffer(data, np.uint8, size_c, pos + size_y).reshape(h // 2, w // 2)
            v = np.frombuffer(data, np.uint8, size_c, pos + size_y + size_c).reshape(h // 2, w // 2)
            pos += size_y + 2 * size_c
            yield i420_to_rgb(y, u, v)

    return header, frames()
