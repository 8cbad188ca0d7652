"""vLLM's own OpenAI-compatible server with a tiny random Qwen2 on the CPU, for the openai engine's test against it
(tests/interaction/test_openai_vllm_server.py). It is started in the background as the run begins, at a low
priority like the demo model's training, so that its three processes' imports (about 30 s of CPU) use the time
the tests before it leave idle; its test's fixture waits until it answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.fakes import free_port
from tests.fixtures_models import TEST_MODELS

NICE = 10  # below the tests: a test that needs the CPU takes it first
START_TIMEOUT_S = 240.0
MODEL_NAME = "tiny-lm"


class BackgroundServer:
    """At most one vLLM server; `stop()` ends it and its engine's processes."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.base_url = ""

    def start(self) -> None:
        if self.process is not None:
            return
        from actors.interaction.models.tiny_lm import ensure_tiny_random_lm

        model = ensure_tiny_random_lm(TEST_MODELS / "tiny-random-lm")
        port = free_port()
        self.log_path = Path(tempfile.mkdtemp(prefix="vigil-vllm-server-")) / "server.log"
        command = ["nice", "-n", str(NICE), sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                   "--model", str(model), "--served-model-name", MODEL_NAME, "--host", "127.0.0.1",
                   "--port", str(port), "--dtype", "float32", "--gpu-memory-utilization", "0.2",
                   "--max-model-len", "4096", "--block-size", "32",
                   "--enforce-eager"]  # eager: a test has no use for minutes of kernel compiling
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                            env=os.environ | {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def wait_ready(self) -> str:
        """The server's API root, once it lists its model."""
        assert self.process is not None and self.log_path is not None, "start() first"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM's server exited:\n{self.log_path.read_text(errors='replace')[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server not up in {START_TIMEOUT_S:.0f} s (log: {self.log_path})")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return self.base_url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


VLLM_SERVER = BackgroundServer()  # started by conftest.py when the test that uses it is collected
