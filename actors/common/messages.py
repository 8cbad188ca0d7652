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
    image_pixels: int = 0  # the most pixels of a frame the model's processor takes (0: not known)


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
    through: int = 0  # `skipped:unlogged`: the last of the ticks from `tick` on that it stands for (0: `tick` alone)

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


DelegationStatus = Literal["done", "failed", "timed_out", "cancelled"]
DELEGATION_STATUSES: tuple[str, ...] = ("done", "failed", "timed_out", "cancelled")
RICH_KINDS: tuple[str, ...] = ("table", "html", "chart")


@dataclass(frozen=True, slots=True)
class DelegationFrame:
    """One recent frame of a delegation: a JPEG file and its stream time."""

    stream_time: float
    jpeg: bytes


@dataclass(frozen=True, slots=True)
class DelegationRequest:
    """A question the interaction model handed to the background brain (`</response> note </delegation> q`).

    `delegation_id` is unique within the session; `note` is what the model said aloud when it delegated;
    `frames` are the newest frames, oldest first; `memories` the memory lines retrieved for the question;
    `stream_time` the stream time of the tick that delegated.
    """

    session_id: str
    delegation_id: str
    question: str
    note: str = ""
    frames: tuple[DelegationFrame, ...] = ()
    memories: tuple[str, ...] = ()
    stream_time: float = 0.0


@dataclass(frozen=True, slots=True)
class DelegationReceipt:
    """The brain's immediate answer to a delegation: taken, or refused (its failed result follows all the same,
    except for a duplicate id, whose first delegation's result is the one). `deadline`: the wall time
    (time.time()) by which an accepted delegation's one result will have been delivered."""

    accepted: bool
    reason: str = ""
    deadline: float = 0.0


@dataclass(frozen=True, slots=True)
class RichPart:
    """A result that is more than a sentence, shown as its own card: `kind` is one of RICH_KINDS (`table`: a
    Markdown table; `html`: an HTML page, to be shown sandboxed; `chart`: a Vega-Lite JSON spec)."""

    kind: str
    content: str


@dataclass(frozen=True, slots=True)
class DelegationResult:
    """The one outcome of one delegation.

    `text`: the condensed answer, short enough to be spoken and to sit in a prompt; `full_text`: the whole
    answer when it is longer than `text` (else empty); `rich`: a table, page or chart, when the answer had one;
    `reason`: why it is not `done`; `duration_s`: from acceptance to outcome.
    """

    session_id: str
    delegation_id: str
    status: DelegationStatus
    question: str = ""
    text: str = ""
    full_text: str = ""
    rich: RichPart | None = None
    reason: str = ""
    duration_s: float = 0.0
    stream_time: float = 0.0  # of the tick that delegated

    def prompt_line(self, question_chars: int = 120) -> str:
        """The result as one line for the session's next prompts (the inbox's `text`)."""
        question = " ".join(self.question.split())
        if len(question) > question_chars:
            question = question[: question_chars - 1].rstrip() + "…"
        about = f'about "{question}": ' if question else ""
        if self.status == "done":
            return about + self.text
        what = {"failed": "no answer", "timed_out": "no answer in time", "cancelled": "cancelled"}[self.status]
        return f"{about}{what}" + (f" ({self.reason})" if self.reason else "")


M = TypeVar("M")

_NESTED: dict[type, dict[str, type]] = {
    SampleVerdict: {"sample": Sample},
    TickRequest: {"samples": Sample, "dialog": Turn, "lookback": Sample},
    DelegationRequest: {"frames": DelegationFrame},
    DelegationResult: {"rich": RichPart},
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
