"""The trust policy for code a spec names (schemas/trusted_code.py; README, "A spec is code").

Each test here backs a sentence of that section: `check` imports nothing, `run` refuses a path the
policy does not allow before it starts anything (exit 2), and `allowed_modules` is the only way to
widen the default (modules inside the job's working directory)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from compute.validation import Validator
from schemas.errors import SpecError
from schemas.spec import parse_spec
from schemas.trusted_code import CodeRef, judge

REPO = Path(__file__).resolve().parents[1]


def spec_data(validation=None, schema=None) -> dict:
    data = {
        "name": "trust",
        "source": {"kafka": {"topic": "t", "bootstrap_servers": "127.0.0.1:1"}},
        "prompt": {"template": "{{ q }}", "id_field": "id"},
        "model": {"path": "m"},
        "sink": {"results": "r", "dead_letter": "d"},
    }
    if validation is not None:
        data["validation"] = validation
    if schema is not None:
        data["output"] = {"schema": schema}
    return data


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the job's working directory, as Ray job submission ships it


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("subprocess:Popen", "an installed or standard-library module"),
        ("os:system", "an installed or standard-library module"),
        ("builtins:eval", "an installed or standard-library module"),
        ("yaml:load", "an installed or standard-library module"),  # site-packages
        ("jobs.run:main", "Tidegate's own code"),
        ("crypto.keyring:Keyring", "Tidegate's own code"),
        ("tidegate:submit", "Tidegate's own code"),  # the Python API: a rule must not submit jobs
        ("tidegate.api:read_results", "Tidegate's own code"),
        ("bench.soak:main", "Tidegate's own code"),
        ("tests.test_validation:_private", "'_private' is not a public name"),
        ("tests.test_validation", "not of the form package.module:Name"),
        ("nowhere_at_all:x", "module 'nowhere_at_all' not found"),
    ],
)
def test_default_policy_refuses(in_repo, path, why):
    verdict = judge(CodeRef("validation.0.path", path), None)
    assert not verdict.allowed and verdict.why.startswith(why), verdict


def test_default_policy_allows_the_working_directory_and_the_examples(in_repo):
    assert judge(CodeRef("f", "tests.test_validation:no_digits"), None).allowed
    assert judge(CodeRef("f", "schemas.examples:TicketTriage"), None).allowed


def test_a_module_outside_the_working_directory_is_refused(tmp_path, monkeypatch):
    pkg = tmp_path / "elsewhere" / "outside_rules"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("def check(c):\n    return True\n")
    monkeypatch.syspath_prepend(str(pkg.parent))
    monkeypatch.chdir(REPO)
    verdict = judge(CodeRef("f", "outside_rules:check"), None)
    assert not verdict.allowed and verdict.why.startswith("outside the job's working directory")
    # allowed_modules names it: allowed (the operator's explicit choice), and only that module.
    assert judge(CodeRef("f", "outside_rules:check"), ["outside_rules"]).allowed
    assert not judge(CodeRef("f", "outside_rules_x:check"), ["outside_rules"]).allowed


def test_a_namespace_folder_in_the_working_directory_does_not_vouch_for_an_installed_one(tmp_path, monkeypatch):
    """`google/` without an __init__.py in the working directory joins the installed namespace
    package google (protobuf's): google.protobuf is loaded from site-packages, so naming it is
    judged by every folder the namespace spans, not by the first one found."""
    import importlib

    (tmp_path / "google").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    spanned = importlib.util.find_spec("google").submodule_search_locations
    assert str(tmp_path / "google") in list(spanned) and len(list(spanned)) > 1  # the case itself
    verdict = judge(CodeRef("f", "google.protobuf.json_format:MessageToJson"), None)
    assert not verdict.allowed and verdict.why.startswith("an installed or standard-library module"), verdict
    # A namespace package wholly inside the working directory is still its own code.
    (tmp_path / "mine" / "rules").mkdir(parents=True)
    (tmp_path / "mine" / "rules" / "ok.py").write_text("def check(c):\n    return True\n")
    importlib.invalidate_caches()
    assert judge(CodeRef("f", "mine.rules.ok:check"), None).allowed


def test_allowed_modules_replaces_the_default(in_repo):
    assert judge(CodeRef("f", "tests.test_validation:no_digits"), ["tests"]).allowed
    assert judge(CodeRef("f", "tests.test_validation:no_digits"), ["tests.test_validation"]).allowed
    refused = judge(CodeRef("f", "tests.test_validation:no_digits"), ["mine"])
    assert not refused.allowed and refused.why == "not in validation.allowed_modules"
    # Tidegate's own code stays refused even when listed.
    assert not judge(CodeRef("f", "jobs.run:main"), ["jobs"]).allowed


def test_validator_refuses_before_importing(in_repo, monkeypatch):
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a))
    spec = parse_spec(spec_data(validation=[{"rule": "custom", "path": "subprocess:Popen", "options": {"args": "id"}}]))
    with pytest.raises(SpecError, match=r"^validation.0.path: refusing to import subprocess:Popen: an installed"):
        Validator(spec)
    with pytest.raises(SpecError, match=r"^output.schema: refusing to import os:system"):
        Validator(parse_spec(spec_data(schema="os:system")))
    assert calls == []


def test_spec_section_form_round_trips():
    spec = parse_spec(spec_data(validation={"rules": [{"rule": "refusal"}], "allowed_modules": ["myrules"]}))
    assert spec.allowed_modules == ["myrules"] and [r.rule for r in spec.rules] == ["refusal"]
    assert parse_spec(spec.redacted()).allowed_modules == ["myrules"]
    listed = parse_spec(spec_data(validation=[{"rule": "refusal"}]))
    assert listed.allowed_modules is None and [r["rule"] for r in listed.redacted()["validation"]] == ["refusal"]
    with pytest.raises(SpecError, match=r"validation.allowed_modules.*not a module name: 'a b'"):
        parse_spec(spec_data(validation={"rules": [], "allowed_modules": ["a b"]}))
    with pytest.raises(SpecError, match=r"validation.1: Input tag .nope."):  # the list form keeps its error paths
        parse_spec(spec_data(validation=[{"rule": "refusal"}, {"rule": "nope"}]))


def test_check_imports_nothing_and_says_what_run_would_load(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from jobs.cli import app

    marker = tmp_path / "imported"
    pkg = tmp_path / "myrules"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "def no_digits(candidate):\n    return True\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_data(validation=[{"rule": "custom", "path": "myrules:no_digits"}])))
    out = CliRunner().invoke(app, ["check", str(spec)])
    assert out.exit_code == 0, out.output
    assert "# code: validation.0.path = myrules:no_digits: run would import it (in the job's working directory" in out.output
    assert not marker.exists() and "myrules" not in sys.modules

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec_data(validation=[{"rule": "custom", "path": "subprocess:Popen"}])))
    out = CliRunner().invoke(app, ["check", str(bad)])
    assert out.exit_code == 2
    assert "validation.0.path: run would refuse to import subprocess:Popen: an installed" in out.output


def test_run_refuses_before_starting_anything(in_repo, tmp_path, capsys):
    import ray

    from jobs.run import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_data(validation=[{"rule": "custom", "path": "subprocess:Popen"}])))
    assert main(str(spec)) == 2
    err = capsys.readouterr().err
    assert "error: validation.0.path: refusing to import subprocess:Popen" in err
    assert not ray.is_initialized()


def _spec_with_untrusted_engine_args(tmp_path):
    """A spec whose model.engine_args name os.system (as data, and written to spec.yaml)."""
    data = spec_data()
    data["model"]["engine_args"] = {"worker_extension_cls": "os.system"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return data, path


def test_dlq_replay_refuses_untrusted_engine_args_before_starting_anything(in_repo, tmp_path, capsys):
    """`tidegate dlq replay` runs engines and stages like `run`: the spec's code is judged first
    (exit 2, Ray not started). Before, a replay imported model.engine_args' classes unchecked."""
    import ray

    from jobs.replay import main as replay_main, replay_dead_letters
    from schemas.errors import SpecError
    from schemas.spec import parse_spec

    data, path = _spec_with_untrusted_engine_args(tmp_path)
    assert replay_main(str(path), None, None) == 2
    assert "model.engine_args.worker_extension_cls: refusing to import os:system" in capsys.readouterr().err
    assert not ray.is_initialized()
    with pytest.raises(SpecError, match="refusing to import os:system"):  # the function on its own too
        replay_dead_letters(parse_spec(data), None, fixed_cluster=True)


def test_engine_args_that_name_code_are_judged_like_rules(in_repo):
    """vLLM imports the classes some of its arguments name (a worker, a worker extension, logits
    processors, an executor, a KV connector): a spec's model.engine_args pass the same policy, and
    trust_remote_code (the model directory's own Python, which no policy can judge) is refused."""
    from schemas.trusted_code import refuse_untrusted

    data = spec_data()
    data["model"]["engine_args"] = {
        "worker_extension_cls": "os.system", "logits_processors": ["tests.test_validation.no_digits"],
        "distributed_executor_backend": "mp", "worker_cls": "auto", "scheduling_policy": "fcfs",
        "kv_transfer_config": {"kv_connector": "Evil", "kv_connector_module_path": "subprocess"},
    }  # fmt: skip
    spec = parse_spec(data)
    assert [(r.field, r.path) for r in spec.code_refs()] == [
        ("model.engine_args.worker_extension_cls", "os:system"),
        ("model.engine_args.logits_processors.0", "tests.test_validation:no_digits"),
        ("model.engine_args.kv_transfer_config.kv_connector_module_path", "subprocess:Evil"),
    ]
    with pytest.raises(SpecError) as e:
        refuse_untrusted(spec.code_refs(), spec.allowed_modules)
    assert "model.engine_args.worker_extension_cls: refusing to import os:system" in str(e.value)
    assert "kv_connector_module_path: refusing to import subprocess:Evil" in str(e.value)
    assert "logits_processors" not in str(e.value)  # in the working directory: allowed, as a rule would be
    # What else vLLM imports by name, nested too: judged the same; a Python file cannot be judged.
    data["model"]["engine_args"] = {
        "scheduler_cls": "os.system", "compilation_config": {"backend": "subprocess.Popen", "mode": 1},
        "speculative_config": {"method": "custom_class", "model": "pty.spawn", "num_speculative_tokens": 1},
        "kv_transfer_config": {"kv_connector_extra_config": {"spec_module_path": "shutil.rmtree"}},
        "ec_transfer_config": {"encoder_cache_manager_cls": "tests.test_validation.MaxWords"},
        "compilation_config_plain": {"backend": "inductor"}, "tokenizer_mode": "auto",
    }  # fmt: skip
    assert [(r.field, r.path) for r in parse_spec(data).code_refs()] == [
        ("model.engine_args.compilation_config.backend", "subprocess:Popen"),
        ("model.engine_args.speculative_config.model", "pty:spawn"),
        ("model.engine_args.scheduler_cls", "os:system"),
        ("model.engine_args.kv_transfer_config.kv_connector_extra_config.spec_module_path", "shutil:rmtree"),
        ("model.engine_args.ec_transfer_config.encoder_cache_manager_cls", "tests.test_validation:MaxWords"),
    ]
    data["model"]["engine_args"] = {  # named by vLLM's own inference or by the user's keys
        "speculative_config": {"model": "evilpkg.Proposer", "num_speculative_tokens": 3},
        "compilation_config": {"inductor_passes": {"my_pass": "os.system"}},
        "kv_transfer_config": {"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {
            "secondary_tiers": [{"module_path": "shutil", "policy": "pty.spawn", "host": "10.0.0.1"}]}},
    }  # fmt: skip
    assert [(r.field, r.path) for r in parse_spec(data).code_refs()] == [
        ("model.engine_args.speculative_config.model", "evilpkg:Proposer"),
        ("model.engine_args.compilation_config.inductor_passes.my_pass", "os:system"),
        ("model.engine_args.kv_transfer_config.kv_connector_extra_config.secondary_tiers.0.module_path", "shutil"),
        ("model.engine_args.kv_transfer_config.kv_connector_extra_config.secondary_tiers.0.policy", "pty:spawn"),
    ]
    data["model"]["engine_args"] = {"speculative_config": {"model": "org/draft-model", "num_speculative_tokens": 3}}
    assert not [r for r in parse_spec(data).code_refs() if r.field.startswith("model.")]  # a model, not code
    data["model"]["engine_args"] = {"reasoning_parser_plugin": "/tmp/evil.py"}
    with pytest.raises(SpecError, match=r"engine_args.reasoning_parser_plugin names a Python file"):
        parse_spec(data)
    data["model"]["engine_args"] = {"distributed_executor_backend": "mypkg.executors.Mine"}
    assert [r.path for r in parse_spec(data).code_refs()] == ["mypkg.executors:Mine"]
    data["model"]["engine_args"] = {"trust_remote_code": True}
    with pytest.raises(SpecError, match="model.engine_args: .*trust_remote_code runs the model directory's own Python"):
        parse_spec(data)


def test_serve_refuses_untrusted_engine_args_before_deploying(in_repo, tmp_path, capsys):
    """`tidegate serve` judges the spec's code before it starts Ray or deploys anything (exit 2)."""
    from jobs.serve import main as serve_main

    _, path = _spec_with_untrusted_engine_args(tmp_path)
    assert serve_main(str(path), None, False) == 2
    assert "model.engine_args.worker_extension_cls: refusing to import os:system" in capsys.readouterr().out
