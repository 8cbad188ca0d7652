"""Vigil's own CPU and memory, per role, read from its Ray Serve replica processes with psutil.

Ray names a replica's worker process `ray::ServeReplica:<app>:<Deployment>`. The replicas measured are those
under one Vigil: the descendants of the process that started it (`serve_app.py`, when the generator started
it), else of the raylet whose Serve proxy listens on the target's port, else every replica of the app on this
machine. CPU is sampled before and after the measured window, so it is what the roles spent during it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

ROLES = ("Ingest", "Sampler", "Interaction", "Memory")
REPLICA_TITLE = re.compile(r"ServeReplica:(?P<app>[^:\s]+):(?P<role>[A-Za-z_]+)")


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    pid: int
    role: str
    cpu_s: float
    rss_bytes: int


@dataclass(frozen=True, slots=True)
class RoleUsage:
    """What one role's replicas spent over a window, and their memory at its end."""

    role: str
    replicas: int
    cpu_s: float
    rss_mb: float
    rss_growth_mb: float


def replica_role(process: psutil.Process, app: str, roles: Iterable[str] | None = ROLES) -> str | None:
    """The deployment a replica process of `app` runs, if it is one of `roles` (None: any)."""
    try:
        title = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    match = REPLICA_TITLE.search(title)
    if match is None or match["app"] != app or (roles is not None and match["role"] not in roles):
        return None
    return match["role"]


def _listening_process(port: int) -> psutil.Process | None:
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port \
                and connection.pid:
            try:
                return psutil.Process(connection.pid)
            except psutil.NoSuchProcess:
                return None
    return None


class VigilProcesses:
    """Finds and samples the replica processes of one Vigil app."""

    def __init__(self, root_pid: int | None = None, port: int | None = None, app: str = "vigil") -> None:
        self.root_pid = root_pid
        self.port = port
        self.app = app

    def _candidates(self) -> Iterable[psutil.Process]:
        if self.root_pid is not None:
            try:
                return psutil.Process(self.root_pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return []
        if self.port is not None:
            proxy = _listening_process(self.port)
            if proxy is not None:
                try:
                    # The HTTP proxy is a Ray worker: its parent raylet also holds the replicas.
                    raylet = proxy.parent()
                    if raylet is not None:
                        return raylet.children(recursive=True)
                except psutil.NoSuchProcess:
                    pass
        return psutil.process_iter()

    def replicas(self, roles: Iterable[str] | None = ROLES) -> dict[int, str]:
        """pid → role of every replica of `roles` (None: of every deployment) found now."""
        return {p.pid: role for p in self._candidates() if (role := replica_role(p, self.app, roles)) is not None}

    def sample(self) -> dict[int, ProcessUsage]:
        samples = {}
        for pid, role in self.replicas().items():
            try:
                process = psutil.Process(pid)
                with process.oneshot():
                    times = process.cpu_times()
                    samples[pid] = ProcessUsage(pid, role, times.user + times.system, process.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return samples


def role_usage(
    baseline: dict[int, ProcessUsage], before: dict[int, ProcessUsage], after: dict[int, ProcessUsage]
) -> list[RoleUsage]:
    """Per role: CPU spent between `before` and `after` (a replica started in between counts from zero),
    RSS at `after`, and its growth since `baseline` (taken before any stream connected)."""
    usage = []
    for role in ROLES:
        ended = [s for s in after.values() if s.role == role]
        if not ended:
            continue
        cpu = sum(s.cpu_s - (before[s.pid].cpu_s if s.pid in before else 0.0) for s in ended)
        rss = sum(s.rss_bytes for s in ended)
        rss_at_start = sum(s.rss_bytes for s in baseline.values() if s.role == role)
        usage.append(RoleUsage(role=role, replicas=len(ended), cpu_s=cpu, rss_mb=rss / 2**20,
                               rss_growth_mb=(rss - rss_at_start) / 2**20))
    return usage
