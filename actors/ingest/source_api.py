"""The HTTP side of a session's video source: attach a URL or a file, upload one, see its state, detach it.

Every route takes the session's token like the other session calls. A refused source (off, a scheme or an
address not allowed, a path outside the roots, an upload too large, not a video) is a 4xx in the documented
`{"error": {"code", "message"}}` shape and leaves no source, thread or file behind (docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, model_validator

from actors.common.messages import SessionRecord
from actors.ingest.api_error import ApiError
from actors.ingest.source_policy import SourceRefused, SourceTarget
from actors.ingest.source_sessions import SourceSessions
from actors.ingest.sources import Unplayable, probe_video

if TYPE_CHECKING:
    from actors.ingest.gateway import Gateway

log = logging.getLogger(__name__)

UPLOAD_NAME_CHARS = 120


class SourceBody(BaseModel):
    """`{"url": …}` or `{"path": …}`, and whether a file (or a recording over HTTP) plays in a loop."""

    model_config = {"extra": "forbid"}

    url: str | None = None
    path: str | None = None
    loop: bool = False

    @model_validator(mode="after")
    def _one_location(self) -> SourceBody:
        if (self.url is None) == (self.path is None):
            raise ValueError("give either url or path")
        return self


def upload_name(header: str | None) -> str:
    """The name an upload is shown by (the page sends it URL-encoded in `x-filename`), printable and short."""
    name = Path(unquote(header or "")).name
    name = "".join(char for char in name if char.isprintable())[:UPLOAD_NAME_CHARS]
    return name or "upload"


async def receive_upload(request: Request, directory: Path, max_bytes: int) -> Path:
    """Stream the request body to a new file in `directory`, at most `max_bytes`; the file is removed if the
    body is larger (SourceRefused 413) or does not arrive whole."""
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    fd, name = await asyncio.to_thread(tempfile.mkstemp, prefix="vigil-upload-", suffix=".video", dir=directory)
    path = Path(name)
    received = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise SourceRefused(413, "body_too_large", f"the upload is over the {max_bytes}-byte limit")
                await asyncio.to_thread(out.write, chunk)
        if received == 0:
            raise SourceRefused(422, "invalid_request", "the upload is empty: send the video file as the body")
    except BaseException:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise
    return path


def source_routes(gateway: Gateway) -> APIRouter:
    """The source routes over `gateway`; the router's lifespan stops every source when the app shuts down."""
    from actors.ingest.gateway import read_json

    sources = SourceSessions(gateway)
    policy, settings = sources.policy, sources.settings
    config = gateway.config
    # The system's temporary directory itself by default: a fixed folder there could be another user's.
    upload_dir = Path(config.sources_upload_dir or tempfile.gettempdir())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await sources.close()

    router = APIRouter(lifespan=lifespan)

    def check_live(record: SessionRecord) -> None:
        if record.state == "ended":
            raise ApiError(404, "unknown_session", f"session {record.session_id} has ended")

    async def playable(target: SourceTarget) -> None:
        try:
            await asyncio.to_thread(probe_video, target, policy, settings)
        except Unplayable as exc:
            raise SourceRefused(422, "invalid_video", str(exc)) from None

    @router.post("/v1/sessions/{session_id}/source")
    async def attach(session_id: str, request: Request) -> dict[str, Any]:
        """Play a URL (rtsp, rtsps, http, https) or a file as the session's video, replacing its source."""
        record = await gateway.authorize(session_id, request)
        body: SourceBody = await read_json(request, SourceBody, config.limits.max_body_bytes)
        check_live(record)
        sources.check_room(record.session_id)  # refusals are ApiErrors: the app answers them
        if body.url is not None:
            target = await policy.check_url(body.url, body.loop)
        else:
            target = await asyncio.to_thread(policy.check_path, body.path or "", body.loop)
            await playable(target)
        attached = await sources.attach(record, target)
        return {"ok": True, "session_id": record.session_id, "source": attached.payload()}

    @router.post("/v1/sessions/{session_id}/upload")
    async def upload(session_id: str, request: Request, loop: bool = False) -> dict[str, Any]:
        """The body is a video file: kept while it plays as the session's source, removed when it stops."""
        record = await gateway.authorize(session_id, request)
        check_live(record)
        declared = request.headers.get("content-length")
        policy.check_upload_size(int(declared) if declared and declared.isdigit() else None)
        sources.check_room(record.session_id)
        path = await receive_upload(request, upload_dir, policy.max_upload_bytes)
        try:
            target = SourceTarget("upload", str(path), upload_name(request.headers.get("x-filename")), loop)
            await playable(target)
            attached = await sources.attach(record, target, upload=path)
        except BaseException:
            await asyncio.to_thread(path.unlink, missing_ok=True)
            raise
        return {"ok": True, "session_id": record.session_id, "source": attached.payload()}

    @router.get("/v1/sessions/{session_id}/source")
    async def state(session_id: str, request: Request) -> dict[str, Any]:
        """The session's source: what it is doing, or how it ended (`stopped`, `ended`, `failed` and why)."""
        record = await gateway.authorize(session_id, request)
        payload = sources.state(record.session_id)
        if payload is None:
            raise ApiError(404, "no_source", "this session has no video source on this replica")
        return {"session_id": record.session_id, "source": payload}

    @router.delete("/v1/sessions/{session_id}/source")
    async def detach(session_id: str, request: Request) -> dict[str, Any]:
        """Stop the session's source (its reader thread ends, an upload is removed); the session goes on."""
        record = await gateway.authorize(session_id, request)
        attached = await sources.detach(record.session_id)
        if attached is None:
            raise ApiError(404, "no_source", "this session has no video source on this replica")
        return {"ok": True, "session_id": record.session_id, "source": attached.payload()}

    return router
