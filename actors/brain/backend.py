"""The interface behind the brain: one answer per delegated question, from whichever backend is configured."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from actors.common.messages import DelegationRequest, RichPart


class BackendError(RuntimeError):
    """The backend could not answer; its message is a short reason, safe to show the user (no secrets)."""


class BackendTimeout(BackendError):
    """The backend itself gave up in time (an agent's `timeout`, an HTTP call past its timeout)."""


@dataclass(frozen=True, slots=True)
class BrainAnswer:
    """What a backend answered: the text, and a table, page or chart when there was one. Unbounded: the brain
    condenses and bounds it into a `DelegationResult`."""

    text: str
    rich: RichPart | None = None


class BrainBackend(ABC):
    """A way to answer delegated questions. Implementations reach only their one configured endpoint, run no
    commands, and bound every network await with a timeout; cancelling `solve` abandons its call."""

    name: str = "backend"

    @abstractmethod
    async def solve(self, request: DelegationRequest) -> BrainAnswer:
        """Answer one delegation; raise BackendError (BackendTimeout when out of time) with a short reason."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raise BackendError unless the backend can answer now."""

    async def close(self) -> None:  # noqa: B027 (optional: most backends hold a connection pool, some nothing)
        """Release connections (nothing by default)."""


class DisabledBackend(BrainBackend):
    """No brain configured (`brain.backend: none`): every delegation ends failed, saying so."""

    name = "none"
    REASON = "no background brain is configured (VIGIL_BRAIN_BACKEND)"

    async def solve(self, request: DelegationRequest) -> BrainAnswer:
        raise BackendError(self.REASON)

    async def check_health(self) -> None:
        raise BackendError(self.REASON)
