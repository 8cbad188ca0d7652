"""Test video made at test time with PyAV, and real local servers that play it: a directory over HTTP, a live
MJPEG camera over HTTP, and a live H.264 camera over RTSP (interleaved on TCP). Each server can be stopped and
started again on the same port, which is how a camera that drops and comes back looks to a client.

Every frame is a grey scene with a moving bar; with the disc on, a large red disc in the middle (what the
scripted engine's `red_rule` answers).
"""

from __future__ import annotations

import functools
import http.server
import io
import socket
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

WIDTH, HEIGHT = 160, 120
DISC_RGB = (225, 15, 15)
CODECS = {".mp4": ("mp4", "libx264"), ".mkv": ("matroska", "libx264"), ".webm": ("webm", "libvpx"),
          ".ts": ("mpegts", "libx264")}


def scene(index: int, disc: bool, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    image = np.full((height, width, 3), 70, np.uint8)
    image[:, (index * 4) % width] = 200  # a moving bar: the scene is alive
    if disc:
        ys, xs = np.mgrid[0:height, 0:width]
        image[(xs - width / 2) ** 2 + (ys - height / 2) ** 2 <= (height / 3) ** 2] = DISC_RGB
    return image


def write_disc_video(path: Path, seconds: float, disc_at_s: float | None, fps: int = 10) -> Path:
    """`seconds` of video at `fps` whose red disc appears at `disc_at_s` (never: None), in the container and
    codec its suffix names (.mp4, .mkv, .ts: H.264; .webm: VP8)."""
    container_format, codec = CODECS[path.suffix]
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=fps, options={"preset": "ultrafast"} if codec == "libx264" else {})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(round(seconds * fps)):
            disc = disc_at_s is not None and index / fps >= disc_at_s
            frame = av.VideoFrame.from_ndarray(scene(index, disc), format="rgb24")
            frame.pts = index
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def _listen(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(8)
    return sock


class _Quiet(http.server.SimpleHTTPRequestHandler):
    hosts: list[str]

    def do_GET(self) -> None:
        self.hosts.append(self.headers.get("Host", ""))
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FileServer:
    """A directory over plain HTTP (Python's http.server: no ranges, so a client reads each file front to back);
    `hosts` holds the Host header of every request, in order."""

    def __init__(self, directory: Path) -> None:
        self.hosts: list[str] = []
        handler = type("Handler", (_Quiet,), {"hosts": self.hosts})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(
            directory)))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-file-server", daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _LiveServer:
    """Accepts connections on one port, each served by `_serve` in a thread, until stopped; `start()` again
    listens on the same port. `stop()` closes every connection at once: the camera is gone."""

    def __init__(self, fps: float = 5.0) -> None:
        self.fps = fps
        self.disc = False
        self.port = 0
        self.connections = 0  # accepted so far, over every start
        self._sock: socket.socket | None = None
        self._clients: set[socket.socket] = set()
        self._running = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._sock = _listen(self.port)
        self.port = self._sock.getsockname()[1]
        self._running.set()
        threading.Thread(target=self._accept, args=(self._sock,), name="test-camera", daemon=True).start()

    def stop(self) -> None:
        self._running.clear()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread: the port is free at once
            except OSError:
                pass
            self._sock.close()
        with self._lock:
            for client in self._clients:
                try:
                    client.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                client.close()
            self._clients.clear()

    def __enter__(self) -> _LiveServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self, sock: socket.socket) -> None:
        while self._running.is_set():
            try:
                client, _ = sock.accept()
            except OSError:
                return
            with self._lock:
                self._clients.add(client)
                self.connections += 1
            threading.Thread(target=self._guarded, args=(client,), daemon=True).start()

    def _guarded(self, client: socket.socket) -> None:
        try:
            self._serve(client)
        except OSError:
            pass
        finally:
            with self._lock:
                self._clients.discard(client)
            client.close()

    def _frames(self) -> Any:
        """Frames (index, rgb) at `fps` in real time, while the server runs."""
        started, index = time.monotonic(), 0
        while self._running.is_set():
            yield index, scene(index, self.disc)
            index += 1
            time.sleep(max(0.0, started + index / self.fps - time.monotonic()))

    def _serve(self, client: socket.socket) -> None:
        raise NotImplementedError


class MjpegCamera(_LiveServer):
    """A live MJPEG stream over HTTP (`multipart/x-mixed-replace`), as many IP cameras serve it."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/video.mjpg"

    def _serve(self, client: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = client.recv(4096)
            if not chunk:
                return
            request += chunk
        client.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace;boundary=frame\r\n\r\n")
        for _, rgb in self._frames():
            jpeg = io.BytesIO()
            Image.fromarray(rgb).save(jpeg, "JPEG")
            data = jpeg.getvalue()
            client.sendall(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data)
                           + data + b"\r\n")


class _Interleaved(io.RawIOBase):
    """Where PyAV's RTP muxer writes, one packet a write: sent as RTSP interleaved data (RTP channel 0, RTCP 1)."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        packet = bytes(data)
        channel = 1 if 200 <= packet[1] <= 204 else 0
        self.client.sendall(b"$" + bytes([channel]) + len(packet).to_bytes(2, "big") + packet)
        return len(packet)


class RtspCamera(_LiveServer):
    """A live RTSP camera: H.264 (packetization mode 1) over RTP interleaved on the RTSP connection (TCP).

    It answers OPTIONS, DESCRIBE, SETUP, PLAY and anything else with 200; RTP comes from PyAV's own `rtp` muxer."""

    SESSION = "4b1d7e55"

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/camera"

    def _serve(self, client: socket.socket) -> None:
        buffer = b""
        while True:
            chunk = client.recv(4096)
            if not chunk:
                return
            buffer += chunk
            while b"\r\n\r\n" in buffer:
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, url = lines[0].split(" ")[:2]
                headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                extra, body = "", ""
                if method == "OPTIONS":
                    extra = "Public: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN, GET_PARAMETER\r\n"
                elif method == "DESCRIBE":
                    body = ("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=camera\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n"
                            "m=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\na=fmtp:96 packetization-mode=1\r\n"
                            "a=control:track0\r\n")
                    extra = f"Content-Base: {url}/\r\nContent-Type: application/sdp\r\nContent-Length: {len(body)}\r\n"
                elif method == "SETUP":
                    extra = f"Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\nSession: {self.SESSION}\r\n"
                elif method == "PLAY":
                    extra = f"Session: {self.SESSION}\r\n"
                client.sendall(f"RTSP/1.0 200 OK\r\nCSeq: {headers.get('CSeq', '0')}\r\n{extra}\r\n{body}".encode())
                if method == "PLAY":
                    threading.Thread(target=self._play, args=(client,), daemon=True).start()

    def _play(self, client: socket.socket) -> None:
        try:
            with av.open(_Interleaved(client), "w", format="rtp") as out:
                stream = out.add_stream("libx264", rate=int(self.fps), options={
                    "preset": "ultrafast", "tune": "zerolatency", "g": str(int(self.fps)), "bf": "0"})
                stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
                stream.codec_context.time_base = Fraction(1, int(self.fps))
                for index, rgb in self._frames():
                    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
                    frame.pts = index
                    out.mux(stream.encode(frame))
        except (OSError, av.error.FFmpegError):
            pass  # the client went, or the camera was stopped
