"""What a spec may make Tidegate import: its trust model for code (README, "A spec is code").

A job spec names Python code by import path in two places: `output.schema` (a pydantic model) and
`validation` rules of kind `custom`. Importing a module runs it, so a spec is code, like a Ray job
entrypoint: whoever may submit specs may run code as the job. What keeps a spec from running just
anything it names (`subprocess:Popen`, `os:system`, a package's internals):

  - `tidegate check SPEC` never imports: it checks each path's form and this policy, and says what
    `run` would load (`describe`).
  - `run` imports a path only if its module is allowed (`check_import`), else the job exits 2
    naming the path:
      validation.allowed_modules given: the module is one of those, or inside one of them
                                        ("myrules" allows "myrules" and "myrules.checks");
      never:                            Tidegate's own packages (jobs, actors, schemas, connectors,
                                        compute, crypto), except schemas.examples;
      not given (the default):          the module's top-level package lives inside the job's
                                        working directory (the project Ray job submission ships)
                                        and not in an installed environment (site-packages,
                                        the standard library), or it is Tidegate's examples
                                        (`schemas.examples`).
  - the attribute must be a public name (no leading underscore).

The policy is checked with importlib.util.find_spec on the top-level name only, which locates a
package without running it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import SpecError

PATH_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
ALWAYS_ALLOWED = ("schemas.examples",)  # Tidegate's own example output schemas
# Tidegate's own packages ship in the working directory too; nothing in them is a rule or schema
# (tidegate: the Python API, which submits jobs; bench: the benchmarks, which start clusters).
INTERNAL = ("jobs", "actors", "schemas", "connectors", "compute", "crypto", "tidegate", "bench")


@dataclass(frozen=True)
class CodeRef:
    field: str  # the spec field naming it, e.g. "validation.2.path"
    path: str  # module:attr


@dataclass(frozen=True)
class Verdict:
    ref: CodeRef
    allowed: bool
    why: str  # where the module is, or why it is refused


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _installed_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(p).resolve() for k, p in paths.items() if k in ("stdlib", "platstdlib", "purelib", "platlib") and p]


def locate(module: str) -> list[Path] | None:
    """Where the module's top-level package is (without running it): its file or folder, or every
    folder of a namespace package (an import may load the module from any of them); None if not
    found."""
    top = module.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        return [Path(spec.origin).resolve()]
    locations = list(spec.submodule_search_locations or [])
    return [Path(p).resolve() for p in locations] if locations else [Path("<built-in>")]


def judge(ref: CodeRef, allowed_modules: list[str] | None, root: Path | None = None) -> Verdict:
    """Whether the policy lets `ref` be imported (nothing is imported here)."""
    if not PATH_RE.fullmatch(ref.path):
        return Verdict(ref, False, "not of the form package.module:Name")
    module, _, attr = ref.path.partition(":")
    if attr.startswith("_"):
        return Verdict(ref, False, f"{attr!r} is not a public name")
    if any(_within(module, p) for p in ALWAYS_ALLOWED):
        return Verdict(ref, True, "Tidegate's examples")
    if module.split(".")[0] in INTERNAL:
        return Verdict(ref, False, "Tidegate's own code (only schemas.examples may be named)")
    if allowed_modules is not None:
        if any(_within(module, p) for p in allowed_modules):
            return Verdict(ref, True, "listed in validation.allowed_modules")
        return Verdict(ref, False, "not in validation.allowed_modules")
    wheres = locate(module)
    if wheres is None:
        return Verdict(ref, False, f"module {module.split('.')[0]!r} not found")
    root = (root or Path(os.getcwd())).resolve()
    installed_roots = _installed_roots()
    for where in wheres:  # a namespace package: every folder it spans (a working-directory one may sit beside an installed one)
        installed = [r for r in installed_roots if r in (where, *where.parents)]
        if installed or str(where) == "<built-in>":
            return Verdict(ref, False, "an installed or standard-library module (list it in validation.allowed_modules "
                                       "to allow it)")  # fmt: skip
        if root not in (where, *where.parents):
            return Verdict(ref, False, "outside the job's working directory (list it in validation.allowed_modules)")
    return Verdict(ref, True, f"in the job's working directory ({wheres[0].relative_to(root)})")


def check_import(field: str, path: str, allowed_modules: list[str] | None) -> None:
    """Raise SpecError naming the field and path unless the policy allows importing it."""
    verdict = judge(CodeRef(field, path), allowed_modules)
    if not verdict.allowed:
        raise SpecError(f"{field}: refusing to import {path}: {verdict.why}")


def refuse_untrusted(refs: list[CodeRef], allowed_modules: list[str] | None) -> None:
    """Raise SpecError naming every path the policy refuses (the job has not started anything)."""
    refused = [v for v in (judge(r, allowed_modules) for r in refs) if not v.allowed]
    if refused:
        raise SpecError("; ".join(f"{v.ref.field}: refusing to import {v.ref.path}: {v.why}" for v in refused))
