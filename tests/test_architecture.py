"""The package map holds (docs/architecture.md): layers never import upward, pure code has no Ray,
production code has no fault hooks, and a new source or sink is one module plus its registration
(tests/toy_source.py, tests/toy_sink.py), shown by a real job running through both."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from tests.conftest import REPO, make_spec, write_spec

# package -> the packages of ours it may import (lazily inside functions too)
LAYERS: dict[str, set[str]] = {
    "schemas": set(),
    "crypto": {"schemas"},
    "connectors": {"schemas", "crypto"},
    "compute": {"schemas", "crypto"},
    "actors": {"schemas", "crypto", "compute", "connectors"},
    "jobs": {"schemas", "crypto", "compute", "connectors", "actors"},
    # The public API on top: it re-exports and delegates (it imports no Ray itself, see NO_RAY).
    "tidegate": {"schemas", "crypto", "compute", "connectors", "actors", "jobs"},
}
OURS = set(LAYERS) | {"tests", "bench"}
# Ray appears where parallelism does: the actors, and the process-level entry points of jobs/
# (ray.init, job submission, Ray's metrics API). The job loop routes through actors/.
NO_RAY = {"schemas", "crypto", "connectors", "compute", "tidegate"}
NO_RAY_MODULES = {"jobs/pipeline.py", "jobs/inflight.py", "jobs/batcher.py", "jobs/stats.py", "jobs/status.py", "jobs/report.py",
                  "jobs/usage.py"}


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_layers_never_import_upward():
    bad = []
    for package, allowed in LAYERS.items():
        for path in _modules(package):
            for name in _imports(path):
                top = name.split(".")[0]
                if top in OURS and top != package and top not in allowed:
                    bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_pure_layers_and_the_job_loop_do_not_use_ray():
    bad = []
    for package in LAYERS:
        for path in _modules(package):
            rel = str(path.relative_to(REPO))
            if package in NO_RAY or rel in NO_RAY_MODULES:
                bad += [f"{rel} imports {n}" for n in _imports(path) if n.split(".")[0] == "ray"]
    assert not bad, "\n".join(bad)


def test_compute_modules_are_plain_python():
    """Every compute module imports without Ray or a connector being loaded (a fresh interpreter)."""
    import subprocess
    import sys

    names = [f"compute.{p.stem}" for p in _modules("compute") if p.stem != "__init__"]
    code = "import sys\n" + "".join(f"import {n}\n" for n in names) + (
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'connectors', 'actors', 'jobs'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_import_tidegate_is_cheap_and_lazy():
    """`import tidegate` loads no Ray and no job code; each exported name resolves on first use."""
    import subprocess
    import sys

    code = (
        "import sys, tidegate\n"
        "print([m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'jobs', 'actors', 'vllm', 'torch'))])\n"
        "missing = [n for n in tidegate.__all__ if getattr(tidegate, n, None) is None]\n"
        "print(missing)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[]", "[]"], out.stdout


def test_no_fault_hooks_in_production_code():
    """Faults are injected through components (tests/job_runner.py), never by env vars in the code paths."""
    hooks = re.compile(r"TIDEGATE_FAULT|os\._exit\(|globals\(\)\[|time\.sleep\(3600")
    bad = [
        f"{p.relative_to(REPO)}:{i}: {line.strip()}"
        for package in LAYERS
        for p in _modules(package)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if hooks.search(line)
    ]
    assert not bad, "\n".join(bad)


def test_source_and_sink_registries(tmp_path):
    import tests.toy_sink  # noqa: F401  (registers kind "jsonl")
    import tests.toy_source  # noqa: F401  (registers kind "counter")
    from connectors.sink import open_sink, register_sink, sink_class
    from connectors.source import register_source, source_class
    from schemas.errors import SpecError
    from schemas.spec import parse_spec

    spec = parse_spec(make_spec(tmp_path, None, "-", tmp_path, source={"counter": {"events": 5, "partitions": 2}},
                                **{"sink.kind": "jsonl"}))  # fmt: skip
    assert (spec.source.kind, spec.source.settings.events) == ("counter", 5)
    assert spec.model_dump(mode="json")["source"] == {"counter": {"events": 5, "partitions": 2}}
    assert source_class("counter").__name__ == "CounterSource"
    assert type(open_sink(spec)).__name__ == "JsonLinesSink"
    assert source_class("kafka").__name__ == "KafkaSource" and sink_class("delta").__name__ == "DeltaSink"
    with pytest.raises(SpecError, match="source.counter.events: Input should be greater than 0"):
        parse_spec(make_spec(tmp_path, None, "-", tmp_path, source={"counter": {"events": 0}}))
    with pytest.raises(SpecError, match=r"unknown source kind 'pigeon'"):
        parse_spec(make_spec(tmp_path, None, "-", tmp_path, source={"pigeon": {}}))
    with pytest.raises(SpecError, match="sink.kind 'pigeon'"):
        sink_class("pigeon")
    with pytest.raises(TypeError, match="lacks"):
        register_source(type("Half", (), {"kind": "half", "poll": lambda self: None}))
    with pytest.raises(TypeError, match="lacks"):
        register_sink(type("Half", (), {"kind": "half"}))


def test_toy_modules_use_only_the_public_interfaces():
    """Adding a source or a sink touches one new module: these two import nothing of the job,
    the actors or the built-in connectors."""
    for toy in ("tests/toy_source.py", "tests/toy_sink.py"):
        ours = {n for n in _imports(REPO / toy) if n.split(".")[0] in OURS}
        assert ours <= {"connectors.source", "connectors.sink", "crypto.binding", "schemas.errors", "schemas.records",
                        "schemas.spec"}, ours


@pytest.mark.slow
def test_a_job_runs_through_a_toy_source_and_a_toy_sink(tmp_path, tiny_model, job_processes):
    """The real job loop, engines and stage actors, with a source and a sink that are one module
    each: every event is written once, and a rerun resumes from the toy sink's positions."""
    n = 45
    out = tmp_path / "out"
    spec = make_spec(
        tmp_path, None, "-", tiny_model,
        source={"counter": {"events": n, "partitions": 3}},
        **{"sink.kind": "jsonl", "sink.results": str(out / "results.jsonl"),
           "sink.dead_letter": str(out / "dead.jsonl"), "pool.batch_size": 8},
    )  # fmt: skip
    path = write_spec(tmp_path, spec)
    args = ("--plugin", "tests.toy_source", "--plugin", "tests.toy_sink")
    job = job_processes(path, module="tests.job_runner", extra_args=args)
    assert job.wait(300) == 0, job.log()[-4000:]
    from tests.toy_sink import _Log

    rows = _Log(str(out / "results.jsonl")).rows()
    assert sorted(r["id"] for r in rows) == [f"c{i:04d}" for i in range(n)]
    assert all(r["output_text"] and r["status"] in ("ok", "flagged") for r in rows)
    positions = _Log(str(out / "results.jsonl")).positions()
    assert positions == {f"counter/{spec['name']}|{p}": n // 3 - 1 for p in range(3)}

    # The rerun reads nothing: the instant engine spares loading vLLM for no work.
    again = job_processes(path, module="tests.job_runner", extra_args=(*args, "--instant-engine"))
    assert again.wait(300) == 0, again.log()[-4000:]
    assert len(_Log(str(out / "results.jsonl")).rows()) == n  # nothing twice
    assert re.search(r"events consumed\s*│\s*0\b", again.log()), again.log()[-3000:]
    json.dumps(rows[0])
