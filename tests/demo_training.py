"""The demo model trained in the background while the first tests run, at a low priority, so that a fresh clone's
run does not wait minutes for it at the first test that needs it.

`python -m tests.demo_training DIR` trains into DIR (as `ensure_demo_model` does: under its lock, so the fixture
that needs the model waits for this run rather than training again); `BackgroundTraining` starts and stops it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

NICE = 10  # below the tests: a test that needs the CPU takes it first
ROOT = Path(__file__).resolve().parent.parent


class BackgroundTraining:
    """At most one training run of the demo model, its log beside the checkpoint."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    def start(self, directory: Path) -> None:
        from actors.interaction.models.demo import DemoRecipe, is_finished

        if self.process is not None or is_finished(directory, DemoRecipe()):
            return
        directory.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = directory.parent / f"{directory.name}-training.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.demo_training", str(directory)], cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, env=os.environ | {"HF_HUB_OFFLINE": "1"},
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The run stopped (SIGSTOP) while a test waits on another background process at the same low priority
        (vLLM's server, tests/vllm_server.py), which would otherwise get half of the idle CPU; resumed after."""
        process = self.process if self.running() else None
        if process is not None:
            os.kill(process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            if process is not None:
                os.kill(process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Ends a run still going (the run was cut short); it leaves no finished-looking checkpoint."""
        if self.running():
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGCONT)  # a stopped process takes SIGTERM only once it goes on
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def main() -> None:
    from actors.interaction.models.demo import ensure_demo_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.nice(NICE)
    ensure_demo_model(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
