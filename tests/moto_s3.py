"""moto's standalone S3 server on a loopback port (tests only): where localbucket stops short.

localbucket (connectors/broker.py `LocalObjectStore`) keeps buckets as folders and is what the
embedded broker and most S3 tests use; it answers S3's batch delete (DeleteObjects, what vacuum
sends) with 501. moto implements it, and conditional writes (`If-None-Match: *`), in memory.
Started as a child process and stopped by PID."""

from __future__ import annotations

import subprocess
import sys

from connectors.broker import _stop, free_port, spawn_listening


class MotoS3:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        """A boto3 S3 client for the test's own look at the bucket (credentials from the environment)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def start(self, timeout_s: float = 30.0) -> MotoS3:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = spawn_listening(cmd, self.port, "moto's S3 server", timeout_s)
        return self

    def stop(self) -> None:
        p, self.process = self.process, None
        _stop(p)

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
