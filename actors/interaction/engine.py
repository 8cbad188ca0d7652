"""The engine interface behind the interaction role: one decision per tick request."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from actors.common.messages import Decision, EngineInfo, TickRequest


class EngineError(RuntimeError):
    """The engine could not decide a tick (the tick is recorded as `skipped:engine_error`)."""


class Engine(ABC):
    """A decision engine. Implementations keep all blocking work off the event loop.

    `batches_itself`: the engine batches concurrent calls on its own (vLLM's scheduler, a remote server), so the
    deployment hands it each tick as it comes instead of gathering them into a batch first.
    """

    batches_itself: ClassVar[bool] = False

    @abstractmethod
    async def start(self) -> None:
        """Load the model; raise with a clear message if it cannot be loaded."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine cannot serve decisions."""

    @abstractmethod
    async def decide(self, requests: list[TickRequest]) -> list[Decision]:
        """Decide a batch of ticks (one per session); the answer has one Decision per request, in order."""

    @abstractmethod
    def info(self) -> EngineInfo:
        """Which model this engine runs."""
