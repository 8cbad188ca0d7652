"""Video sources through the real gateway (uvicorn, real Redis, the scripted engine that answers a red disc):
a file, an HTTP stream, an RTSP camera and an upload each feed a session's ticks, which answer when the disc
appears; a camera that drops is reconnected and the ticks resume; a page's connection gets the source and its
state; refused sources get their 4xx and leave no source, thread or file behind; and ending the session stops
its source."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamTrack

from bench.webrtc_client import SyntheticVideoTrack, VigilClient
from tests.fixtures_gateway import LocalVigil, start_local_vigil
from tests.video_sources import FileServer, MjpegCamera, RtspCamera, write_disc_video

pytestmark = pytest.mark.integration

TICK_S = 0.5


@pytest.fixture
def videos(tmp_path: Path) -> Path:
    path = tmp_path / "videos"
    path.mkdir()
    return path


@pytest.fixture
def vigil(redis_server, videos: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalVigil]:  # type: ignore[no-untyped-def]
    settings: dict[str, Any] = {
        "tick_interval_s": TICK_S, "sources_allowed_schemes": ["http", "rtsp"],
        "sources_allowed_networks": ["127.0.0.0/8"], "sources_file_roots": [str(videos)],
        "sources_max_upload_bytes": 1_000_000, "sources_upload_dir": str(tmp_path / "uploads"),
        "sources_open_timeout_s": 3.0, "sources_read_timeout_s": 2.0,
    } | getattr(request, "param", {})
    server, local = start_local_vigil(redis_server, **settings)
    with server:
        local.url = server.url
        yield local


class Session:
    """One session over HTTP: created with an instruction (so that its ticks call the engine)."""

    def __init__(self, http: httpx.AsyncClient, body: dict[str, Any]) -> None:
        self.http = http
        self.id = body["session_id"]
        self.headers = {"Authorization": f"Bearer {body['token']}", "x-session-id": self.id}

    @classmethod
    async def create(cls, http: httpx.AsyncClient) -> Session:
        reply = await http.post("/v1/sessions", json={"instructions": ["tell me when a red disc appears"]})
        assert reply.status_code == 201, reply.text
        return cls(http, reply.json())

    async def attach(self, **body: Any) -> httpx.Response:
        return await self.http.post(f"/v1/sessions/{self.id}/source", json=body, headers=self.headers)

    async def source(self) -> dict[str, Any] | None:
        reply = await self.http.get(f"/v1/sessions/{self.id}/source", headers=self.headers)
        return reply.json()["source"] if reply.status_code == 200 else None

    async def events(self) -> list[dict[str, Any]]:
        reply = await self.http.get(f"/v1/sessions/{self.id}/events", params={"limit": 1000}, headers=self.headers)
        return list(reply.json()["events"])

    async def until(self, read: Any, predicate: Any, timeout_s: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = await read()
            if predicate(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not in time: {value}")
            await asyncio.sleep(0.1)

    async def until_state(self, state: str, timeout_s: float = 15.0) -> dict[str, Any]:
        return await self.until(self.source, lambda source: source is not None and source["state"] == state,
                                timeout_s)

    async def end(self) -> None:
        reply = await self.http.delete(f"/v1/sessions/{self.id}", headers=self.headers)
        assert reply.status_code == 200, reply.text


def source_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("vigil-source-")]


async def no_source_thread_left(timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while source_threads():
        assert time.monotonic() < deadline, f"source threads left: {source_threads()}"
        await asyncio.sleep(0.05)


def responses(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if event["outcome"] == "respond"]


def assert_recorded_once(events: list[dict[str, Any]]) -> None:
    ticks = [event["tick"] for event in events]
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), f"each tick recorded once, in order: {ticks}"


async def test_a_file_source_feeds_the_ticks_and_the_engine_answers_the_disc(vigil: LocalVigil, videos: Path) -> None:
    video = write_disc_video(videos / "clip.mp4", seconds=4.0, disc_at_s=2.0)
    async with httpx.AsyncClient(base_url=vigil.url, timeout=10) as http:
        session = await Session.create(http)
        reply = await session.attach(path=str(video))
        assert reply.status_code == 200, reply.text
        source = reply.json()["source"]
        assert (source["kind"], source["source"], source["ticks_with"]) == ("file", "clip.mp4", "source")
        events = await session.until(session.events, lambda events: responses(events))
        first = responses(events)[0]
        assert first["text"] == "I see red." and 1.6 <= first["stream_time"] <= 3.2, first
        assert all(event["outcome"] in ("silent", "skipped:no_frame") for event in events[: events.index(first)])
        assert any(event["outcome"] == "silent" for event in events), "the seconds before the disc were decided"
        ended = await session.until_state("ended")
        assert ended["frames"] >= 12 and ended["reason"] is None
        await no_source_thread_left()
        assert_recorded_once(await session.events())
        assert vigil.engine.requests[-1].session_id == session.id


@pytest.mark.parametrize("vigil", [{"sources_allowed_networks": ["127.0.0.0/8", "::1/128"]}], indirect=True)
async def test_an_http_stream_plays_through_a_real_session(vigil: LocalVigil, tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    write_disc_video(served / "stream.webm", seconds=3.0, disc_at_s=1.5)
    with FileServer(served) as server:
        async with httpx.AsyncClient(base_url=vigil.url, timeout=10) as http:
            session = await Session.create(http)
            url = f"http://localhost:{server.port}/stream.webm"  # a name: resolved, checked, and pinned
            reply = await session.attach(url=url)
            assert reply.status_code == 200, reply.text
            assert reply.json()["source"]["source"] == url
            events = await session.until(session.events, lambda events: responses(events))
            assert responses(events)[0]["stream_time"] >= 1.0
            await session.until_state("ended")
            await session.end()
    # Vigil connected to the address it checked (the server listens on 127.0.0.1 only), naming the host it was given.
    assert server.hosts == [f"localhost:{server.port}"]
    await no_source_thread_left()


@pytest.mark.parametrize("camera_kind", [MjpegCamera, RtspCamera], ids=["http-mjpeg", "rtsp-h264"])
async def test_a_camera_that_drops_is_reconnected_and_the_ticks_resume(vigil: LocalVigil, camera_kind: type) -> None:
    camera = camera_kind(fps=5.0)
    camera.start()
    try:
        async with httpx.AsyncClient(base_url=vigil.url, timeout=10) as http:
            session = await Session.create(http)
            reply = await session.attach(url=camera.url)
            assert reply.status_code == 200, reply.text
            await session.until(session.events, lambda events: sum(e["outcome"] == "silent" for e in events) >= 2)
            camera.stop()
            dropped = await session.until_state("reconnecting")
            assert dropped["reason"] and dropped["attempt"] >= 1
            await session.until(session.events, lambda events: events[-1]["outcome"] == "skipped:no_frame")
            camera.disc = True
            camera.start()  # the camera is back, on the same address
            back = await session.until_state("playing")
            assert back["attempt"] == 0
            events = await session.until(session.events, lambda events: responses(events))
            assert responses(events)[0]["text"] == "I see red."
            assert camera.connections >= 2
            assert_recorded_once(events)
            await session.end()
            await no_source_thread_left()
    finally:
        camera.stop()


async def test_an_upload_plays_end_to_end_and_its_file_goes_with_the_session(
    vigil: LocalVigil, tmp_path: Path
) -> None:
    video = write_disc_video(tmp_path / "mine.mp4", seconds=2.0, disc_at_s=0.5)
    uploads = tmp_path / "uploads"
    async with httpx.AsyncClient(base_url=vigil.url, timeout=10) as http:
        session = await Session.create(http)
        reply = await http.post(f"/v1/sessions/{session.id}/upload", params={"loop": "true"},
                                content=video.read_bytes(),
                                headers=session.headers | {"x-filename": "my%20clip.mp4"})
        assert reply.status_code == 200, reply.text
        source = reply.json()["source"]
        assert (source["kind"], source["source"], source["loop"]) == ("upload", "my clip.mp4", True)
        assert len(os.listdir(uploads)) == 1
        events = await session.until(session.events, lambda events: responses(events))
        assert responses(events)[0]["stream_time"] >= 0.3
        assert (await session.source())["state"] == "playing"  # looped: it plays on
        await session.end()
        await no_source_thread_left()
        assert os.listdir(uploads) == []


class ListeningClient(VigilClient):
    """A page's connection that shares no camera: video comes from the session's source (recvonly video)."""

    def _add_track(self, track: MediaStreamTrack | None) -> None:
        assert self.pc is not None
        if track is None:
            self.pc.addTransceiver("video", direction="recvonly")
        else:
            self.pc.addTrack(track)


def _red(elapsed: float) -> np.ndarray:
    image = np.full((120, 160, 3), 70, np.uint8)
    image[30:90, 50:110] = (225, 15, 15)
    image[:, int(elapsed * 20) % 160] = 200
    return image


async def test_a_page_connection_gets_the_source_and_keeps_it_when_it_reconnects(
    vigil: LocalVigil, videos: Path
) -> None:
    write_disc_video(videos / "disc.mp4", seconds=2.0, disc_at_s=0.5)
    client = ListeningClient(vigil.url)
    await client.connect(None, instructions=["tell me when a red disc appears"])  # type: ignore[arg-type]
    try:
        reply = await client.http.post(f"/v1/sessions/{client.session_id}/source", headers=client.auth(),
                                       json={"path": str(videos / "disc.mp4"), "loop": True})
        assert reply.status_code == 200 and reply.json()["source"]["ticks_with"] == "peer", reply.text
        while (await asyncio.wait_for(client.ticks.get(), 10))["outcome"] != "respond":
            pass
        states = [m["state"] for m in client.messages if m["type"] == "source"]
        assert states[0] == "connecting" and "playing" in states
        latest = next(m for m in reversed(client.messages) if m["type"] == "source")
        assert (latest["source"], latest["kind"], latest["ticks_with"]) == ("disc.mp4", "file", "peer")
        # The page connects again (same session, a new peer connection here): the source goes on feeding it.
        await client.reconnect(None)  # type: ignore[arg-type]
        while (await asyncio.wait_for(client.ticks.get(), 10))["outcome"] != "respond":
            pass
        state = (await client.http.get(f"/v1/sessions/{client.session_id}/source", headers=client.auth())).json()
        assert (state["source"]["state"], state["source"]["ticks_with"]) == ("playing", "peer")
        assert len(source_threads()) == 1
        assert_recorded_once(await client.events())
    finally:
        await client.close()
    await no_source_thread_left()


async def test_a_page_that_connects_to_a_session_its_source_runs_takes_the_source_over(
    vigil: LocalVigil, videos: Path
) -> None:
    write_disc_video(videos / "disc.mp4", seconds=2.0, disc_at_s=0.5)
    client = ListeningClient(vigil.url)
    await client.create(["tell me when a red disc appears"])
    try:
        reply = await client.http.post(f"/v1/sessions/{client.session_id}/source", headers=client.auth(),
                                       json={"path": str(videos / "disc.mp4"), "loop": True})
        assert reply.json()["source"]["ticks_with"] == "source", reply.text
        deadline = time.monotonic() + 10
        while not responses(await client.events()):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await client.connect(None)  # type: ignore[arg-type]
        while (await asyncio.wait_for(client.ticks.get(), 10))["outcome"] != "respond":
            pass
        state = (await client.http.get(f"/v1/sessions/{client.session_id}/source", headers=client.auth())).json()
        assert state["source"]["ticks_with"] == "peer"
        assert len(source_threads()) == 1
        assert_recorded_once(await client.events())
    finally:
        await client.close()
    await no_source_thread_left()


async def test_while_a_source_plays_the_connections_own_camera_is_set_aside(vigil: LocalVigil, videos: Path) -> None:
    write_disc_video(videos / "calm.mp4", seconds=1.0, disc_at_s=None)
    client = ListeningClient(vigil.url)
    await client.connect(SyntheticVideoTrack(_red, fps=5), instructions=["tell me when a red disc appears"])
    try:
        await asyncio.wait_for(client.ticks.get(), 10)
        reply = await client.http.post(f"/v1/sessions/{client.session_id}/source", headers=client.auth(),
                                       json={"path": str(videos / "calm.mp4"), "loop": True})
        assert reply.status_code == 200, reply.text
        deadline = time.monotonic() + 10
        while not any(m["type"] == "source" and m["state"] == "playing" for m in client.messages):
            assert time.monotonic() < deadline, client.messages
            await asyncio.sleep(0.05)
        await asyncio.sleep(2 * TICK_S)
        seen = len(client.messages)
        await asyncio.sleep(4 * TICK_S)  # the camera shows red all along: only the source is watched
        ticks = [m for m in client.messages[seen:] if m["type"] == "tick"]
        assert ticks and all(tick["outcome"] == "silent" for tick in ticks), ticks
        reply = await client.http.delete(f"/v1/sessions/{client.session_id}/source", headers=client.auth())
        assert reply.status_code == 200 and reply.json()["source"]["state"] == "stopped"
        await no_source_thread_left()
        while (await asyncio.wait_for(client.ticks.get(), 10))["outcome"] != "respond":
            pass  # the camera is the session's video again
        stopped = [m for m in client.messages if m["type"] == "source"][-1]
        assert stopped["state"] == "stopped"
        missing = await client.http.delete(f"/v1/sessions/{client.session_id}/source", headers=client.auth())
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "no_source"
    finally:
        await client.close()


async def _refused(session: Session, reply: httpx.Response, status: int, code: str) -> str:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code, error
    assert await session.source() is None, "a refused source leaves no source behind"
    assert source_threads() == []
    return str(error["message"])


async def test_refused_sources_get_their_4xx_and_leave_nothing_behind(
    vigil: LocalVigil, videos: Path, tmp_path: Path
) -> None:
    (videos / "notes.mp4").write_text("no video here\n" * 50)
    os.symlink("/etc/hostname", videos / "escape.mp4")
    uploads = tmp_path / "uploads"
    async with httpx.AsyncClient(base_url=vigil.url, timeout=10) as http:
        session = await Session.create(http)
        message = await _refused(session, await session.attach(url="https://127.0.0.1/v.webm"), 403,
                                 "source_not_allowed")
        assert "'https'" in message and "http, rtsp" in message
        await _refused(session, await session.attach(url="file:///etc/passwd"), 403, "source_not_allowed")
        message = await _refused(session, await session.attach(url="http://10.9.8.7/cam"), 403, "source_not_allowed")
        assert "outside the networks" in message
        await _refused(session, await session.attach(path="/etc/hostname"), 403, "source_not_allowed")
        await _refused(session, await session.attach(path=str(videos / "escape.mp4")), 403, "source_not_allowed")
        await _refused(session, await session.attach(path=str(videos / "notes.mp4")), 422, "invalid_video")
        await _refused(session, await session.attach(url="http://127.0.0.1:1/a", path="/x"), 422, "invalid_request")
        await _refused(session, await session.attach(url="rtsp://127.0.0.1/a", extra=1), 422, "invalid_request")
        upload = f"/v1/sessions/{session.id}/upload"
        # Too large, whether it says so up front or only while it streams (chunked, no length).
        await _refused(session, await http.post(upload, content=b"\0" * 1_000_001, headers=session.headers),
                       413, "body_too_large")

        async def chunks() -> Any:
            for _ in range(40):
                yield b"\0" * 50_000

        await _refused(session, await http.post(upload, content=chunks(), headers=session.headers),
                       413, "body_too_large")
        await _refused(session, await http.post(upload, content=b"not a video" * 100, headers=session.headers),
                       422, "invalid_video")
        assert os.listdir(uploads) == []
        # Wrong token, unknown session: the session calls' own errors.
        bad = await http.post(f"/v1/sessions/{session.id}/source", json={"path": "/x"},
                              headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401
        assert (await http.post("/v1/sessions/s_nope/upload", content=b"x")).status_code == 404


@pytest.mark.parametrize("vigil", [{"sources_allowed_networks": ["10.0.0.0/8"]}], indirect=True)
async def test_loopback_is_refused_when_only_another_network_is_allowed(vigil: LocalVigil) -> None:
    async with httpx.AsyncClient(base_url=vigil.url, timeout=10) as http:
        session = await Session.create(http)
        for url in (f"{vigil.url}/v1/info", "http://localhost:8000/", "rtsp://127.0.0.1:8554/cam"):
            message = await _refused(session, await session.attach(url=url), 403, "source_not_allowed")
            assert "127.0.0.1" in message and "10.0.0.0/8" in message


async def test_sources_are_off_unless_configured(local_vigil: LocalVigil) -> None:
    async with httpx.AsyncClient(base_url=local_vigil.url, timeout=10) as http:
        session = await Session.create(http)
        for body in ({"url": "rtsp://127.0.0.1/cam"}, {"path": "/etc/hostname"}):
            message = await _refused(session, await session.attach(**body), 403, "sources_off")
            assert "VIGIL_SOURCES_" in message
        reply = await http.post(f"/v1/sessions/{session.id}/upload", content=b"x" * 10, headers=session.headers)
        await _refused(session, reply, 403, "sources_off")


async def test_a_source_that_never_plays_fails_with_its_reason_and_stops(vigil: LocalVigil) -> None:
    async with httpx.AsyncClient(base_url=vigil.url, timeout=10) as http:
        session = await Session.create(http)
        reply = await session.attach(url="http://127.0.0.1:9/camera")  # nothing listens there
        assert reply.status_code == 200
        failed = await session.until_state("failed")
        assert "refused" in failed["reason"].lower(), failed
        await no_source_thread_left()
        # The failed state stays readable; a new source replaces it.
        assert (await session.source())["state"] == "failed"
        messages = json.dumps(await session.events())
        assert "refused" not in messages  # the ticks are not where a source's troubles go
