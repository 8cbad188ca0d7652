"""Calls from one deployment to another's replicas: a replica that dies mid-call surfaces as `ReplicaFailed`.

Ray Serve does not retry a call whose replica died; the caller decides (retry elsewhere, or record the tick as
`skipped:replica_failed`), so every handle-side client turns the two ways Ray reports it into one error.
"""

from __future__ import annotations

from typing import Any

import ray


class ReplicaFailed(RuntimeError):
    """The replica serving a call died mid-call (the tick is recorded as `skipped:replica_failed`)."""


REPLICA_LOST = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)


async def call_replica(response: Any) -> Any:
    """The result of a call to another deployment (a `DeploymentResponse`); `ReplicaFailed` when its replica
    was lost."""
    try:
        return await response
    except REPLICA_LOST as exc:
        raise ReplicaFailed(str(exc)) from exc
