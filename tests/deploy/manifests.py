"""The manifests under deploy/ as the tests read them: every object, the RayService's groups, pod templates and
Serve application, and the environment a container gets from its ConfigMaps and Secrets."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs" / "deploy.md"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
CUSTOM_KINDS = {"RayService", "PodMonitor", "Probe", "PrometheusRule"}


@dataclass(frozen=True)
class Obj:
    """One object of a manifest file."""

    path: Path
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}: {self.kind}/{self.name}"


@cache
def objects() -> tuple[Obj, ...]:
    """Every object of every manifest under deploy/ (shared: a test that changes one deep-copies it first)."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        found += [Obj(path, body) for body in yaml.safe_load_all(path.read_text()) if body]
    return tuple(found)


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [o.body for o in objects() if o.kind == kind and o.name == name]
    assert len(matches) == 1, f"expected one {kind}/{name} under deploy/, found {len(matches)}"
    return matches[0]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o.body for o in objects() if o.kind == kind]


def rayservice() -> dict[str, Any]:
    (service,) = of_kind("RayService")
    return service


def cluster() -> dict[str, Any]:
    return rayservice()["spec"]["rayClusterConfig"]


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


def application() -> dict[str, Any]:
    (app,) = serve_config()["applications"]
    return app


def deployments() -> dict[str, dict[str, Any]]:
    """The Serve application's deployment options, by deployment name."""
    return {d["name"]: d for d in application()["deployments"]}


def worker_groups() -> dict[str, dict[str, Any]]:
    return {group["groupName"]: group for group in cluster()["workerGroupSpecs"]}


def ray_pod_templates() -> dict[str, dict[str, Any]]:
    """The head's and each worker group's pod template, by group name ("head" for the head)."""
    return {"head": cluster()["headGroupSpec"]["template"]} | {
        name: group["template"] for name, group in worker_groups().items()}


def pod_templates() -> dict[str, dict[str, Any]]:
    """Every pod template under deploy/: the Ray groups' and those of Deployments and StatefulSets."""
    found = {f"ray/{name}": template for name, template in ray_pod_templates().items()}
    for o in objects():
        if o.kind in ("Deployment", "StatefulSet"):
            found[f"{o.kind}/{o.name}"] = o.body["spec"]["template"]
    return found


def ray_container(group: str) -> dict[str, Any]:
    (container,) = ray_pod_templates()[group]["spec"]["containers"]
    return container


def container_ports(template: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A pod template's container ports by name."""
    return {port["name"]: port for c in template["spec"]["containers"] for port in c.get("ports", []) if "name" in port}


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def secret_refs(node: Any) -> set[tuple[str, str]]:
    """Every `secretKeyRef` (name, key) anywhere in `node`."""
    found: set[tuple[str, str]] = set()
    if isinstance(node, dict):
        if isinstance(ref := node.get("secretKeyRef"), dict):
            found.add((ref["name"], ref["key"]))
        for value in node.values():
            found |= secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= secret_refs(value)
    return found


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def container_env(container: Mapping[str, Any], secrets: Mapping[tuple[str, str], str]) -> dict[str, str]:
    """The environment Kubernetes gives `container`: its ConfigMaps (envFrom), then `env` in order with
    `$(NAME)` expanded from what is defined before it; `secrets` stands in for the Secrets' values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= find("ConfigMap", source["configMapRef"]["name"])["data"]
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = _VAR.sub(
                lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), item["value"])
        elif ref := item["valueFrom"].get("secretKeyRef"):
            if (ref["name"], ref["key"]) in secrets:
                env[item["name"]] = secrets[ref["name"], ref["key"]]
            else:
                assert ref.get("optional"), f"{item['name']}: no value for Secret {ref['name']}/{ref['key']}"
        elif ref := item["valueFrom"].get("configMapKeyRef"):
            env[item["name"]] = find("ConfigMap", ref["name"])["data"][ref["key"]]
    return env


def docs_secrets() -> dict[str, set[str]]:
    """The Secrets docs/deploy.md creates (`kubectl create secret generic NAME --from-literal=KEY=...`) and
    their keys; `kubectl create secret docker-registry NAME` counts with no keys."""
    found: dict[str, set[str]] = {}
    text = DOCS.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if match := re.search(r"kubectl\b.*\bcreate secret generic ([a-z0-9-]+)(.*)", line):
            found[match.group(1)] = set(re.findall(r"--from-literal=([A-Za-z0-9_.-]+)=", match.group(2)))
        elif match := re.search(r"kubectl\b.*\bcreate secret docker-registry ([a-z0-9-]+)", line):
            found[match.group(1)] = set()
    return found
