"""Deployment configs: cluster.yaml against Ray's own schema, the KubeRay RayJob's required fields."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

from tests.conftest import REPO


def test_cluster_yaml_passes_rays_cluster_config_validation():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))  # Ray's own checks after filling its defaults

    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] < gpu["max_workers"]
    assert any("[gpu]" in c for c in config["setup_commands"])  # Tidegate with the GPU vLLM
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-port=8265" in head_start and "--metrics-export-port" in head_start


def test_kuberay_rayjob_has_what_kuberay_requires():
    docs = list(yaml.safe_load_all((REPO / "deploy" / "kuberay" / "rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.run ")
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    assert "rayStartParams" in head
    workers = cluster["workerGroupSpecs"]
    assert workers
    for group in workers:
        for field in ("groupName", "template", "rayStartParams", "minReplicas", "maxReplicas"):
            assert field in group, field
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    # The spec the entrypoint reads is mounted from the ConfigMap, and it is a valid job spec.
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    from schemas.spec import parse_spec

    parsed = parse_spec(yaml.safe_load(configmap["data"]["spec.yaml"]), "configmap")
    assert parsed.pool.num_gpus == 1
    mounts = head["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["mountPath"] == "/etc/tidegate" for m in mounts)


def test_cluster_exposure_token_auth_and_no_master_key_in_the_cluster_environment():
    """docs/operations.md, "Running on a cluster": token auth on every node, the job API on the
    head's loopback, the master key never in `ray start`'s environment nor on workers."""
    text = (REPO / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    head, workers = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token ray start --address" in workers and "0.0.0.0" not in head
    for start in (head, workers):  # serve.ingress haproxy on a cluster (docs/serving.md)
        assert "RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in start
    assert "/home/ubuntu/.ray/auth_token" in config["file_mounts"]
    for commands in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands", "worker_setup_commands"):
        assert "TIDEGATE_MASTER_KEY" not in " ".join(config.get(commands, [])), commands
    assert not any("master-key" in str(v) for v in config["file_mounts"].values())  # file_mounts reach workers too

    docs = list(yaml.safe_load_all((REPO / "deploy" / "kuberay" / "rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")["spec"]
    cluster = job["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"] == {
        "TIDEGATE_MASTER_KEY_FILE": "/var/run/secrets/tidegate/master-key"
    }
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    key_volume = next(v for v in head_pod["volumes"] if v["name"] == "master-key")
    assert key_volume["secret"]["defaultMode"] & 0o004 == 0  # not world-readable (the provider refuses that)
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        for c in pod["containers"]:
            assert all(e["name"] != "TIDEGATE_MASTER_KEY" for e in c.get("env", [])), group
    for group in cluster["workerGroupSpecs"]:
        assert all(v["name"] != "master-key" for v in group["template"]["spec"].get("volumes", []))


def _declared() -> dict[str, str]:
    """pyproject's runtime dependencies: normalised name -> specifier string."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    reqs = [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


def _pinned() -> dict[str, str]:
    """Every requirements/*.lock pin: normalised name -> version."""
    from packaging.utils import canonicalize_name

    pins = {}
    for lock in sorted((REPO / "requirements").glob("*.lock")):
        for line in lock.read_text().splitlines():
            name, sep, version = line.split("#")[0].strip().partition("==")
            if sep:
                pins[canonicalize_name(name.split("[")[0])] = version.strip()
    return pins


def test_security_floors_are_declared_and_met_by_the_locks():
    from packaging.specifiers import SpecifierSet

    declared, pinned = _declared(), _pinned()
    # Jinja2 < 3.1.6 has sandbox escapes (|attr reaching str.format); prompts render in its sandbox.
    assert not SpecifierSet(declared["jinja2"]).contains("3.1.5") and SpecifierSet(declared["jinja2"]).contains("3.1.6")
    assert "cryptography" in declared  # crypto/ imports it directly: declared, not left to a transitive pull
    for name, spec in declared.items():
        if name in pinned:
            assert SpecifierSet(spec).contains(pinned[name], prereleases=True), (name, spec, pinned[name])
    assert {"jinja2", "cryptography"} <= set(pinned)
    # The GPU image installs Tidegate with --no-deps: the floors are named where its dependencies install.
    dockerfile = (REPO / "deploy" / "Dockerfile.gpu").read_text()
    assert f'"jinja2{declared["jinja2"]}"' in dockerfile and f'"cryptography{declared["cryptography"]}"' in dockerfile

