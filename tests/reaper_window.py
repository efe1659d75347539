"""Kill a job's driver while its local Ray is starting, and count what outlives it (by hand).

    python -m tests.reaper_window [--kill-at 6.2,6.4,...] [--wait 10]

Each trial starts a driver that brings up a local Ray the way `tidegate run` does
(`jobs.run.init_ray`, so with `jobs/reaper.py` beside it) and three actors, SIGKILLs it
`kill-at` seconds after starting it, waits `--wait` seconds, then lists the processes it left:
any process that names the driver's Ray session in its arguments, or that was seen in the
driver's tree (polled every 0.1 s), and still runs. Those are then killed by PID. A machine
that is busier or quieter shifts when Ray spawns its workers: spread `--kill-at` over the
seconds around that (here: 6-8 s after the start).

Measured here (2026-12-06, the 12 default kill times plus 6.3 and 6.5): before `jobs/reaper.py`
looked for workers by their session name, 5 of 12 trials left one or two `python
.../default_worker.py` processes behind (workers the raylet spawned in the reaper's last half
second; one such pair, watched, was gone on its own within 70 s); after, 0 of 12.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

DRIVER = """
import sys, time, types
import ray
from jobs.run import init_ray

init_ray(types.SimpleNamespace(ray=types.SimpleNamespace(address=None, metrics_export_port=None)))

@ray.remote(num_cpus=0)
class Idle:
    def ping(self):
        return 1

actors = [Idle.remote() for _ in range(3)]
ray.get([a.ping.remote() for a in actors])
time.sleep(600)
"""


def trial(kill_at: float, wait: float) -> list[dict]:
    temp = tempfile.mkdtemp(prefix="tgrw", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, TIDEGATE_RAY_TEMP_DIR=temp)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    seen: dict[int, float] = {}
    end = time.monotonic() + kill_at
    while time.monotonic() < end:
        try:
            for p in psutil.Process(driver.pid).children(recursive=True):
                seen.setdefault(p.pid, p.create_time())
        except psutil.Error:
            pass
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(wait)
    left = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "create_time"]):
        mine = seen.get(p.pid) == p.info["create_time"] or any(
            a.startswith("--session-name=") and a.endswith(f"_{driver.pid}") for a in p.info["cmdline"] or ())
        if mine and p.status() != psutil.STATUS_ZOMBIE:
            left.append({"pid": p.pid, "name": p.info["name"], "ppid": p.ppid()})
            p.kill()
    return left


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.reaper_window", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kill-at", default="6.2,6.4,6.6,6.8,7.0,7.2,7.4,7.6,7.8,8.0")
    ap.add_argument("--wait", type=float, default=10.0)
    args = ap.parse_args(argv)
    leaky = 0
    for at in [float(x) for x in args.kill_at.split(",")]:
        left = trial(at, args.wait)
        leaky += bool(left)
        print(json.dumps({"kill_at_s": at, "left": left}), flush=True)
    print(f"{leaky} of {len(args.kill_at.split(','))} trials left processes behind")
    return 1 if leaky else 0


if __name__ == "__main__":
    raise SystemExit(main())
