"""Shared fixtures: a real Redis, tiny models, a demo Vigil (see fixtures_*.py)."""

from pathlib import Path

import pytest

from tests.fixtures_gateway import *  # noqa: F403
from tests.fixtures_models import *  # noqa: F403
from tests.fixtures_models import DEMO_MODEL, DEMO_TRAINING
from tests.fixtures_redis import *  # noqa: F403
from tests.fixtures_vigil import SHARED_DEMO, RunningVigil


@pytest.fixture
def vigil_demo(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> RunningVigil:
    """Vigil with the demo model, shared by the tests that use it (tests/test_e2e_*.py)."""
    return SHARED_DEMO.get(tmp_path_factory.mktemp("vigil-demo"), demo_model_dir)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    users = [item.nodeid for item in items if "vigil_demo" in getattr(item, "fixturenames", ())]
    SHARED_DEMO.last_user = users[-1] if users else None
    if any("demo_model_dir" in getattr(item, "fixturenames", ()) for item in items):
        DEMO_TRAINING.start(DEMO_MODEL)  # trained while the tests before its first user run


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if item.nodeid == SHARED_DEMO.last_user:
        SHARED_DEMO.stop()


def pytest_sessionfinish(session, exitstatus) -> None:  # type: ignore[no-untyped-def]
    """No Vigil outlives the run: those still stopping in the background are waited for (or killed)."""
    from tests.fixtures_vigil import wait_for_stopping_vigils

    DEMO_TRAINING.stop()
    wait_for_stopping_vigils()
