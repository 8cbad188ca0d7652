"""The load generator sends what it claims and reports what Vigil did: the clip is encoded once and every stream
replays the same VP8 packets with its own timing; the report finds each trigger's response, counts responses
outside triggers as false, and against a real Vigil (demo model) every stream ticks once a second, the
replayed frames are decoded and decided, the trigger is answered, and each role's CPU is measured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc.codecs.vpx import VpxPayloadDescriptor
from aiortc.mediastreams import MediaStreamError

from load_tests import packets
from load_tests.clip import ClipSpec
from load_tests.packets import EncodedClip, cached_clip, is_vp8_keyframe
from load_tests.replay import VIDEO_CLOCK_RATE, LayeredVp8Packer, PacketReplayTrack
from load_tests.report import Window, overall_report, stream_report
from load_tests.runner import LoadRun, Scenario
from load_tests.server_usage import REPLICA_TITLE, ProcessUsage, VigilProcesses, role_usage
from load_tests.stream import ReceivedTick, negotiated_video_codec, vp8_preferences
from load_tests.table import render, write_json
from tests.fixtures_vigil import RunningVigil

SMALL = ClipSpec(width=160, height=120, fps=5, seconds=2.0, triggers=(1.0,), trigger_s=0.6, keyframe_s=1.0,
                 bitrate_kbps=200)


class VirtualClock:
    """Time that passes only when a track sleeps."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def red_center(rgb: np.ndarray) -> bool:
    r, g, b = (int(v) for v in rgb[rgb.shape[0] // 2, rgb.shape[1] // 2])
    return r > 150 and g < 90 and b < 90


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("load-clips")


@pytest.fixture(scope="module")
def small_clip(cache_dir: Path) -> EncodedClip:
    return cached_clip(SMALL, cache_dir)


# -- the clip and its packets ------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_clip_is_encoded_once_then_read_from_its_cache(
    small_clip: EncodedClip, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cached,) = cache_dir.iterdir()
    written = cached.stat().st_mtime_ns

    def no_encoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the clip was encoded again")

    monkeypatch.setattr(packets.concurrent.futures, "ProcessPoolExecutor", no_encoding)
    again = cached_clip(SMALL, cache_dir)
    assert again.packets == small_clip.packets
    assert cached.stat().st_mtime_ns == written
    assert len(small_clip.packets) == SMALL.frame_count == 10
    assert small_clip.keyframes == (0, 5)  # the first packet, then one a second
    assert all(is_vp8_keyframe(small_clip.packets[i]) for i in small_clip.keyframes)


@pytest.mark.unit
def test_another_clip_gets_its_own_cache_entry(cache_dir: Path) -> None:
    assert ClipSpec(fps=5).key != ClipSpec(fps=6).key != ClipSpec(triggers=(3.0,)).key
    assert ClipSpec().key == ClipSpec().key


@pytest.mark.unit
@pytest.mark.parametrize("bad", [
    {"width": 641}, {"fps": 0}, {"triggers": (9.5,)}, {"triggers": (2.0, 3.0), "trigger_s": 2.0}, {"seconds": 0.5},
    {"temporal_layers": 3},
])
def test_a_clip_that_cannot_be_built_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ClipSpec(**bad)  # type: ignore[arg-type]


@pytest.mark.unit
def test_trigger_windows_repeat_with_the_loop() -> None:
    spec = ClipSpec(seconds=10.0, triggers=(2.0, 6.0), trigger_s=1.0)
    windows = spec.windows(5.0, 23.0, grace_s=2.0)
    assert [w.onset for w in windows] == [6.0, 12.0, 16.0, 22.0]
    assert windows[0].holds(6.0) and windows[0].holds(8.9) and not windows[0].holds(9.0)


# -- replaying ---------------------------------------------------------------------------------------------


@pytest.mark.unit
async def test_two_tracks_replay_the_same_packets_each_on_its_own_clock(small_clip: EncodedClip) -> None:
    clock_a, clock_b = VirtualClock(), VirtualClock()
    clock_b.now = 250.0
    a = PacketReplayTrack(small_clip, clock=clock_a, sleep=clock_a.sleep)
    b = PacketReplayTrack(small_clip, clock=clock_b, sleep=clock_b.sleep)
    assert a.clip.packets is b.clip.packets  # shared, not copied per stream
    count = len(small_clip.packets)
    sent_a = [await a.recv() for _ in range(2 * count + 1)]
    sent_b = [await b.recv() for _ in range(3)]
    for sent in (sent_a, sent_b):
        for i, packet in enumerate(sent):
            assert bytes(packet) == small_clip.packets[i % count]  # loops back to the keyframe
            assert packet.pts == i * VIDEO_CLOCK_RATE // SMALL.fps
            assert packet.time_base.denominator == VIDEO_CLOCK_RATE
    assert clock_a.now == pytest.approx(100.0 + 2 * count / SMALL.fps)  # paced at the clip's fps
    assert a.stream_time(clock_a.now) == pytest.approx(2 * count / SMALL.fps)
    assert clock_b.now == pytest.approx(250.0 + 2 / SMALL.fps)
    a.stop()
    with pytest.raises(MediaStreamError):  # a stopped track ends the sender's loop
        await a.recv()


@pytest.mark.unit
async def test_a_track_that_starts_late_counts_its_stream_time_from_its_first_packet(small_clip: EncodedClip) -> None:
    clock = VirtualClock()
    track = PacketReplayTrack(small_clip, clock=clock, sleep=clock.sleep, start_delay_s=0.37)
    first = await track.recv()
    assert bytes(first) == small_clip.packets[0] and first.pts == 0
    assert track.started == pytest.approx(100.37) and track.stream_time(100.37) == 0.0
    await track.recv()
    assert clock.now == pytest.approx(100.37 + 1 / SMALL.fps)


@pytest.mark.unit
async def test_the_replayed_packets_decode_to_the_clip_with_its_disc(small_clip: EncodedClip) -> None:
    clock = VirtualClock()
    track = PacketReplayTrack(small_clip, clock=clock, sleep=clock.sleep)
    decoder = av.CodecContext.create("libvpx", "r")
    frames = []
    for _ in range(len(small_clip.packets)):
        frames += [f.to_ndarray(format="rgb24") for f in decoder.decode(await track.recv())]
    assert len(frames) == SMALL.frame_count
    assert all(f.shape == (SMALL.height, SMALL.width, 3) for f in frames)
    assert [red_center(f) for f in frames] == [SMALL.disc_at(i / SMALL.fps) for i in range(SMALL.frame_count)]


@pytest.mark.unit
async def test_each_replayed_packet_carries_its_temporal_layer_into_its_rtp_descriptors(
    small_clip: EncodedClip,
) -> None:
    assert small_clip.layers[0] == 0 and 1 in small_clip.layers  # two layers, as the page sends them
    clock = VirtualClock()
    track = PacketReplayTrack(small_clip, clock=clock, sleep=clock.sleep)
    packer = LayeredVp8Packer(small_clip)
    tl0_indices = []
    for index in range(len(small_clip.packets)):
        packet = await track.recv()
        payloads, timestamp = packer.pack(packet)
        assert timestamp == index * VIDEO_CLOCK_RATE // SMALL.fps
        descriptors = [VpxPayloadDescriptor.parse(payload) for payload in payloads]
        assert b"".join(data for _, data in descriptors) == small_clip.packets[index]
        for descriptor, _ in descriptors:
            assert descriptor.tid == (small_clip.layers[index], small_clip.layers[index])
            tl0_indices.append(descriptor.tl0picidx)
    assert tl0_indices[-1] == small_clip.layers.count(0)  # counts the layer-0 frames sent


@pytest.mark.unit
def test_a_clip_of_one_layer_has_every_packet_in_layer_0(tmp_path: Path) -> None:
    clip = cached_clip(dataclasses.replace(SMALL, temporal_layers=1), tmp_path)
    assert clip.layers == (0,) * SMALL.frame_count


@pytest.mark.unit
def test_the_offer_proposes_vp8_only_and_the_answer_is_read() -> None:
    assert {c.mimeType for c in vp8_preferences()} == {"video/VP8", "video/rtx"}
    answer = ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n"
              "m=video 9 UDP/TLS/RTP/SAVPF 97 98\r\na=rtpmap:97 rtx/90000\r\na=rtpmap:98 VP8/90000\r\n")
    assert negotiated_video_codec(answer) == "VP8"
    assert negotiated_video_codec("v=0\r\nm=application 9 DTLS/SCTP 5000\r\n") is None


