"""Vigil's configuration: one pydantic model, loadable from the environment (VIGIL_*) or a Serve config file."""

from __future__ import annotations

import ipaddress
import json
import os
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

ENV_PREFIX = "VIGIL_"
DEFAULT_MODEL = "Qwen/Qwen2-VL-2B-Instruct"


class Limits(BaseModel):
    """Hard limits on everything a client can send."""

    max_body_bytes: int = 64 * 1024
    max_sdp_bytes: int = 32 * 1024
    max_tracks: int = 2
    max_message_bytes: int = 4096
    max_text_chars: int = 1000
    max_instructions: int = 8
    max_sessions: int = 64
    max_frame_pixels: int = 1920 * 1080
    # Sessions one API key / one client address may hold at once (created and not yet expired, or connected),
    # counted across every ingest replica. With one shared API key, the key quota caps the whole deployment.
    max_sessions_per_key: int = Field(default=32, ge=1)
    max_sessions_per_address: int = Field(default=16, ge=1)
    # The streaming API (docs/api.md): a chat-completions request, and the images (data URLs) it may carry.
    max_chat_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(default=16, ge=1)
    max_image_bytes: int = Field(default=4 * 1024 * 1024, ge=1)


class BrainConfig(BaseModel):
    """The background brain that answers delegated questions (`VIGIL_BRAIN_<NAME>`).

    It reaches one endpoint, `base_url`, and nothing else; it never runs commands. The API key is not part of
    the configuration: `api_key_env` names the environment variable that holds it, read when the backend is
    made, so no config dump or log line can show it.
    """

    backend: Literal["none", "openai", "agent", "engine"] = Field(
        default="none", description="openai: an OpenAI-compatible chat-completions server with images; agent: a "
        "JoyAI-style agent service (POST /v1/solve); engine: an interaction deployment of its own (a bigger model); "
        "none: delegations are answered failed",
    )
    base_url: str = Field(default="", description="openai: the API root (http://host:8001/v1); agent: the service root")
    model: str = Field(default="", description="openai: the model (empty: the first one listed); engine: the model")
    api_key_env: str = Field(default="VIGIL_BRAIN_API_KEY", description="the variable holding the key (never the key)")
    timeout_s: float = Field(default=120.0, gt=0.0, description="a delegation's outcome is due this long after it")
    max_in_flight_per_session: int = Field(default=2, ge=1, description="a session's delegations running or queued")
    max_in_flight: int = Field(default=16, ge=1, description="delegations running at once (per brain replica)")
    max_queued: int = Field(default=64, ge=0, description="delegations waiting for a slot, first come first served")
    max_frames: int = Field(default=8, ge=0, description="the newest frames sent with a delegation")
    max_tokens: int = Field(default=1024, ge=1, description="openai and engine: tokens of an answer")
    spoken_chars: int = Field(default=300, ge=40, description="the condensed, spoken part of an answer, in characters")

    @field_validator("base_url")
    @classmethod
    def _base_url_is_http(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("brain.base_url must be an http:// or https:// URL")
        if "@" in urlsplit(value).netloc:
            # It is logged and shown: credentials go in the variable api_key_env names.
            raise ValueError("brain.base_url must not hold credentials; put the key in brain.api_key_env's variable")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _api_key_env_is_a_name(cls, value: str) -> str:
        if value and not (value.replace("_", "a").isalnum() and value.isascii() and not value[0].isdigit()):
            raise ValueError("brain.api_key_env must be the name of an environment variable (not the key itself)")
        return value

    @model_validator(mode="after")
    def _endpoint_for_remote_backends(self) -> BrainConfig:
        if self.backend in ("openai", "agent") and not self.base_url:
            raise ValueError(f"brain.backend {self.backend!r} needs brain.base_url (VIGIL_BRAIN_BASE_URL)")
        return self


class VigilConfig(BaseModel):
    """Everything Vigil reads at start-up. Secrets are `SecretStr` so they never print."""

    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    redis_dir: str = ".cache/redis"
    api_key: SecretStr | None = None
    trust_forwarded_for: bool = Field(
        default=False, description="count sessions by the address the proxy in front appended to X-Forwarded-For; "
        "only behind a proxy that sets it, or any client can claim any address",
    )

    model: str = DEFAULT_MODEL
    fallback_to_demo: bool = True
    demo_model_dir: str = ".cache/vigil-demo-model"
    engine: Literal["transformers", "openai", "vllm"] = "transformers"
    device: str = "cpu"
    max_new_tokens: int = 40
    image_size: int = Field(
        default=448, description="Longest side of a sample, in pixels, before the engine's own resize"
    )

    tick_interval_s: float = 1.0
    tick_frame_wait_s: float = Field(
        default=0.45, ge=0.0, le=2.0, description="a tick whose newest frame is older than a quarter of the frame "
        "interval waits this long at most (and half the tick interval) for the next frame, when one is expected "
        "by then, unless its previous tick still runs: it decides on a frame that just arrived (0: never waits)",
    )
    short_term_frames: int = 4
    prompt_layout: Literal["auto", "window", "append"] = Field(
        default="auto", description="window: the newest short_term_frames frames; append: the prompt grows by a "
        "frame a tick and resets every prompt_segment_frames, so a prefix cache serves it; auto: append for the "
        "engines with a prefix cache (vllm, openai), window for transformers",
    )
    prompt_segment_frames: int = Field(default=32, ge=1)
    dialog_turns: int = 6
    silent_without_instruction: bool = True
    change_threshold: float = 0.08
    sampler: Literal["deployment", "inline"] = Field(
        default="inline", description="inline: the ingest judges its frames itself (a 16x16 signature of the "
        "frame it already holds at the model's size), a sixth of the CPU per stream of a call to the sampler "
        "deployment; deployment: the sampler deployment judges them (bound only then)",
    )
    video_max_kbps: int = Field(
        default=400, ge=50, le=20_000, description="the most video a client is asked to send (b=AS in the answer): "
        "the model sees a frame a second at image_size, and decoding costs the ingest CPU in proportion",
    )
    video_decode_layers: int = Field(
        default=1, ge=0, le=4, description="how many temporal layers of a VP8 stream the ingest decodes (0: all): "
        "the page sends two, and a tick takes a frame a second, so layer 0 alone (2.5 of 5 frames a second) is "
        "enough and halves the decoding; a stream without layers is decoded whole",
    )
    video_bandwidth_estimate: bool = Field(
        default=False, description="negotiate the receiver's bandwidth estimate (REMB over abs-send-time): a "
        "computation per packet and, on a loaded replica, RTCP for many packets; without it the sender adapts to "
        "the losses the receiver reports, under video_max_kbps",
    )
    session_ttl_s: int = 13 * 3600
    unconnected_session_ttl_s: int = Field(
        default=120, ge=1, description="a created session whose offer is not accepted this soon expires; an accepted "
        "offer gives it session_ttl_s",
    )
    http_session_ttl_s: int = Field(
        default=3600, ge=1, description="a session of the streaming API (docs/api.md) idle this long is dropped: its "
        "name then starts a new session",
    )
    event_log_max: int = 50_000
    redis_tick_timeout_s: float = Field(
        default=0.25, gt=0.0, description="a tick waits this long for Redis (its pending inbox, its outcome's write) "
        "before it goes on without: the inbox is read again next tick, the outcome is written behind",
    )
    redis_http_timeout_s: float = Field(
        default=0.5, gt=0.0, description="an HTTP call whose Redis does not answer this soon is refused with "
        "503 redis_unavailable (and Retry-After) rather than left hanging; time the replica's own loop ran "
        "behind is not counted against Redis",
    )
    outcome_buffer: int = Field(
        default=300, ge=1, description="tick outcomes a session holds while Redis is out of reach, written in "
        "order once it is back; past it they are dropped (counted) and one skipped:unlogged outcome marks them",
    )
    heartbeat_timeout_s: float = 30.0
    decide_timeout_s: float = Field(
        default=10.0, gt=0.0,
        description="a tick's decision is due this long after the tick: later, it is recorded skipped:timeout "
        "(or skipped:overload when it could not even start); raise it for a model slower than the tick interval",
    )
    speak_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="a new session's proactivity: speak when P(respond or delegate) is at least this",
    )

    # -- the vllm engine (GPU; `pip install 'vigil[vllm]'`): arguments for vLLM's engine (max_num_seqs,
    # max_num_batched_tokens, limit_mm_per_prompt, gpu_memory_utilization, dtype, ...); prefix caching is always on.
    vllm_engine_args: dict[str, Any] = Field(default_factory=dict, description="VIGIL_VLLM_ENGINE_ARGS as JSON")
    vllm_max_lookback_images: int = 4

    # -- the openai engine: any OpenAI-compatible chat-completions server (vllm serve, SGLang, the JoyAI API)
    openai_base_url: str = Field(default="", description="e.g. http://127.0.0.1:8001/v1")
    openai_model: str = ""
    openai_api_key: SecretStr | None = Field(default=None, description="VIGIL_OPENAI_API_KEY; never logged")
    openai_timeout_s: float = 10.0
    openai_retries: int = Field(default=1, ge=0, le=5)
    openai_images: bool = Field(default=True, description="false: a text-only model; frames go as their time tags")
    openai_session_header: str = Field(
        default="x-streaming-session", description="header that carries the session id (JoyAI's)"
    )

    ice_servers: list[str] = Field(default_factory=list)
    ice_host_addresses: list[str] = Field(default_factory=list)
    ice_allowed_networks: list[str] = Field(default_factory=list)
    # A TURN relay for clients (coturn with use-auth-secret): with both set, each session's client is handed
    # short-lived credentials for these URLs (actors/ingest/turn.py).
    turn_urls: list[str] = Field(
        default_factory=list, description="TURN URLs handed to clients, e.g. turn:turn.example.com:3478?transport=udp",
    )
    turn_secret: SecretStr | None = Field(default=None, description="the relay's shared secret; never logged")
    turn_ttl_s: int | None = Field(
        default=None, ge=60, description="how long handed TURN credentials last; unset: session_ttl_s",
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="each ingest replica also serves its metrics on this port "
        "(one replica per node), so Prometheus scrapes every replica rather than the one Serve routes /metrics to",
    )
    # -- video sources (actors/ingest/sources.py): off unless configured, since a server that opens URLs can be
    # made to reach what its clients cannot (SSRF). Each list below is empty by default, and empty allows nothing.
    sources_allowed_schemes: list[str] = Field(
        default_factory=list, description="URL schemes a session's source may have (rtsp, rtsps, http, https); "
        "empty: no URL sources",
    )
    sources_allowed_networks: list[str] = Field(
        default_factory=list, description="CIDRs every address a source's host resolves to must be in, e.g. "
        "10.0.0.0/8; empty: no URL sources",
    )
    sources_file_roots: list[str] = Field(
        default_factory=list, description="directories a file source's path must resolve under; empty: no files",
    )
    sources_max_upload_bytes: int = Field(default=0, ge=0, description="the largest upload played as a source; 0: "
                                          "no uploads")
    sources_upload_dir: str | None = Field(default=None, description="where uploads are kept while they play; unset: "
                                           "the system's temporary directory")
    sources_max_total: int = Field(default=8, ge=0, description="sources playing at once on one ingest replica "
                                   "(one per session: a new one replaces it)")
    sources_max_fps: float = Field(default=5.0, gt=0.0, le=30.0, description="decoded frames handed to a "
                                   "session's ticks per second at most (the newest wins)")
    sources_open_timeout_s: float = Field(default=10.0, gt=0.0, description="opening a source, each try")
    sources_read_timeout_s: float = Field(default=5.0, gt=0.0, description="a source that sends nothing this long "
                                          "has dropped")
    limits: Limits = Field(default_factory=Limits)
    brain: BrainConfig = Field(default_factory=BrainConfig)

    memory: bool = Field(default=True, description="12-hour session memory (retrieval in the prompt, recall)")
    memory_replicas: int = 1
    summary_model: str | None = Field(
        default=None, description="a causal LM that writes memory summaries; unset: extractive summaries"
    )
    summary_device: str = "cpu"
    memory_cpus: float = 0.25
    memory_top_k: int = 8
    memory_timeout_s: float = Field(default=0.5, description="a tick waits this long for memory lines")
    memory_refresh_s: float = Field(default=30.0, description="memory lines for the instructions are reused")
    keyframe_change: float = Field(default=0.3, description="change score from which a sample is a keyframe")
    keyframe_every_s: float = Field(default=5.0, description="at most one keyframe per this much stream time")

    interaction_replicas: int = 1
    ingest_replicas: int = Field(
        default=1, description="ingest replicas (HTTP + WebRTC peers); a session's calls go to its replica by the "
        "x-session-id header, and its clients resume on another when it goes",
    )
    max_ongoing_requests: int = 64
    interaction_max_queued: int = Field(
        default=256, description="ticks queued for the interaction replicas beyond which new ones are refused "
        "(skipped:overload)",
    )
    # Ray logical CPUs each replica reserves. The defaults fit the whole graph on a 2-core machine; the model
    # replica takes a whole core, the I/O-bound roles a quarter each.
    ingest_cpus: float = 0.25
    sampler_cpus: float = 0.25
    brain_cpus: float = 0.25
    interaction_cpus: float = 1.0

    @field_validator("ice_allowed_networks", "sources_allowed_networks")
    @classmethod
    def _networks_parse(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)
        return value

    @field_validator("sources_allowed_schemes")
    @classmethod
    def _source_schemes_known(cls, value: list[str]) -> list[str]:
        schemes = [scheme.strip().lower() for scheme in value if scheme.strip()]
        unknown = sorted(set(schemes) - {"rtsp", "rtsps", "http", "https"})
        if unknown:
            raise ValueError(f"sources_allowed_schemes: {unknown} unknown; choose from rtsp, rtsps, http, https")
        return schemes

    @property
    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    @property
    def resolved_prompt_layout(self) -> Literal["window", "append"]:
        if self.prompt_layout != "auto":
            return self.prompt_layout
        return "window" if self.engine == "transformers" else "append"

    @property
    def auth_required(self) -> bool:
        """Session creation needs the API key when one is set; loopback without a key is open."""
        return self.api_key is not None

    @classmethod
    def from_env(cls, overrides: dict[str, Any] | None = None) -> VigilConfig:
        """Read VIGIL_<FIELD>, VIGIL_LIMITS_<LIMIT> and VIGIL_BRAIN_<NAME> variables (and REDIS_URL); lists are
        comma-separated; `overrides` win."""
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = os.environ.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            if field.annotation == list[str]:
                values[name] = [part.strip() for part in raw.split(",") if part.strip()]
            elif field.annotation == dict[str, Any]:
                try:
                    values[name] = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{ENV_PREFIX}{name.upper()} must be a JSON object: {exc}") from None
            else:
                values[name] = raw
        limits = {name: raw for name in Limits.model_fields
                  if (raw := os.environ.get(f"{ENV_PREFIX}LIMITS_{name.upper()}")) is not None}
        if limits:
            values["limits"] = limits
        brain = {name: raw for name in BrainConfig.model_fields
                 if (raw := os.environ.get(f"{ENV_PREFIX}BRAIN_{name.upper()}")) is not None}
        if brain:
            values["brain"] = brain
        if "redis_url" not in values and os.environ.get("REDIS_URL"):
            values["redis_url"] = os.environ["REDIS_URL"]
        for name, value in (overrides or {}).items():
            # A section in `overrides` (limits, brain) sets its fields over the environment's, not instead.
            if isinstance(value, dict) and isinstance(values.get(name), dict):
                values[name] = values[name] | value
            else:
                values[name] = value
        config = cls.model_validate(values)
        if not config.is_loopback and config.api_key is None:
            raise ValueError(
                f"Vigil listens on {config.host}, which is not loopback: set VIGIL_API_KEY so that "
                "session creation is authenticated."
            )
        return config
