"""One Vigil with every role its own deployment, for the tests that kill its replicas and redeploy it
(tests/test_replica_kills.py, then tests/test_ingest_replicas.py, whose redeploy test stops it last): two ingest
replicas, two interaction replicas on the openai engine (a scripted model server), the sampler, memory, and the
brain (on a model server that never answers, so a delegation stays in flight until its replica is killed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_vigil import SHARED_ROLES, RunningVigil
from tests.openai_server import MODEL, ChatServer

CHAT_DELAY_S = 0.3  # each interaction call takes this long: a tick is in flight a third of every second
WORDS = " Let me work that out. </delegation> what do the prices on the shelf add up to?"
ROLES_MODULES = ("tests/test_replica_kills.py", "tests/test_ingest_replicas.py")  # the order they run in


@pytest.fixture(scope="session")
def roles_chat() -> Iterator[ChatServer]:
    """The interaction engine's model: silent unless a test makes one session speak."""
    with ChatServer() as server:
        server.script.delay_s = CHAT_DELAY_S
        server.script.words = WORDS
        yield server


@pytest.fixture(scope="session")
def roles_brain_chat() -> Iterator[ChatServer]:
    """The brain's model: it never answers."""
    with ChatServer() as server:
        server.script.hang = True
        yield server


@pytest.fixture
def vigil_every_role(
    tmp_path_factory: pytest.TempPathFactory, roles_chat: ChatServer, roles_brain_chat: ChatServer
) -> RunningVigil:
    """Started by the first test that asks; stopped after the last (`conftest.pytest_runtest_teardown`)."""
    return SHARED_ROLES.get(
        tmp_path_factory.mktemp("vigil-roles"), Path("unused"), VIGIL_ENGINE="openai",
        VIGIL_OPENAI_BASE_URL=roles_chat.base_url, VIGIL_OPENAI_MODEL=MODEL, VIGIL_INTERACTION_CPUS="0.25",
        VIGIL_INGEST_REPLICAS="2", VIGIL_INTERACTION_REPLICAS="2", VIGIL_SAMPLER="deployment",
        VIGIL_BRAIN_BACKEND="openai", VIGIL_BRAIN_BASE_URL=roles_brain_chat.base_url, VIGIL_BRAIN_MODEL=MODEL,
    )
