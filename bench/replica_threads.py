"""Where a replica's CPU goes, thread by thread: the CPU each thread group of a Vigil role's replicas spends per
second over a window, while a load runs against it (`make load` in another shell, say).

    python -m bench.replica_threads --role Ingest --seconds 30 --streams 16
    python -m bench.replica_threads --pid 12345 --seconds 10

Threads and their CPU are read from /proc (Linux). Python's own threads (aiortc's `video-decoder`s, Serve's
router loop, the replica's user-code loop, the workers of `asyncio.to_thread`) are named inside the interpreter
only: with `py-spy` on PATH (`pip install py-spy`) its `dump` names them, else they show by their OS name, which
they inherit from the process. Ray's own threads (`worker.io`, `client.poll0`, ...) are named either way.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from load_tests.server_usage import VigilProcesses

PY_SPY_THREAD = re.compile(r'^Thread (\d+) \([^)]*\): "([^"]*)"', re.M)
NUMBERED = re.compile(r"(-\d+(_\d+)?|_\d+|\d+)$")


def thread_group(name: str) -> str:
    """Threads of one kind under one name: pool workers' and numbered threads' numbers left out."""
    name = re.sub(r"^Thread-\d+ ", "", name)
    return NUMBERED.sub("", name) or name


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid` so far."""
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    cpu = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the thread ended
        cpu[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks_per_s
    return cpu


def thread_names(pid: int) -> dict[int, str]:
    """Each thread's name: Python's, from `py-spy dump`, where py-spy is there; else the OS's."""
    names = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names[int(task.name)] = (task / "comm").read_text().strip()
        except OSError:
            continue
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is not None:
        dump = subprocess.run([py_spy, "dump", "--nonblocking", "-p", str(pid)], capture_output=True, text=True,
                              timeout=60)
        names |= {int(tid): name for tid, name in PY_SPY_THREAD.findall(dump.stdout)}
    return names


def measure(pids: list[int], seconds: float) -> dict[str, float]:
    """CPU ms per second of each thread group, summed over `pids`, over `seconds` from now."""
    names = {pid: thread_names(pid) for pid in pids}
    before = {pid: thread_cpu_s(pid) for pid in pids}
    time.sleep(seconds)
    groups: collections.defaultdict[str, float] = collections.defaultdict(float)
    for pid in pids:
        for tid, cpu in thread_cpu_s(pid).items():
            name = names[pid].get(tid, "(started during the window)")
            groups[thread_group(name)] += (cpu - before[pid].get(tid, 0.0)) * 1000 / seconds
    return dict(groups)


def table(groups: dict[str, float], streams: int | None) -> str:
    total = sum(groups.values()) or 1.0
    header = "| thread | CPU ms per second | share |" + (" ms per stream-second |" if streams else "")
    lines = [header, "|---|---|---|" + ("---|" if streams else "")]
    for name, ms in sorted(groups.items(), key=lambda item: -item[1]):
        if ms < 0.05:
            continue
        row = f"| {name} | {ms:.1f} | {ms / total:.0%} |"
        lines.append(row + (f" {ms / streams:.2f} |" if streams else ""))
    lines.append(f"| all | {total:.1f} | 100% |" + (f" {total / streams:.2f} |" if streams else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="Ingest", help="the deployment whose replicas to measure")
    parser.add_argument("--app", default="vigil", help="the Serve application")
    parser.add_argument("--pid", type=int, action="append", help="measure these processes instead")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--streams", type=int, help="streams of the load running: adds ms per stream-second")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or (args.streams is not None and args.streams < 1):
        parser.error("--seconds must be > 0 and --streams >= 1")
    pids = args.pid or sorted(VigilProcesses(app=args.app).replicas([args.role]))
    if not pids:
        sys.exit(f"no {args.role} replica of the Serve app {args.app!r} runs on this machine")
    print(f"{args.role if not args.pid else 'processes'} {pids}: {args.seconds:g} s …", flush=True)
    print(table(measure(pids, args.seconds), args.streams))


if __name__ == "__main__":
    main()
