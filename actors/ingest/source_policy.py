"""Which video sources a session may open: the guard in front of every URL and file a client names.

A server that opens the URLs its clients give can be made to reach what they cannot (server-side request
forgery): a cloud's metadata address, an admin page on loopback, a camera on another network. So sources are off
unless configured, and each one passes every rule here before anything connects, and again at every reconnection:

- its scheme is in `sources_allowed_schemes` (rtsp, rtsps, http, https);
- every address its host resolves to is in `sources_allowed_networks`, and the connection goes to the checked
  address itself (pinned in the URL, the name kept in the HTTP `Host` header), so the name cannot resolve
  elsewhere a moment later (DNS rebinding);
- FFmpeg follows no HTTP redirect (`max_redirects=0`), takes no proxy from the environment, and may use only the
  protocols of that scheme (`protocol_whitelist`) and plain video demuxers (`format_whitelist`: no playlists or
  image sequences, which open further URLs or files named in what they read);
- a file's path, symbolic links resolved, lies under one of `sources_file_roots`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

from actors.common.config import VigilConfig
from actors.ingest.api_error import ApiError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
# What FFmpeg may open beneath each scheme: RTSP interleaved over TCP (no UDP ports opened for the server to
# send to), HTTP over TCP, their TLS variants.
PROTOCOLS = {"rtsp": "rtsp,tcp", "rtsps": "rtsps,tls,tcp", "http": "http,tcp", "https": "https,tls,tcp"}
# Demuxers a source may be read with: video containers and camera streams. Not hls, dash, concat or image2.
DEMUXERS = ("mov", "matroska", "mpegts", "avi", "flv", "mjpeg", "mpjpeg", "mpeg", "h264", "hevc", "m4v", "ivf",
            "yuv4mpegpipe", "ogg", "asf", "rtsp")
MAX_URL_CHARS = 2048
MAX_PATH_CHARS = 4096
RESOLVE_TIMEOUT_S = 5.0


class SourceRefused(ApiError):
    """A source a session may not have; `status` and `code` are its HTTP error (docs/protocol.md)."""


@dataclass(frozen=True, slots=True)
class SourceTarget:
    """What a source plays: a URL (checked again at every connection) or a checked file (a path or an upload).

    `shown` is what clients and logs see: the URL without its credentials and query, or the file's name."""

    kind: Literal["url", "file", "upload"]
    location: str
    shown: str
    loop: bool = False


