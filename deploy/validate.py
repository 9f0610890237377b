"""Offline checks of deploy/ (no cluster, no registry, no broker), each run when its tool is importable:

  yaml                  every file parses
  kubernetes-validate   kubernetes/*.yaml against the Kubernetes API schemas it ships (pip install kubernetes-validate)
  dagster-k8s           helm/values.yaml's k8sRunLauncher settings against K8sRunLauncher's config schema
  dagster-celery        celery/dagster.yaml's run launcher against CeleryRunLauncher's config schema, and
                        celery/worker.yaml against celery_executor's (what `dagster-celery worker start -y` checks)
  dagster               postgres/ and celery/ instance files against Dagster's instance schema

    python deploy/validate.py        # prints one line per check: ok / skipped (why) / FAILED (what)

Not checked offline: the Helm chart's own values.schema.json (not packaged on PyPI; `helm lint` with the chart
does it) and anything needing a cluster, a broker or a registry. tests/topology/test_deploy.py runs these checks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent


class Skipped(Exception):
    pass


def load(relpath: str) -> Any:
    return yaml.safe_load((DEPLOY / relpath).read_text(encoding="utf-8"))


def check_yaml() -> str:
    files = sorted(p for p in DEPLOY.rglob("*.yaml"))
    for p in files:
        list(yaml.safe_load_all(p.read_text(encoding="utf-8")))
    return f"{len(files)} files parse"


def check_kubernetes() -> str:
    try:
        import kubernetes_validate
    except ImportError as err:
        raise Skipped("pip install kubernetes-validate") from err
    version = kubernetes_validate.latest_version()
    n = 0
    for p in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(p.read_text(encoding="utf-8")):
            kubernetes_validate.validate(doc, version, strict=True)
            n += 1
    return f"{n} manifests valid for Kubernetes {version} (strict)"


def _validate(config_type: Any, value: Any, what: str) -> None:
    # dagster's config validation is not in its public API; this script is a deployment check, not runtime code.
    # Validation only: `env:` sources are checked for shape, not read (the variables exist in the cluster).
    from dagster._config import validate_config

    result = validate_config(config_type, value)
    if not result.success:
        raise AssertionError(f"{what}: " + "; ".join(e.message for e in result.errors))


def _camel_to_snake(d: Any) -> Any:
    import re

    if isinstance(d, dict):
        return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): _camel_to_snake(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_camel_to_snake(v) for v in d]
    return d


def check_k8s_launcher() -> str:
    try:
        from dagster_k8s import K8sRunLauncher
    except ImportError as err:
        raise Skipped("pip install dagster-k8s==0.29.27") from err
    values = load("helm/values.yaml")["runLauncher"]
    assert values["type"] == "K8sRunLauncher", values["type"]
    chart = values["config"]["k8sRunLauncher"]
    # the chart renders these keys into the instance's run_launcher config (snake_case; env sources by name;
    # runK8sConfig's inner Kubernetes objects keep their camelCase keys)
    config = {
        "image_pull_policy": chart["imagePullPolicy"],
        "load_incluster_config": chart["loadInclusterConfig"],
        "env_secrets": [s["name"] for s in chart.get("envSecrets", [])],
        "run_k8s_config": {
            "container_config": chart["runK8sConfig"]["containerConfig"],
            "pod_spec_config": chart["runK8sConfig"]["podSpecConfig"],
        },
        "instance_config_map": "oppsync-dagster-instance",  # the chart names these
        "service_account_name": "oppsync-dagster",
        "postgres_password_secret": "dagster-postgresql-secret",
        "dagster_home": "/opt/dagster/dagster_home",
    }
    _validate(K8sRunLauncher.config_type(), config, "helm/values.yaml runLauncher.config.k8sRunLauncher")
    return "K8sRunLauncher accepts the chart's launcher settings"


def check_celery() -> str:
    try:
        from dagster_celery.executor import celery_executor
        from dagster_celery.launcher import CeleryRunLauncher
    except ImportError as err:
        raise Skipped("pip install dagster-celery==0.29.27") from err
    launcher = load("celery/dagster.yaml")["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_celery.launcher", "CeleryRunLauncher")
    _validate(CeleryRunLauncher.config_type(), launcher["config"], "celery/dagster.yaml run_launcher")
    worker = load("celery/worker.yaml")["execution"]["config"]
    _validate(celery_executor.config_schema.config_type, worker, "celery/worker.yaml")
    return "CeleryRunLauncher and celery_executor accept the configs"


def check_instances() -> str:
    try:
        from dagster._core.instance.config import dagster_instance_config
    except ImportError as err:
        raise Skipped("pip install dagster") from err
    for folder in ("postgres", "celery"):
        dagster_instance_config(str(DEPLOY / folder), "dagster.yaml")
    return "postgres/ and celery/ instance files match Dagster's instance schema"


CHECKS: dict[str, Callable[[], str]] = {
    "yaml": check_yaml,
    "kubernetes-validate": check_kubernetes,
    "dagster-k8s": check_k8s_launcher,
    "dagster-celery": check_celery,
    "dagster": check_instances,
}


def main() -> int:
    failed = 0
    for name, check in CHECKS.items():
        try:
            print(f"{name:20} ok       {check()}")
        except Skipped as why:
            print(f"{name:20} skipped  {why}")
        except Exception as err:  # noqa: BLE001 - report every check's failure, then exit non-zero
            failed += 1
            print(f"{name:20} FAILED   {type(err).__name__}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
