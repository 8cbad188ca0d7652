"""A real Redis for tests: one embedded redis-server per test session, a fresh database view per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from actors.common.embedded_redis import EmbeddedRedis
from actors.common.session_store import SessionStore


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), snapshots=False)  # what the suite writes need not persist
    yield server
    server.shutdown()


@pytest.fixture
async def store(redis_server: EmbeddedRedis) -> AsyncIterator[SessionStore]:
    session_store = SessionStore.from_url(redis_server.url, ttl_s=600, event_log_max=1000)
    yield session_store
    await session_store.close()
