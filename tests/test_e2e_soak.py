"""The soak against a real Vigil (demo model): each window's table shows every replica's RSS, fds and threads and
the ingest's asyncio tasks and peer connections (one per stream), every vital gets a verdict, the ingest is back
where it was once the streams close, and every stream's ticks are in its event log once each, as many as the time
it streamed. The 5-minute soak of `make soak` (8 streams, every vital flat) runs with `pytest -m slow`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from load_tests.packets import cached_clip
from load_tests.server_usage import VigilProcesses
from load_tests.soak import SoakRun, SoakScenario
from load_tests.soak_table import render_soak, write_soak_json
from load_tests.tick_ledger import TICK_SLACK
from tests.fixtures_vigil import ROOT, RunningVigil

SHORT_BUDGET_S = 120.0
LONG_BUDGET_S = 900.0  # Vigil's start, 5 s of warm-up, 300 s of soak, the event logs


@pytest.mark.integration
async def test_a_short_soak_samples_every_window_judges_each_vital_and_accounts_for_every_tick(
    vigil_demo: RunningVigil, tmp_path: Path
) -> None:
    scenario = SoakScenario(url=vigil_demo.url, streams=2, seconds=24.0, warmup_s=3.0, interval_s=3.0)
    clip = await asyncio.to_thread(cached_clip, scenario.clip)
    out, progress = io.StringIO(), io.StringIO()
    run = SoakRun(scenario, clip, VigilProcesses(root_pid=vigil_demo.process.pid), progress=progress, out=out)
    report = await asyncio.wait_for(run.soak(), SHORT_BUDGET_S)

    assert len(report.windows) == scenario.windows == 8 and report.warmup_windows == 2
    assert out.getvalue().count("[soak] window ") == 8
    (ingest_before,) = [p for p in report.before if p.role == "Ingest"]
    for window in report.windows:
        roles = {p.role for p in window.processes}
        assert {"Ingest", "Interaction", "Memory"} <= roles, window
        assert all(p.rss_mb and p.fds and p.threads for p in window.processes), window
        (ingest,) = [p for p in window.processes if p.role == "Ingest"]
        assert ingest.peer_connections == (ingest_before.peer_connections or 0) + 2, window
        assert ingest.asyncio_tasks and ingest.asyncio_tasks > (ingest_before.asyncio_tasks or 0)
        if window.index > 1:
            assert 0.6 <= window.ticks_per_s_per_stream <= 1.4, window
            assert window.decided > 0 and window.p99_ms >= window.p50_ms > 0, window

    judged = {(t.subject, t.vital): t for t in report.trends}
    for process in report.windows[-1].processes:
        for vital in ("rss_mb", "fds", "threads"):
            assert judged[(process.name, vital)].samples == 6
    ingest_name = f"Ingest {ingest_before.pid}"
    assert judged[(ingest_name, "peer_connections")].flat
    assert judged[(ingest_name, "asyncio_tasks")].samples == 6
    assert judged[("streams", "p99_ms")].samples == 6

    (settled,) = report.settling
    assert settled.ok, settled
    for ledger in report.ledgers:
        assert ledger.ok, ledger.described()
        # The warm-up and the soak at one tick a second, and the connecting and closing.
        streamed_s = scenario.warmup_s + scenario.seconds
        assert streamed_s - TICK_SLACK <= ledger.logged <= ledger.expected_max, ledger

    text = render_soak(report)
    assert "ticks in each session's event log" in text and text.splitlines()[-1].startswith("SOAK ")
    path = tmp_path / "soak.json"
    write_soak_json(report, path)
    payload = json.loads(path.read_text())
    assert len(payload["windows"]) == 8 and payload["passed"] == report.passed
    assert all(t["ok"] for t in payload["ticks"]) and payload["load"]["overall"]["connected"] == 2
    assert {t["described"].split()[0] for t in payload["trends"]} <= {"flat", "grows"}


@pytest.mark.slow
def test_make_soak_passes(tmp_path: Path) -> None:
    """`make soak`'s run: 8 streams for 5 minutes against a Vigil started for it; every vital flat."""
    report = tmp_path / "soak.json"
    command = [sys.executable, "-m", "load_tests", "--start-vigil", "--streams", "8", "--seconds", "300",
               "--soak-interval-s", "30", "--json", str(report)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=LONG_BUDGET_S,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    payload = json.loads(report.read_text())
    assert payload["passed"] and len(payload["windows"]) == 10 and len(payload["ticks"]) == 8
