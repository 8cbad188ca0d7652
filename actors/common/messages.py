"""Messages passed between Vigil's actors and stored in Redis: small frozen dataclasses, msgpack in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgpack

MAX_ENCODED_BYTES = 8 * 1024 * 1024

DecisionKind = Literal["silent", "respond", "delegate"]
OUTCOME_KINDS: tuple[str, ...] = ("silent", "respond", "delegate")
SKIP_REASONS: tuple[str, ...] = (
    "no_frame",
    "busy",
    "engine_error",
    "replica_failed",
    "timeout",
    "closed",
    "overload",
    "reconnect",
)


class MessageTooLarge(ValueError):
    """An encoded message exceeds the size limit."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One model-ready frame: RGB pixels resized to the model's budget, with its stream time.

    `ref`: the pixels in Ray's object store (an ObjectRef, from the ingest's one `ray.put` of the frame), when
    they are there; then `rgb` is empty in the ingest (which needs no copy of its own) and a call to another
    process carries the ref (`without_pixels`), the receiver reading them back (`with_pixels`).
    """

    stream_time: float
    width: int
    height: int
    rgb: bytes
    change_score: float = 1.0
    ref: Any = field(default=None, compare=False, repr=False)

    def without_pixels(self) -> Sample:
        return dataclasses.replace(self, rgb=b"", ref=None)

    def with_pixels(self, rgb: bytes) -> Sample:
        return dataclasses.replace(self, rgb=rgb, ref=None)


@dataclass(frozen=True, slots=True)
class SampleVerdict:
    """What the sampler made of a candidate frame."""

    keep: bool
    change_score: float
    signature: bytes
    sample: Sample | None = None


@dataclass(frozen=True, slots=True)
class Turn:
    """One past step of the conversation, in stream time."""

    role: Literal["user", "assistant"]
    text: str
    stream_time: float


@dataclass(frozen=True, slots=True)
class TickRequest:
    """Everything the interaction engine needs to decide one tick of one session."""

    session_id: str
    tick: int
    stream_time: float
    samples: tuple[Sample, ...]
    instructions: tuple[str, ...] = ()
    dialog: tuple[Turn, ...] = ()
    inbox: tuple[str, ...] = ()
    memories: tuple[str, ...] = ()
    lookback: tuple[Sample, ...] = ()
    # Speak only when the engine gives respond/delegate at least this probability (the session's proactivity).
    speak_threshold: float = 0.5
    # Wall-clock time (time.time()) after which the decision is no use; 0: none. An engine that cannot start
    # before it answers `skipped:overload` instead of deciding.
    deadline: float = 0.0


@dataclass(frozen=True, slots=True)
class MemoryContext:
    """What memory gives a tick: prompt lines with their times, and old keyframes (JPEG) brought back."""

    lines: tuple[str, ...] = ()
    keyframes: tuple[tuple[float, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """The engine's answer: silence, a response, or a response that delegates a question."""

    kind: DecisionKind
    text: str = ""
    question: str = ""
    raw: str = ""
    model_ms: float = 0.0
    # The probability the engine gave this decision: P(speak) for respond/delegate, 1 - P(speak) for silence.
    probability: float = 1.0
    replica: str = ""  # the interaction replica that decided it
    # The decision's prompt, in tokens, and how many of them the engine's prefix cache served (0: no cache).
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What a user is told about the model that watches their stream."""

    engine: str
    model: str
    demo: bool = False
    note: str = ""


@dataclass(frozen=True, slots=True)
class TickOutcome:
    """The one recorded outcome of one tick: a decision kind or `skipped:<reason>`."""

    session_id: str
    tick: int
    stream_time: float
    outcome: str
    text: str = ""
    question: str = ""
    wall_time: float = 0.0
    stages_ms: dict[str, float] = field(default_factory=dict)
    model_called: bool = False
    probability: float = 0.0
    replica: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    missed_s: float = 0.0  # `skipped:reconnect`: the seconds of video a resumed session did not see

    @property
    def skipped(self) -> bool:
        return self.outcome.startswith("skipped:")


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session as stored in Redis. `token_hash` is a SHA-256 of the bearer token, never the token."""

    session_id: str
    token_hash: str
    created_at: float
    instructions: tuple[str, ...] = ()
    state: Literal["created", "live", "ended"] = "created"
    owner: str = ""
    speak_threshold: float = 0.5


M = TypeVar("M")

_NESTED: dict[type, dict[str, type]] = {
    SampleVerdict: {"sample": Sample},
    TickRequest: {"samples": Sample, "dialog": Turn, "lookback": Sample},
}


def to_dict(message: Any) -> dict[str, Any]:
    """A dataclass as plain msgpack-able data."""
    return dataclasses.asdict(message)


def from_dict(cls: type[M], data: dict[str, Any]) -> M:
    """Rebuild a dataclass from `to_dict` output; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    values = dict(data)
    for name, nested in _NESTED.get(cls, {}).items():
        value = values.get(name)
        if isinstance(value, dict):
            values[name] = from_dict(nested, value)
        elif isinstance(value, list | tuple):
            values[name] = tuple(from_dict(nested, item) for item in value)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if isinstance(values.get(f.name), list):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def encode(message: Any, limit: int = MAX_ENCODED_BYTES) -> bytes:
    """msgpack-encode a message dataclass, refusing anything over `limit` bytes."""
    data = msgpack.packb(to_dict(message), use_bin_type=True)
    if len(data) > limit:
        raise MessageTooLarge(f"{type(message).__name__} is {len(data)} bytes, over the {limit}-byte limit")
    return data


def decode(cls: type[M], data: bytes, limit: int = MAX_ENCODED_BYTES) -> M:
    """Decode bytes produced by `encode` back into `cls`."""
    if len(data) > limit:
        raise MessageTooLarge(f"{len(data)} bytes, over the {limit}-byte limit")
    return from_dict(cls, msgpack.unpackb(data, raw=False))
