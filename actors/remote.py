"""Small helpers every actor module shares: placing stage actors, waiting for calls, reading Ray's errors.

    on_driver_node(spec, **options)   actor options pinning an actor to the driver's node
    wait_started(refs, spec, what)    ray.get with stages.start_timeout_s and errors in our words
    wait_ready(refs, timeout_s)       which calls finished, after waiting for the first (or the time)
    put(value)                        into the object store once, for several calls to read
    app_actor(cls, kind, app, *args)  the named, detached actor `kind` of a Serve application
    delete_app_actors(app)            kill them (`tidegate serve stop`, the end of `tidegate serve`)
    cause(err) / actor_error(err)     the useful part of a RayTaskError / RayActorError
"""

from __future__ import annotations

import re
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from schemas.errors import StageError
from schemas.spec import JobSpec


def on_driver_node(spec: JobSpec, **options) -> dict[str, Any]:
    """Stage actors run on the driver's node: the keyring file and the master key's environment
    variable are there, and latency is measured against the driver's monotonic clock."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return dict(
        num_cpus=spec.stages.num_cpus,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        **options,
    )


def cause(err: Exception) -> BaseException:
    """What an actor method raised (a RayTaskError wraps it)."""
    return err.cause if isinstance(err, RayTaskError) and err.cause is not None else err


def actor_error(err: BaseException) -> str:
    """The useful line of a Ray actor error: the cause's `SomeError: message` line when Ray quotes
    a traceback (an actor whose constructor raised), else the first line."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception):", line)]
    return causes[-1] if causes else (lines[0] if lines else type(err).__name__)


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def wait_started(refs: list, spec: JobSpec, what: str) -> list:
    try:
        return ray.get(refs, timeout=spec.stages.start_timeout_s)
    except GetTimeoutError:
        raise StageError(
            f"{what} did not start within stages.start_timeout_s={spec.stages.start_timeout_s:g}s on the driver's "
            f"node; asked for stages.num_cpus={spec.stages.num_cpus:g} each"
        ) from None
    except RayTaskError as e:
        raise cause(e) from None
    except RayActorError as e:
        raise StageError(f"{what} failed to start: {actor_error(e)}") from None


def wait_ready(refs: list, timeout_s: float) -> set:
    """The calls among `refs` that have finished, waiting up to timeout_s for the first one: one
    wait for every stage of the job loop (each stage's collect then only looks them up). Fetches
    the results to this node (not into this process): completions must outlive an engine's node."""
    if not refs:
        return set()
    if timeout_s > 0:
        ray.wait(refs, num_returns=1, timeout=timeout_s)
    return set(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=True)[0])


def actor_restarts(actor: Any) -> tuple[bool, int] | None:
    """(restarting now, restarts so far) of an actor, from Ray's GCS actor table (one lookup);
    None if it cannot be read. "Restarting" covers a new process still running the actor's
    constructor (an engine reloading its model): such an actor answers nothing, and is not stuck."""
    try:
        from ray._private import state  # the GCS table itself: no dashboard needed

        info = state.actors(actor_id=actor._actor_id.hex())
        return info["State"] in ("RESTARTING", "PENDING_CREATION", "DEPENDENCIES_UNREADY"), int(info.get("NumRestarts", 0))
    except Exception:  # noqa: BLE001 - a hint only: the caller keeps its own clocks without it
        return None


def put(value: Any) -> ray.ObjectRef:
    return ray.put(value)


def kill(actor: Any) -> None:
    """Stop an actor for good; one that is gone already is fine."""
    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass


# -- state shared by the replicas of one Serve application (jobs/serve.py) -----------------------

SERVE_NAMESPACE = "tidegate"
APP_ACTOR_KINDS = ("limits", "idempotency-claims")  # actors/limiter.py, actors/idempotency.py
# Kinds of earlier versions, still removed by `serve stop`: "idempotency", the claims before stop 43.
_FORMER_APP_ACTOR_KINDS = ("idempotency",)


def app_actor_name(kind: str, app: str) -> str:
    return f"tidegate-{kind}:{app}"


def app_actor(cls: Any, kind: str, app: str, *args) -> Any:
    """The application's actor `kind`, created by the first replica that asks (the others find it by
    name). Detached: it outlives the replica that created it, until delete_app_actors."""
    return cls.options(name=app_actor_name(kind, app), namespace=SERVE_NAMESPACE, lifetime="detached",
                       get_if_exists=True).remote(*args)  # fmt: skip


def delete_app_actors(app: str) -> list[str]:
    """Kill the application's shared actors; the kinds it had."""
    gone = []
    for kind in APP_ACTOR_KINDS + _FORMER_APP_ACTOR_KINDS:
        try:
            handle = ray.get_actor(app_actor_name(kind, app), namespace=SERVE_NAMESPACE)
        except ValueError:
            continue
        kill(handle)
        gone.append(kind)
    return gone
