"""Shared fixtures and the test layers.

Layers (markers assigned here, by path and fixture use, never per file; `make test-unit` runs
`-m "unit and not slow and not postgres"`):
  unit     pure functions, connectors and simulators in-process (real HTTP on localhost), DuckDB files;
           no Dagster materialize, no dbt, no subprocess
  assets   in-process integration: `dg.materialize`/definitions loading, or a dbt build
  e2e      the CLI, subprocesses, SIGKILLs, syncs of sandbox CRMs into warehouses (a warehouse fixture in a
           module that serves a simulator)
  postgres needs the Postgres server (any layer; warehouse_url's second param, pg_url, postgres_dbt)
  slow     long even alone (dbt builds, the webserver, the CLI's whole run; SLOW below), any layer

Postgres: one server, one variable, OPPSYNC_TEST_PG_URL (default
postgresql+psycopg2://postgres@127.0.0.1:5432/postgres). Each test gets its own database, dropped afterwards.
Outside CI the Postgres tests skip, with the reason shown, when Postgres does not answer; with CI=true an
unreachable Postgres is a failure, never a skip.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from oppsync_pipeline.lib.config import OppsyncConfig, parse_config
from oppsync_pipeline.sandbox.cluster import crm_module, env_var

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

PG_ADMIN_URL = os.environ.get("OPPSYNC_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


# HubSpot portals that a test builds without limits of its own do not rate-limit. The suite's HubSpot connections
# do not pace their searches (the registry's test_options: search_requests_per_second 0), so every burst over
# the portal's default 5 searches a second waited out a 429 and its backoff (HubSpot's sync e2e took 19 s, the
# other CRMs' 6-8 s). The tests about limits and 429s build their portals with explicit Limits (test_hubspot_*,
# test_contract); processes started by tests (`oppsync sandbox serve`, benchmarks' subprocesses) keep the defaults.
NO_HUBSPOT_LIMITS = {"ten_secondly": 0, "search_per_second": 0}


@pytest.fixture(scope="session", autouse=True)
def hubspot_portals_without_default_limits() -> Iterator[None]:
    from oppsync_pipeline.sandbox import hubspot

    built = hubspot.HubSpotSimulator.__init__

    def init(self, world, faults=None, limits=None, variant="default"):
        built(self, world, faults, limits or hubspot.Limits(**NO_HUBSPOT_LIMITS), variant)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hubspot.HubSpotSimulator, "__init__", init)
        yield


@functools.cache  # once per process: a down server costs its connect timeout once, not once per test
def postgres_available() -> str | None:
    """None when Postgres answers, else why not."""
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as err:  # noqa: BLE001 - any failure means "not available", with the reason
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def require_postgres() -> None:
    why = postgres_available()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but Postgres at {make_url(PG_ADMIN_URL).render_as_string()} is unreachable: {why}")
    pytest.skip(f"Postgres unreachable ({why}); these tests run in CI (set OPPSYNC_TEST_PG_URL to point elsewhere)")


def _new_database() -> tuple[str, str]:
    name = f"oppsync_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop_database(name: str) -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A fresh, empty Postgres database for this test (dropped afterwards)."""
    with warehouse_database("postgres", tmp_path) as url:
        yield url


@pytest.fixture
def duckdb_url(tmp_path: Path) -> str:
    return f"duckdb:///{tmp_path / 'warehouse.duckdb'}"


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Both warehouses: every test using it runs once on DuckDB and once on Postgres."""
    with warehouse_database(request.param, tmp_path) as url:
        yield url


@contextmanager
def warehouse_database(backend: str, tmp_dir: Path) -> Iterator[str]:
    """A warehouse URL: a DuckDB file in `tmp_dir`, or a fresh Postgres database dropped afterwards."""
    if backend == "duckdb":
        yield f"duckdb:///{tmp_dir / 'warehouse.duckdb'}"
        return
    require_postgres()
    name, url = _new_database()
    try:
        yield url
    finally:
        _drop_database(name)


def live_client_names(engine: Any, connection: str) -> dict[str, str | None]:
    """source_id -> client_name of a connection's live opportunities in the warehouse."""
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT source_id, client_name FROM oppsync.opportunities WHERE connection = :c AND deleted_at IS NULL"
            ),
            {"c": connection},
        )
        return {r.source_id: r.client_name for r in rows}