# -- the report --------------------------------------------------------------------------------------------


def _tick(n: int, outcome: str, at: float, started: float = 1000.0, total: float = 200.0) -> ReceivedTick:
    """Tick `n` heard at stream second `at` (its frame 0.2 s older)."""
    stages = {"wait": 50.0, "sample": 10.0, "decide": 100.0, "total": total}
    return ReceivedTick(tick=n, outcome=outcome, stream_time=at - 0.2, received_at=started + at,
                        frame_time=at - 0.2, stages_ms=stages if not outcome.startswith("skipped:") else {})


@pytest.mark.unit
def test_the_report_finds_each_trigger_and_counts_false_responses() -> None:
    spec = ClipSpec(seconds=10.0, triggers=(4.0,), trigger_s=2.0)
    started = 1000.0
    ticks = [_tick(n, "silent", n + 0.5) for n in range(2, 22)]
    ticks[3] = _tick(5, "respond", 5.5)  # frame at 5.3: trigger 4..6 (+2 grace), 1.3 s in
    ticks[4] = _tick(6, "respond", 6.5)  # still in the same trigger: not a second finding, not false
    ticks[8] = _tick(10, "respond", 10.5)  # frame at 10.3: no disc then
    ticks[10] = _tick(12, "skipped:busy", 12.5)
    window = Window(started + 2.0, started + 22.0)
    report = stream_report(0, "s_1", ticks, started, window, spec, grace_s=2.0)
    assert report.ticks == 20 and report.ticks_per_s == 1.0
    assert report.outcomes == {"respond": 3, "silent": 16, "skipped:busy": 1}
    assert report.skipped == {"busy": 1}
    # Onsets 4 and 14 are measured (their windows end by 22); 24 is after the window.
    assert [(t.onset_s, t.found) for t in report.triggers] == [(4.0, True), (14.0, False)]
    assert report.triggers[0].delay_stream_s == pytest.approx(1.3)
    assert report.triggers[0].delay_wall_s == pytest.approx(1.5)
    assert report.false_responses == 1
    assert report.latency_ms["overhead"]["p50"] == pytest.approx(50.0)
    assert report.latency_ms["total"]["count"] == 19
    overall = overall_report([report, report], [ticks, ticks], window)
    assert overall.ticks == 40 and overall.triggers_found == 2 and overall.triggers_total == 4
    assert overall.false_responses == 2 and overall.skipped == {"busy": 2}


