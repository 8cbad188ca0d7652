"""Names that must agree across deploy/ and docs/deploy.md do: the Secrets the manifests read (the brain's key
among them) are the ones the guide creates, each Redis address reaches its own instance, Services select pods
that have their ports, the TURN relay and Vigil share a secret, a port and a network, and the monitors scrape
ports that exist."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import pytest

from tests.deploy.manifests import (
    application,
    cluster,
    container_env,
    container_ports,
    docs_secrets,
    find,
    objects,
    of_kind,
    pod_templates,
    ray_container,
    ray_pod_templates,
    rayservice,
    secret_refs,
    selects,
    serve_config,
)
from tests.deploy.test_rayservice import SECRETS

pytestmark = pytest.mark.unit


def _service_backend(host: str, port: int, protocol: str = "TCP") -> dict:
    """The pod template behind Service `host` on `port`, checking the Service's target port is one it has."""
    service = find("Service", host)
    (entry,) = [p for p in service["spec"]["ports"] if p["port"] == port and p.get("protocol", "TCP") == protocol]
    backends = [t for name, t in pod_templates().items()
                if not name.startswith("ray/") and selects(service["spec"]["selector"], t["metadata"]["labels"])]
    assert len(backends) == 1, f"Service {host} selects {len(backends)} pod templates"
    target = entry.get("targetPort", port)
    ports = container_ports(backends[0])
    assert target in ports or target in {p["containerPort"] for p in ports.values()}, f"{host}:{port} -> {target}"
    return backends[0]


def test_the_secrets_read_are_the_ones_the_guide_creates() -> None:
    created = docs_secrets()
    referenced: set[tuple[str, str]] = set()
    for o in objects():
        referenced |= secret_refs(o.body)
    for name, key in sorted(referenced):
        assert name in created and key in created[name], f"docs/deploy.md does not create Secret {name}/{key}"
    pulled = {ref["name"] for t in ray_pod_templates().values() for ref in t["spec"].get("imagePullSecrets", [])}
    assert pulled <= set(created)
    assert {name for name, _ in referenced} | pulled == set(created), "the guide creates a Secret no one reads"
    # The brain's key among them: the variable brain.api_key_env names comes from a Secret the guide creates.
    brain_key = application()["args"]["brain"]["api_key_env"]
    for group in ray_pod_templates():
        (item,) = [e for e in ray_container(group)["env"] if e["name"] == brain_key]
        ref = item["valueFrom"]["secretKeyRef"]
        assert ref["key"] in created[ref["name"]], group


