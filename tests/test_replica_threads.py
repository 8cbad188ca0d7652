"""bench/replica_threads.py: a process's CPU per second, thread group by thread group, read from /proc."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.replica_threads import PY_SPY_THREAD, main, measure, thread_group

BUSY = """
import threading, time
def spin():
    while True:
        pass
threading.Thread(target=spin, name="spinner", daemon=True).start()
time.sleep(60)
"""


def test_numbered_threads_of_one_kind_are_one_group() -> None:
    assert thread_group("video-decoder") == "video-decoder"
    assert thread_group("ThreadPoolExecutor-0_3") == thread_group("ThreadPoolExecutor-0_0") == "ThreadPoolExecutor"
    assert thread_group("Thread-3 (_run_router_event_loop)") == "(_run_router_event_loop)"
    assert thread_group("client.poll0") == "client.poll"


def test_py_spy_names_threads_whatever_they_are_doing() -> None:
    dump = ('Thread 13622 (active+gil): "Thread-1 (_run_user_code_event_loop)"\n    run (x.py:1)\n'
            'Thread 13666 (idle): "video-decoder"\n')
    assert PY_SPY_THREAD.findall(dump) == [("13622", "Thread-1 (_run_user_code_event_loop)"),
                                           ("13666", "video-decoder")]


@pytest.fixture
def busy_process():
    process = subprocess.Popen([sys.executable, "-c", BUSY])
    time.sleep(1.0)  # its thread spinning
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_spinning_thread_shows_as_most_of_a_core(busy_process: subprocess.Popen, capsys) -> None:
    groups = measure([busy_process.pid], 1.5)
    assert max(groups.values()) > 300, groups  # about 1000 ms a second, less on a loaded machine
    assert sum(groups.values()) < 2200, groups  # one spinning thread, not more than the two cores
    main(["--pid", str(busy_process.pid), "--seconds", "0.5", "--streams", "2"])
    printed = capsys.readouterr().out
    assert "| thread | CPU ms per second | share | ms per stream-second |" in printed
    assert printed.rstrip().splitlines()[-1].startswith("| all |")


def test_a_role_with_no_replica_running_says_so() -> None:
    with pytest.raises(SystemExit, match="no Nowhere replica"):
        main(["--role", "Nowhere", "--seconds", "0.1"])
