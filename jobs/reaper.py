"""A watchdog that stops the local Ray processes of a job that died without cleaning up.

Ray starts its raylet and GCS with the parent-death signal, so they die with a `kill -9`-ed job;
but the raylet's own children (the dashboard and runtime-env agents) were measured to outlive it
(still running 30 s later, re-parented to init). This process, started by the job when it starts a
local Ray, records the job's process tree every `interval` seconds while the job lives, and when
the job is gone kills exactly those processes (matched by PID *and* start time, so a reused PID is
never hit). A process started less than `interval` before the kill is not in that record, and is
found by a sweep instead, by one of two marks:

- a Ray worker still starting up (not yet renamed `ray::...`, in a process group of its own,
  measured to live on for tens of seconds once its raylet is gone) carries its Ray session's name
  in its arguments, `--session-name=session_<date>_<PID of the process that started Ray>`: any
  process started since the job that names a session ending in the job's PID is the job's;
- an agent renames itself and clears its arguments and environment, so it is found by what is
  left, every one of: in the job's process group, named `ray::`, started while the job lived, and
  orphaned (its parent is no longer a raylet).

Then it exits. It never touches a live job's processes: the one process it could take that the job
did not start is an orphaned agent of another driver in the same group that died in the same
window, which that driver's own reaper kills as well.

    python -m jobs.reaper JOB_PID [--interval SECONDS]
"""

from __future__ import annotations

import argparse
import os
import signal
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


SESSION_FLAG = "--session-name="


def _processes_of_its_ray(job_pid: int, born: float, died: float) -> dict[int, float]:
    """Processes started while the job lived whose arguments name a Ray session the job started:
    Ray names a session it starts `session_<date>_<PID of the starting process>`
    (ray/_private/node.py). Not one started after it (its raylet, which starts workers, dies with
    the job; a second of grace for that): a new process that reused the job's PID and started a
    Ray of its own would name a session ending the same way."""
    suffix = f"_{job_pid}"
    out = {}
    for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
        try:
            if p.pid == os.getpid() or not (born <= p.info["create_time"] <= died + 1.0):
                continue
            for arg in p.info["cmdline"] or ():
                if arg.startswith(SESSION_FLAG):
                    if arg.endswith(suffix):
                        out[p.pid] = p.info["create_time"]
                    break
        except (psutil.Error, OSError):
            pass
    return out


def _kill(pid: int, created: float) -> bool:
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - created) < 0.01:
            p.send_signal(signal.SIGKILL)
            return True
    except psutil.Error:
        pass
    return False


def _orphaned_ray_processes(pgid: int, born: float, died: float) -> tuple[dict[int, float], int]:
    """Ray processes of the job's process group started while it lived whose raylet is gone, and
    how many such processes still have a raylet (another job's, or ours still exiting)."""
    out, under_a_raylet = {}, 0
    for p in psutil.process_iter(["pid", "name", "create_time"]):
        try:
            if p.pid == os.getpid() or not (p.info["name"] or "").startswith("ray::"):
                continue
            if not (born <= p.info["create_time"] <= died) or os.getpgid(p.pid) != pgid:
                continue
            parent = p.parent()
            if parent is not None and parent.name() == "raylet":
                under_a_raylet += 1
                continue
            out[p.pid] = p.info["create_time"]
        except (psutil.Error, OSError):
            pass
    return out, under_a_raylet


def watch(job_pid: int, interval: float = 0.5) -> int:
    """Wait for the job to end, then kill what it left behind. Returns how many were killed."""
    try:
        job = psutil.Process(job_pid)
        born, pgid = job.create_time(), os.getpgid(job_pid)
    except (psutil.Error, OSError):
        return 0
    seen: dict[int, float] = {}
    while True:
        try:
            if not job.is_running() or job.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.Error:  # gone between the two questions
            break
        seen.update(_tree(job))
        # Forget processes that ended on their own, so the list stays small.
        seen = {pid: ct for pid, ct in seen.items() if psutil.pid_exists(pid)}
        _, alive = psutil.wait_procs([job], timeout=interval)
        if not alive:
            break
    died = time.time()
    killed = sum(_kill(pid, created) for pid, created in seen.items())
    # The agents are re-parented only once their raylet has exited (its parent-death signal, or
    # the kill above): look again for a few seconds while some still hang under a raylet.
    deadline = time.monotonic() + 5.0
    while True:
        orphans, under_a_raylet = _orphaned_ray_processes(pgid, born, died)
        orphans.update(_processes_of_its_ray(job_pid, born, died))
        killed += sum(_kill(pid, created) for pid, created in orphans.items())
        if not under_a_raylet or time.monotonic() > deadline:
            return killed
        time.sleep(0.2)


def start_for_current_process() -> None:
    """Spawn the reaper for this process; it outlives us by design (own session)."""
    import subprocess
    import sys

    subprocess.Popen(
        [sys.executable, "-m", "jobs.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.reaper", description=__doc__.split("\n\n")[0])
    p.add_argument("job_pid", type=int)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between records of the job's process tree")
    args = p.parse_args(argv)
    watch(args.job_pid, args.interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
