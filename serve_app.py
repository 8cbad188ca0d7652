"""Vigil's application graph on Ray Serve, and `main()`, which `make run` starts.

    ingest (HTTP + WebRTC, session loops) ──▶ sampler (VIGIL_SAMPLER=deployment; inline in the ingest by default)
                                          ├─▶ interaction (the VLM engine)
                                          ├─▶ memory (12-hour session memory; sessions routed by id)
                                          └─▶ brain (delegated questions, when VIGIL_BRAIN_BACKEND is set)

Each deployment lives in its role's package (`actors/<role>/deployment.py`); this module only binds them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import ray
from ray import serve

from actors.brain.deployment import Brain, engine_config
from actors.common.config import VigilConfig
from actors.ingest.deployment import Ingest
from actors.interaction.deployment import Interaction
from actors.memory.deployment import Memory
from actors.sampler.deployment import Sampler

log = logging.getLogger("vigil")


def build_app(config: VigilConfig) -> serve.Application:
    """The bound graph for a config (its `redis_url` must be set)."""
    if not config.redis_url:
        raise ValueError("build_app needs config.redis_url: start Redis first (main() embeds one)")
    interaction = Interaction.options(
        num_replicas=config.interaction_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.interaction_max_queued,
        ray_actor_options={"num_cpus": config.interaction_cpus},
    ).bind(config)
    sampler = None
    if config.sampler == "deployment":
        sampler = Sampler.options(ray_actor_options={"num_cpus": config.sampler_cpus}).bind(config)
    memory = None
    if config.memory:
        memory = Memory.options(
            num_replicas=config.memory_replicas, ray_actor_options={"num_cpus": config.memory_cpus}
        ).bind(config)
    brain = None
    if config.brain.backend != "none":
        own_engine = None
        if config.brain.backend == "engine":
            # The brain's bigger model, in an interaction deployment of its own (not the ticks' replicas).
            own_engine = Interaction.options(
                name="BrainInteraction", num_replicas=1, ray_actor_options={"num_cpus": config.interaction_cpus},
            ).bind(engine_config(config))
        brain = Brain.options(ray_actor_options={"num_cpus": config.brain_cpus}).bind(config, own_engine)
    ingest = Ingest.options(num_replicas=config.ingest_replicas, ray_actor_options={"num_cpus": config.ingest_cpus})
    return ingest.bind(config, sampler, interaction, memory, brain)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for `serve run serve_app:app_builder` and Serve config files (`args` override VIGIL_*)."""
    return build_app(VigilConfig.from_env(args))


def main() -> None:
    """Start Redis (embedded unless REDIS_URL is set), Ray, and Vigil; block until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = VigilConfig.from_env()
    except ValueError as exc:
        sys.exit(f"vigil: {exc}")
    redis = None
    if not config.redis_url:
        from actors.common.embedded_redis import EmbeddedRedis

        redis = EmbeddedRedis(config.redis_dir)
        config = config.model_copy(update={"redis_url": redis.url})
        log.info("embedded Redis at %s", redis.url)
    if config.engine == "transformers":
        from actors.interaction.engines.transformers import prepare_model

        config = prepare_model(config)  # the weights on disk (or the demo model trained) before replicas start
    ray.init(include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("VIGIL_", "HF_"))}})
    # Another driver (`serve run`, a redeploy) joins this cluster at this address.
    log.info("Ray cluster at %s", ray.get_runtime_context().gcs_address)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name="vigil", route_prefix="/")
    url = f"http://{config.host}:{config.port}/"
    print(f"\nVigil is running: open {url}\n", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    print("stopping Vigil…", flush=True)
    serve.shutdown()
    ray.shutdown()
    if redis is not None:
        redis.shutdown()


if __name__ == "__main__":
    main()
