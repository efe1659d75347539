"""A local S3-compatible server for tests: localbucket (PyPI, one module, no dependencies) on a
loopback port, storing buckets as folders under a temp dir; started and stopped by PID."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from connectors.broker import free_port


class LocalS3:
    def __init__(self, root: Path, port: int | None = None):
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
        """What tansu (Rust object_store) reads to reach this server."""
        return {"AWS_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": "tidegate", "AWS_SECRET_ACCESS_KEY": "tidegate",
                "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}  # fmt: skip

    def start(self, timeout_s: float = 15.0) -> LocalS3:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "localbucket", str(self.root), "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"localbucket exited with code {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("localbucket did not listen in time")

    def stop(self) -> None:
        p, self.process = self.process, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
