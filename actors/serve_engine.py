"""pool.backend serve: the engine pool's engine is a running Serve application's (online and
batch on the same GPUs).

    ServeEngine(app, model, sampling, chat, system, json_schema)   an actor the pool starts (num_cpus 0)
        info(), model_revision(), run_batch(requests) -> (counts, COMPLETION_SCHEMA table), ping(), usage()

It has the engine actor's interface (compute.engine.EngineWorker), so the pool's bookkeeping,
hang timeouts, quarantine and isolation work unchanged; each call goes to the application's
replicas through a DeploymentHandle (Serve routes it, and autoscales the replicas). The replica
runs the batch in its own engine at a lower vLLM priority than its online requests
(jobs/serve.py run_batch). The replica generates with its own spec, so info() refuses an
application whose model, sampling, prompt chat/system or output schema differ from the job's.

Not here: room() (the replicas' engines also hold online traffic, and a handle call may reach any
replica, so pool.max_batches_in_flight does not apply), and restarts (a stuck or dead replica is
Serve's to replace). A batch whose replica died under it is sent once more (Serve routes it to a
living or replacement replica), as Ray retries an engine actor's call once; a second failure goes
to the pool's quarantine as with any engine (a row that kills whatever runs it is isolated there).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import pyarrow as pa

from actors.remote import cause
from schemas.errors import EngineBroken, EngineError
from schemas.spec import SERVE_DEPLOYMENT, ModelSpec

log = logging.getLogger(__name__)

BACKPRESSURE_WAIT_S = 0.5  # the replicas' queues are full (serve.max_queued_requests): try again after this
# A replica whose engine broke (EngineBroken) fails Serve's health check and is replaced: its
# batches are sent again, every BROKEN_WAIT_S, for up to BROKEN_FOR_S, before the pool takes
# their failure (quarantine) as theirs.
BROKEN_WAIT_S = 2.0
BROKEN_FOR_S = 120.0


class ServeEngine:
    def __init__(self, app: str, model: ModelSpec, sampling: dict[str, Any], chat: bool, system: str | None,
                 json_schema: dict | None):  # fmt: skip
        from ray import serve

        self.app = app
        self.expected = {"model": model.label, "sampling": dict(sampling), "chat": chat, "system": system,
                         "json_schema": json_schema}  # fmt: skip
        try:
            self.handle = serve.get_deployment_handle(SERVE_DEPLOYMENT, app_name=app)
        except Exception:  # noqa: BLE001 - no such application (Serve raises KeyError): info() says so
            self.handle = None
        self._info: dict[str, Any] | None = None
        self.batches_resent = 0  # batches sent again after their replica died (usage())

    async def info(self) -> dict[str, Any]:
        """The application's engine sizes, once it is checked to generate as this job's spec says."""
        if self._info is None:
            try:
                if self.handle is None:
                    raise LookupError("not deployed")
                info = await self.handle.engine_info.remote()
            except Exception as e:  # no such application, or it is not running
                why = str(e) if isinstance(e, LookupError) else type(e).__name__
                raise EngineError(
                    f"pool.backend serve: the Serve application {self.app!r} does not answer on this Ray cluster "
                    f"({why}); deploy it first on the Ray cluster this job runs on (`tidegate serve SPEC --address "
                    "ADDR`, and the job with the same --address)"
                ) from None
            differ = [k for k, v in self.expected.items() if info.get(k) != v]
            if differ:
                raise EngineError(
                    f"pool.backend serve: the Serve application {self.app!r} generates with another "
                    f"{', '.join(differ)} than this job's spec (its replicas run their own spec's engine)"
                )
            self._info = info
        return self._info

    async def model_revision(self) -> str:
        return (await self.info())["model_revision"]

    async def run_batch(self, requests: pa.Table) -> tuple[dict, pa.Table]:
        """One batch on the application's engines. Cancelled (pool.batch_timeout_s), the replica's
        call is cancelled too, which aborts the batch's rows in its engine."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        resent = False
        broken_since: float | None = None
        while True:
            try:  # a cancelled await cancels the call in the replica (Serve; tests/test_serve.py checks it)
                return await self.handle.run_batch.remote(requests)
            except BackPressureError:  # the replicas' queues are full of online requests: wait, not fail
                await asyncio.sleep(BACKPRESSURE_WAIT_S)
            except RayActorError as e:  # the replica died (or is gone) while it held the batch
                if resent:
                    raise
                resent = True
                self.batches_resent += 1
                log.warning("pool.backend serve: the replica running a batch of %d row(s) of application %r "
                            "died (%s); sending the batch once more", requests.num_rows, self.app,
                            type(e).__name__)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - only a broken replica's failure is waited out
                if not isinstance(cause(e), EngineBroken):  # (cause: the error itself when not wrapped)
                    raise
                now = asyncio.get_running_loop().time()
                broken_since = broken_since if broken_since is not None else now
                if now - broken_since > BROKEN_FOR_S:
                    raise
                log.warning("pool.backend serve: a replica of application %r has a broken engine; sending the "
                            "batch again in %.0fs (Serve replaces the replica)", self.app, BROKEN_WAIT_S)  # fmt: skip
                await asyncio.sleep(BROKEN_WAIT_S)

    def ping(self) -> int:
        return os.getpid()

    async def usage(self) -> dict[str, float]:
        """One replica's engine usage (its online requests included), and this client's batches
        sent again after their replica died."""
        return {**await self.handle.engine_usage.remote(), "batches_resent": self.batches_resent}
