"""The video sources of this replica's sessions: each feeds the tick loop that runs its session here.

A source belongs to its session, not to a connection. Its frames go to whichever `SessionLoop` runs the session
on this replica: the page's peer connection when it has one (its data channel then carries the source's state
and the ticks; the track's own video, if any, is set aside), else a loop of the source's own that claims the
session exactly as an accepted offer does (`SessionStore.claim`, resumed from its clock, quotas held). So a
source-fed session has the same ticks, recorded once, the same memory and metrics as any other.

It follows its session: a page that reconnects (a new peer on this replica) keeps it; a page that takes over a
session the source ran alone gets it; a session that ends (`DELETE`), is taken over elsewhere, or whose page is
gone for `PEER_GRACE_S` stops it. Stopping ends the reader thread and removes an uploaded file.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.common.messages import SessionRecord, from_dict, to_dict
from actors.common.session_store import UnknownSession
from actors.ingest.channel import source_message
from actors.ingest.frames import LatestFrameBuffer
from actors.ingest.session_loop import SessionLoop
from actors.ingest.source_policy import SourcePolicy, SourceRefused, SourceTarget
from actors.ingest.sources import SourceSettings, SourceStatus, VideoSource, open_input

if TYPE_CHECKING:
    from actors.ingest.gateway import Gateway
    from actors.ingest.peer import PeerSession

log = logging.getLogger(__name__)

PEER_GRACE_S = 15.0  # a page's reconnection: five tries, a second more apart each
OWNER_GRACE_S = 1.0  # an offer that took the session over puts its peer in place right after its claim
POLL_S = 0.2
SESSION_CHECK_S = 30.0  # a session that expired (its record gone) stops its source within this
# A reader blocked on a silent camera ends by itself within its read timeout; nobody waits longer than this.
JOIN_WAIT_S = 2.0
FINISHED_KEPT = 256  # the last state of sources that stopped, for GET …/source


def _no_client(_text: str) -> None:
    """A session fed by a source alone has no data channel: its ticks are read from its event log."""


async def _first_of(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    """Wait until one of `events` is set (or `timeout_s` passed)."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


