"""What a soak samples from Vigil: per replica process its RSS, open file descriptors and threads (psutil), and
from each ingest replica's `/metrics` its asyncio tasks and open peer connections.

The replicas are those `VigilProcesses` finds (every deployment's, the brain's too). Serve's proxy sends a request
to the ingest replica its `x-session-id` picks, so each ingest replica is scraped through a session it holds; the
`x-vigil-replica` header of the answer (`<replica id>@<pid>`) says which process answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from load_tests.server_usage import VigilProcesses

log = logging.getLogger(__name__)

GAUGES = {"vigil_asyncio_tasks": "asyncio_tasks", "vigil_peer_connections": "peer_connections"}
SCRAPE_TIMEOUT_S = 10.0
PROCESS_VITALS = ("rss_mb", "fds", "threads")
INGEST_VITALS = ("asyncio_tasks", "peer_connections")


@dataclass(frozen=True, slots=True)
class ProcessVitals:
    """One process at one moment; a figure not measured (a target on another machine, a scrape that failed) is
    None."""

    role: str
    pid: int
    rss_mb: float | None = None
    fds: int | None = None
    threads: int | None = None
    asyncio_tasks: float | None = None
    peer_connections: float | None = None

    @property
    def name(self) -> str:
        return f"{self.role} {self.pid}"

    def vital(self, name: str) -> float | None:
        value: float | None = getattr(self, name)
        return value


def process_vitals(pid: int, role: str) -> ProcessVitals | None:
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            return ProcessVitals(role, pid, rss_mb=process.memory_info().rss / 2**20, fds=process.num_fds(),
                                 threads=process.num_threads())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def read_gauges(text: str) -> dict[str, float]:
    """The soak's gauges in a Prometheus text page, by their short names."""
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name in GAUGES and family.samples:
            found[GAUGES[family.name]] = float(family.samples[0].value)
    return found


def replica_pid(header: str) -> int:
    """The pid in an `x-vigil-replica` header (`<replica id>@<pid>`); 0 when it has none."""
    _, _, pid = header.rpartition("@")
    return int(pid) if pid.isdigit() else 0


class VitalsProbe:
    """Samples every Vigil process it can see, and the ingest replicas' gauges through `http` (Vigil's URL)."""

    def __init__(self, http: httpx.AsyncClient, processes: VigilProcesses | None) -> None:
        self.http = http
        self.processes = processes

    async def sample(self, routes: Iterable[Mapping[str, str]] = ({},)) -> list[ProcessVitals]:
        """Every process now, ordered by role then pid; `routes` are the headers that reach each ingest replica."""
        measured = await asyncio.to_thread(self._measure_processes)
        gauges = await self._scrape(routes)
        by_pid = {p.pid: p for p in measured}
        for pid, values in gauges.items():
            known = by_pid.get(pid, ProcessVitals("Ingest", pid))
            by_pid[pid] = replace(known, asyncio_tasks=values.get("asyncio_tasks"),
                                  peer_connections=values.get("peer_connections"))
        return sorted(by_pid.values(), key=lambda p: (p.role, p.pid))

    def _measure_processes(self) -> list[ProcessVitals]:
        if self.processes is None:
            return []
        found = (process_vitals(pid, role) for pid, role in self.processes.replicas(roles=None).items())
        return [vitals for vitals in found if vitals is not None]

    async def _scrape(self, routes: Iterable[Mapping[str, str]]) -> dict[int, dict[str, float]]:
        gauges: dict[int, dict[str, float]] = {}
        for headers in routes:
            try:
                reply = await self.http.get("/metrics", headers=dict(headers), timeout=SCRAPE_TIMEOUT_S)
                reply.raise_for_status()
            except httpx.HTTPError as exc:
                log.warning("could not read %s/metrics: %r", self.http.base_url, exc)
                continue
            gauges[replica_pid(reply.headers.get("x-vigil-replica", ""))] = read_gauges(reply.text)
        return gauges
