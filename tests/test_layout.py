"""The layout shows the actor graph: one package per role, dependencies that run one way, Serve only in
each package's `deployment.py`, and `serve_app.py` binding deployments it does not define."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from ray import serve

pytestmark = pytest.mark.unit

ACTORS = Path(__file__).resolve().parent.parent / "actors"
ROLES = ("ingest", "sampler", "interaction", "memory", "brain")
# The roles each role calls, and the modules of a called role that its callers may import: its client interface.
CALLS = {
    "ingest": {"sampler", "interaction", "memory", "brain"},
    "sampler": set(),
    "interaction": set(),
    "memory": set(),
    # The brain's `engine` backend asks an interaction deployment of its own, through its client.
    "brain": {"interaction"},
}
CLIENTS = {
    "sampler": {"actors.sampler.deployment"},
    "interaction": {"actors.interaction.deployment"},
    "memory": {"actors.memory.deployment", "actors.memory.link"},
    "brain": {"actors.brain.deployment"},
}


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (at any depth: imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from actors.common import decisions` imports the module actors.common.decisions.
            found |= {f"{node.module}.{alias.name}" for alias in node.names if (ACTORS.parent / node.module.replace(
                ".", "/") / f"{alias.name}.py").is_file()}
    return found


def _modules() -> list[tuple[str, Path]]:
    return [(path.relative_to(ACTORS).parts[0], path) for path in sorted(ACTORS.rglob("*.py"))
            if len(path.relative_to(ACTORS).parts) > 1]


def test_every_module_belongs_to_a_role_or_to_common() -> None:
    loose = [path.name for path in ACTORS.glob("*.py") if path.name != "__init__.py"]
    assert loose == []
    assert {package for package, _ in _modules()} == {*ROLES, "common"}
    for role in ROLES:
        assert (ACTORS / role / "deployment.py").is_file(), role


def test_dependencies_run_one_way() -> None:
    wrong = []
    for package, path in _modules():
        for module in sorted(_imports(path)):
            parts = module.split(".")
            if parts[0] != "actors" or len(parts) < 2 or parts[1] in (package, "common"):
                continue
            if package == "common":
                wrong.append(f"{path.relative_to(ACTORS)} imports {module}: common/ imports no role")
            elif parts[1] not in CALLS[package]:
                wrong.append(f"{path.relative_to(ACTORS)} imports {module}: {package} does not call {parts[1]}")
            elif module not in CLIENTS[parts[1]]:
                wrong.append(f"{path.relative_to(ACTORS)} imports {module}, an internal of {parts[1]}")
    assert wrong == []


def test_only_deployments_know_serve() -> None:
    knows_serve = {path.relative_to(ACTORS).as_posix() for _, path in _modules()
                   if any(module.startswith("ray.serve") for module in _imports(path))}
    # common/replicas.py says how deployments call each other (routing, Serve's errors), for all of them.
    assert knows_serve == {f"{role}/deployment.py" for role in ROLES} | {"common/replicas.py"}


def test_serve_app_binds_deployments_defined_in_their_packages() -> None:
    import serve_app

    deployments = {name: value for name, value in vars(serve_app).items() if isinstance(value, serve.Deployment)}
    assert set(deployments) == {"Ingest", "Sampler", "Interaction", "Memory", "Brain"}
    for name, deployment in deployments.items():
        assert deployment.func_or_class.__module__ == f"actors.{name.lower()}.deployment"
    source = ast.parse(Path(serve_app.__file__).read_text())
    defined = {node.name for node in source.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert defined == {"build_app", "app_builder", "main"}
