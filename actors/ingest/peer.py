"""One session's WebRTC peer connection: offer checks, the video reader, the data channel and the tick loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from actors.common.config import VigilConfig
from actors.common.messages import EngineInfo
from actors.common.session_store import SessionClock
from actors.ingest.bitrate import cap_video_bitrate, without_receiver_estimate
from actors.ingest.channel import (
    ChannelError,
    error_message,
    hello_message,
    parse_client_message,
    pong_message,
    recall_message,
    reconnect_message,
)
from actors.ingest.frames import LatestFrameBuffer
from actors.ingest.ice import filter_remote_candidates, rtc_configuration
from actors.ingest.session_loop import SessionLoop, TickServices

log = logging.getLogger(__name__)

CHANNEL_LABEL = "vigil"
MAX_CHANNEL_BUFFER_BYTES = 256 * 1024
NEGOTIATION_TIMEOUT_S = 10.0


class InvalidOffer(ValueError):
    """The SDP offer was refused; `code` is the HTTP error code of docs/protocol.md."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_offer(sdp: str, max_bytes: int, max_tracks: int) -> None:
    """Refuse an offer before any peer connection exists: size, shape, media sections."""
    size = len(sdp.encode())
    if size > max_bytes:
        raise InvalidOffer("sdp_too_large", f"SDP of {size} bytes is over the {max_bytes}-byte limit")
    lines = sdp.replace("\r\n", "\n").split("\n")
    if not lines or lines[0].strip() != "v=0":
        raise InvalidOffer("invalid_sdp", "not an SDP description: it must start with 'v=0'")
    media = [line.split()[0][2:] for line in lines if line.startswith("m=") and line.split()]
    unknown = [kind for kind in media if kind not in ("audio", "video", "application")]
    if unknown:
        raise InvalidOffer("invalid_sdp", f"unsupported media sections: {unknown}")
    tracks = [kind for kind in media if kind in ("audio", "video")]
    if len(tracks) > max_tracks:
        raise InvalidOffer("invalid_sdp", f"{len(tracks)} media tracks, over the limit of {max_tracks}")
    if media.count("video") > 1:
        raise InvalidOffer("invalid_sdp", "at most one video track per session")
    if "video" not in media:
        raise InvalidOffer("invalid_sdp", "the offer has no video track")
    if "application" not in media:
        raise InvalidOffer("invalid_sdp", "the offer has no data channel")


