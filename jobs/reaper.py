"""A watchdog that stops the local Ray processes of a job that died without cleaning up.

Ray starts its raylet and GCS with the parent-death signal, so they die with a `kill -9`-ed job;
but the raylet's own children (the dashboard and runtime-env agents) were measured to outlive it
(still running 30 s later, re-parented to init). This process, started by the job when it starts a
local Ray, records the job's process tree every `interval` seconds while the job lives, and when
the job is gone kills exactly those processes (matched by PID *and* start time, so a reused PID is
never hit), then exits. It never touches processes the job did not start.

    python -m jobs.reaper JOB_PID
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil


def _tree(root: psutil.Process) -> dict[int, float]:
    out = {}
    try:
        for p in root.children(recursive=True):
            try:
                out[p.pid] = p.create_time()
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    out.pop(os.getpid(), None)
    return out


def watch(job_pid: int, interval: float = 0.5) -> int:
    try:
        job = psutil.Process(job_pid)
    except psutil.NoSuchProcess:
        return 0
    seen: dict[int, float] = {}
    while True:
        if not job.is_running() or job.status() == psutil.STATUS_ZOMBIE:
            break
        seen.update(_tree(job))
        # Forget processes that ended on their own, so the list stays small.
        seen = {pid: ct for pid, ct in seen.items() if psutil.pid_exists(pid)}
        time.sleep(interval)
    killed = 0
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 0.01:
                p.send_signal(signal.SIGKILL)
                killed += 1
        except psutil.Error:
            pass
    return killed


def start_for_current_process() -> None:
    """Spawn the reaper for this process; it outlives us by design (own session)."""
    import subprocess

    subprocess.Popen(
        [sys.executable, "-m", "jobs.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]))
