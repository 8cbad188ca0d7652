"""The RayService runs the graph Vigil builds, where it should, and keeps streams through an upgrade.

Its `serveConfigV2` passes Ray's own `ServeDeploySchema`, builds from `serve_app:app_builder` with its args and
the environment a Ray pod gets, names only real deployments, and survives the overrides Serve applies at deploy
time. Each replica fits a pod of the group its label selector names, the groups can grow to every deployment's
maximum, no replica lands on the head, and an upgrade keeps the old cluster as long as a session lives. The
background brain reaches one in-cluster endpoint with its key from a Secret, and the two other ways docs/deploy.md
describes (turned off; the `engine` backend on a GPU of its own) build graphs the manifest then fits.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from ray import serve
from ray.serve._private.build_app import build_app  # Serve's own graph walk (Ray is pinned)
from ray.serve.schema import ServeDeploySchema

import serve_app
from actors.brain.backends.chat import ChatBackend
from actors.brain.backends.http import read_api_key
from actors.brain.deployment import brain_backend
from actors.common.config import VigilConfig
from actors.ingest.deployment import DRAIN_GRACE_S
from tests.deploy.manifests import (
    DOCS,
    application,
    cluster,
    container_env,
    deployments,
    ray_container,
    ray_pod_templates,
    rayservice,
    serve_config,
    worker_groups,
)

pytestmark = pytest.mark.unit

SECRETS = {("vigil-api-key", "key"): "from-the-secret", ("vigil-turn", "secret"): "turn-shared-secret",
           ("vigil-redis", "password"): "0123456789abcdef", ("vigil-brain", "api-key"): "brain-key-from-the-secret"}
# Ray's "memory" resource is what a pod's memory limit leaves beside its object store (30 % by default).
OBJECT_STORE_SHARE = 0.3
GIB = 1024**3


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("8", "500m", "16Gi") as a number (bytes for memory)."""
    text = str(value)
    for suffix, factor in (("Ki", 1024), ("Mi", 1024**2), ("Gi", GIB), ("Ti", 1024**4), ("m", 0.001)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def _pod_env(monkeypatch: pytest.MonkeyPatch, group: str = "head") -> dict[str, str]:
    """Make this process's environment that of the group's Ray container (the app is built on the head)."""
    for name in list(os.environ):
        if name.startswith("VIGIL_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    env = container_env(ray_container(group), SECRETS)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _config(monkeypatch: pytest.MonkeyPatch) -> VigilConfig:
    _pod_env(monkeypatch)
    return VigilConfig.from_env(application()["args"])


def _graph(monkeypatch: pytest.MonkeyPatch, args: dict[str, Any]) -> set[str]:
    """The deployments `serve_app:app_builder` binds for these args, in a Ray pod's environment."""
    _pod_env(monkeypatch)
    return {d.name for d in build_app(serve_app.app_builder(args), name=application()["name"]).deployments}


def test_serve_config_passes_rays_schema_and_builds_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    ServeDeploySchema.model_validate(serve_config())
    app = application()
    assert app["import_path"] == "serve_app:app_builder"
    _pod_env(monkeypatch)
    built = serve_app.app_builder(app["args"])
    assert isinstance(built, serve.Application)
    # Serve refuses options for a deployment the graph does not have; every one it has is configured here.
    assert set(deployments()) == {d.name for d in build_app(built, name=app["name"]).deployments}
    # The brain is bound (backend openai: no interaction deployment of its own).
    assert "Brain" in deployments() and "BrainInteraction" not in deployments()


def test_serve_accepts_every_override_the_manifest_makes(monkeypatch: pytest.MonkeyPatch) -> None:
    # What Serve's controller does with the config at deploy time (Ray is pinned, so are these internals).
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.config import ReplicaConfig
    from ray.serve._private.deployment_info import DeploymentInfo

    schema = ServeDeploySchema.model_validate(serve_config())
    (app_schema,) = schema.applications
    _pod_env(monkeypatch)
    built = build_app(serve_app.app_builder(app_schema.args), name=app_schema.name)
    # The replicas' init args (handles to other deployments) are left out: they need a running Serve.
    infos = {d.name: DeploymentInfo(
        deployment_config=d._deployment_config, start_time_ms=0, deployer_job_id="manifest-test",
        replica_config=ReplicaConfig.create(d.func_or_class, ray_actor_options=d._replica_config.ray_actor_options,
                                            max_replicas_per_node=d._replica_config.max_replicas_per_node),
    ) for d in built.deployments}
    applied = override_deployment_info(infos, app_schema)
    for name, options in deployments().items():
        info = applied[name]
        assert info.replica_config.ray_actor_options["num_cpus"] == options["ray_actor_options"]["num_cpus"]
        scaling = info.deployment_config.autoscaling_config
        if "autoscaling_config" in options:
            assert scaling is not None and scaling.max_replicas == options["autoscaling_config"]["max_replicas"]
        else:
            assert scaling is None and info.deployment_config.num_replicas == options["num_replicas"]
    assert applied["Ingest"].replica_config.max_replicas_per_node == 1


def test_args_say_what_the_deployments_are_configured_with(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(monkeypatch)
    configured = deployments()
    assert config.ingest_replicas == configured["Ingest"]["num_replicas"]
    assert config.memory_replicas == configured["Memory"]["num_replicas"]
    scaling = configured["Interaction"]["autoscaling_config"]
    assert scaling["min_replicas"] <= config.interaction_replicas <= scaling["max_replicas"]
    assert config.brain.backend == "openai"
    for name, cpus in (("Ingest", config.ingest_cpus), ("Memory", config.memory_cpus),
                       ("Brain", config.brain_cpus), ("Interaction", config.interaction_cpus)):
        assert configured[name]["ray_actor_options"]["num_cpus"] == cpus, name
    assert config.engine == "vllm" and not config.fallback_to_demo and config.memory
    assert config.sampler == "inline"  # the ingest samples its own frames: no sampler deployment to place


def _group_capacity(group: str) -> dict[str, float]:
    """What Ray sees on one pod of a worker group: CPUs and GPUs from the container's limits, memory after the
    object store."""
    limits = ray_container(group)["resources"]["limits"]
    return {"num_cpus": _quantity(limits["cpu"]), "num_gpus": _quantity(limits.get("nvidia.com/gpu", 0)),
            "memory": _quantity(limits["memory"]) * (1 - OBJECT_STORE_SHARE)}


def _group_of(options: dict[str, Any]) -> str:
    selector = options["ray_actor_options"]["label_selector"]
    matches = [name for name, group in worker_groups().items()
               if all(group.get("labels", {}).get(k) == v for k, v in selector.items())]
    assert len(matches) == 1, f"{options['name']}'s label selector {selector} picks groups {matches}"
    return matches[0]


def _max_replicas(options: dict[str, Any]) -> int:
    return options["autoscaling_config"]["max_replicas"] if "autoscaling_config" in options else options["num_replicas"]


def test_each_replica_fits_a_pod_of_the_group_it_selects() -> None:
    placed = {name: _group_of(options) for name, options in deployments().items()}
    assert placed == {"Ingest": "cpu", "Memory": "cpu", "Brain": "cpu", "Interaction": "gpu"}
    for name, options in deployments().items():
        need, capacity = options["ray_actor_options"], _group_capacity(placed[name])
        for resource in ("num_cpus", "num_gpus", "memory"):
            assert need.get(resource, 0) <= capacity[resource], f"{name} needs more {resource} than a pod has"
    # Requests equal limits: the pods are Guaranteed, and what Ray counts is what the node reserved.
    for group in ray_pod_templates():
        resources = ray_container(group)["resources"]
        assert resources["requests"] == resources["limits"], group


def _demand(configured: dict[str, dict[str, Any]], size: Any = _max_replicas) -> dict[str, dict[str, float]]:
    """What the deployments ask of each group, each at `size` replicas (their maximum by default)."""
    demand: dict[str, dict[str, float]] = {}
    for options in configured.values():
        group = demand.setdefault(_group_of(options), {"num_cpus": 0.0, "num_gpus": 0.0, "memory": 0.0})
        for resource in group:
            group[resource] += options["ray_actor_options"].get(resource, 0) * size(options)
    return demand


def _min_replicas(options: dict[str, Any]) -> int:
    return options["autoscaling_config"]["min_replicas"] if "autoscaling_config" in options else options["num_replicas"]


def test_the_groups_can_grow_to_every_deployments_maximum() -> None:
    demand = _demand(deployments())
    assert set(demand) == {"cpu", "gpu"}  # the brain's replicas among the CPU group's
    for name, needed in demand.items():
        spec, capacity = worker_groups()[name], _group_capacity(name)
        assert spec["minReplicas"] <= spec["replicas"] <= spec["maxReplicas"]
        for resource, amount in needed.items():
            assert amount <= capacity[resource] * spec["maxReplicas"], f"group {name} cannot hold {resource}"
    # One ingest replica per pod: the CPU group's pods at their minimum hold every ingest replica.
    assert deployments()["Ingest"]["num_replicas"] <= worker_groups()["cpu"]["minReplicas"]
    # One interaction replica per GPU, and the GPU group grows as far as the interaction deployment does.
    interaction = deployments()["Interaction"]
    assert interaction["ray_actor_options"]["num_gpus"] == 1
    assert _max_replicas(interaction) <= worker_groups()["gpu"]["maxReplicas"] * _group_capacity("gpu")["num_gpus"]


def test_no_replica_runs_on_the_head_and_gpu_pods_reach_gpu_nodes() -> None:
    head = cluster()["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and "labels" not in head
    gpu = ray_pod_templates()["gpu"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    assert all("nvidia.com/gpu" not in ray_container(g)["resources"]["limits"] for g in ("head", "cpu"))


def test_an_upgrade_keeps_every_stream_until_its_session_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(monkeypatch)
    spec = rayservice()["spec"]
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    # The old cluster outlives the longest session (13 h), so no stream is cut when it goes.
    assert spec["rayClusterDeletionDelaySeconds"] >= config.session_ttl_s
    ingest = deployments()["Ingest"]
    # A replica Serve stops (scale-down, redeploy) drains: clients are told to reconnect, then its peers close.
    assert ingest["graceful_shutdown_timeout_s"] >= 10 * DRAIN_GRACE_S
    for group in ("cpu", "gpu"):
        grace = ray_pod_templates()[group]["spec"]["terminationGracePeriodSeconds"]
        assert grace > max(d.get("graceful_shutdown_timeout_s", 20) for d in deployments().values()), group


def test_the_pods_configure_vigil_from_the_configmap_and_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(monkeypatch)
    assert config.api_key is not None and config.api_key.get_secret_value() == "from-the-secret"
    assert config.turn_secret is not None and config.turn_secret.get_secret_value() == "turn-shared-secret"
    assert config.turn_urls and config.metrics_port is not None and config.ice_allowed_networks
    url = urlsplit(config.redis_url or "")
    assert (url.hostname, url.port, url.path, url.password) == ("vigil-redis", 6379, "/0", "0123456789abcdef")
    # The secrets stay out of the RayService itself: only references to Secrets.
    assert "0123456789abcdef" not in str(rayservice()) and "redis_url" not in application()["args"]
    # Every Ray pod reads the same settings (the app is built on the head, replicas run on the workers).
    envs = [container_env(ray_container(group), SECRETS) for group in ray_pod_templates()]
    assert all(env == envs[0] for env in envs)


def test_the_brain_reaches_one_in_cluster_endpoint_with_its_key_from_a_secret(
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(monkeypatch)
    brain = config.brain
    assert brain.backend == "openai" and urlsplit(brain.base_url).hostname
    # The operator's to change: the guide names it and says what to put there.
    assert brain.base_url in DOCS.read_text()
    # The key: in the variable api_key_env names, which every Ray pod gets from a Secret (never a value here).
    for group in ray_pod_templates():
        (item,) = [e for e in ray_container(group)["env"] if e["name"] == brain.api_key_env]
        assert set(item) == {"name", "valueFrom"} and "secretKeyRef" in item["valueFrom"], group
    assert "brain-key-from-the-secret" not in str(rayservice())
    key = read_api_key(brain.api_key_env)
    assert key is not None and key.get_secret_value() == "brain-key-from-the-secret"
    # The backend a Brain replica makes in that environment: the manifest's endpoint, the key shown nowhere.
    backend = brain_backend(config)
    try:
        assert isinstance(backend, ChatBackend) and backend.base_url == brain.base_url.rstrip("/")
        assert "brain-key-from-the-secret" not in repr(backend) + repr(config) + config.model_dump_json()
    finally:
        asyncio.run(backend.close())
    # A `brain` in the args replaces every VIGIL_BRAIN_* variable: none in the ConfigMap would be read.
    env = container_env(ray_container("cpu"), SECRETS)
    assert [name for name in env if name.startswith("VIGIL_BRAIN_") and name != brain.api_key_env] == []


def test_the_brain_turned_off_as_the_guide_says_leaves_the_other_deployments(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # backend none, and the Brain entry removed: Serve would refuse options for a deployment not in the graph.
    graph = _graph(monkeypatch, application()["args"] | {"brain": {"backend": "none"}})
    assert graph == set(deployments()) - {"Brain"}


def _docs_engine_variant() -> dict[str, Any]:
    """The change docs/deploy.md gives for the `engine` backend: its YAML block naming BrainInteraction."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.S)
    (block,) = [yaml.safe_load(b) for b in blocks if "BrainInteraction" in b]
    return block


def test_the_engine_backend_as_the_guide_gives_it_fits_a_gpu_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    variant = _docs_engine_variant()
    assert variant["args"]["brain"]["backend"] == "engine" and variant["args"]["brain"]["model"]
    app = copy.deepcopy(application())
    app["args"] |= variant["args"]
    app["deployments"] += variant["deployments"]
    ServeDeploySchema.model_validate(serve_config() | {"applications": [app]})
    configured = {d["name"]: d for d in app["deployments"]}
    assert _graph(monkeypatch, app["args"]) == set(configured) == set(deployments()) | {"BrainInteraction"}
    brain_engine = configured["BrainInteraction"]
    assert _group_of(brain_engine) == "gpu" and brain_engine["ray_actor_options"]["num_gpus"] == 1
    for resource, capacity in _group_capacity("gpu").items():
        assert brain_engine["ray_actor_options"].get(resource, 0) <= capacity, resource
    # It costs a GPU more: the guide's GPU group sizes hold the ticks' replicas and it, at their least and most.
    text = " ".join(DOCS.read_text().split())
    sizes = re.search(r"set the GPU group's `replicas` and `minReplicas` to (\d+) and its `maxReplicas` to (\d+)", text)
    assert sizes, "docs/deploy.md gives the GPU group's sizes for the engine backend"
    least, most = int(sizes.group(1)), int(sizes.group(2))
    gpus = _group_capacity("gpu")["num_gpus"]
    assert _demand(configured, _min_replicas)["gpu"]["num_gpus"] == least * gpus
    assert _demand(configured)["gpu"]["num_gpus"] == most * gpus
    assert most > worker_groups()["gpu"]["maxReplicas"], "the manifest's GPU group cannot hold it as it is"
