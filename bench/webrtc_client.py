"""A Vigil client in Python: creates a session, streams a synthetic video track, reads decisions.

Used by the benchmarks and the integration tests; it speaks docs/protocol.md and nothing else.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from collections.abc import Callable
from typing import Any

import av
import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack, VideoStreamTrack

from actors.ingest.ice import rtc_configuration

RenderFn = Callable[[float], np.ndarray]
VIDEO_CLOCK_RATE = 90_000


class SyntheticVideoTrack(VideoStreamTrack):
    """Frames drawn by `render(seconds since start)` at `fps`."""

    def __init__(self, render: RenderFn, fps: float = 5.0) -> None:
        super().__init__()
        self._render = render
        self._fps = fps
        self._started: float | None = None
        self._count = 0

    async def recv(self) -> av.VideoFrame:
        if self._started is None:
            self._started = time.monotonic()
        due = self._started + self._count / self._fps
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        elapsed = self._count / self._fps
        frame = av.VideoFrame.from_ndarray(self._render(elapsed), format="rgb24")
        frame.pts = int(elapsed * VIDEO_CLOCK_RATE)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
        self._count += 1
        return frame


def raise_for_status(reply: httpx.Response) -> None:
    """`reply.raise_for_status()`, with what Vigil said in the message (its error code and why)."""
    if reply.is_error:
        raise httpx.HTTPStatusError(f"{reply.status_code} from {reply.request.method} {reply.request.url.path}: "
                                    f"{reply.text[:500]}", request=reply.request, response=reply)


class VigilClient:
    """One session: HTTP calls with httpx, media and data channel with aiortc."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 15.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s)
        self.pc: RTCPeerConnection | None = None
        self.session: dict[str, Any] = {}
        self.messages: list[dict[str, Any]] = []
        self.ticks: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=100_000)
        self.opened = asyncio.Event()
        self.greeted = asyncio.Event()  # the connection's `hello` came
        self.channel: Any = None
        self.replica = ""

    @property
    def session_id(self) -> str:
        return str(self.session["session_id"])

    def auth(self) -> dict[str, str]:
        """The headers of every call about this session: its token, and its id (Vigil routes by it)."""
        return {"Authorization": f"Bearer {self.session['token']}", "x-session-id": self.session_id}

    async def create(self, instructions: list[str] | None = None,
                     speak_threshold: float | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body: dict[str, Any] = {"instructions": instructions or []}
        if speak_threshold is not None:
            body["speak_threshold"] = speak_threshold
        reply = await self.http.post("/v1/sessions", json=body, headers=headers)
        raise_for_status(reply)
        self.session = reply.json()
        return self.session

    async def connect(self, track: MediaStreamTrack, instructions: list[str] | None = None,
                      speak_threshold: float | None = None) -> None:
        """Create a session (unless created) and start streaming `track`."""
        if not self.session:
            await self.create(instructions, speak_threshold)
        await self._offer(track)

    async def reconnect(self, track: MediaStreamTrack) -> None:
        """A new peer connection for the same session (same id and token): Vigil resumes it where it was.

        This is also what follows a failed connection: aiortc has no ICE restart (no `iceRestart` offer, and an
        ICE transport connects once), so a new offer on the same session takes its place."""
        if self.pc is not None:
            await self.pc.close()
        self.opened = asyncio.Event()
        self.greeted = asyncio.Event()
        await self._offer(track)

    async def _offer(self, track: MediaStreamTrack) -> None:
        self.pc = RTCPeerConnection(rtc_configuration([]))
        self._open_channel()
        self._add_track(track)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        reply = await self.http.post(
            f"/v1/sessions/{self.session_id}/offer",
            json={"type": "offer", "sdp": self.pc.localDescription.sdp},
            headers=self.auth(),
        )
        raise_for_status(reply)
        self.replica = reply.headers.get("x-vigil-replica", "")  # the ingest replica that holds the peer now
        body = reply.json()  # with "iceServers" too when Vigil hands out TURN credentials
        answer = RTCSessionDescription(sdp=body["sdp"], type=body["type"])
        self._check_answer(answer.sdp)
        await self.pc.setRemoteDescription(answer)
        await asyncio.wait_for(self.opened.wait(), 15.0)
        await asyncio.wait_for(self.greeted.wait(), 15.0)

    async def reopen_channel(self) -> None:
        """A new data channel on the same peer connection, once the last one has closed: Vigil greets it and the
        session's messages go on over it."""
        self.opened = asyncio.Event()
        self.greeted = asyncio.Event()
        self._open_channel()
        await asyncio.wait_for(self.opened.wait(), 15.0)
        await asyncio.wait_for(self.greeted.wait(), 15.0)

    def _open_channel(self) -> None:
        assert self.pc is not None
        self.channel = self.pc.createDataChannel("vigil")
        self.channel.on("open", self.opened.set)
        self.channel.on("message", self._on_message)

    def _add_track(self, track: MediaStreamTrack) -> None:
        assert self.pc is not None
        self.pc.addTrack(track)

    def _check_answer(self, sdp: str) -> None:
        """Refuse an answer before it is applied (a subclass's check); any answer does here."""

    def _on_message(self, data: str | bytes) -> None:
        message = json.loads(data)
        message["received_at"] = time.monotonic()
        self.messages.append(message)
        if message.get("type") == "hello":
            self.greeted.set()
        if message.get("type") == "tick":
            self.ticks.put_nowait(message)

    def send(self, message: dict[str, Any] | str) -> None:
        self.channel.send(message if isinstance(message, str) else json.dumps(message))

    async def events(self, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        reply = await self.http.get(
            f"/v1/sessions/{self.session_id}/events", params={"after": after, "limit": limit}, headers=self.auth()
        )
        raise_for_status(reply)
        return list(reply.json()["events"])

    async def recall(self, question: str, k: int = 5) -> list[str]:
        """What the session's memory holds on `question`, with times (HTTP; the data channel has `recall` too)."""
        reply = await self.http.get(
            f"/v1/sessions/{self.session_id}/memory", params={"q": question, "k": k}, headers=self.auth()
        )
        raise_for_status(reply)
        return list(reply.json()["lines"])

    async def close(self, end_session: bool = True) -> None:
        if end_session and self.session:
            try:
                await self.http.delete(f"/v1/sessions/{self.session_id}", headers=self.auth())
            except httpx.HTTPError:
                pass
        if self.pc is not None:
            await self.pc.close()
        await self.http.aclose()