def sandbox_config(
    servers: dict[str, Any],
    warehouse_url: str,
    tmp_path: Path,
    extra: dict[str, dict[str, Any]] | None = None,
    **top: Any,
) -> OppsyncConfig:
    """An OppsyncConfig for running SandboxServers ({crm: server}), credentials in a secrets file.

    `extra` adds keys per connection (e.g. {"salesforce": {"open_statuses": [...]}}); `top` adds top-level keys.
    """
    secrets, connections = [], []
    for crm, server in servers.items():
        mod = crm_module(crm)
        name = f"sandbox-{crm}"
        entry: dict[str, Any] = {
            "name": name,
            "crm": crm,
            "base_url": server.url,
            "credentials": {k: "${" + env_var(name, k) + "}" for k in mod.SANDBOX_CREDENTIALS},
        }
        options = getattr(mod, "connection_options", lambda url: {})(server.url)
        if options:
            entry["options"] = options
        entry.update((extra or {}).get(crm, {}))
        connections.append(entry)
        secrets += [f"{env_var(name, k)}={v}" for k, v in mod.SANDBOX_CREDENTIALS.items()]
    secrets_file = tmp_path / "sandbox.secrets.env"
    secrets_file.write_text("\n".join(secrets) + "\n", encoding="utf-8")
    return parse_config(
        {"warehouse": {"url": warehouse_url}, "secrets_file": str(secrets_file), "connections": connections, **top}
    )


