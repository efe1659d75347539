"""What every Ray worker process of a job runs before anything else: Ray's runtime_env
`worker_process_setup_hook` (jobs/run.py init_ray and jobs/submit.py put it there; a plain
`ray job submit` names it in --runtime-env-json, README).

    setup_worker()   log records redacted like the driver's (jobs/logs.py), and tables sent
                     with actors/transport.py's reducer instead of Ray's
"""

from __future__ import annotations

WORKER_SETUP_HOOK = "jobs.worker.setup_worker"


def setup_worker() -> None:
    from actors.transport import use_table_transport
    from jobs.logs import configure_worker_logging

    configure_worker_logging()
    use_table_transport()
