"""Syncs through Celery on a real broker: three connections' sync jobs run with `celery_executor` (code location
`oppsync_pipeline.locations.syncs_celery`) on two `oppsync workers` fed by the local RabbitMQ; the warehouse they
leave equals the one a single-process run of the same jobs leaves (run ids and wall-clock times aside).

Each test run has its own queue name, so parallel test processes (or a developer's `make workers`) never take
each other's steps; the broker is RabbitMQ at 127.0.0.1:5672 (.ci/run starts it in CI)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from oppsync_pipeline.lib.workers import DEFAULT_WORKER_CONFIG, Workers, delete_queue
from oppsync_pipeline.sandbox.cluster import Sandbox
from tests.conftest import warehouse_database

REPO = Path(__file__).resolve().parents[2]
CRMS = ("salesforce", "hubspot", "autotask")
BROKER = yaml.safe_load(DEFAULT_WORKER_CONFIG.read_text())["execution"]["config"]["broker"]
# what differs between two runs of the same sync by construction: ids minted per run, and wall-clock times
VOLATILE = {
    "run_id",
    "last_run_id",
    "extract_id",
    "event_id",
    "change_id",
    "first_seen_at",
    "last_seen_at",
    "valid_from",
    "valid_to",
    "recorded_at",
    "started_at",
    "finished_at",
    "seconds_waited",
    "updated_at",
    "applied_at",
    "last_success_at",
    "last_full_sync_at",
    "acquired_at",
    "expires_at",
    "read_at",  # oppsync.crm_lookups: when a dictionary entry was read
    "holder",
    # the CRM's time when the run started, and its API usage counter, which the first pair of runs raised: both
    # warehouses read the same tenants, one after the other
    "crm_clock",
    "quota_used",
}


def rabbitmq_answers() -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", 5672)) == 0


@pytest.fixture
def broker() -> str:
    if not rabbitmq_answers():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but RabbitMQ does not answer on 127.0.0.1:5672 (.ci/run starts it)")
        pytest.skip("RabbitMQ does not answer on 127.0.0.1:5672; `service rabbitmq-server start`")
    return BROKER


@pytest.fixture
def queue(broker: str) -> Iterator[str]:
    """A queue of this test's own: parallel test processes and a developer's `make workers` never share steps."""
    name = f"oppsync-test-{uuid.uuid4().hex[:10]}"
    yield name
    delete_queue(broker, name)


def warehouse_rows(url: str) -> dict[str, list[dict]]:
    """Every table of the oppsync schema, its rows (sorted) without the volatile columns."""
    engine = create_engine(url)
    try:
        out = {}
        for table in sorted(inspect(engine).get_table_names(schema="oppsync")):
            cols = [
                c["name"] for c in inspect(engine).get_columns(table, schema="oppsync") if c["name"] not in VOLATILE
            ]
            with engine.connect() as c:
                rows = c.execute(text(f"SELECT {', '.join(cols)} FROM oppsync.{table}")).all()  # noqa: S608 - names from the catalog
            out[table] = sorted(
                ({k: repr(v) for k, v in r._mapping.items()} for r in rows), key=lambda d: list(d.values())
            )
        return out
    finally:
        engine.dispose()


def differing_columns(a: list[dict], b: list[dict]) -> list[str] | str:
    """What differs between two tables' rows: the columns, or the row counts."""
    if len(a) != len(b):
        return f"{len(a)} rows != {len(b)} rows"
    return sorted({k for ra, rb in zip(a, b, strict=True) for k in ra if ra[k] != rb.get(k)})


def instance_env(home: Path, pg_url: str) -> dict[str, str]:
    """DAGSTER_HOME with the production instance (deploy/postgres/dagster.yaml) on this test's database: the
    workers write the steps' events where the run's process reads them."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text((REPO / "deploy/postgres/dagster.yaml").read_text())
    u = make_url(pg_url)
    return {
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": u.host or "127.0.0.1",
        "DAGSTER_PG_PORT": str(u.port or 5432),
        "DAGSTER_PG_USER": u.username or "postgres",
        "DAGSTER_PG_PASSWORD": u.password or "",
        "DAGSTER_PG_DB": u.database or "",
    }


def test_celery_workers_sync_like_one_process(
    broker: str, queue: str, pg_url: str, tmp_path: Path, monkeypatch
) -> None:
    with Sandbox(crms=CRMS, opportunities=80) as sandbox, warehouse_database("postgres", tmp_path) as single_url:
        celery_cfg = sandbox.write_config(tmp_path / "celery" / "oppsync.yaml", pg_url)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OPPSYNC_CONFIG": str(celery_cfg),
            **instance_env(tmp_path / "dagster", pg_url),
        }
        # As a deployment starts: `oppsync init-db` first (the oppsync schema and Dagster's tables), then the workers
        # and runs. On a fresh database the three runs' first steps raced to CREATE SCHEMA oppsync: the loser's
        # UniqueViolation failed its extract, whose RetryPolicy waited 0-60 s (the test took 27-72 s for it).
        with pytest.MonkeyPatch.context() as init_env:
            for key, value in env.items():
                if key.startswith(("DAGSTER_", "OPPSYNC_CONFIG")):
                    init_env.setenv(key, value)
            from oppsync_pipeline.cli import cmd_init_db

            assert cmd_init_db(str(celery_cfg)) == 0
        run_config = {
            "execution": {
                "config": {"broker": broker, "backend": "rpc://", "config_source": {"task_default_queue": queue}}
            }
        }
        with Workers(count=2, queue=queue, log_dir=tmp_path / "workers", env=env) as workers:
            workers.wait_ready()
            runs = []
            for crm in CRMS:
                job = f"sync_sandbox_{crm}"
                cfg_file = tmp_path / f"{job}.yaml"
                cfg_file.write_text(
                    yaml.safe_dump(
                        {**run_config, "ops": {f"oppsync__sandbox_{crm}__extract": {"config": {"mode": "auto"}}}}
                    )
                )
                cmd = [str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m"]
                cmd += ["oppsync_pipeline.locations.syncs_celery", "-a", "defs", "-j", job, "-c", str(cfg_file)]
                runs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            outputs = [p.communicate(timeout=300)[0] for p in runs]
            logs = workers.logs()
        for p, out in zip(runs, outputs, strict=True):
            assert p.returncode == 0, out[-4000:]
            assert "Submitting celery task" in out
        # the steps were spread: each worker executed some
        assert all("Task execute_plan" in log and "succeeded" in log for log in logs), [log[-1500:] for log in logs]

        # the same jobs in one process, into a second warehouse
        single_cfg = sandbox.write_config(tmp_path / "single" / "oppsync.yaml", single_url)
        monkeypatch.setenv("OPPSYNC_CONFIG", str(single_cfg))
        import dagster as dg

        from oppsync_pipeline.cli import run_connection
        from oppsync_pipeline.lib.config import load_config
        from oppsync_pipeline.locations import load_location

        cfg = load_config(single_cfg)
        defs = load_location("syncs")
        with dg.DagsterInstance.ephemeral() as instance:
            for crm in CRMS:
                assert run_connection(defs, instance, cfg.connection(f"sandbox-{crm}"), "auto").success

        celery_rows, single_rows = warehouse_rows(pg_url), warehouse_rows(single_url)
    assert set(celery_rows) == set(single_rows)
    assert sum(len(r) for r in celery_rows.values()) > 3 * 80  # the syncs wrote (3 tenants x 80 opportunities)
    differ = {
        t: differing_columns(celery_rows[t], single_rows[t]) for t in celery_rows if celery_rows[t] != single_rows[t]
    }
    assert not differ
