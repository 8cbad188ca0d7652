"""Vigil as a user runs it: `serve_app.py` in its own process (Ray, Serve, embedded Redis), on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import free_port

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 240.0
STOP_WAIT_S = 2.0
STOPPING: list[subprocess.Popen[bytes]] = []


@dataclass
class RunningVigil:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    settings: dict[str, str]  # the environment it was started with, besides the test's own

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def replica_pids(self, deployment: str) -> list[int]:
        """The processes of this Vigil's replicas of `deployment` (e.g. "Ingest"), not another Vigil's on the
        same machine: Ray's processes stay in the session Vigil was started in."""
        found = subprocess.run(["pgrep", "-s", str(self.process.pid), "-f", f"ServeReplica:vigil:{deployment}"],
                               capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    async def video_frames(self) -> dict[str, float]:
        """What an ingest replica counted of the video frames it received: decoded, and dropped unread."""
        async with httpx.AsyncClient(base_url=self.url) as http:
            text = (await http.get("/metrics")).text
        counts = {"decoded": 0.0, "dropped": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "vigil_video_frames_total":
                    counts[sample.labels["result"]] += sample.value
        return counts


def launch_vigil(workdir: Path, model_dir: Path, **env: str) -> Generator[RunningVigil, None, None]:
    """Start Vigil with `model_dir` as its model; yield once /readyz answers 200; stop it (SIGINT) after.
    A Vigil still stopping is waited for first: two starting and stopping at once on two cores starve both."""
    wait_for_stopping_vigils()
    port = free_port()
    log_path = workdir / "vigil.log"
    settings = {
        "VIGIL_PORT": str(port),
        "VIGIL_MODEL": str(model_dir),
        "VIGIL_FALLBACK_TO_DEMO": "false",
        "VIGIL_REDIS_DIR": str(workdir / "redis"),
        "VIGIL_ICE_HOST_ADDRESSES": "127.0.0.1",
        "VIGIL_ICE_ALLOWED_NETWORKS": "127.0.0.0/8",
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    } | env
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "serve_app.py")], cwd=workdir, env=os.environ | settings,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    vigil = RunningVigil(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path, settings=settings)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Vigil exited with {process.returncode}:\n{vigil.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Vigil not ready in {START_TIMEOUT_S:.0f} s:\n{vigil.log()[-4000:]}")
            try:
                # Ready, and `serve.run` has returned: every replica of every deployment is up (not only the
                # one interaction replica that readiness reaches).
                if httpx.get(vigil.url + "/readyz", timeout=2).status_code == 200 and "Vigil is running" in vigil.log():
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield vigil
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                # Its graceful stop (draining, Serve's shutdown) goes on while the next tests run; the session's
                # end waits for it (`wait_for_stopping_vigils`).
                STOPPING.append(process)


def wait_for_stopping_vigils(timeout_s: float = 60.0) -> None:
    """Let every Vigil still stopping finish; one that does not in time is killed with its whole session."""
    while STOPPING:
        process = STOPPING.pop()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            subprocess.run(["pkill", "-KILL", "-s", str(process.pid)], check=False)
            process.wait(10)


class SharedVigil:
    """One Vigil for the modules that only watch it work, which run one after the other: started by the first
    test that asks (or handed over by a test that started it), stopped after the last
    (`conftest.pytest_runtest_teardown`), so it neither starts twice nor idles beside the rest of the suite."""

    def __init__(self) -> None:
        self._running: Generator[RunningVigil, None, None] | None = None
        self.vigil: RunningVigil | None = None
        self.last_user: str | None = None  # the node id of the last test that uses it (set at collection)

    def get(self, workdir: Path, model_dir: Path, **env: str) -> RunningVigil:
        if self.vigil is None:
            self._running = launch_vigil(workdir, model_dir, **env)
            self.vigil = next(self._running)
        return self.vigil

    def hand_over(self, running: Generator[RunningVigil, None, None], vigil: RunningVigil) -> None:
        """Keep a Vigil a test started (with the settings `get` would use) for the tests after it, or stop it
        when none is to come."""
        if self.vigil is not None or self.last_user is None:
            running.close()
        else:
            self._running, self.vigil = running, vigil

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()  # launch_vigil's `finally` stops it
        self._running, self.vigil = None, None


SHARED_DEMO = SharedVigil()  # the demo model: the browser's and the load generator's modules
SHARED_TINY = SharedVigil()  # the tiny random model, default settings: tests/test_serve_graph.py
SHARED_ROLES = SharedVigil()  # every role its own deployment: tests/fixtures_roles.py
