"""Azurite's blob service (the Azure Storage emulator, from npm) on a loopback port (tests only).

Started from tests/emulators/node_modules/.bin/azurite-blob (`make azurite` installs the version
pinned in tests/emulators/package-lock.json with npm) as a child process, storing blobs in the test's temp dir, stopped by PID. delta-rs reaches it with
`azure_storage_use_emulator` and `AZURITE_BLOB_STORAGE_URL`; containers are created here with one
SharedKey-signed REST call (the emulator's well-known account, no Azure SDK needed)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import subprocess
import urllib.request
from email.utils import formatdate
from pathlib import Path

from connectors.broker import free_port, spawn_listening

REPO = Path(__file__).resolve().parent.parent
ACCOUNT = "devstoreaccount1"
# Azurite's published development key (the same in every install; not a secret).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
API_VERSION = "2021-08-06"


def azurite_binary() -> str | None:
    local = REPO / "tests" / "emulators" / "node_modules" / ".bin" / "azurite-blob"
    return str(local) if local.exists() else shutil.which("azurite-blob")


class Azurite:
    def __init__(self, root: str | Path, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Where delta-rs (object_store) finds the emulator when `azure_storage_use_emulator` is on,
        and the account's credentials (from the environment, as a job gets them)."""
        return {"AZURITE_BLOB_STORAGE_URL": self.endpoint, "AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT,
                "AZURE_STORAGE_ACCOUNT_KEY": KEY}  # fmt: skip

    @staticmethod
    def storage_options() -> dict[str, str]:
        """What a spec's sink.storage_options holds for the emulator: no credentials."""
        return {"azure_storage_use_emulator": "true"}

    def container(self, name: str) -> str:
        date = formatdate(usegmt=True)
        string_to_sign = "\n".join(
            ["PUT", "", "", "", "", "", "", "", "", "", "", "",
             f"x-ms-date:{date}\nx-ms-version:{API_VERSION}", f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"]
        )  # fmt: skip
        sig = base64.b64encode(hmac.new(base64.b64decode(KEY), string_to_sign.encode(), hashlib.sha256).digest())
        req = urllib.request.Request(
            f"{self.endpoint}/{ACCOUNT}/{name}?restype=container", method="PUT",
            headers={"Content-Length": "0", "x-ms-date": date, "x-ms-version": API_VERSION, "Authorization": f"SharedKey {ACCOUNT}:{sig.decode()}"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201, resp.status
        return name

    def start(self, timeout_s: float = 30.0) -> Azurite:
        binary = azurite_binary()
        if binary is None:
            raise RuntimeError("azurite-blob is not installed: `make azurite` (npm) installs it in tests/emulators/")
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", str(self.root),
               "--skipApiVersionCheck", "--silent"]  # fmt: skip
        self.process = spawn_listening(cmd, self.port, "azurite-blob", timeout_s)
        return self

    def stop(self) -> None:
        # SIGKILL at once: the emulator's graceful close waits ~10 s and its data is a temp dir.
        p, self.process = self.process, None
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(10)

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