def test_each_redis_address_reaches_its_own_instance_with_a_volume_and_aof() -> None:
    sessions = urlsplit(container_env(ray_container("head"), SECRETS)["REDIS_URL"])
    gcs_host, _, gcs_port = cluster()["gcsFaultToleranceOptions"]["redisAddress"].rpartition(":")
    backends = [_service_backend(sessions.hostname or "", sessions.port or 0),
                _service_backend(gcs_host, int(gcs_port))]
    assert backends[0] is not backends[1], "session state and GCS fault tolerance share one Redis"
    for template in backends:
        (container,) = template["spec"]["containers"]
        args = container["args"]
        assert args[args.index("--appendonly") + 1] == "yes" and "--requirepass" in args
        assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
        (statefulset,) = [s for s in of_kind("StatefulSet") if s["spec"]["template"] is template]
        claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
        assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/data"} <= claims
        assert find("Service", statefulset["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    # Both use the password that the pods put into REDIS_URL and the GCS options read.
    password_ref = cluster()["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
    for template in backends:
        assert (password_ref["name"], password_ref["key"]) in secret_refs(template)


def test_services_select_pods_that_have_their_ports() -> None:
    for service in of_kind("Service"):
        for entry in service["spec"]["ports"]:
            _service_backend(service["metadata"]["name"], entry["port"], entry.get("protocol", "TCP"))


def _turn_args() -> dict[str, str]:
    (container,) = find("Deployment", "vigil-turn")["spec"]["template"]["spec"]["containers"]
    return dict(arg.removeprefix("--").partition("=")[::2] for arg in container["args"])


def test_the_turn_relay_and_vigil_agree() -> None:
    env = container_env(ray_container("cpu"), SECRETS)
    service_ports = {(p["protocol"].lower(), p["port"]) for p in find("Service", "vigil-turn")["spec"]["ports"]}
    for url in env["VIGIL_TURN_URLS"].split(","):
        match = re.fullmatch(r"turn:[^:?]+:(\d+)\?transport=(udp|tcp)", url)
        assert match, url
        assert (match.group(2), int(match.group(1))) in service_ports, url
    args = _turn_args()
    assert "use-auth-secret" in args and args["listening-port"] == "3478"
    # Both sides read the one shared secret.
    (coturn,) = find("Deployment", "vigil-turn")["spec"]["template"]["spec"]["containers"]
    assert secret_refs(coturn) & secret_refs(ray_container("cpu")) == {("vigil-turn", "secret")}
    # Relayed addresses (the coturn pod's IP) are among the remote candidates Vigil keeps, and coturn relays to
    # exactly the networks Vigil accepts candidates from.
    first, _, last = args["allowed-peer-ip"].partition("-")
    allowed = [ipaddress.ip_network(n) for n in env["VIGIL_ICE_ALLOWED_NETWORKS"].split(",")]
    relayed = ipaddress.summarize_address_range(ipaddress.ip_address(first), ipaddress.ip_address(last))
    assert list(relayed) == allowed
    assert args["denied-peer-ip"] == "0.0.0.0-255.255.255.255"


def test_the_monitors_scrape_ports_that_exist() -> None:
    env = container_env(ray_container("cpu"), SECRETS)
    for monitor in of_kind("PodMonitor"):
        selector = monitor["spec"]["selector"]
        chosen = {name: t for name, t in pod_templates().items()
                  if selects(selector.get("matchLabels", {}), t["metadata"]["labels"])
                  and all(t["metadata"]["labels"].get(e["key"]) in e["values"]
                          for e in selector.get("matchExpressions", []))}
        assert chosen, f"PodMonitor {monitor['metadata']['name']} selects no pod"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for name, template in chosen.items():
                assert endpoint["port"] in container_ports(template), f"{name} has no port {endpoint['port']}"
    # The ingest runs on the CPU group only, and serves its metrics on VIGIL_METRICS_PORT there.
    ingest = find("PodMonitor", "vigil-ingest")
    chosen = [name for name, t in pod_templates().items()
              if selects(ingest["spec"]["selector"]["matchLabels"], t["metadata"]["labels"])]
    assert chosen == ["ray/cpu"]
    assert container_ports(ray_pod_templates()["cpu"])["vigil-metrics"]["containerPort"] == int(
        env["VIGIL_METRICS_PORT"])
    # Ray exports its metrics on the port its pods name `metrics`.
    groups = [cluster()["headGroupSpec"], *cluster()["workerGroupSpecs"]]
    for group, template in zip(groups, ray_pod_templates().values(), strict=True):
        exported = int(group["rayStartParams"]["metrics-export-port"])
        assert container_ports(template)["metrics"]["containerPort"] == exported


def test_the_readiness_probe_reaches_the_serve_service() -> None:
    probe = find("Probe", "vigil-readyz")
    (target,) = probe["spec"]["targets"]["staticConfig"]["static"]
    url = urlsplit(target)
    # KubeRay names the Serve service after the RayService.
    assert (url.hostname or "").split(".")[0] == f"{rayservice()['metadata']['name']}-serve-svc"
    assert url.port == serve_config()["http_options"]["port"] and url.path == "/readyz"
    assert all(container_ports(t)["serve"]["containerPort"] == url.port for t in ray_pod_templates().values())
    alert_jobs = set(re.findall(r'job="([^"]+)"', str(find("PrometheusRule", "vigil")["spec"])))
    assert alert_jobs == {probe["spec"]["jobName"]}
    assert application()["route_prefix"] == "/"


def test_the_dashboard_configmap_is_provisioned_by_grafana() -> None:
    dashboard = find("ConfigMap", "vigil-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(dashboard["data"]) == ["vigil.json"]