class AttachedSource:
    """One session's source on this replica and the loop it feeds; its supervisor task owns both."""

    def __init__(self, manager: SourceSessions, session_id: str) -> None:
        self.manager = manager
        self.gateway = manager.gateway
        self.session_id = session_id
        self.peer: PeerSession | None = None
        self.own: SessionLoop | None = None
        self.source: VideoSource | None = None
        self.upload: Path | None = None
        self.status: SourceStatus | None = None
        self.frames = 0
        self.closing = False  # the supervisor is tearing down: a new source for the session waits for `done`
        self.done = asyncio.Event()
        self._generation = 0
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()  # the reader reached a terminal state (ended, failed)
        self._task: asyncio.Task[None] | None = None

    @property
    def loop(self) -> SessionLoop | None:
        return self.own if self.own is not None else (self.peer.loop if self.peer is not None else None)

    def payload(self) -> dict[str, Any]:
        assert self.status is not None
        # ticks_with: the loop its frames go to, the page's peer connection's or the source's own
        return self.status.payload() | {"frames": self.frames,
                                        "ticks_with": "peer" if self.peer is not None else "source"}

    # -- start, replace, stop ------------------------------------------------------------------------------

    async def start(self, record: SessionRecord, target: SourceTarget, upload: Path | None) -> None:
        """Attach to the session's peer here, or claim the session for a loop of its own; then start reading.
        On failure nothing is left running (the caller still owns `upload`)."""
        peer = self.gateway.peers.get(self.session_id)
        if peer is not None and not peer.loop.closed.is_set():
            self._follow(peer)
        else:
            self.own = await self._claim(record)
        self._read(target, upload)
        self._task = asyncio.create_task(self._supervise(), name=f"source-{self.session_id}")

    async def replace(self, target: SourceTarget, upload: Path | None) -> None:
        """Play another target into the same loop (the old reader stops first, its upload is removed)."""
        await self._stop_reader()
        self._finished.clear()
        self._read(target, upload)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        else:
            await self._teardown()

    def _read(self, target: SourceTarget, upload: Path | None) -> None:
        self._generation += 1
        generation = self._generation
        self.upload = upload
        self.source = VideoSource(
            target, functools.partial(open_input, target, self.manager.policy, self.manager.settings),
            on_frame=lambda rgb, at: self._on_frame(generation, rgb, at),
            on_status=lambda status: self._on_status(generation, status),
            settings=self.manager.settings, name=f"vigil-source-{self.session_id}",
        )
        self.status = self.source.status
        self._send()
        self.source.start()

    async def _stop_reader(self) -> None:
        self._generation += 1  # what the old reader still reports is not about the session's source any more
        source, upload = self.source, self.upload
        self.source, self.upload = None, None
        if source is not None:
            await source.join(JOIN_WAIT_S)
        if upload is not None:
            await asyncio.to_thread(upload.unlink, missing_ok=True)

    # -- what the reader hands over (on the event loop) ----------------------------------------------------

    def _on_frame(self, generation: int, rgb: np.ndarray, arrival: float) -> None:
        loop = self.loop
        if generation != self._generation or loop is None or loop.closed.is_set():
            return
        loop.frames.put(rgb, arrival)
        self.frames += 1
        if self.own is not None:
            self.own.touch()  # its video is its heartbeat

    def _on_status(self, generation: int, status: SourceStatus) -> None:
        if generation != self._generation:
            return  # a replaced reader's last words
        previous, self.status = self.status, status
        if previous is None or previous.state != status.state:
            log.info("session %s: source %s %s%s", self.session_id, status.source, status.state,
                     f" ({status.reason})" if status.reason else "")
        if self.own is not None and status.state in ("connecting", "reconnecting"):
            self.own.touch()  # a camera being reconnected keeps its session
        self._send()
        if status.terminal:
            self._finished.set()

    def _send(self) -> None:
        if self.peer is not None and self.status is not None:
            self.peer.loop.send(source_message(self.payload()))

    # -- following the session -----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            while (loop := self.loop) is not None:
                await _first_of(loop.closed, self._finished, self._stopping, timeout_s=SESSION_CHECK_S)
                if self._stopping.is_set():
                    break
                if not (loop.closed.is_set() or self._finished.is_set()):
                    if await self._session_over():  # expired: nobody could end it any more
                        break
                    continue
                if self._finished.is_set():
                    self.closing = True  # from here a new source for the session starts afresh
                    if self.own is not None:  # one more tick decides the last frame handed on
                        await _first_of(self.own.closed, self._stopping,
                                        timeout_s=self.gateway.config.tick_interval_s * 1.5)
                    break
                if not await self._find_peer():
                    break
        finally:
            self.closing = True
            await self._teardown()

    async def _find_peer(self) -> bool:
        """The loop it fed closed: follow the session to a peer on this replica if one comes (a reconnecting page,
        or a page that took the session over), unless the session is over."""
        grace = OWNER_GRACE_S if self.own is not None else PEER_GRACE_S
        await self._stop_own()
        self._leave_peer()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self._stopping.is_set():
            peer = self.gateway.peers.get(self.session_id)
            if peer is not None and not peer.loop.closed.is_set():
                self._follow(peer)
                return True
            if await self._session_over():
                return False
            try:
                await asyncio.wait_for(self._stopping.wait(), POLL_S)
            except TimeoutError:
                pass
        return False

    def _follow(self, peer: PeerSession) -> None:
        self.peer = peer
        peer.video_from_track = False  # the source is the session's video now
        self._send()

    def _leave_peer(self) -> None:
        if self.peer is not None:
            self.peer.video_from_track = True
            self.peer = None

    async def _session_over(self) -> bool:
        try:
            record = await self.gateway.store.get(self.session_id)
        except UnknownSession:
            return True
        except Exception:  # Redis out of reach: not a reason to stop
            return False
        return record.state == "ended"

    async def _teardown(self) -> None:
        try:
            await self._stop_reader()
            await self._stop_own()
            if self.peer is not None and self.status is not None and not self.status.terminal:
                self.status = SourceStatus("stopped", self.status.source, self.status.kind, loop=self.status.loop,
                                           frames=self.frames)
                self._send()
            self._leave_peer()
        finally:
            self.manager.forget(self)
            self.done.set()

    # -- a loop of its own ---------------------------------------------------------------------------------

    async def _claim(self, record: SessionRecord) -> SessionLoop:
        """Run the session here as an accepted offer would: counted in its quotas again, claimed (its ticks go on
        from its clock), live with the full session TTL."""
        gateway, store, config = self.gateway, self.gateway.store, self.gateway.config
        ttl_s = config.unconnected_session_ttl_s
        await gateway._counted(gateway.quotas.readmit(self.session_id, time.time() + ttl_s), ttl_s)
        owner = f"{gateway.replica}/source-{uuid.uuid4().hex[:12]}"
        resumed = await store.claim(self.session_id, owner)
        current = await store.get(self.session_id)
        if current.state == "ended":  # ended between the caller's check and the claim
            await store.release(self.session_id, owner)
            raise SourceRefused(404, "unknown_session", f"session {self.session_id} has ended")
        loop = SessionLoop(self.session_id, config, gateway.services, LatestFrameBuffer(), _no_client,
                           current.instructions, speak_threshold=current.speak_threshold, owner=owner,
                           resumed=resumed)
        if resumed is not None:
            loop.frames.stream_time_offset = resumed.stream_time + loop.missed_s
        loop.start()
        try:
            await store.update(from_dict(SessionRecord, to_dict(current) | {"state": "live"}))
            await gateway.quotas.hold(self.session_id, time.time() + config.session_ttl_s)
        except BaseException:
            await loop.stop()
            raise
        log.info("session %s: ticks on a video source%s", self.session_id,
                 "" if resumed is None else f", resumed after tick {resumed.tick}")
        return loop

    async def _stop_own(self) -> None:
        own, self.own = self.own, None
        if own is None:
            return
        await own.stop()
        if not own.lost:  # not taken over, not ended elsewhere: it leaves its quotas, as a closed peer does
            await self.gateway._release_memory(self.session_id)
            await self.gateway.quotas.release(self.session_id)