class PeerSession:
    """Owns one aiortc peer connection and everything hanging off it; `close()` leaves nothing behind."""

    def __init__(
        self,
        session_id: str,
        config: VigilConfig,
        services: TickServices,
        engine_info: EngineInfo,
        instructions: tuple[str, ...],
        on_instructions: Callable[[tuple[str, ...]], None] | None = None,
        speak_threshold: float = 0.5,
        on_speak_threshold: Callable[[float], None] | None = None,
        owner: str = "",
        resumed: SessionClock | None = None,
    ) -> None:
        self.session_id = session_id
        self.config = config
        self.services = services
        self.engine_info = engine_info
        self.pc = RTCPeerConnection(rtc_configuration(config.ice_servers))
        self.channel: RTCDataChannel | None = None
        self.loop = SessionLoop(session_id, config, services, LatestFrameBuffer(), self._send, instructions,
                                speak_threshold, owner, resumed)
        if resumed is not None:
            self.loop.frames.stream_time_offset = resumed.stream_time + self.loop.missed_s
        self.frames = self.loop.frames
        self.video_from_track = True  # False while a source (actors/ingest/source_sessions.py) feeds it
        self._on_instructions = on_instructions
        self._on_speak_threshold = on_speak_threshold
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._recalling = False
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)

    async def accept(self, offer_sdp: str) -> str:
        """Answer an offer and start ticking. On any failure the peer connection is closed before raising."""
        limits = self.config.limits
        check_offer(offer_sdp, limits.max_sdp_bytes, limits.max_tracks)
        sdp = filter_remote_candidates(offer_sdp, self.config.ice_allowed_networks)
        if not self.config.video_bandwidth_estimate:
            sdp = without_receiver_estimate(sdp)
        try:
            await asyncio.wait_for(self._negotiate(sdp), NEGOTIATION_TIMEOUT_S)
        except InvalidOffer:
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            raise InvalidOffer("invalid_sdp", f"the offer could not be answered: {exc}") from None
        self.loop.start()
        self._own(self._watch_loop())
        return cap_video_bitrate(self.pc.localDescription.sdp, self.config.video_max_kbps)

    async def _negotiate(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        await self.loop.stop()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        await self.pc.close()

    # -- owned tasks ---------------------------------------------------------------------------------------

    def _own(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_loop(self) -> None:
        """Close the peer when the loop closes itself (heartbeat timeout)."""
        await self.loop.closed.wait()
        if not self._closing:
            await self.close()

    def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed") and not self._closing:
            log.info("session %s: peer connection %s", self.session_id, self.pc.connectionState)
            self._own(self.close())

    # -- media ---------------------------------------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        # Audio is read and dropped: an unread track queues frames without bound.
        self._own(self._read(track, keep=track.kind == "video"))

    async def _read(self, track: MediaStreamTrack, keep: bool) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if keep:
                if self.video_from_track:
                    self.frames.put(frame, time.monotonic())
                self.loop.touch()

    # -- data channel --------------------------------------------------------------------------------------

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        # One channel at a time; one the client opens again on the same peer connection, once its last one has
        # closed, takes that one's place (with a hello of its own) and the session goes on.
        current = self.channel
        if channel.label != CHANNEL_LABEL or (current is not None and current.readyState not in ("closing", "closed")):
            self.services.metrics.channel_rejected_total.labels(reason="unknown_channel").inc()
            channel.close()
            return
        if current is not None:
            log.info("session %s: a new data channel replaces the one that closed", self.session_id)
        self.channel = channel
        channel.on("message", self._on_message)
        if channel.readyState == "open":
            self._send_hello()
        else:
            channel.on("open", self._send_hello)

    def _send_hello(self) -> None:
        resumed = None
        if self.loop.resumed is not None:
            resumed = {"tick": self.loop.resumed.tick, "stream_time": self.loop.frames.stream_time_offset,
                       "missed_s": round(self.loop.missed_s, 1)}
        self._send(hello_message(self.session_id, self.engine_info, self.config.tick_interval_s,
                                 self.loop.instructions, self.loop.speak_threshold, resumed))

    async def drain(self, grace_s: float) -> None:
        """Tell the client to connect again (to another replica), give it `grace_s` to read that, and close."""
        await self.loop.stop()  # the tick in flight is recorded first, so the next owner numbers on from it
        self._send(reconnect_message("drain", "this Vigil replica is shutting down: connect again to resume"))
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.channel is not None and self.channel.bufferedAmount > 0:
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(min(0.2, grace_s))  # the SCTP send is asynchronous even once the buffer is empty
        await self.close()

    def _send(self, text: str) -> None:
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return
        if channel.bufferedAmount > MAX_CHANNEL_BUFFER_BYTES:
            self.services.metrics.channel_rejected_total.labels(reason="client_backlog").inc()
            return
        channel.send(text)

    def _on_message(self, data: str | bytes) -> None:
        self.loop.touch()
        limits = self.config.limits
        try:
            message = parse_client_message(data, limits.max_message_bytes, limits.max_text_chars)
        except ChannelError as exc:
            self.services.metrics.channel_rejected_total.labels(reason=exc.reason).inc()
            self._send(error_message(exc.reason, str(exc)))
            return
        if message.kind == "ping":
            self._send(pong_message(message.ping_id))
        elif message.kind == "question":
            self.loop.add_question(message.text)
        elif message.kind == "recall":
            self._start_recall(message.text)
        elif message.kind == "instruction":
            if len(self.loop.instructions) >= limits.max_instructions:
                self.services.metrics.channel_rejected_total.labels(reason="too_many_instructions").inc()
                self._send(error_message("too_many_instructions",
                                         f"at most {limits.max_instructions} standing instructions"))
                return
            self._set_instructions((*self.loop.instructions, message.text))
        elif message.kind == "clear_instructions":
            self._set_instructions(())
        elif message.kind == "cancel":
            self._own(self._cancel(message.delegation_id))
        elif message.kind == "settings" and message.speak_threshold is not None:
            self.loop.set_speak_threshold(message.speak_threshold)
            if self._on_speak_threshold is not None:
                self._on_speak_threshold(message.speak_threshold)

    async def _cancel(self, delegation_id: str) -> None:
        try:
            cancelled = await self.loop.delegations.cancel(delegation_id)
        except Exception as exc:
            log.warning("session %s: cancel of delegation %s failed: %r", self.session_id, delegation_id, exc)
            self._send(error_message("brain_unavailable", f"the brain did not answer: {type(exc).__name__}"))
            return
        if not cancelled:
            self._send(error_message("not_in_flight", f"no delegation {delegation_id} is in flight"))

    def _start_recall(self, question: str) -> None:
        if self.loop.memory is None:
            self._send(error_message("memory_off", "this Vigil runs without memory (VIGIL_MEMORY=false)"))
        elif self._recalling:
            self.services.metrics.channel_rejected_total.labels(reason="busy").inc()
            self._send(error_message("busy", "one recall at a time: wait for the answer to the last one"))
        else:
            self._recalling = True
            self._own(self._recall(question))

    async def _recall(self, question: str) -> None:
        assert self.loop.memory is not None
        try:
            lines = await self.loop.memory.recall(question)
        except Exception as exc:
            log.warning("session %s: recall failed: %r", self.session_id, exc)
            self._send(error_message("memory_unavailable", f"memory did not answer: {type(exc).__name__}"))
        else:
            self._send(recall_message(question, lines))
        finally:
            self._recalling = False

    def _set_instructions(self, instructions: tuple[str, ...]) -> None:
        self.loop.set_instructions(instructions)
        if self._on_instructions is not None:
            self._on_instructions(instructions)
