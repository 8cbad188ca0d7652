"""Prometheus metrics of the tick path, the sessions, rejected input and delegations (exposed at /metrics)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
DELEGATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class VigilMetrics:
    """All of Vigil's metrics in one registry (one per process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.tick_stage_seconds = Histogram(
            "vigil_tick_stage_seconds",
            "Duration of each stage of a tick: sample (frame arrival to sample), decide, record (log and send), "
            "total (frame arrival to sent).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.ticks_total = Counter(
            "vigil_ticks_total", "Ticks by recorded outcome.", ["outcome"], registry=self.registry
        )
        self.active_sessions = Gauge(
            "vigil_active_sessions", "Sessions with a live peer connection.", registry=self.registry
        )
        self.channel_rejected_total = Counter(
            "vigil_channel_rejected_total",
            "Data-channel messages rejected, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.http_rejected_total = Counter(
            "vigil_http_rejected_total", "HTTP requests rejected, by error code.", ["code"], registry=self.registry
        )
        self.sessions_created_total = Counter(
            "vigil_sessions_created_total", "Sessions created (POST /v1/sessions answered 201).", registry=self.registry
        )
        self.quota_refusals_total = Counter(
            "vigil_quota_refusals_total",
            "Sessions refused (429 quota_exceeded) by the quota that was full: key (per API key) or address "
            "(per client address).",
            ["quota"],
            registry=self.registry,
        )

        self.memory_writes_total = Counter(
            "vigil_memory_writes_total",
            "Writes to session memory by result: ok, refused (bad item), failed (after retries), dropped "
            "(queue full or session closed first).",
            ["result"],
            registry=self.registry,
        )
        self.memory_errors_total = Counter(
            "vigil_memory_errors_total",
            "Memory reads that failed or timed out (the tick went on without fresh memory lines), by call.",
            ["call"],
            registry=self.registry,
        )

        self.delegations_total = Counter(
            "vigil_delegations_total",
            "Delegations to the background brain by outcome: done, failed (refused ones included), timed_out, "
            "cancelled. Each delegation is counted once.",
            ["outcome"],
            registry=self.registry,
        )
        self.delegation_seconds = Histogram(
            "vigil_delegation_seconds", "Time from a delegation's acceptance to its outcome, by outcome.",
            ["outcome"], buckets=DELEGATION_BUCKETS, registry=self.registry,
        )
        self.delegations_in_flight = Gauge(
            "vigil_delegations_in_flight", "Delegations running or queued in the brain.", registry=self.registry
        )
        self.delegation_deliveries_failed_total = Counter(
            "vigil_delegation_deliveries_failed_total",
            "Delegation results that could not be written to the session's inbox.",
            registry=self.registry,
        )

        self.outcomes_held_total = Counter(
            "vigil_outcomes_held_total",
            "Tick outcomes sent to the client before they reached the event log (Redis did not answer in time); "
            "held in their session's buffer, they land in order when Redis is back.",
            registry=self.registry,
        )
        self.outcomes_dropped_total = Counter(
            "vigil_outcomes_dropped_total",
            "Tick outcomes the client heard that never reached the event log: their session's buffer was full "
            "while Redis was out of reach (a skipped:unlogged outcome in the log stands for them), or its peer "
            "closed before Redis was back.",
            registry=self.registry,
        )
        self.outcomes_pending = Gauge(
            "vigil_outcomes_pending", "Tick outcomes held for the event log, waiting for Redis.", registry=self.registry
        )

        self.prompt_tokens = Histogram(
            "vigil_prompt_tokens", "Prompt tokens of each decided tick.",
            buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384), registry=self.registry,
        )
        self.prefix_reuse_ratio = Histogram(
            "vigil_prefix_reuse_ratio",
            "Share of each decided tick's prompt tokens that the engine's prefix cache served.",
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0), registry=self.registry,
        )

        self.video_frames_total = Counter(
            "vigil_video_frames_total", "Frames of the VP8 streams received, by what the ingest did with them: "
            "decoded, or dropped unread (above the temporal layers it decodes, actors/ingest/video_layers.py).",
            ["result"], registry=self.registry,
        )

        # Counted at each scrape (watch_event_loop): what a long run watches for leaks.
        self.asyncio_tasks = Gauge(
            "vigil_asyncio_tasks", "Asyncio tasks not yet done on the event loop that serves the ingest's API.",
            registry=self.registry,
        )
        self.peer_connections = Gauge(
            "vigil_peer_connections",
            "WebRTC peer connections of this ingest replica not yet closed, whether or not a session still holds them.",
            registry=self.registry,
        )

    def watch_event_loop(self, loop: asyncio.AbstractEventLoop, open_peer_connections: Callable[[], int]) -> None:
        """Count the serving loop's tasks and the open peer connections at each scrape. `loop` is the serving loop as
        seen at start, for a scrape from a thread without one (the metrics port's)."""

        def tasks() -> float:
            try:
                serving = asyncio.get_running_loop()  # scraped through the API: the loop that runs it
            except RuntimeError:
                serving = loop
            return float(len(asyncio.all_tasks(serving)))

        self.asyncio_tasks.set_function(tasks)
        self.peer_connections.set_function(lambda: float(open_peer_connections()))

    def observe_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        """One decided tick's prompt size and the share of it its engine's prefix cache served (0 without one)."""
        if prompt_tokens <= 0:
            return
        self.prompt_tokens.observe(prompt_tokens)
        self.prefix_reuse_ratio.observe(cached_tokens / prompt_tokens)

    def observe_delegation(self, outcome: str, duration_s: float) -> None:
        """One delegation's outcome (done, failed, timed_out, cancelled) and its time from acceptance."""
        self.delegations_total.labels(outcome=outcome).inc()
        self.delegation_seconds.labels(outcome=outcome).observe(duration_s)

    def observe_stages(self, stages_ms: dict[str, float]) -> None:
        for stage, ms in stages_ms.items():
            self.tick_stage_seconds.labels(stage=stage).observe(ms / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
