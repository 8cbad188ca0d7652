"""Shared fixtures: a real Redis, tiny models (see fixtures_*.py)."""

from tests.fixtures_gateway import *  # noqa: F403
from tests.fixtures_models import *  # noqa: F403
from tests.fixtures_redis import *  # noqa: F403
