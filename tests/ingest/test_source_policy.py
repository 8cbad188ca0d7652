"""The guard in front of every source a client names: sources are off unless configured, and a URL or path that
breaks a rule is refused with its 4xx before anything connects; what is allowed is pinned to the checked address."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from actors.common.config import VigilConfig
from actors.ingest.source_policy import SourcePolicy, SourceRefused, SourceTarget, shown_url

pytestmark = pytest.mark.unit


def policy(**settings: object) -> SourcePolicy:
    return SourcePolicy(VigilConfig(**settings))


def refusal(call) -> SourceRefused:  # type: ignore[no-untyped-def]
    with pytest.raises(SourceRefused) as caught:
        call()
    return caught.value


def test_everything_is_off_by_default(tmp_path: Path) -> None:
    off = policy()
    assert refusal(lambda: off.parse_url("rtsp://10.0.0.5/stream")).code == "sources_off"
    assert refusal(lambda: off.check_path(str(tmp_path))).code == "sources_off"
    assert refusal(lambda: off.check_upload_size(10)).code == "sources_off"
    # A scheme without networks (or networks without a scheme) still allows no URL.
    assert refusal(lambda: policy(sources_allowed_schemes=["rtsp"]).parse_url("rtsp://10.0.0.5/")).code == "sources_off"


def test_schemes_and_malformed_urls_are_refused() -> None:
    rtsp_only = policy(sources_allowed_schemes=["rtsp"], sources_allowed_networks=["10.0.0.0/8"])
    for url in ("http://10.0.0.5/video", "file:///etc/passwd", "gopher://10.0.0.5/", "10.0.0.5/stream"):
        error = refusal(lambda url=url: rtsp_only.parse_url(url))
        assert (error.status, error.code) == (403, "source_not_allowed"), url
        assert "allowed: rtsp" in error.message
    for url in ("rtsp:///no-host", "rtsp://10.0.0.5:99999/", "rtsp://10.0.0.5/a b", "rtsp://" + "a" * 3000):
        assert refusal(lambda url=url: rtsp_only.parse_url(url)).status == 422, url
    with pytest.raises(ValueError, match="unknown"):
        VigilConfig(sources_allowed_schemes=["ftp"])


def test_every_resolved_address_must_be_in_an_allowed_network() -> None:
    guard = policy(sources_allowed_schemes=["http"], sources_allowed_networks=["10.0.0.0/8"])
    error = refusal(lambda: guard.check_addresses("localhost", ["127.0.0.1"]))
    assert (error.status, error.code) == (403, "source_not_allowed")
    assert "127.0.0.1" in error.message and "10.0.0.0/8" in error.message
    # A name that resolves to an allowed address and to another is refused: it could connect to either.
    assert "169.254.169.254" in refusal(lambda: guard.check_addresses("cam", ["10.0.0.5", "169.254.169.254"])).message
    assert refusal(lambda: guard.check_addresses("cam", ["::ffff:127.0.0.1"])).code == "source_not_allowed"
    assert str(guard.check_addresses("cam", ["10.1.2.3"])) == "10.1.2.3"
    everything = policy(sources_allowed_schemes=["http"], sources_allowed_networks=["0.0.0.0/0"])
    assert refusal(lambda: everything.check_addresses("any", ["0.0.0.0"])).code == "source_not_allowed"
    assert refusal(lambda: everything.check_addresses("mc", ["224.0.0.1"])).code == "source_not_allowed"


async def test_a_host_outside_the_networks_is_refused_before_anything_connects() -> None:
    guard = policy(sources_allowed_schemes=["http", "rtsp"], sources_allowed_networks=["10.0.0.0/8"])
    error = None
    try:
        await guard.check_url("http://127.0.0.1:9/video")
    except SourceRefused as exc:
        error = exc
    assert error is not None and error.code == "source_not_allowed"
    # Decimal and other odd spellings resolve to what they are, and are judged by that.
    with pytest.raises(SourceRefused, match=r"127\.0\.0\.1"):
        await guard.check_url("http://2130706433/video")
    target = await policy(sources_allowed_schemes=["rtsp"], sources_allowed_networks=["127.0.0.0/8"]).check_url(
        "rtsp://user:secret@127.0.0.1:8554/cam?token=abc")
    assert target.shown == "rtsp://127.0.0.1:8554/cam?…"


def test_the_connection_goes_to_the_checked_address_and_nowhere_else() -> None:
    guard = policy(sources_allowed_schemes=["http", "https", "rtsp"], sources_allowed_networks=["127.0.0.0/8"])
    url, options = guard.connection(SourceTarget("url", "http://localhost:8080/cam.mjpg?x=1", "shown"))
    assert url == "http://127.0.0.1:8080/cam.mjpg?x=1"  # pinned: the name cannot resolve elsewhere meanwhile
    assert options["headers"] == "Host: localhost:8080\r\n"  # the server still sees the name it was given
    assert options["max_redirects"] == "0" and options["http_proxy"] == ""
    assert options["protocol_whitelist"] == "http,tcp"
    assert "hls" not in options["format_whitelist"].split(",") and "mpjpeg" in options["format_whitelist"]
    url, options = guard.connection(SourceTarget("url", "rtsp://admin:pw@localhost/live", "shown"))
    assert url == "rtsp://admin:pw@127.0.0.1:554/live"  # credentials kept for the camera, never shown
    assert options["rtsp_transport"] == "tcp" and options["protocol_whitelist"] == "rtsp,tcp"
    assert guard.connection(SourceTarget("url", "https://localhost/v.webm", ""))[1]["protocol_whitelist"] == \
        "https,tls,tcp"


def test_shown_urls_carry_no_credentials() -> None:
    from urllib.parse import urlsplit

    assert shown_url(urlsplit("rtsp://u:p@cam.local:554/s?auth=1")) == "rtsp://cam.local:554/s?…"
    assert shown_url(urlsplit("http://[::1]:8000/v")) == "http://[::1]:8000/v"


def test_paths_must_resolve_under_a_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "videos", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    (root / "clip.mp4").write_bytes(b"x")
    (outside / "secret.mp4").write_bytes(b"x")
    os.symlink(outside / "secret.mp4", root / "link.mp4")
    guard = policy(sources_file_roots=[str(root)])
    target = guard.check_path(str(root / "clip.mp4"), loop=True)
    assert target == SourceTarget("file", str((root / "clip.mp4").resolve()), "clip.mp4", True)
    for path in (outside / "secret.mp4", root / "link.mp4", root / ".." / "private" / "secret.mp4",
                 outside / "missing.mp4"):
        error = refusal(lambda path=path: guard.check_path(str(path)))
        assert (error.status, error.code) == (403, "source_not_allowed"), path
        assert str(outside) not in error.message  # nothing said about what lies outside the roots
    assert refusal(lambda: guard.check_path("clip.mp4")).status == 422  # relative
    assert refusal(lambda: guard.check_path(str(root / "missing.mp4"))).code == "invalid_source"
    assert refusal(lambda: guard.check_path(str(root))).code == "invalid_source"  # a directory


def test_uploads_are_bounded() -> None:
    guard = policy(sources_max_upload_bytes=1000)
    guard.check_upload_size(1000)
    guard.check_upload_size(None)  # no declared size: counted while it streams
    error = refusal(lambda: guard.check_upload_size(1001))
    assert (error.status, error.code) == (413, "body_too_large")
