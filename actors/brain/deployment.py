"""The brain on Ray Serve, routed by session id, and its handle-side client for the roles that delegate.

`delegate` answers at once (accepted, or refused with the reason); the delegation runs in the replica's
background and its one result lands in the session's inbox in Redis (`SessionStore.push_delegation_result`).
A session's calls reach the replica its id hashes to, so a `cancel` finds the delegation it names, and a `follow`
is held on the replica that runs it (its failing tells the session at once that the replica was lost).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.brain.backend import BrainBackend
from actors.brain.backends import load_backend
from actors.brain.runner import FOLLOW_WAIT_S
from actors.brain.runner import Brain as BrainRunner
from actors.common.config import VigilConfig
from actors.common.messages import DelegationReceipt, DelegationRequest
from actors.common.metrics import VigilMetrics
from actors.common.replicas import Overloaded, call_replica, session_affinity
from actors.common.session_store import SessionStore
from actors.interaction.deployment import RemoteEngine

log = logging.getLogger(__name__)

# A call to the brain only takes or refuses a delegation: it is quick, or the brain is overloaded.
CALL_TIMEOUT_S = 5.0


def brain_backend(config: VigilConfig, interaction: DeploymentHandle | None = None) -> BrainBackend:
    """The configured backend; for `engine`, through the client of the interaction deployment given."""
    if config.brain.backend == "engine" and interaction is not None:
        engine = RemoteEngine(interaction)
        return load_backend(config.brain, engine.decide, engine.check_health)
    return load_backend(config.brain)


def engine_config(config: VigilConfig) -> VigilConfig:
    """The config of the brain's own interaction deployment (`brain.backend: engine`): the brain's model (when
    set) with room for a whole answer."""
    update: dict[str, object] = {"max_new_tokens": config.brain.max_tokens}
    if config.brain.model:
        update["model"] = config.brain.model
    return config.model_copy(update=update)


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_timeout_s=15, request_router_config=session_affinity())
class Brain:
    """Delegations of many sessions answered in the background (see `actors.brain.runner`).

    `interaction`: for `brain.backend: engine`, a handle to an interaction deployment of the brain's own,
    bound with `engine_config(config)`."""

    def __init__(self, config: VigilConfig, interaction: DeploymentHandle | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        self.store = SessionStore.from_url(config.redis_url or "", config.session_ttl_s, config.event_log_max)
        self.metrics = VigilMetrics()
        backend = brain_backend(config, interaction)
        self.brain = BrainRunner.from_config(config.brain, backend, self.store.push_delegation_result, self.metrics)
        log.info("brain: backend %r", backend)

    async def delegate(self, request: DelegationRequest) -> DelegationReceipt:
        """Take the delegation or refuse it, at once; its result goes to the session's inbox later."""
        return self.brain.delegate(request)

    async def cancel(self, session_id: str, delegation_id: str) -> bool:
        """Cancel a delegation in flight; False when none by that id is in flight here."""
        return self.brain.cancel(session_id, delegation_id)

    async def cancel_session(self, session_id: str) -> int:
        return self.brain.cancel_session(session_id)

    async def follow(self, session_id: str, delegation_id: str) -> bool:
        """Held while the delegation runs here (at most FOLLOW_WAIT_S): True when it is still in flight (ask
        again), False once its result is delivered or when it is not in flight here. The session that holds
        this call learns at once when this replica is lost, instead of at the receipt's deadline."""
        return await self.brain.follow(session_id, delegation_id, FOLLOW_WAIT_S)

    async def ready(self) -> None:
        """Readiness: Redis answers and the backend can answer now (raises saying which is not)."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await self.store.ping()
        await self.brain.check_health()

    async def check_health(self) -> None:
        """Liveness: the replica runs. An endpoint that is down does not restart it (that would cancel every
        delegation in flight); `ready` reports it."""

    async def __del__(self) -> None:
        await self.brain.close()
        await self.store.close()


class RemoteBrain:
    """The brain deployment seen from a role that delegates: each call routed by session id and bounded by
    CALL_TIMEOUT_S (`Overloaded` past it); a lost replica is `ReplicaFailed`. The caller follows each accepted
    delegation (`follow`), so the loss of the replica that runs it shows at once; one whose result has not
    arrived by the receipt's `deadline` was lost with its replica all the same."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def delegate(self, request: DelegationRequest) -> DelegationReceipt:
        routed = self.handle.options(session_id=request.session_id)
        receipt: DelegationReceipt = await self._bounded(routed.delegate.remote(request), "delegate")
        return receipt

    async def cancel(self, session_id: str, delegation_id: str) -> bool:
        routed = self.handle.options(session_id=session_id)
        return bool(await self._bounded(routed.cancel.remote(session_id, delegation_id), "cancel"))

    async def cancel_session(self, session_id: str) -> int:
        routed = self.handle.options(session_id=session_id)
        return int(await self._bounded(routed.cancel_session.remote(session_id), "cancel_session"))

    async def follow(self, session_id: str, delegation_id: str) -> bool:
        """True while the delegation is still in flight on the replica the session's calls reach (ask again);
        `ReplicaFailed` when that replica was lost meanwhile."""
        routed = self.handle.options(session_id=session_id)
        call = routed.follow.remote(session_id, delegation_id)
        return bool(await self._bounded(call, "follow", FOLLOW_WAIT_S + CALL_TIMEOUT_S))

    async def ready(self) -> None:
        await self._bounded(self.handle.ready.remote(), "ready")

    async def check_health(self) -> None:
        await self._bounded(self.handle.check_health.remote(), "check_health")

    @staticmethod
    async def _bounded(response: Any, call: str, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        try:
            return await asyncio.wait_for(call_replica(response), timeout_s)
        except TimeoutError:
            cancel = getattr(response, "cancel", None)
            if cancel is not None:
                cancel()
            raise Overloaded(f"the brain did not answer {call} within {timeout_s:g} s") from None
