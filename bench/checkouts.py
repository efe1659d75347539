"""The Tidegate checkouts a bench compares (`--code NAME=PATH,...`), and the commit each is at."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def parse_codes(arg: str) -> dict[str, str]:
    """"before=/path/a,now=." -> {"before": "/path/a", "now": "."}."""
    return dict(item.split("=", 1) for item in arg.split(",") if item)


def commit_of(path: str) -> dict:
    """The commit a checkout is at, and whether its tracked files differ from it (recorded with a
    bench's results, so each number can be traced to the code that made it)."""
    git = ["git", "-C", path]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return {"path": str(Path(path).resolve()), "commit": head, "uncommitted_changes": bool(dirty.stdout.strip())}


def run_leg(cmd: list[str], result: dict, out: Path, **tags) -> dict:
    """Run one leg in a child process (its last stdout line is its JSON), tag it, add it to
    result["legs"] and write the result file (after every leg: a stopped run keeps what it did)."""
    got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    got.update(tags)
    result["legs"].append(got)
    out.write_text(json.dumps(result, indent=2))
    return got