@pytest.mark.unit
def test_role_cpu_is_what_each_replica_spent_in_the_window() -> None:
    assert REPLICA_TITLE.search("ray::ServeReplica:vigil:Ingest")["role"] == "Ingest"  # type: ignore[index]
    baseline = {1: ProcessUsage(1, "Ingest", 1.0, 100 * 2**20)}
    before = {1: ProcessUsage(1, "Ingest", 5.0, 110 * 2**20), 2: ProcessUsage(2, "Memory", 3.0, 50 * 2**20)}
    after = {1: ProcessUsage(1, "Ingest", 7.5, 120 * 2**20), 3: ProcessUsage(3, "Memory", 0.5, 60 * 2**20)}
    usage = {u.role: u for u in role_usage(baseline, before, after)}
    assert usage["Ingest"].cpu_s == pytest.approx(2.5) and usage["Ingest"].rss_growth_mb == pytest.approx(20.0)
    assert usage["Memory"].cpu_s == pytest.approx(0.5)  # a replacement replica counts from zero


@pytest.mark.unit
def test_a_run_is_bounded() -> None:
    for bad in ({"streams": 0}, {"streams": 10_000}, {"seconds": 7200.0}, {"warmup_s": -1.0}):
        with pytest.raises(ValueError):
            Scenario(**bad)  # type: ignore[arg-type]
    assert "api_key" not in Scenario(api_key="secret").described()
    assert "secret" not in repr(Scenario(api_key="secret"))


# -- against a running Vigil -------------------------------------------------------------------------------




@pytest.mark.integration
async def test_two_streams_against_vigil_tick_and_answer_the_trigger(vigil_demo: RunningVigil, tmp_path: Path) -> None:
    # The trigger's window (6 s to 8 s, plus 2 s of grace) lies inside the measured stream seconds 3 to 13.
    spec = ClipSpec(seconds=10.0, triggers=(6.0,), trigger_s=2.0)
    scenario = Scenario(url=vigil_demo.url, streams=2, seconds=10.0, warmup_s=3.0, clip=spec, grace_s=2.0)
    clip = await asyncio.to_thread(cached_clip, spec)
    progress = io.StringIO()
    run = LoadRun(scenario, clip, VigilProcesses(root_pid=vigil_demo.process.pid), progress=progress)
    report = await asyncio.wait_for(run.run(), 90)

    assert all(s.codec == "VP8" for s in run.streams)
    assert report.overall.connected == 2
    for stream in report.streams:
        assert stream.error is None
        assert 0.8 <= stream.ticks_per_s <= 1.2, stream
        decided = sum(v for k, v in stream.outcomes.items() if not k.startswith("skipped:"))
        assert decided >= 8, stream.outcomes  # the replayed frames reach the model
        assert stream.skipped.get("no_frame", 0) == 0, stream.outcomes
        assert stream.triggers_found == len(stream.triggers) == 1, stream.triggers
        assert stream.false_responses == 0
        assert stream.latency_ms["total"]["count"] == decided
    assert report.overall.trigger_delay_wall_s["max"] < 3.0
    roles = {r.role: r for r in report.server}
    assert set(roles) == {"Ingest", "Interaction", "Memory", "all"}  # the sampler runs inline by default
    assert all(r.cpu_ms_per_stream_s > 0 for r in roles.values()), roles
    assert "streams connected" in progress.getvalue()

    path = tmp_path / "report.json"
    write_json(report, path)
    payload = json.loads(path.read_text())
    assert payload["overall"]["triggers_found"] == 2
    assert payload["streams"][0]["triggers_found"] == 1
    assert payload["server"][0]["cpu_ms_per_stream_s"] > 0
    assert "Interaction" in render(report)
