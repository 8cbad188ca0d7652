"""A Vigil for a load run to measure (`--start-vigil`, what `make load` does without VIGIL_URL).

It starts `serve_app.py` the way the integration tests do (`tests/fixtures_vigil.py`: its own process, an
embedded Redis in a temporary directory, loopback ICE, nothing downloaded), with the model VIGIL_MODEL names
or else the demo model (trained once into `.cache/vigil-demo-model`, as `make run` does), and stops it after.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.fixtures_vigil import ROOT, RunningVigil, launch_vigil

DEMO_MODEL_DIR = ROOT / ".cache" / "vigil-demo-model"


def _ensure_demo_model(directory: Path) -> str:
    from actors.interaction.models.demo import ensure_demo_model

    return str(ensure_demo_model(directory))


def demo_model() -> Path:
    """The demo model's directory, trained first if missing; in a child process, so that the generator
    does not keep torch in memory."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return Path(pool.submit(_ensure_demo_model, DEMO_MODEL_DIR).result())


@contextlib.contextmanager
def started_vigil(streams: int) -> Iterator[RunningVigil]:
    """Vigil on a free loopback port, ready (every replica up) when this yields; stopped on exit. Its session
    quotas admit `streams` sessions from this one address (Vigil's own caps are for real clients)."""
    model = os.environ.get("VIGIL_MODEL")
    model_dir = Path(model) if model else demo_model()
    workdir = Path(tempfile.mkdtemp(prefix="vigil-load-"))
    quotas = {"VIGIL_LIMITS_MAX_SESSIONS_PER_ADDRESS": str(max(16, streams)),
              "VIGIL_LIMITS_MAX_SESSIONS_PER_KEY": str(max(32, streams)),
              "VIGIL_LIMITS_MAX_SESSIONS": str(max(64, streams))}
    with contextlib.contextmanager(launch_vigil)(workdir, model_dir, **(quotas | _passed_on())) as vigil:
        yield vigil


def _passed_on() -> dict[str, str]:
    """VIGIL_* settings of this environment (e.g. VIGIL_INGEST_REPLICAS) win over the launch defaults."""
    return {name: value for name, value in os.environ.items() if name.startswith("VIGIL_") and name != "VIGIL_URL"}

