"""The delegation benchmark runs end to end in its smoke mode (2 sessions, one flooding, 8 s: a real gateway,
WebRTC clients, Redis, the brain's runner and a chat server that answers, fails and hangs), prints its tables,
and its accounting adds up: every delegation has one outcome at the client and one result in the log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.delegation_load import STATUSES, accounting_errors

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def test_the_smoke_run_prints_its_tables_and_adds_up(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.delegation_load", "--smoke", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "| session | role | delegated |" in run.stdout and "| sessions | n | delegated |" in run.stdout
    report = json.loads(out.read_text())
    assert accounting_errors(report) == []
    assert "accounting: every delegation has one outcome" in run.stdout
    steady, flooding = report["sessions"]
    assert (steady["role"], flooding["role"]) == ("steady", "flooding")
    # A red square every 3 s for 8 s; the flooder on every tick of the window, at most 2 in flight.
    assert 2 <= steady["delegated"] <= 4, steady
    assert flooding["delegated"] >= 6, flooding
    for session in report["sessions"]:
        assert sum(session["outcomes"][status] for status in STATUSES) == session["delegated"]
        assert session["log_once"] == session["delegated"]
        assert 0.8 <= session["ticks_per_s"] <= 1.2 and session["longest_gap_s"] < 2.0, session
        assert all(latency > 0 for values in session["latency_s"].values() for latency in values)
    assert report["brain_after_close"]["in_flight"] == 0
    assert sum(report["chat_fates"].values()) >= 1