def shown_url(parts: SplitResult) -> str:
    """A URL as it may be shown: no user name or password, the query (often a token) replaced by `?…`."""
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def _address(value: str) -> Address:
    address = ipaddress.ip_address(value.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class SourcePolicy:
    """The rules of `VigilConfig.sources_*` over URLs and paths; refusals are `SourceRefused` with a 4xx."""

    def __init__(self, config: VigilConfig) -> None:
        self.schemes = tuple(config.sources_allowed_schemes)
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(net, strict=False) for net in config.sources_allowed_networks)
        self.roots = tuple(Path(os.path.realpath(root)) for root in config.sources_file_roots)
        self.max_upload_bytes = config.sources_max_upload_bytes

    # -- URLs ----------------------------------------------------------------------------------------------

    def parse_url(self, url: str) -> SplitResult:
        """The URL's parts if its scheme is allowed; no I/O."""
        if not self.schemes or not self.networks:
            raise SourceRefused(403, "sources_off", "URL sources are off on this Vigil: its operator allows them "
                                "with VIGIL_SOURCES_ALLOWED_SCHEMES and VIGIL_SOURCES_ALLOWED_NETWORKS")
        if len(url) > MAX_URL_CHARS or any(ord(char) < 0x21 for char in url):
            raise SourceRefused(422, "invalid_request", f"url: at most {MAX_URL_CHARS} characters, no spaces or "
                                "control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise SourceRefused(422, "invalid_request", f"url: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in self.schemes:
            raise SourceRefused(403, "source_not_allowed", f"the scheme {scheme or '(none)'!r} is not allowed here; "
                                f"allowed: {', '.join(self.schemes)}")
        if not parts.hostname:
            raise SourceRefused(422, "invalid_request", "url: no host")
        if port == 0:
            raise SourceRefused(422, "invalid_request", "url: port 0")
        return parts._replace(scheme=scheme)

    def check_addresses(self, host: str, addresses: list[str]) -> Address:
        """The address to connect to, if every address `host` resolved to is in the allowed networks."""
        checked = sorted({_address(value) for value in addresses}, key=lambda a: (a.version, int(a)))
        if not checked:
            raise SourceRefused(422, "invalid_source", f"the host {host!r} resolves to no address")
        outside = [a for a in checked if a.is_multicast or a.is_unspecified
                   or not any(a in net for net in self.networks)]
        if outside:
            allowed = ", ".join(str(net) for net in self.networks)
            raise SourceRefused(403, "source_not_allowed", f"the host {host!r} resolves to "
                                f"{', '.join(map(str, outside))}, outside the networks sources may reach ({allowed})")
        return checked[0]

    async def check_url(self, url: str, loop: bool = False) -> SourceTarget:
        """A URL source, checked now (resolving its host off the event loop); checked again at each connection."""
        parts = self.parse_url(url)
        host, port = parts.hostname or "", parts.port or DEFAULT_PORTS[parts.scheme]
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise SourceRefused(422, "invalid_source", f"the host {host!r} cannot be resolved "
                                f"({type(exc).__name__})") from None
        self.check_addresses(host, [str(info[4][0]) for info in infos])
        return SourceTarget("url", url, shown_url(parts), loop)

    def connection(self, target: SourceTarget) -> tuple[str, dict[str, str]]:
        """What PyAV opens for a URL source, checked at this moment: the URL with its host replaced by the address
        just resolved and checked, and the FFmpeg options that hold it there. Blocks (DNS): call it off the loop."""
        parts = self.parse_url(target.location)
        host, port = parts.hostname or "", parts.port or DEFAULT_PORTS[parts.scheme]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise SourceRefused(422, "invalid_source", f"the host {host!r} cannot be resolved ({exc})") from None
        address = self.check_addresses(host, [str(info[4][0]) for info in infos])
        userinfo = parts.netloc.rpartition("@")[0]
        pinned = f"[{address}]" if address.version == 6 else str(address)
        netloc = (f"{userinfo}@" if userinfo else "") + f"{pinned}:{port}"
        url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        options = {"protocol_whitelist": PROTOCOLS[parts.scheme], "format_whitelist": ",".join(DEMUXERS)}
        if parts.scheme.startswith("rtsp"):
            options |= {"rtsp_transport": "tcp"}
        else:
            name = f"[{host}]" if ":" in host else host
            options |= {"max_redirects": "0", "http_proxy": "", "reconnect": "0",
                        "headers": f"Host: {name}{'' if parts.port is None else f':{port}'}\r\n"}
        return url, options

    # -- files ---------------------------------------------------------------------------------------------

    def check_path(self, path: str, loop: bool = False) -> SourceTarget:
        """A file source, if its path (links resolved) lies under a file root. Touches the disk: off the loop."""
        if not self.roots:
            raise SourceRefused(403, "sources_off", "file sources are off on this Vigil: its operator allows them "
                                "with VIGIL_SOURCES_FILE_ROOTS")
        if not path or len(path) > MAX_PATH_CHARS or "\x00" in path or not os.path.isabs(path):
            raise SourceRefused(422, "invalid_request", "path: an absolute path to a file")
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(root) for root in self.roots):
            raise SourceRefused(403, "source_not_allowed", "the path is outside the directories sources may be "
                                "read from (VIGIL_SOURCES_FILE_ROOTS)")
        if not real.is_file():
            raise SourceRefused(422, "invalid_source", f"no file at {path}")
        return SourceTarget("file", str(real), Path(path).name, loop)

    @staticmethod
    def file_options() -> dict[str, str]:
        """FFmpeg options for a file (read through Python, so FFmpeg opens no path): plain demuxers only."""
        return {"format_whitelist": ",".join(DEMUXERS)}

    # -- uploads -------------------------------------------------------------------------------------------

    def check_upload_size(self, declared: int | None) -> None:
        if self.max_upload_bytes <= 0:
            raise SourceRefused(403, "sources_off", "uploads are off on this Vigil: its operator allows them with "
                                "VIGIL_SOURCES_MAX_UPLOAD_BYTES")
        if declared is not None and declared > self.max_upload_bytes:
            raise SourceRefused(413, "body_too_large", f"an upload of {declared} bytes is over the "
                                f"{self.max_upload_bytes}-byte limit")
