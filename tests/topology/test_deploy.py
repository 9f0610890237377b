"""deploy/ checked offline: every check of deploy/validate.py whose tool is installed (the project's venv has
yaml and dagster; kubernetes-validate, dagster-k8s and dagster-celery are not project dependencies, so those
skip here and run with `pip install kubernetes-validate dagster-k8s==0.29.27 dagster-celery==0.29.27`), and
the Helm values kept equal to the workspace and the production instance they mirror."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from tests.topology.harness import REPO

spec = importlib.util.spec_from_file_location("deploy_validate", REPO / "deploy" / "validate.py")
validate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(validate)


def load(relpath: str):
    return yaml.safe_load((REPO / relpath).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", list(validate.CHECKS))
def test_offline_check(name: str):
    try:
        validate.CHECKS[name]()
    except validate.Skipped as why:
        pytest.skip(f"{name}: {why}")


def test_helm_user_deployments_are_the_workspace_code_locations():
    workspace = {
        e["python_module"]["location_name"]: e["python_module"]["module_name"]
        for e in load("workspace.yaml")["load_from"]
    }
    deployments = load("deploy/helm/values.yaml")["dagster-user-deployments"]["deployments"]
    served = {}
    for d in deployments:
        args = d["dagsterApiGrpcArgs"]
        served[d["name"]] = args[args.index("--module-name") + 1]
        assert {"name": "OPPSYNC_CONFIG", "value": "/etc/oppsync/oppsync.yaml"} in d["env"]
        assert d["includeConfigInLaunchedRuns"]["enabled"] is True  # run Jobs get the config and credentials
    assert served == workspace


def test_the_cluster_queues_runs_like_the_production_instance():
    instance = load("deploy/postgres/dagster.yaml")
    queue = instance["run_coordinator"]["config"]
    values = load("deploy/helm/values.yaml")
    daemon = values["dagsterDaemon"]
    custom = daemon["runCoordinator"]["config"]["customRunCoordinator"]
    assert daemon["runCoordinator"]["type"] == "CustomRunCoordinator"
    assert (custom["module"], custom["class"]) == (
        instance["run_coordinator"]["module"],
        instance["run_coordinator"]["class"],
    )
    assert custom["config"] == queue  # the chart writes this block verbatim into the cluster's dagster.yaml
    assert daemon["runRetries"]["maxRetries"] == instance["run_retries"]["max_retries"]
    assert daemon["runMonitoring"]["maxRuntimeSeconds"] == instance["run_monitoring"]["max_runtime_seconds"]
    assert values["postgresql"]["postgresqlScheme"] == instance["storage"]["postgres"]["postgres_db"]["scheme"]
    celery = load("deploy/celery/dagster.yaml")
    # the same instance but for who runs the runs (warm forks on the daemon's host vs Celery workers)
    assert {k: v for k, v in celery.items() if k != "run_launcher"} == {
        k: v for k, v in instance.items() if k != "run_launcher"
    }


def test_no_secret_values_in_deploy():
    values = load("deploy/helm/values.yaml")
    assert "postgresqlPassword" not in values["postgresql"] and values["generatePostgresqlPasswordSecret"] is False
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if str(k).lower().endswith(("password", "token", "secret", "apikey")) and isinstance(v, str):
                    found.append(f"{path}.{k}")  # a literal; `password: {env: NAME}` is a mapping and passes
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    for p in sorted((REPO / "deploy").rglob("*.yaml")):
        for doc in yaml.safe_load_all(p.read_text(encoding="utf-8")):
            walk(doc, p.relative_to(REPO).as_posix())
    assert not found