class SourceSessions:
    """At most one source per session, `sources_max_total` on this replica; `close()` stops them all."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.policy = SourcePolicy(gateway.config)
        self.settings = SourceSettings.from_config(gateway.config)
        self.attached: dict[str, AttachedSource] = {}
        self.finished: OrderedDict[str, dict[str, Any]] = OrderedDict()  # session id → its source's last state
        self._lock = asyncio.Lock()

    def state(self, session_id: str) -> dict[str, Any] | None:
        """The session's source as `GET …/source` shows it: playing now, or how the last one ended."""
        attached = self.attached.get(session_id)
        if attached is not None and attached.status is not None:
            return attached.payload()
        return self.finished.get(session_id)

    def check_room(self, session_id: str) -> None:
        """Refuse a new source (before an upload is read) when this replica holds its most already."""
        if self.gateway.draining:
            raise SourceRefused(503, "draining", "this replica is shutting down: try again to reach another")
        limit = self.gateway.config.sources_max_total
        if session_id not in self.attached and len(self.attached) >= limit:
            raise SourceRefused(503, "too_many_sources", f"this replica plays {limit} sources, its limit "
                                "(VIGIL_SOURCES_MAX_TOTAL)")

    async def attach(self, record: SessionRecord, target: SourceTarget, upload: Path | None = None) -> AttachedSource:
        """Play `target` as the session's video, replacing its source if it has one. Raises SourceRefused (or the
        gateway's quota error) with nothing left behind; `upload` is then still the caller's to remove."""
        async with self._lock:
            current = self.attached.get(record.session_id)
            if current is not None and current.closing:
                await current.done.wait()
                current = None
            if current is not None:
                await current.replace(target, upload)
                return current
            self.check_room(record.session_id)
            self.finished.pop(record.session_id, None)
            attached = AttachedSource(self, record.session_id)
            await attached.start(record, target, upload)
            self.attached[record.session_id] = attached
            return attached

    async def detach(self, session_id: str) -> AttachedSource | None:
        attached = self.attached.get(session_id)
        if attached is None:
            return None
        await attached.stop()
        return attached

    def forget(self, attached: AttachedSource) -> None:
        if self.attached.get(attached.session_id) is attached:
            del self.attached[attached.session_id]
            if attached.status is not None:
                self.finished[attached.session_id] = attached.payload() | {"ticks_with": None}
                while len(self.finished) > FINISHED_KEPT:
                    self.finished.popitem(last=False)

    async def close(self) -> None:
        await asyncio.gather(*(attached.stop() for attached in list(self.attached.values())),
                             return_exceptions=True)
