"""The orphan reaper (jobs/reaper.py) against real local Rays whose drivers are killed with -9."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import living

REPO = Path(__file__).resolve().parents[1]

DRIVER = """
import subprocess, sys, time, ray
ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1])
# A stand-in for a Ray worker still starting up when its driver is killed: named `python`, in a
# process group of its own, its session in its arguments (measured: such a worker lives on for
# tens of seconds after its raylet is gone). It never exits on its own: only the reaper ends it.
session = ray._private.worker._global_node.session_name
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "--session-name=" + session],
                 start_new_session=True)
print("up", flush=True)
time.sleep(600)
"""


def names(pids) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid).name())
        except psutil.NoSuchProcess:
            pass
    return out


class Driver:
    """A Ray driver and its reaper, both started here (and stopped here, by PID)."""

    def __init__(self, interval: float):
        self.ray_tmp = tempfile.mkdtemp(prefix="tgrp", dir="/tmp")  # short: Ray's socket paths have a length limit
        # In pytest's process group, like the replicas of the chaos and rebalance tests.
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, self.ray_tmp], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        self.reaper = subprocess.Popen([sys.executable, "-m", "jobs.reaper", str(self.proc.pid), "--interval",
                                        str(interval)], cwd=REPO, start_new_session=True)  # fmt: skip
        self.family: set[int] = set()

    def wait_for_agents(self) -> None:
        assert self.proc.stdout.readline().strip() == b"up"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
            self.family |= {p.pid for p in kids}
            if len([n for n in names(p.pid for p in kids) if n.startswith(("ray::DashboardA", "ray::RuntimeEnv"))]) == 2:
                return
            time.sleep(0.2)
        raise AssertionError("the dashboard and runtime-env agents never started")

    def kill(self) -> None:
        self.family |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        assert self.reaper.wait(timeout=60) == 0

    def cleanup(self) -> None:
        for pid in living(self.family | {self.proc.pid, self.reaper.pid}):
            psutil.Process(pid).kill()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def wait_gone(pids: set[int]) -> list[int]:
    deadline = time.monotonic() + 15  # workers notice their raylet is gone on their own
    while living(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return living(pids)


@pytest.mark.slow
def test_processes_started_after_the_reapers_last_look_die_with_a_killed_driver():
    """A's reaper records A's tree every `interval`; that interval is longer than the test, so its
    only record was taken before Ray started and every Ray process must be found by the orphan
    sweep (without it the dashboard and runtime-env agents, and the worker stand-in, outlive the
    driver). B runs in the same process group, with its agents and its stand-in started while A
    lived: A's reaper must leave them alone."""
    a = Driver(interval=600)
    b = None
    try:
        a.wait_for_agents()
        b = Driver(interval=0.5)
        b.wait_for_agents()
        a.kill()
        assert wait_gone(a.family) == [], names(living(a.family))
        assert living(b.family) == sorted(b.family), "A's reaper killed processes of B"
        b.kill()
        assert wait_gone(b.family) == [], names(living(b.family))
    finally:
        a.cleanup()
        if b is not None:
            b.cleanup()
