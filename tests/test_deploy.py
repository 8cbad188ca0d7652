"""The KubeRay manifest matches the code: its Serve application builds from `serve_app:app_builder` with its
args, and every deployment it configures exists (a misspelt name would be ignored by Serve, silently)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray import serve

import serve_app
from actors.common.config import VigilConfig

pytestmark = pytest.mark.unit

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "rayservice.yaml"


def test_the_rayservice_builds_and_names_only_real_deployments(monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = yaml.safe_load(MANIFEST.read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    assert application["import_path"] == "serve_app:app_builder"
    monkeypatch.setenv("VIGIL_API_KEY", "from-the-secret")  # the manifest takes it from a Secret
    config = VigilConfig.from_env(application["args"])
    assert config.memory and config.memory_replicas == 2 and not config.fallback_to_demo
    assert isinstance(serve_app.build_app(config), serve.Application)
    defined = {value.name for value in vars(serve_app).values() if isinstance(value, serve.Deployment)}
    assert defined == {"Ingest", "Sampler", "Interaction", "Memory"}
    configured = {deployment["name"] for deployment in application["deployments"]}
    assert configured <= defined, f"unknown deployments in the manifest: {configured - defined}"
