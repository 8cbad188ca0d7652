"""Every manifest under deploy/ is one a cluster accepts, checked offline: core objects and the Ray pod templates
(as PodTemplates) against Kubernetes' own schemas, the RayService and the Prometheus Operator's objects against
schemas written from their CRDs. Unknown fields fail: the API server would drop them without a word."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.manifests import CUSTOM_KINDS, SCHEMAS, Obj, objects, ray_pod_templates, rayservice

pytestmark = pytest.mark.unit

KUBERNETES_VERSION = "1.35"  # the oldest Kubernetes the manifests are meant for


def _errors(schema_file: str, body: dict[str, Any]) -> list[str]:
    schema = yaml.safe_load((SCHEMAS / schema_file).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]


def test_every_object_is_a_kind_these_tests_check() -> None:
    # Core kinds go to kubernetes-validate (which fails on a kind it has no schema for); the rest to a CRD schema.
    assert {o.kind for o in objects()} >= {"RayService", "StatefulSet", "Deployment", "Service", "ConfigMap",
                                          "PodMonitor", "Probe", "PrometheusRule"}
    assert {o.body["apiVersion"] for o in objects() if o.kind in CUSTOM_KINDS} == {"ray.io/v1",
                                                                                 "monitoring.coreos.com/v1"}


@pytest.mark.parametrize("obj", [o for o in objects() if o.kind not in CUSTOM_KINDS], ids=str)
def test_core_objects_pass_the_kubernetes_schemas(obj: Obj) -> None:
    kubernetes_validate.validate(obj.body, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("group", sorted(ray_pod_templates()))
def test_ray_pod_templates_pass_as_pod_templates(group: str) -> None:
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"vigil-{group}"},
                "template": ray_pod_templates()[group]}
    kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)


def test_the_rayservice_passes_the_schema_of_its_crd() -> None:
    assert _errors("rayservice.yaml", rayservice()) == []


def test_the_crd_schema_rejects_what_the_api_server_would_drop_or_refuse() -> None:
    misspelt = copy.deepcopy(rayservice())
    misspelt["spec"]["rayClusterDeletionDelaySecond"] = misspelt["spec"].pop("rayClusterDeletionDelaySeconds")
    assert any("rayClusterDeletionDelaySecond" in e for e in _errors("rayservice.yaml", misspelt))
    numeric = copy.deepcopy(rayservice())
    numeric["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("num-cpus" in e for e in _errors("rayservice.yaml", numeric))
    group = copy.deepcopy(rayservice())
    group["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e for e in _errors("rayservice.yaml", group))


@pytest.mark.parametrize("obj", [o for o in objects() if o.kind in CUSTOM_KINDS - {"RayService"}], ids=str)
def test_monitoring_objects_pass_the_schemas_of_their_crds(obj: Obj) -> None:
    assert _errors("monitoring.yaml", obj.body) == []


def test_the_monitoring_schema_rejects_unknown_fields() -> None:
    (monitor,) = [copy.deepcopy(o.body) for o in objects() if o.kind == "PodMonitor" and o.name == "vigil-ingest"]
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    assert _errors("monitoring.yaml", monitor)
