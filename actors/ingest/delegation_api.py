"""The HTTP side of a session's delegations: what they came to, and the user's cancel (docs/protocol.md)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request

from actors.common.messages import to_dict
from actors.ingest.api_error import ApiError
from actors.ingest.channel import ChannelError, parse_delegation_id

if TYPE_CHECKING:
    from actors.ingest.gateway import Gateway

CANCEL_TIMEOUT_S = 5.0


def delegation_routes(gateway: Gateway) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/sessions/{session_id}/delegations")
    async def delegations(session_id: str, request: Request) -> dict[str, Any]:
        """Every recorded result of the session's delegations, oldest first: one per delegation."""
        record = await gateway.authorize(session_id, request)
        results = await gateway.store.delegations(record.session_id)
        return {"delegations": [to_dict(result) for result in results]}

    @router.delete("/v1/sessions/{session_id}/delegations/{delegation_id}", status_code=202)
    async def cancel(session_id: str, delegation_id: str, request: Request) -> dict[str, Any]:
        """Cancel a delegation in flight; its `cancelled` result follows on the data channel and in the log."""
        record = await gateway.authorize(session_id, request)
        try:
            delegation_id = parse_delegation_id(delegation_id)
        except ChannelError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
        brain = gateway.services.brain
        if brain is None:
            raise ApiError(404, "not_in_flight", "no background brain is configured here (VIGIL_BRAIN_BACKEND)")
        try:
            cancelled = await asyncio.wait_for(brain.cancel(record.session_id, delegation_id), CANCEL_TIMEOUT_S)
        except Exception as exc:
            why = f"the brain did not answer ({type(exc).__name__}); retry"
            raise ApiError(503, "brain_unavailable", why) from None
        if not cancelled:
            raise ApiError(404, "not_in_flight", f"no delegation {delegation_id} is in flight")
        return {"ok": True, "session_id": record.session_id, "delegation_id": delegation_id, "cancelled": True}

    return router
