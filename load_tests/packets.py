"""A clip encoded once to VP8 packets, cached on disk as an IVF file keyed by the clip's parameters.

Encoding 640x480 VP8 costs about 11 ms a frame on a small machine; replaying packets costs almost nothing.
So the clip is encoded once (in a child process, so the generator never loads the renderer's torch) and every
stream sends the same packets. The first packet is a keyframe and one follows every `keyframe_s`, so a
receiver that joins or loses a packet decodes again within that time (replayed packets cannot answer a
keyframe request).

With two temporal layers (`temporal_layers`, the default, as the page sends them) the frames that no later
frame refers to are layer 1, the rest layer 0; `layers` gives each packet's layer for its RTP descriptor.
"""

from __future__ import annotations

import concurrent.futures
import fractions
import logging
import multiprocessing
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av

from load_tests.clip import ClipSpec, render_frames

log = logging.getLogger(__name__)

IVF_HEADER = struct.Struct("<4sHH4sHHIII4x")
IVF_FRAME = struct.Struct("<IQ")
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "load-clips"


@dataclass(frozen=True, slots=True)
class EncodedClip:
    """The VP8 packets of a clip, in order, each a complete frame; shared by every replaying stream."""

    spec: ClipSpec
    packets: tuple[bytes, ...]
    layers: tuple[int, ...]  # each packet's temporal layer (0 or 1)

    @property
    def keyframes(self) -> tuple[int, ...]:
        return tuple(index for index, data in enumerate(self.packets) if is_vp8_keyframe(data))

    @property
    def bytes_per_s(self) -> float:
        return sum(len(p) for p in self.packets) / self.spec.seconds


def is_vp8_keyframe(data: bytes) -> bool:
    """Bit 0 of a VP8 frame tag is 0 on keyframes (RFC 6386, 9.1)."""
    return bool(data) and not data[0] & 1


def temporal_layers(packets: tuple[bytes, ...]) -> tuple[int, ...]:
    """Each packet's layer: 1 for a frame that updates none of the decoder's references, so that no later frame
    needs it (FFmpeg's VP8 decoder, told to skip such frames, gives nothing for it), 0 for the others."""
    decoder = av.CodecContext.create("vp8", "r")
    assert isinstance(decoder, av.VideoCodecContext)
    decoder.skip_frame = "NONREF"
    return tuple(0 if decoder.decode(av.Packet(data)) else 1 for data in packets)


def encode_clip(spec: ClipSpec) -> EncodedClip:
    """Draw and encode the clip with libvpx (real-time settings, a keyframe every `keyframe_s`; two temporal
    layers, libvpx's 2-layer pattern, unless `temporal_layers` is 1)."""
    codec = av.CodecContext.create("libvpx", "w")
    assert isinstance(codec, av.VideoCodecContext)
    codec.width, codec.height, codec.pix_fmt = spec.width, spec.height, "yuv420p"
    codec.time_base = fractions.Fraction(1, spec.fps)
    codec.framerate = fractions.Fraction(spec.fps, 1)
    codec.bit_rate = spec.bitrate_kbps * 1000
    codec.gop_size = max(1, round(spec.keyframe_s * spec.fps))
    codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    if spec.temporal_layers == 2:
        base_kbps = spec.bitrate_kbps * 3 // 5
        layering = ("ts_number_layers=2:ts_rate_decimator=2,1:ts_periodicity=2:ts_layer_id=0,1:ts_layering_mode=2:"
                    f"ts_target_bitrate={base_kbps},{spec.bitrate_kbps}")
        # Error-resilient: no frame keeps its entropy updates for the next, so dropping layer 1 changes nothing
        # in the frames of layer 0 (what browsers do with temporal layers).
        codec.options |= {"error-resilient": "1", "ts-parameters": layering}
    packets: list[bytes] = []
    for index, rgb in enumerate(render_frames(spec)):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts, frame.time_base = index, codec.time_base
        packets.extend(bytes(packet) for packet in codec.encode(frame))
    packets.extend(bytes(packet) for packet in codec.encode(None))
    if len(packets) != spec.frame_count or not is_vp8_keyframe(packets[0]):
        raise RuntimeError(f"libvpx gave {len(packets)} packets for {spec.frame_count} frames")
    return _clip(spec, tuple(packets))


def _clip(spec: ClipSpec, packets: tuple[bytes, ...]) -> EncodedClip:
    layers = temporal_layers(packets) if spec.temporal_layers == 2 else (0,) * len(packets)
    return EncodedClip(spec=spec, packets=packets, layers=layers)


def write_ivf(path: Path, clip: EncodedClip) -> None:
    """Write atomically: a concurrent reader sees the old file or the whole new one."""
    spec = clip.spec
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    with os.fdopen(fd, "wb") as out:
        out.write(IVF_HEADER.pack(b"DKIF", 0, IVF_HEADER.size, b"VP80", spec.width, spec.height, spec.fps, 1,
                                  len(clip.packets)))
        for index, data in enumerate(clip.packets):
            out.write(IVF_FRAME.pack(len(data), index))
            out.write(data)
    os.replace(temp, path)


def read_ivf(path: Path, spec: ClipSpec) -> EncodedClip:
    data = path.read_bytes()
    magic, _, header_size, fourcc, width, height, rate, scale, count = IVF_HEADER.unpack_from(data)
    if magic != b"DKIF" or fourcc != b"VP80" or (width, height, rate, scale) != (spec.width, spec.height, spec.fps, 1):
        raise ValueError(f"{path} is not the VP8 IVF of this clip")
    packets = []
    offset = header_size
    for _ in range(count):
        size, _pts = IVF_FRAME.unpack_from(data, offset)
        offset += IVF_FRAME.size
        packets.append(data[offset : offset + size])
        offset += size
    if len(packets) != spec.frame_count or offset != len(data):
        raise ValueError(f"{path} is truncated or holds another clip")
    return _clip(spec, tuple(packets))


def _encode_to(spec: ClipSpec, path: Path) -> None:
    write_ivf(path, encode_clip(spec))


def cached_clip(spec: ClipSpec, cache_dir: Path = DEFAULT_CACHE_DIR) -> EncodedClip:
    """The clip's packets from the cache, encoded (in a child process) and cached first when missing."""
    path = cache_dir / f"clip-{spec.width}x{spec.height}-{spec.fps}fps-{spec.key}.ivf"
    if path.is_file():
        try:
            return read_ivf(path, spec)
        except (ValueError, struct.error):
            log.warning("cached clip %s is unreadable; encoding it again", path)
    log.info("encoding the %dx%d clip (%d frames) once into %s", spec.width, spec.height, spec.frame_count, path)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        pool.submit(_encode_to, spec, path).result()
    return read_ivf(path, spec)
