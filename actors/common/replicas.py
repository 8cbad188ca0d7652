"""How one deployment calls another's replicas: routed by session, and with the two ways a call can fail
without an answer made into errors the caller can act on.

Ray Serve does not retry a call whose replica died, and a deployment whose queue is full refuses the call; the
caller decides what to do (retry elsewhere, or record the tick as `skipped:replica_failed` / `skipped:overload`),
so every handle-side client turns what Ray raises into `ReplicaFailed` or `Overloaded`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError


class ReplicaFailed(RuntimeError):
    """The replica serving a call died mid-call (the tick is recorded as `skipped:replica_failed`)."""


class Overloaded(RuntimeError):
    """A deployment could not start a call before its deadline (the tick is recorded as `skipped:overload`)."""


REPLICA_LOST = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)


def session_affinity() -> RequestRouterConfig:
    """Route each call by its `session_id` to the replica the id hashes to, so a session's state (its memory,
    its engine's prefix cache) stays on one replica while it lives, with sessions spread evenly over replicas.

    One fallback, the next replica on the ring: when the owner dies, its sessions go at once to the replica that
    owns them once the ring is rebuilt, instead of queueing (and holding up other sessions' calls) until then.
    """
    return RequestRouterConfig(
        request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",  # type: ignore[arg-type]
        request_router_kwargs={"num_fallback_replicas": 1},
    )


async def taken_by_replica(response: Any, within_s: float, what: str) -> Any:
    """The ObjectRef of a call (a `DeploymentResponse`) once a replica has taken it; `Overloaded` when none did
    within `within_s` (every replica busy, or every one lost and no replacement up yet: Serve would hold the call
    until one is) or when the deployment's queue is full. `what` names the call in the error."""
    try:
        return await asyncio.wait_for(response._to_object_ref(), within_s)
    except TimeoutError:
        response.cancel()
        raise Overloaded(f"no replica took {what} within {within_s:g} s") from None
    except BackPressureError as exc:
        raise Overloaded(str(exc)) from exc
    except REPLICA_LOST as exc:
        raise ReplicaFailed(str(exc)) from exc


async def call_replica(response: Any) -> Any:
    """The result of a call to another deployment (a `DeploymentResponse`); `ReplicaFailed` when its replica
    was lost, `Overloaded` when the deployment's queue was full."""
    try:
        return await response
    except REPLICA_LOST as exc:
        raise ReplicaFailed(str(exc)) from exc
    except BackPressureError as exc:
        raise Overloaded(str(exc)) from exc
