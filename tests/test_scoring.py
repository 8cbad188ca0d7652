"""`vigil score` counts what a user would: a response inside a due window answers it once, a response where none
is due is a false alarm, a window nobody answered is a miss, and SW-F1 weighs them as the Streaming Harness does
(2·TP / (2·TP + 0.2·FP + 2·FN)); StreamingBench's ±2 s rule holds at its borders; OVO-Bench and StreamingBench
annotation files turn into the windows they describe; the console script prints the table, writes the JSON and
refuses a bad file with exit status 2 and one line saying why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from load_tests.expectations import (
    Expectation,
    ExpectationSet,
    load_expectations,
    parse_expectations,
    seconds_of,
)
from load_tests.scoring import score, sw_f1
from load_tests.timeline import BadInput, Tick, Timeline, load_timeline, timeline_payload, write_timeline

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "scoring"
ROOT = Path(__file__).resolve().parent.parent
VIGIL = Path(sys.executable).parent / "vigil"


def said(*times: float, decision: str = "respond", text: str = "") -> list[Tick]:
    return [Tick(t=t, decision=decision, text=text) for t in times]


def window(start: float, end: float, answer: str | None = None) -> Expectation:
    return Expectation(start=start, end=end, answer=answer)


# -- the metric ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tp", "fp", "fn", "expected"), [
    (0, 0, 0, 1.0),               # nothing due, nothing said
    (1, 0, 0, 1.0),
    (0, 1, 0, 0.0),
    (0, 0, 1, 0.0),
    (1, 1, 0, 2 / 2.2),           # a false alarm costs a tenth of a miss
    (1, 0, 1, 2 / 4),
    (2, 1, 1, 4 / 6.2),
    (3, 10, 0, 6 / 8),
])
def test_sw_f1_by_hand(tp: int, fp: int, fn: int, expected: float) -> None:
    assert sw_f1(tp, fp, fn) == pytest.approx(expected)


def test_window_borders_are_inside_and_a_millisecond_out_is_not() -> None:
    windows = [window(4.0, 8.0), window(20.0, 24.0)]
    result = score(said(4.0, 24.0), windows)
    assert (result.tp, result.fp, result.fn) == (2, 0, 0)
    result = score(said(3.999, 8.001, 19.999, 24.001), windows)
    assert (result.tp, result.fp, result.fn) == (0, 4, 2)
    assert result.sw_f1 == pytest.approx(0.0)


def test_a_point_is_due_within_two_seconds_either_side() -> None:
    point = [Expectation.point(29.0)]
    for t in (27.0, 29.0, 31.0):
        assert score(said(t), point).tp == 1, t
    for t in (26.99, 31.01):
        result = score(said(t), point)
        assert (result.tp, result.fp, result.fn) == (0, 1, 1), t
    early = score(said(27.0), point).windows[0]
    assert early.delay_s == pytest.approx(-2.0)  # a point's delay runs from its ground-truth time


def test_each_window_is_answered_once() -> None:
    result = score(said(5.0, 6.0, 7.0), [window(4.0, 8.0)])
    assert (result.tp, result.fp, result.fn) == (1, 0, 0)
    assert [t.t for t in result.extra_responses] == [6.0, 7.0]
    assert result.windows[0].response is not None and result.windows[0].response.t == 5.0  # the first answers
    strict = score(said(5.0, 6.0, 7.0), [window(4.0, 8.0)], extra_as_fp=True)
    assert (strict.tp, strict.fp, strict.fn) == (1, 2, 0)
    assert strict.sw_f1 == pytest.approx(2 / 2.4)


def test_overlapping_windows_each_get_a_response() -> None:
    # 5.5 answers the short window (it closes first), so 7.0 can still answer the long one.
    result = score(said(5.5, 7.0), [window(0.0, 10.0), window(5.0, 6.0)])
    assert (result.tp, result.fp, result.fn) == (2, 0, 0)
    assert [w.response.t for w in result.windows if w.response] == [7.0, 5.5]


def test_only_responses_and_delegations_count() -> None:
    ticks = [Tick(5.0, "silent"), Tick(6.0, "skipped:busy"), Tick(7.0, "skipped:timeout"), Tick(30.0, "silent")]
    assert (score(ticks, [window(4.0, 8.0)]).tp, score(ticks, [window(4.0, 8.0)]).fp) == (0, 0)
    result = score([*ticks, Tick(6.5, "delegate", "checking the price"), Tick(40.0, "respond")], [window(4.0, 8.0)])
    assert (result.tp, result.fp, result.fn, result.responses) == (1, 1, 0, 2)


def test_empty_inputs() -> None:
    nothing = score([], [])
    assert (nothing.sw_f1, nothing.precision, nothing.recall, nothing.f1) == (1.0, 1.0, 1.0, 1.0)
    assert nothing.mean_delay_s is None
    chatter = score(said(1.0), [])
    assert (chatter.sw_f1, chatter.precision, chatter.fp) == (0.0, 0.0, 1)
    silence = score([Tick(5.0, "silent")], [window(4.0, 8.0)])
    assert (silence.sw_f1, silence.precision, silence.recall, silence.fn) == (0.0, 1.0, 0.0, 1)


def test_precision_recall_f1_and_mean_delay() -> None:
    windows = [window(10.0, 20.0), window(30.0, 40.0), Expectation.point(60.0)]
    result = score(said(12.0, 25.0, 61.5), windows)
    assert (result.tp, result.fp, result.fn) == (2, 1, 1)
    assert result.precision == pytest.approx(2 / 3)
    assert result.recall == pytest.approx(2 / 3)
    assert result.f1 == pytest.approx(4 / 6)
    assert result.sw_f1 == pytest.approx(4 / 6.2)
    assert result.mean_delay_s == pytest.approx((2.0 + 1.5) / 2)


def test_required_answers_must_be_in_the_response() -> None:
    windows = [window(4.0, 8.0, answer="Red"), window(20.0, 24.0)]
    lenient = score(said(5.0, text="a blue square"), windows)
    assert (lenient.tp, lenient.windows[0].answer_ok) == (1, False)
    wrong_then_right = [*said(5.0, text="a blue square"), *said(6.0, text="a RED disc"), *said(21.0, text="x")]
    result = score(wrong_then_right, windows, require_answer=True)
    assert (result.tp, result.fp, result.fn) == (2, 1, 0)
    assert result.windows[0].response is not None and result.windows[0].response.t == 6.0
    assert result.windows[0].answer_ok is True


# -- properties ----------------------------------------------------------------------------------------------

times = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
spans = st.tuples(times, st.floats(min_value=0.0, max_value=10.0)).map(lambda s: window(s[0], s[0] + s[1]))


@settings(max_examples=150, deadline=None)
@given(windows=st.lists(spans, max_size=8), responses=st.lists(times, max_size=12),
       outside=st.floats(min_value=200.0, max_value=300.0))
def test_score_properties(windows: list[Expectation], responses: list[float], outside: float) -> None:
    result = score(said(*responses), windows)
    assert 0.0 <= result.sw_f1 <= 1.0
    assert result.tp + result.fn == len(windows)
    assert result.tp + len(result.false_responses) + len(result.extra_responses) == len(responses)
    answered = [w.response for w in result.windows if w.response is not None]
    assert len({id(r) for r in answered}) == len(answered)  # a response answers one window at most
    with_fp = score(said(*responses, outside), windows)
    assert with_fp.sw_f1 <= result.sw_f1
    assert with_fp.tp == result.tp
    # one response at each window's start matches them all (disjointness not needed: starts are inside)
    assert score(said(*(w.start for w in windows)), windows).tp == len(windows)


# -- timelines -----------------------------------------------------------------------------------------------


def test_timeline_shapes(tmp_path: Path) -> None:
    timeline = load_timeline(FIXTURES / "timeline.json")
    assert timeline.video == "./videos/sample_17_proactive.mp4"
    assert [t.t for t in timeline.responses] == [28.0, 29.0, 40.0, 66.0]
    messages = load_timeline(FIXTURES / "messages.jsonl")  # hello and pong are passed over
    assert [(t.tick, t.t, t.decision) for t in messages.ticks] == [
        (309, 308.0, "silent"), (312, 311.0, "respond"), (330, 329.0, "skipped:timeout")]
    events = tmp_path / "events.json"
    events.write_text(json.dumps({"events": [{"tick": 3, "stream_time": 2.0, "outcome": "delegate", "text": "hm"}]}))
    assert load_timeline(events).ticks == (Tick(t=2.0, decision="delegate", text="hm", tick=3),)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([{"t": 1.5, "decision": "respond"}]))
    assert load_timeline(bare).responses == [Tick(t=1.5, decision="respond")]


def test_a_written_timeline_reads_back(tmp_path: Path) -> None:
    ticks = [Tick(0.0, "silent", tick=1), Tick(1.0, "respond", "a red disc", tick=2), Tick(2.0, "skipped:busy")]
    path = tmp_path / "out" / "timeline.json"
    write_timeline(path, ticks, video="clip.mp4", session_id="s-1")
    again = load_timeline(path)
    assert again == Timeline(ticks=tuple(ticks), video="clip.mp4", meta={"session_id": "s-1"})
    assert timeline_payload(ticks)["format"] == "vigil.timeline"


# -- importers -----------------------------------------------------------------------------------------------


def spans_of(chosen: ExpectationSet) -> list[tuple[float, float, str]]:
    return [(w.start, w.end, w.label) for w in chosen.windows]


def test_ovo_bench_forward_annotations() -> None:
    sets = parse_expectations(json.loads((FIXTURES / "ovo_forward.json").read_text()), "ovo")
    by_video = {s.video: s for s in sets}
    assert set(by_video) == {"Countix/jumping.mp4", "Countix/clapping.mp4", "COIN/hair.mp4", "MovieNet/street.mp4"}
    assert all(s.source == "ovo-bench" for s in sets)  # the backward EPM question has no window
    # REC: each repetition while it happens; without start/end times, between the probes around each count.
    assert spans_of(by_video["Countix/jumping.mp4"]) == [(6, 9, "jumping jacks #1"), (20, 24, "jumping jacks #2")]
    assert [w.answer for w in by_video["Countix/jumping.mp4"].windows] == ["1", "2"]
    assert spans_of(by_video["Countix/clapping.mp4"]) == [
        (5, 10, "clapping #1"), (10, 15, "clapping #2"), (10, 15, "clapping #3")]
    # SSR: each step while it is performed.
    assert spans_of(by_video["COIN/hair.mp4"]) == [(25, 30, "pull up the hair"), (31, 49, "put on the hair extensions")]
    # CRR: from the clue to the last probe that has enough to answer.
    street = by_video["MovieNet/street.mp4"].windows
    assert [(w.start, w.end, w.answer, w.asked, w.source_id) for w in street] == [
        (308, 338, "She walks past the car.", 297, "1468"), (317, 347, "She walks past him.", 310, "1469")]


def test_streamingbench_proactive_annotations() -> None:
    sets = parse_expectations(json.loads((FIXTURES / "streamingbench_proactive.json").read_text()), "sb")
    assert [s.video for s in sets] == ["./videos/sample_17_proactive.mp4", "./videos/sample_3_proactive.mp4"]
    first = sets[0].windows
    assert [(w.at, w.start, w.end, w.answer, w.asked) for w in first] == [
        (29.0, 27.0, 31.0, "3", 20.0), (65.0, 63.0, 67.0, "10", 40.0)]
    assert first[0].task == "Proactive Output"
    narrow = load_expectations(FIXTURES / "streamingbench_proactive.json", video="sample_3_proactive.mp4",
                               tolerance_s=0.5)
    assert [(w.at, w.start, w.end) for w in narrow.windows] == [(12.0, 11.5, 12.5)]


def test_vigil_expectations_and_selection() -> None:
    own = load_expectations(FIXTURES / "expectations.json")
    assert [(w.start, w.end, w.at, w.answer) for w in own.windows] == [
        (4.0, 8.0, None, "red"), (15.0, 19.0, 17.0, None)]
    assert load_expectations(FIXTURES / "ovo_forward.json", ids=["1469"]).windows[0].start == 317
    # The timeline's video chooses among several videos; a file of one video is used whatever the timeline says.
    assert load_expectations(FIXTURES / "ovo_forward.json", prefer_video="COIN/hair.mp4").video == "COIN/hair.mp4"
    assert load_expectations(FIXTURES / "expectations.json", prefer_video="other.mp4").video == "red_disc.mp4"
    with pytest.raises(BadInput, match="4 videos"):
        load_expectations(FIXTURES / "ovo_forward.json")
    with pytest.raises(BadInput, match="no expectations for video"):
        load_expectations(FIXTURES / "ovo_forward.json", video="elsewhere.mp4")


@pytest.mark.parametrize(("text", "seconds"), [("00:03:10", 190.0), ("0:00:29", 29.0), ("01:05", 65.0),
                                               ("12.5", 12.5), (7, 7.0)])
def test_stream_times(text: str | int, seconds: float) -> None:
    assert seconds_of(text, "t") == seconds


# -- the console script --------------------------------------------------------------------------------------


def vigil(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [str(VIGIL)] if VIGIL.exists() else [sys.executable, "-m", "load_tests.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_vigil_score_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "score.json"
    done = vigil("score", FIXTURES / "timeline.json", FIXTURES / "streamingbench_proactive.json", "--json", out)
    assert done.returncode == 0, done.stderr
    # The timeline names its video, which picks that video's questions out of the StreamingBench file.
    assert "SW-F1 0.952" in done.stdout
    assert "(TP 2, FP 1, FN 0;" in done.stdout
    assert "| 28.0 | -1.00 | yes | USA has 3 points now |" in done.stdout
    assert "40.0 s  respond   A timeout is called" in done.stdout
    payload = json.loads(out.read_text())
    assert payload["sw_f1"] == pytest.approx(4 / 4.2, abs=1e-4)
    assert (payload["tp"], payload["fp"], payload["fn"], payload["responses"]) == (2, 1, 0, 4)
    assert (payload["precision"], payload["recall"], payload["f1"]) == (pytest.approx(2 / 3, abs=1e-4), 1.0, 0.8)
    assert [w["delay_s"] for w in payload["windows"]] == [-1.0, 1.0]
    assert [w["response"]["t"] for w in payload["windows"]] == [28.0, 66.0]
    assert [r["t"] for r in payload["extra_responses"]] == [29.0]


def test_vigil_score_ovo_messages_and_fail_under(tmp_path: Path) -> None:
    args = ("score", FIXTURES / "messages.jsonl", FIXTURES / "ovo_forward.json", "--video", "street.mp4")
    done = vigil(*args, "--fail-under", "0.9")
    assert done.returncode == 1
    assert "SW-F1 0.500" in done.stdout and "| missed |" in done.stdout
    one = vigil(*args, "--id", "1468", "--fail-under", "1.0")
    assert one.returncode == 0, one.stderr
    assert "SW-F1 1.000" in one.stdout


def test_vigil_expectations_converts_and_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "expected.json"
    done = vigil("expectations", FIXTURES / "ovo_forward.json", "--video", "Countix/jumping.mp4", "-o", out)
    assert done.returncode == 0, done.stderr
    converted = load_expectations(out)
    assert (converted.source, [(w.start, w.end) for w in converted.windows]) == ("ovo-bench", [(6, 9), (20, 24)])


@pytest.mark.parametrize(("files", "says"), [
    ({"t.json": None}, "cannot read it"),
    ({"t.json": "{not json"}, "not JSON"),
    ({"t.json": ""}, "empty"),
    ({"t.json": '{"ticks": [{"t": 1, "decision": "shout"}]}'}, "tick 0: decision \"shout\""),
    ({"t.json": '{"ticks": [{"decision": "respond"}]}'}, "no stream time"),
    ({"t.json": '{"ticks": [{"t": "soon", "decision": "respond"}]}'}, "expected a number"),
    ({"t.json": '{"hello": 1}'}, "not a timeline"),
    ({"e.json": '{"windows": [{"start": 5, "end": 4}]}'}, "window 0: `end` (4) is before `start` (5)"),
    ({"e.json": '{"windows": [{"start": 5}]}'}, "needs `start` and `end`"),
    ({"e.json": '[{"questions": [{"ground_truth_time_stamp": "half past"}], "video_path": "v.mp4"}]'},
     "'half past' is not a time"),
    ({"e.json": '[{"task": "EPM", "video": "a.mp4", "realtime": 3}]'}, "no OVO-Bench forward"),
    ({"e.json": '{"something": "else"}'}, "neither Vigil expectations"),
])
def test_bad_files_exit_2_with_one_line(tmp_path: Path, files: dict[str, str | None], says: str) -> None:
    good = {"t.json": (FIXTURES / "timeline.json").read_text(), "e.json": (FIXTURES / "expectations.json").read_text()}
    for name in ("t.json", "e.json"):
        content = files.get(name, good[name])
        if content is not None:
            (tmp_path / name).write_text(content)
    done = vigil("score", tmp_path / "t.json", tmp_path / "e.json")
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vigil score: ") and says in lines[0], done.stderr


def test_several_videos_without_a_choice_exit_2(tmp_path: Path) -> None:
    done = vigil("score", FIXTURES / "messages.jsonl", FIXTURES / "ovo_forward.json")
    assert done.returncode == 2
    assert "choose one with --video" in done.stderr and len(done.stderr.strip().splitlines()) == 1
