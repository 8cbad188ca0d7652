"""Shared fixtures: a real Redis, tiny models, a demo Vigil (see fixtures_*.py)."""

import importlib.util
from pathlib import Path

import pytest

from tests.fixtures_gateway import *  # noqa: F403
from tests.fixtures_models import *  # noqa: F403
from tests.fixtures_models import DEMO_MODEL, DEMO_TRAINING
from tests.fixtures_redis import *  # noqa: F403
from tests.fixtures_roles import *  # noqa: F403
from tests.fixtures_roles import ROLES_MODULES
from tests.fixtures_vigil import SHARED_DEMO, SHARED_ROLES, SHARED_TINY, RunningVigil
from tests.vllm_server import VLLM_SERVER

# The test that leaves a Vigil with the tiny random model and default settings running, for SHARED_TINY's users.
TINY_HANDED_OVER_BY = ("tests/test_ingest_replicas.py::"
                       "test_a_redeploy_drains_sessions_onto_the_new_replicas_and_sigterm_onto_a_new_vigil")


@pytest.fixture
def vigil_demo(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> RunningVigil:
    """Vigil with the demo model, shared by the tests that use it (tests/test_e2e_*.py)."""
    return SHARED_DEMO.get(tmp_path_factory.mktemp("vigil-demo"), demo_model_dir)


@pytest.fixture
def vigil_tiny(tmp_path_factory: pytest.TempPathFactory, tiny_random_model_dir: Path) -> RunningVigil:
    """Vigil with the tiny random model and default settings: the one the ingest's redeploy test starts again,
    else one of its own (tests/test_serve_graph.py)."""
    return SHARED_TINY.get(tmp_path_factory.mktemp("vigil-tiny"), tiny_random_model_dir)


def _uses(item: pytest.Item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def _run_right_after(items: list[pytest.Item], nodeid: str, fixture: str) -> None:
    """The tests using `fixture` move to just after test `nodeid`, when both are selected."""
    moving = [item for item in items if _uses(item, fixture)]
    staying = [item for item in items if not _uses(item, fixture)]
    after = next((n for n, item in enumerate(staying) if item.nodeid == nodeid), None)
    if moving and after is not None:
        items[:] = staying[: after + 1] + moving + staying[after + 1:]


def _run_together(items: list[pytest.Item], modules: tuple[str, ...]) -> None:
    """The tests of `modules` run one module after the other, in that order, where the first of them ran."""
    def module(item: pytest.Item) -> str:
        return item.nodeid.partition("::")[0]

    moving = sorted((item for item in items if module(item) in modules), key=lambda item: modules.index(module(item)))
    if moving:
        at = next(n for n, item in enumerate(items) if module(item) in modules)
        staying = [item for item in items if module(item) not in modules]
        items[:] = staying[:at] + moving + staying[at:]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _run_together(items, ROLES_MODULES)
    _run_right_after(items, TINY_HANDED_OVER_BY, "vigil_tiny")
    shared_vigils = ((SHARED_DEMO, "vigil_demo"), (SHARED_TINY, "vigil_tiny"), (SHARED_ROLES, "vigil_every_role"))
    for shared, fixture in shared_vigils:
        users = [item.nodeid for item in items if _uses(item, fixture)]
        shared.last_user = users[-1] if users else None
    if any(_uses(item, "demo_model_dir") for item in items):
        DEMO_TRAINING.start(DEMO_MODEL)  # trained while the tests before its first user run
    if any(_uses(item, "vllm_server") for item in items) and importlib.util.find_spec("vllm") is not None:
        VLLM_SERVER.start()  # started while the tests before its user run


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    for shared in (SHARED_ROLES, SHARED_DEMO, SHARED_TINY):
        if item.nodeid == shared.last_user:
            shared.stop()
            shared.last_user = None  # a Vigil handed over after this is not kept


def pytest_sessionfinish(session, exitstatus) -> None:  # type: ignore[no-untyped-def]
    """No Vigil outlives the run: those still stopping in the background are waited for (or killed)."""
    from tests.fixtures_vigil import wait_for_stopping_vigils

    DEMO_TRAINING.stop()
    VLLM_SERVER.stop()
    SHARED_DEMO.stop()  # running still when the run was cut short
    SHARED_TINY.stop()
    SHARED_ROLES.stop()
    wait_for_stopping_vigils()