@pytest.fixture(scope="session")
def dbt_manifest(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """dbt/target/manifest.json, parsed once per test run before any definitions load it.

    The definitions read the manifest dbt leaves in dbt/target; parsed per test (or by two xdist workers at
    once into the same folder) it costs seconds each time and races. The first worker parses under a file
    lock in the run's shared temporary folder; the others find the marker and reuse the file."""
    from filelock import FileLock  # a dependency of dagster

    from oppsync_pipeline.lib.dbt_env import DBT_PROJECT_DIR

    manifest = DBT_PROJECT_DIR / "target" / "manifest.json"
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base  # the run's folder, common to its xdist workers
    with FileLock(str(shared / "dbt-manifest.lock")):
        done = shared / "dbt-manifest.done"
        if done.exists() and manifest.exists():
            return manifest
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DBT_", "OPPSYNC_"))}
        # parse needs the profile rendered, not a warehouse: the file is never opened
        env.update(
            DBT_SEND_ANONYMOUS_USAGE_STATS="false",
            DO_NOT_TRACK="1",
            OPPSYNC_DUCKDB_PATH=str(shared / "parse-only.duckdb"),
        )
        dbt = Path(sys.executable).parent / "dbt"
        proc = subprocess.run(
            [
                str(dbt),
                "parse",
                "--project-dir",
                str(DBT_PROJECT_DIR),
                "--profiles-dir",
                str(DBT_PROJECT_DIR),
                "--target",
                "duckdb",
            ],
            cwd=DBT_PROJECT_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"dbt parse failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
        done.touch()
    return manifest


# -- the reliability report (tests/reliability/report.py) ----------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """The controller names a fresh results file before xdist starts its workers (they inherit it)."""
    if hasattr(config, "workerinput"):
        return
    from tests.reliability import report

    path = report.DEFAULT_RESULTS.with_name(f"results-{os.getpid()}.jsonl")
    path.unlink(missing_ok=True)
    os.environ["OPPSYNC_RELIABILITY_RESULTS"] = str(path)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    from tests.reliability import report

    rows = report.read_rows()
    if rows:
        terminalreporter.write_line(report.table(rows))
        report.results_path().unlink(missing_ok=True)


# -- layers: one marker per test, from where it lives and what it uses -----------------------------------------

# Paths (relative to tests/, a folder ending in "/") outside the unit layer. Everything else is `unit`.
LAYERS: dict[str, str] = {
    "dagster/": "assets",  # definitions loaded, dg.materialize
    "dbt/": "assets",  # dbt builds of the marts
    "dagster/test_cli_sync.py": "e2e",  # `oppsync sync` in a subprocess
    "dagster/test_webserver.py": "e2e",  # a dagster webserver and its code server
    "dagster/test_ui_tags.py": "e2e",  # a code server subprocess answering the UI's GraphQL
    "reliability/": "e2e",  # fault matrix, kills, secrets scans: whole syncs
    "reconcile/test_crash.py": "e2e",  # SIGKILLed child processes
    "reconcile/test_lease_race.py": "e2e",  # twenty threads and processes
    "sandbox/test_serve_cli.py": "e2e",  # `oppsync sandbox serve` in a subprocess
    "variants/": "e2e",  # every tenant variant: full, incremental, full syncs
    "test_sync_e2e.py": "e2e",
    "test_history_truth.py": "e2e",
    "test_cli_run.py": "e2e",
    "test_cli_config_online.py": "e2e",
    "test_cli_status.py": "e2e",  # syncs of sandbox CRMs, then `oppsync status`
    "test_cli_console.py": "assets",  # a sync job materialized (its run log), a child process's output redirected
    "test_readme_sql.py": "e2e",  # the README's SQL on the five sandbox CRMs synced with the default oppsync.yaml
    "test_init_db.py": "e2e",  # `oppsync init-db`, createdb/psql and the README's Postgres section in a shell
    "test_benchmarks_smoke.py": "e2e",
    "topology/test_three_processes.py": "e2e",  # dagster-webserver, dagster-daemon, the receiver, the sandbox
    "dagster/test_webhook_syncs.py": "e2e",  # simulator -> receiver -> sensor -> sync -> mart
    "writeback/test_writeback_e2e.py": "e2e",  # per CRM and warehouse: syncs, writes, faults
    "dashboard/test_dashboard_asset.py": "assets",  # dg.materialize of the dashboard asset
    "dashboard/test_page.py": "e2e",  # sandbox syncs, dbt, `oppsync dashboard` and a headless chromium
    "scale/test_celery.py": "e2e",  # two Celery workers on RabbitMQ, `dagster job execute` subprocesses
    "scale/test_shared_job.py": "e2e",  # a sandbox tenant synced through the shared job of 51 connections
    "scale/test_bench_scale.py": "e2e",  # a subprocess loads a 60-connection code location
}
# Fixtures that mean a test needs the Postgres server.
POSTGRES_FIXTURES = {"pg_url", "postgres_dbt"}
# A warehouse fixture in a module that serves a simulated CRM: a sync from sandbox to warehouse, so e2e.
WAREHOUSE_FIXTURES = {"warehouse_url", "duckdb_url", "pg_url"}
SANDBOX_NAMES = ("SandboxServer", "sandbox_config", "start_servers")
# Tests too slow for the fast loop (wall seconds measured on the shared 2-core machine, ~4x load): they run
# in `make test`. Property tests against a reference model, and HubSpot's >10,000-deal search windows.
SLOW = (
    "reconcile/test_property.py",  # 85 s (DuckDB), hypothesis against the reference model
    "test_row_hash_sql.py",  # 50 s, hypothesis: SQL hash == Python hash
    "crm/test_hubspot_connector.py::test_more_than_ten_thousand_deals",  # 12-16 s each, 10,300+ deals
    "sandbox/test_serve_cli.py",  # 80 s, a 100,000-opportunity sandbox in a subprocess (e2e)
    # 12-25 s: three CRMs, each synced in full and incrementally twice (e2e, with warehouses of its own)
    "crm/test_kept_lookups.py::test_dictionaries_larger_than_memory_keeps_give_the_same_warehouse",
    "crm/test_parallel_reads.py::test_split_read_equals_the_sequential_read[hubspot",  # 7 s, searches at 5/s
    "crm/test_connectwise_connector.py::test_full_sync_equals_the_world_field_by_field",  # 11 s, 500 forecasts
    "dagster/test_dbt_cli_resource.py",  # 12 s: importing dagster-dbt and dbt-core, and dbt's version
    # 3-5 s each: they wait out a real 429 and the portal's rolling window
    "crm/test_hubspot_connector.py::test_real_search_rate_limit_is_respected_and_retried",
    "crm/test_hubspot_connector.py::test_calls_are_paced_to_the_rolling_limit_the_portal_reports",
    # 1-2.3 s each on an idle machine: several tenants, or whole syncs read side by side
    "crm/test_dynamics_connector.py::test_open_statuses_by_stage_name_and_stage_categories",
    "crm/test_parallel_reads.py::test_autotask_looks_up_pages_side_by_side_each_id_once",
    "crm/test_parallel_reads.py::test_connectwise_forecasts_read_concurrently_give_the_same_amounts",
    "crm/test_parallel_reads.py::test_a_failing_read_ahead_fails_the_full_sync_and_changes_nothing",
    "crm/test_parallel_reads.py::test_split_read_equals_the_sequential_read[dynamics",
    "crm/test_parallel_reads.py::test_autotask_full_read_stays_within_three_threads_per_endpoint",
    "writeback/test_autotask_writer.py::test_a_refused_run_stops_and_names_the_right",
    "crm/test_dynamics_hostile.py::test_counts_are_exact_past_the_count_cap_and_the_aggregate_limit",
    "crm/test_parallel_reads.py::test_split_read_equals_the_sequential_read[autotask",  # 0.8-0.9 s each below
    "crm/test_dynamics_tenants.py::test_transient_errors_are_retried_in_the_client",
    "crm/test_dynamics_tenants.py::test_token_requests_are_counted_with_the_requests",
    "crm/test_connectwise_history.py::test_fetch_by_ids_batches_200_ids_a_request_and_reads_each_site_once",
    "crm/test_salesforce_connector.py::test_deleted_falls_back_to_query_all_beyond_15_days",
)
TESTS_DIR = Path(__file__).resolve().parent
# `make test` hands whole files to its two workers (--dist loadfile) in collection order (--no-loadscope-reorder:
# xdist's own order, most tests first, put the long files of one or two tests last, where one of them ran alone
# on one worker while the other had finished). So the longest files are collected first, longest first, then
# the other e2e/slow files, then assets, then unit files (most tests first within each group): the end of the
# run is many short files that even the two workers out. Wall seconds from CI's --durations (clean clone, 2
# workers); refresh them when a file's cost changes a lot (only the order depends on them, never a result).
LONGEST_FILES = {
    "dagster/test_webhook_syncs.py": 80,  # one simulator -> receiver -> sensor -> sync -> mart per webhook CRM
    "sandbox/test_serve_cli.py": 75,  # a 100,000-opportunity sandbox in a subprocess
    "reconcile/test_property.py": 70,  # hypothesis against the reference model, DuckDB and Postgres
    "topology/test_three_processes.py": 65,  # webserver, daemon, receiver, sandbox; a schedule tick
    "test_cli_run.py": 55,  # two `oppsync run`
    "dbt/test_mart.py": 55,  # four dbt invocations per warehouse
    "test_benchmarks_smoke.py": 45,  # the tiny end-to-end benchmark and the others
    "test_row_hash_sql.py": 40,  # hypothesis: SQL hash == Python hash
    "scale/test_celery.py": 30,  # two Celery workers, `dagster job execute` subprocesses
    "dashboard/test_page.py": 30,  # sandbox syncs, dbt, the dashboard and a headless chromium
    "reliability/test_hostile_assets.py": 20,  # three sync jobs, one retried
}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The fast loop (`-m "unit ..."`, make test-unit) does not import the folders LAYERS puts wholly outside the
    unit layer (their Dagster and dbt imports were half of each worker's 5.6 s collection)."""
    if not (config.option.markexpr or "").startswith("unit"):
        return None
    try:
        relpath = collection_path.resolve().relative_to(TESTS_DIR).as_posix() + "/"
    except ValueError:
        return None
    return True if relpath in LAYERS else None


def layer_of(relpath: str) -> str:
    """The layer of a test file (path relative to tests/): its longest matching entry in LAYERS, else unit."""
    matches = [k for k in LAYERS if relpath == k or (k.endswith("/") and relpath.startswith(k))]
    return LAYERS[max(matches, key=len)] if matches else "unit"


def _serves_a_crm(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    return module is not None and any(name in vars(module) for name in SANDBOX_NAMES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            relpath = item.path.resolve().relative_to(TESTS_DIR).as_posix()
        except ValueError:  # a test outside tests/ (none today): leave it unmarked
            continue
        fixtures = set(getattr(item, "fixturenames", ()))
        if POSTGRES_FIXTURES & fixtures:
            item.add_marker(pytest.mark.postgres)
        layer = layer_of(relpath)
        if layer == "unit" and WAREHOUSE_FIXTURES & fixtures and _serves_a_crm(item):
            layer = "e2e"
        item.add_marker(getattr(pytest.mark, layer))
        # postgres and slow are orthogonal to the layer: `make test-unit` runs `unit and not slow and not postgres`
        nodeid = f"{relpath}::{item.name}"
        if any(nodeid.startswith(prefix) for prefix in SLOW):
            item.add_marker(pytest.mark.slow)
    items[:] = longest_files_first(items)


def longest_files_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """Whole files (tests in their order) in the order `make test` should start them (LONGEST_FILES)."""
    by_file: dict[Path, list[pytest.Item]] = {}
    for item in items:
        by_file.setdefault(item.path, []).append(item)

    def rank(path: Path) -> tuple[int, float]:
        tests = by_file[path]
        try:
            relpath = path.resolve().relative_to(TESTS_DIR).as_posix()
        except ValueError:
            return (4, -len(tests))
        if relpath in LONGEST_FILES:
            return (0, -LONGEST_FILES[relpath])
        if any(t.get_closest_marker(m) for t in tests for m in ("e2e", "slow")):
            group = 1
        else:
            group = 2 if any(t.get_closest_marker("assets") for t in tests) else 3
        return (group, -len(tests))

    return [item for path in sorted(by_file, key=rank) for item in by_file[path]]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--snapshot-update",
        action="store_true",
        default=False,
        help="rewrite checked-in snapshots (tests/dagster/snapshots/) instead of comparing with them",
    )
