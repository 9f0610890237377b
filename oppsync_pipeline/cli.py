"""The `oppsync` command.

  oppsync config check                      validate oppsync.yaml and the credentials it references
  oppsync config check --online             ... then ask each CRM what this tenant has: what will be read and why
  oppsync init-db                           create or check the warehouse and Dagster's storage databases
  oppsync run                               the main job: every connection, then the mart (make run)
  oppsync sync --connection NAME [--full]   "Synchronize now" for one connection
  oppsync status [--json]                   per connection: last sync, rows, API use, next run, freshness, health
  oppsync writeback --connection NAME [--opportunity ID] [--dry-run] [--force]
                                            seed 000's "Update CRM": write revenue back to the CRM
  oppsync webhooks serve                    the webhook receiver (CRM notifications -> syncs within seconds)
  oppsync webhooks register --connection NAME --public-url URL
                                            subscribe to the CRM's notifications (or print the manual steps)
  oppsync sandbox serve                     the CRM simulators (one per registered CRM), with a matching oppsync.yaml
  oppsync sandbox advance --hours N         move a running sandbox's clock, applying activity
  oppsync dashboard [--port N]              the outcomes dashboard (a web page over the marts, read-only)
  oppsync sandbox serve --tenants N         N small tenants, one port each (with --write-config: their oppsync.yaml)
  oppsync config generate --tenants N       an oppsync.yaml for N sandbox tenants (`sandbox serve --tenants N`)
  oppsync workers --count N                 N Celery workers for the celery_executor (README "Scaling out")

Runs go through Dagster against the instance in $DAGSTER_HOME (default .oppsync/dagster), so they
appear in the UI's run history next to scheduled runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from oppsync_pipeline.lib.config import ConfigError, OppsyncConfig, check_config, config_path, load_config
from oppsync_pipeline.lib.crm.registry import CRMS, REGISTRY
from oppsync_pipeline.lib.memory import limit_malloc_arenas

# the sandbox is imported when a command starts it (`config check` and --help stay quick)

ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = Path(".oppsync")
VERBOSE = False  # -v / --verbose: Dagster's own logs and tracebacks on the console too


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("oppsync")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _SubParser(argparse.ArgumentParser):
    """Every subcommand accepts the global options too (`oppsync sync --connection X --config f.yaml`): given
    after the subcommand they win, left out they keep what was given before it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--config", default=argparse.SUPPRESS, help="path to oppsync.yaml (as before the command)")
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO")

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", _SubParser)
        return super().add_subparsers(**kwargs)


def parser() -> argparse.ArgumentParser:
    """Every subcommand sets `run(args) -> exit code`, a small function calling lib/ or the sandbox."""
    p = argparse.ArgumentParser(prog="oppsync", description="Sync CRM opportunities into a warehouse.")
    p.add_argument("--config", help="path to oppsync.yaml (default: $OPPSYNC_CONFIG or ./oppsync.yaml)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO (libraries included) to stderr")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_SubParser)

    cfg_p = sub.add_parser("config", help="configuration commands")
    cfg_p.add_argument(
        "action",
        choices=["check", "generate"],
        help="check: validate the file, credentials and options; generate: write one for --tenants sandbox tenants",
    )
    cfg_p.add_argument(
        "--online",
        action="store_true",
        help="also connect to each CRM and report what the sync will and will not read, and why",
    )
    cfg_p.add_argument("--connection", action="append", help="with --online: only these connections (repeatable)")
    cfg_p.add_argument("--tenants", type=int, help="generate: this many connections, the CRMs in turn")
    cfg_p.add_argument("--port-base", type=int, default=9000, help="generate: tenant i at 127.0.0.1:<base+i>")
    cfg_p.add_argument(
        "--warehouse-url",
        default="postgresql+psycopg2://postgres@127.0.0.1:5432/oppsync",
        help="generate: warehouse.url (above warehouse.duckdb.max_connections tenants, Postgres)",
    )
    cfg_p.add_argument("--out", default="oppsync.scale.yaml", help="generate: where to write it")
    cfg_p.set_defaults(
        run=lambda a: (
            cmd_config_generate(a.tenants, a.port_base, a.warehouse_url, a.out)
            if a.action == "generate"
            else cmd_config_check(a.config, online=a.online, only=a.connection)
        )
    )

    init_p = sub.add_parser(
        "init-db",
        help="create or check the warehouse database and Dagster's storage database ($DAGSTER_HOME/dagster.yaml)",
        description="Creates what is missing when the configured roles may (a database; the oppsync schema; "
        "Dagster's tables), and otherwise prints the createdb / GRANT to run. Exit 3 when something is left.",
    )
    init_p.set_defaults(run=lambda a: cmd_init_db(a.config))

    run_p = sub.add_parser("run", help="sync every connection, then build the mart")
    run_p.add_argument("--full", action="store_true", help="full sync (reads every id, detects deletes)")
    run_p.add_argument(
        "--advance-hours", type=float, default=0.0, help="sandbox only: simulate N hours of CRM activity before syncing"
    )
    run_p.set_defaults(run=lambda a: cmd_run(a.config, full=a.full, advance_hours=a.advance_hours, verbose=a.verbose))

    sync_p = sub.add_parser("sync", help="sync one connection now (through Dagster)")
    sync_p.add_argument("--connection", required=True, help="the connection's name in oppsync.yaml")
    sync_p.add_argument("--full", action="store_true", help="full sync (reads every id, detects deletes)")
    sync_p.set_defaults(run=lambda a: cmd_sync(a.config, a.connection, full=a.full, verbose=a.verbose))

    status_p = sub.add_parser(
        "status",
        help="per connection: last sync, rows, API use, next scheduled run, freshness and health",
        description="Reads the warehouse (oppsync.sync_runs, sync_state) and the Dagster instance in $DAGSTER_HOME "
        "(schedules switched off, the scheduler daemon, runs that failed before they reached the warehouse).",
    )
    status_p.add_argument("--json", action="store_true", help="print JSON for scripts instead of the table")
    status_p.set_defaults(run=lambda a: cmd_status(a.config, as_json=a.json))

    wb = sub.add_parser(
        "writeback",
        help="write revenue from the write-back input table back to the CRM (seed 000's 'Update CRM')",
        description="Reads writeback.opportunity_revenue, compares each row with the CRM's current values and "
        "writes only what differs (README: Revenue write-back). Runs through Dagster (job `writeback`).",
    )
    wb.add_argument("--connection", action="append", help="the connection to write to (repeatable)")
    wb.add_argument("--all", action="store_true", help="every connection with writeback.enabled")
    wb.add_argument("--opportunity", action="append", help="only this opportunity id (repeatable)")
    wb.add_argument("--dry-run", action="store_true", help="print the per-field diff and write nothing")
    wb.add_argument(
        "--force", action="store_true", help="overwrite values someone changed in the CRM since oppsync's last write"
    )
    wb.set_defaults(run=cmd_writeback)

    hooks = sub.add_parser("webhooks", help="near-real-time syncs from CRM notifications (README)")
    hooks_sub = hooks.add_subparsers(dest="action", required=True)
    serve_hooks = hooks_sub.add_parser("serve", help="run the webhook receiver (Starlette on uvicorn)")
    serve_hooks.add_argument("--host", help="default: webhooks.host (127.0.0.1)")
    serve_hooks.add_argument("--port", type=int, help="default: webhooks.port (8710)")
    serve_hooks.set_defaults(run=lambda a: cmd_webhooks_serve(a.config, a.host, a.port))
    register = hooks_sub.add_parser(
        "register", help="create the CRM's subscription to this receiver, or print the manual steps"
    )
    register.add_argument("--connection", required=True, help="the connection's name in oppsync.yaml")
    register.add_argument(
        "--public-url", required=True, help="the receiver's URL as the CRM reaches it, e.g. https://hooks.example.com"
    )
    register.set_defaults(run=lambda a: cmd_webhooks_register(a.config, a.connection, a.public_url))

    sb = sub.add_parser("sandbox", help="the built-in CRM sandbox")
    sb_sub = sb.add_subparsers(dest="action", required=True)
    serve = sb_sub.add_parser("serve", help="serve the simulators until interrupted")
    serve.add_argument("--seed", type=int, default=42, help="the tenants' random seed (same seed, same data)")
    serve.add_argument(
        "--opportunities", type=int, help="opportunities per CRM (default 2000; per tenant with --tenants: 20)"
    )
    first = min(s.port for s in REGISTRY.values())
    serve.add_argument(
        "--port-base",
        type=int,
        default=first,
        help=", ".join(f"{s.name}=base+{s.port - first}" for s in REGISTRY.values()),
    )
    serve.add_argument("--latency-ms", type=int, default=0, help="added to every answer (a slow network)")
    serve.add_argument("--faults", help="JSON fault plan applied to every simulator (see README)")
    serve.add_argument("--crm", action="append", choices=CRMS, help="serve only these CRMs (repeatable)")
    serve.add_argument("--write-config", help="write an oppsync.yaml for these simulators here")
    serve.add_argument(
        "--webhooks-url",
        default="http://127.0.0.1:8710",
        help="the webhook receiver the simulators notify (`oppsync webhooks serve`); '' for none",
    )
    serve.add_argument(
        "--variant",
        action="append",
        metavar="CRM=VARIANT",
        help="serve a tenant variant, e.g. salesforce=multi_currency (see `oppsync sandbox variants`)",
    )
    serve.add_argument(
        "--tenants",
        type=int,
        help="instead of one simulator per CRM: N small tenants (the CRMs in turn) on ports --port-base + i",
    )
    serve.set_defaults(run=cmd_sandbox_serve)
    sb_sub.add_parser("variants", help="list each simulator's tenant variants").set_defaults(
        run=lambda a: cmd_sandbox_variants()
    )
    adv = sb_sub.add_parser("advance", help="advance the running sandbox's clock")
    adv.add_argument("--hours", type=float, default=1.0, help="simulated hours of CRM activity to apply")
    adv.set_defaults(run=lambda a: cmd_sandbox_advance(a.config, a.hours))

    dash = sub.add_parser("dashboard", help="the outcomes dashboard: a web page over the marts (Streamlit)")
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    dash.add_argument("--port", type=int, default=8501, help="port to listen on (default 8501)")
    dash.set_defaults(run=cmd_dashboard)
    from oppsync_pipeline.lib.workers import DEFAULT_QUEUE, DEFAULT_WORKER_CONFIG

    wk = sub.add_parser(
        "workers",
        help="start N dagster-celery workers (one step at a time each) until interrupted",
        description="Workers for the celery_executor (code location oppsync_pipeline.locations.syncs_celery). They "
        "need OPPSYNC_CONFIG and the connections' secrets like a code location (README: Scaling out).",
    )
    wk.add_argument("--count", type=int, default=2, help="how many worker processes (default 2)")
    wk.add_argument("--queue", default=DEFAULT_QUEUE, help=f"the Celery queue to consume (default {DEFAULT_QUEUE})")
    wk.add_argument(
        "--worker-config", default=str(DEFAULT_WORKER_CONFIG), help="broker and backend (deploy/celery/worker.yaml)"
    )
    wk.set_defaults(run=lambda a: cmd_workers(a.config, a.count, a.queue, a.worker_config))
    return p


def main(argv: list[str] | None = None) -> int:
    global VERBOSE
    limit_malloc_arenas()  # before any thread: a sync's read threads would each keep an arena (lib/memory.py)
    args = parser().parse_args(argv)
    VERBOSE = bool(args.verbose)
    configure_logging(args.verbose)
    try:
        return args.run(args)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    except DatabaseUnusable as err:
        print(f"oppsync: {err}", file=sys.stderr)
        return 3
    except Exception as err:
        # A database no retry fixes (missing, login refused, no privilege), met before any connection ran (the
        # Dagster instance, the warehouse's schema): one line with its fix; the traceback only with --verbose.
        problem = None if args.verbose else _database_problem(err, args.config)
        if problem is None:
            raise
        print(f"oppsync: {problem}", file=sys.stderr)
        return 3


def _database_problem(err: BaseException, path: str | None):
    """The permanent problem behind `err` when it is a database's: Dagster's storage or the warehouse, whichever
    database the error names (tried first), else the other."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    from oppsync_pipeline.lib.warehouse.errors import permanent_problem

    chain, e = [], err
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    db_error = next((e for e in chain if isinstance(e, DBAPIError)), None)
    if db_error is None:
        return None
    try:
        databases, _ = _databases(load_config(path), path)
    except ConfigError:
        return None
    named_first = sorted(databases, key=lambda db: f'"{make_url(db.url).database}"' not in str(db_error))
    return next((p for p in (permanent_problem(db_error, db.url, db.what) for db in named_first) if p), None)


def configure_logging(verbose: bool) -> None:
    """Log to stderr; every record (ours and other libraries') passes the secrets filter first."""
    from oppsync_pipeline.lib.scrub import scrub_handlers

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    scrub_handlers(logging.getLogger().handlers)


# -- config -----------------------------------------------------------------------------------------------------


def cmd_config_check(path: str | None, online: bool = False, only: list[str] | None = None) -> int:
    cfg = load_config(path)
    problems = check_config(cfg) + [str(p) for p in database_problems(cfg, path)]
    if problems:
        print(f"{config_path(path)}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    print(f"{config_path(path)}: OK ({len(cfg.connections)} connection(s), warehouse {cfg.warehouse.backend})")
    if not online:
        return 0
    connections = [cfg.connection(name) for name in only] if only else cfg.connections
    with _sandbox(cfg):
        failed = sum(not check_online(cfg, conn) for conn in connections)
    return 3 if failed else 0


def _databases(cfg: OppsyncConfig, path: str | None) -> tuple[list, list[str]]:
    """The warehouse and (when $DAGSTER_HOME/dagster.yaml keeps it in Postgres) Dagster's storage database;
    and the problems of reading the latter's settings (an unset DAGSTER_PG_* variable)."""
    from oppsync_pipeline.lib.warehouse.setup import WAREHOUSE, Database, dagster_database

    databases, problems = [Database(WAREHOUSE, cfg.warehouse.url, f"{config_path(path)}: warehouse.url")], []
    try:
        dagster = dagster_database(os.environ.get("DAGSTER_HOME"))
    except ValueError as err:
        problems.append(str(err))
    else:
        databases += [dagster] if dagster else []
    return databases, problems


def database_problems(cfg: OppsyncConfig, path: str | None) -> list:
    """What keeps the databases from being used (read-only: `oppsync init-db` creates what it can)."""
    from oppsync_pipeline.lib.warehouse.setup import check_database

    databases, problems = _databases(cfg, path)
    return problems + [p for p in (check_database(db) for db in databases) if p is not None]


def cmd_init_db(path: str | None) -> int:
    """Create what is missing of the two databases, or say what to run; exit 3 when something is left."""
    from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
    from oppsync_pipeline.lib.warehouse.setup import WAREHOUSE, create_database

    cfg = load_config(path)
    databases, problems = _databases(cfg, path)
    for line in problems:
        print(f"Dagster storage: {line}")
    if not any(db.what != WAREHOUSE for db in databases) and not problems:
        home = os.environ.get("DAGSTER_HOME") or str((STATE_DIR / "dagster").resolve())
        print(f"Dagster storage: SQLite files in {home} (no database; deploy/postgres/dagster.yaml for Postgres)")
    ok = not problems
    for db in databases:
        step = create_database(db)
        if step.problem is not None:
            print(step.problem)
            ok = False
        elif db.what == WAREHOUSE:
            versions = ensure_schema(make_engine(db.url, cfg.warehouse.duckdb))
            shown = _redact_url(db.url) if not db.url.startswith("duckdb") else db.url
            print(f"warehouse: {step.done} ({shown}); schema oppsync " + ("migrated" if versions else "up to date"))
        else:
            import dagster as dg

            with dg.DagsterInstance.get():  # dagster-postgres creates its tables when they are not there
                pass
            print(f"Dagster storage: {step.done} ({_redact_url(db.url)}); Dagster's tables in place")
    return 0 if ok else 3


def cmd_config_generate(tenants: int | None, port_base: int, warehouse_url: str, out: str) -> int:
    from oppsync_pipeline.lib.config import parse_config
    from oppsync_pipeline.sandbox.cluster import tenant_urls, tenants_config, write_tenants_config

    if not tenants or tenants < 1:
        print("config generate: --tenants N is required (N >= 1)", file=sys.stderr)
        return 2
    urls = tenant_urls(tenants, port_base)
    # validated before it is written: a size DuckDB refuses is named here, not at the first run
    cfg = parse_config(tenants_config(urls, warehouse_url)[0])
    path = write_tenants_config(Path(out), urls, warehouse_url)
    print(
        f"wrote {path} ({len(cfg.connections)} connections, schedules spread over {cfg.spread_minutes()} min) and "
        f"{path.with_suffix('.secrets.env').name}; serve them with: oppsync sandbox serve --tenants {tenants} "
        f"--port-base {port_base}"
    )
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM (a supervisor's stop, `Popen.terminate()`) stops a serving command as Ctrl-C does, whatever it
    inherited: a parent that ran Dagster in-process while SIGINT was ignored (a shell's background job, as CI
    runs) hands its children SIGTERM ignored, since Dagster points SIGTERM at SIGINT's handler after each run
    (dagster._utils.interrupts), and such a server outlived `terminate()`."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_workers(path: str | None, count: int, queue: str, worker_config: str) -> int:
    from oppsync_pipeline.lib.workers import Workers

    # the workers load the code location for each step: the configuration must be valid and found (OPPSYNC_CONFIG),
    # and `dagster-celery worker start` keeps its rendered settings under DAGSTER_HOME
    _prepare_dagster(path)
    _stop_on_sigterm()
    workers = Workers(count=count, queue=queue, config_yaml=Path(worker_config)).start()
    print(f"{count} Celery worker(s) on queue '{queue}' ({worker_config}); Ctrl-C stops them", flush=True)
    try:
        while workers.alive() == count:
            time.sleep(1)
        print("a worker exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        workers.stop()


def check_online(cfg: OppsyncConfig, conn) -> bool:
    """The discovery a run does, printed: per capability `read` or `skipped` (optional, with the fallback)
    or `REFUSED` (required: the sync would fail). False when the connection cannot sync."""
    from oppsync_pipeline.lib.crm.http import CrmError
    from oppsync_pipeline.lib.sync import build_connector, scrub

    connector = build_connector(cfg, conn)
    try:
        capabilities = connector.discover()
        error = None
    except (CrmError, ConfigError) as err:
        capabilities, error = list(connector.capabilities.values()), scrub(str(err), connector.scrubber)
    stats = connector.stats
    required_refused = [c for c in capabilities if not c.available and c.detail.startswith("REQUIRED")]
    verdict = "cannot sync" if (error or required_refused) else "will sync"
    print(f"\n{conn.name} ({conn.crm}): {verdict}; {stats.requests} request(s), {stats.token_requests} for tokens")
    for c in capabilities:
        mark = "read" if c.available else ("REFUSED" if c.detail.startswith("REQUIRED") else "skipped")
        # a refused read's detail carries the CRM's answer, which may echo the request
        detail = scrub(c.detail, connector.scrubber)
        print(f"  {mark:<8} {c.name}" + (f": {detail}" if detail and detail != "readable" else ""))
    if error:
        print(f"  ERROR    {error}")
    return verdict == "will sync"


# -- running through Dagster ---------------------------------------------------------------------------------------


def _prepare_dagster(path: str | None) -> tuple[Path, OppsyncConfig]:
    cfg_file = config_path(path).resolve()
    cfg = load_config(cfg_file)
    problems = check_config(cfg)
    if problems:
        raise ConfigError(problems)
    os.environ["OPPSYNC_CONFIG"] = str(cfg_file)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    if not os.environ.get("DAGSTER_HOME"):
        home = (STATE_DIR / "dagster").resolve()
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "dagster.yaml").exists() and (ROOT / "dagster.yaml").exists():
            shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
        os.environ["DAGSTER_HOME"] = str(home)
    _check_dagster_storage()
    return cfg_file, cfg


class DatabaseUnusable(Exception):
    """A database the command needs has a problem no retry fixes (its message: the problem and the fix)."""


def _check_dagster_storage() -> None:
    """Dagster's Postgres storage, checked before the instance opens it: dagster-postgres retries a refused
    connection for ~11 s and then raises a 177-line traceback; a missing database or role is said in one line.
    A server that does not answer is left to Dagster's own retries."""
    from oppsync_pipeline.lib.warehouse.setup import check_database, dagster_database

    try:
        db = dagster_database(os.environ.get("DAGSTER_HOME"))
    except ValueError as err:
        raise ConfigError([str(err)]) from None
    problem = check_database(db) if db is not None else None
    if problem is not None and not problem.problem.startswith("no answer"):
        raise DatabaseUnusable(str(problem))


def _load_defs(location: str | None = None):
    """The whole project, or one code location's definitions (`syncs`: no dbt imported, as a deployment's
    sync run worker loads them)."""
    import dagster as dg

    if location:
        from oppsync_pipeline.locations import load_location

        return load_location(location)
    return dg.load_from_defs_folder(path_within_project=ROOT / "oppsync_pipeline")


def run_connection(defs, instance, conn, mode: str):
    from oppsync_pipeline.defs.crm.schedules import extract_run_config, quiet, sync_target
    from oppsync_pipeline.defs.resources import load_app_config

    target = sync_target(load_app_config()[1], conn)
    job = defs.resolve_job_def(target.pop("job_name"))
    return job.execute_in_process(
        # a failed step is told in one line by the summary; Dagster's own report of it (a stack trace per
        # failed and per skipped step) only with --verbose
        run_config=quiet(extract_run_config(conn, mode), "INFO" if VERBOSE else "CRITICAL"),
        **target,
        instance=instance,
        tags={"oppsync/connection": conn.name, "oppsync/mode": mode, "oppsync/trigger": "cli"},
        raise_on_error=False,
    )


def cmd_sync(path: str | None, connection: str, full: bool, verbose: bool = False) -> int:
    import dagster as dg

    _, cfg = _prepare_dagster(path)
    conn = cfg.connection(connection)
    with _run_console(verbose, "sync") as shown, _sandbox(cfg):
        defs = _load_defs("syncs")
        with dg.DagsterInstance.get() as instance:
            result = _shown_sync(shown, defs, instance, conn, "full" if full else "auto")
    _print_summary(cfg, [(conn, result)])
    return 0 if result.success else 1


def writeback_connection(defs, instance, conn_name: str, *, opportunities=None, dry_run=False, force=False):
    from oppsync_pipeline.defs.crm.schedules import quiet
    from oppsync_pipeline.defs.crm.writeback import JOB_NAME

    config = {"connection": conn_name, "opportunities": list(opportunities or []), "dry_run": dry_run, "force": force}
    return defs.resolve_job_def(JOB_NAME).execute_in_process(
        run_config=quiet({"ops": {"write_revenue": {"config": config}}}, "ERROR"),
        instance=instance,
        tags={"oppsync/connection": conn_name, "oppsync/trigger": "cli"},
        raise_on_error=False,
    )


def cmd_writeback(args: argparse.Namespace) -> int:
    import dagster as dg

    _, cfg = _prepare_dagster(args.config)
    if args.all:
        names = [c.name for c in cfg.connections if c.writeback.enabled]
    elif args.connection:
        names = [cfg.connection(n).name for n in args.connection]
    else:
        raise ConfigError(["writeback: name a connection with --connection NAME (or --all)"])
    ok = True
    with _sandbox(cfg):
        defs = _load_defs("syncs")
        with dg.DagsterInstance.get() as instance:
            for name in names:
                result = writeback_connection(
                    defs, instance, name, opportunities=args.opportunity, dry_run=args.dry_run, force=args.force
                )
                ok = _print_writeback(cfg, name, result) and ok
    return 0 if ok else 1


def _print_writeback(cfg: OppsyncConfig, connection: str, result) -> bool:
    """What a write-back run did, from its audit rows (oppsync.writeback_log)."""
    from sqlalchemy import text

    from oppsync_pipeline.lib.warehouse.engine import make_engine, transaction

    with transaction(make_engine(cfg.warehouse.url, cfg.warehouse.duckdb)) as c:
        rows = c.execute(
            text(
                "SELECT opportunity_id, field, before, after, status, error FROM oppsync.writeback_log "
                "WHERE run_id = :r ORDER BY log_id"
            ),
            {"r": result.run_id},
        ).fetchall()
    crm = cfg.connection(connection).crm
    if not rows:
        print(f"{connection} ({crm}): write-back failed before any row: {_step_error(result)}")
        return False
    per_status: dict[str, set[str]] = {}
    for r in rows:
        per_status.setdefault(r.status, set()).add(r.opportunity_id)
    print(f"{connection} ({crm}): " + ", ".join(f"{len(ids)} {s}" for s, ids in sorted(per_status.items())))
    told = set()
    for r in rows:
        if r.field is not None:
            print(f"  {r.opportunity_id}  {r.field}: {_shown(r.before)} -> {_shown(r.after)}  [{r.status}]")
        if r.error and (r.opportunity_id, r.error) not in told:
            told.add((r.opportunity_id, r.error))
            print(f"  {r.opportunity_id}  {r.status}: {r.error}")
    return result.success


def _step_error(result) -> str:
    """The failed step's own message (a dg.Failure's description, else the exception), not Dagster's wrapper."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data:
            data = event.step_failure_data
            if data.user_failure_data and data.user_failure_data.description:
                return data.user_failure_data.description
            if data.error:
                return data.error.cause.message.strip() if data.error.cause else data.error.message.strip()
    return "unknown error (see the run in the Dagster UI)"


def _shown(value: str | None) -> str:
    return "(none)" if value is None else value


def cmd_webhooks_serve(path: str | None, host: str | None, port: int | None) -> int:
    from oppsync_pipeline.lib.webhooks.app import serve

    cfg = load_config(config_path(path))
    serve(cfg, host, port)
    return 0


def cmd_webhooks_register(path: str | None, connection: str, public_url: str) -> int:
    from oppsync_pipeline.lib.config import resolve_refs
    from oppsync_pipeline.lib.crm.registry import spec
    from oppsync_pipeline.lib.sync import build_connector

    cfg = load_config(config_path(path))
    conn = cfg.connection(connection)
    s = spec(conn.crm)
    if not s.webhooks:
        print(f"{conn.name}: {conn.crm} sends no opportunity webhooks: {s.webhooks_note}.")
        print("The hourly schedule (and `oppsync sync`) keep it in step; nothing to register.")
        return 0
    cls = s.webhook_receiver_class()
    problems = cls.problems(conn)
    if problems:
        raise ConfigError(problems)
    secrets = resolve_refs(cfg, conn.webhooks.secrets, f"connections.{conn.name}.webhooks.secrets")
    url = public_url.rstrip("/") + f"/webhooks/{conn.name}"
    for line in cls(conn, secrets).register(build_connector(cfg, conn), url):
        print(line)
    if not conn.webhooks.enabled:
        print(f"then set connections.{conn.name}.webhooks.enabled: true and restart `oppsync webhooks serve`")
    return 0


def cmd_run(path: str | None, full: bool = False, advance_hours: float = 0.0, verbose: bool = False) -> int:
    import dagster as dg

    from oppsync_pipeline.defs.crm.schedules import quiet

    t0 = time.monotonic()
    _, cfg = _prepare_dagster(path)
    with _run_console(verbose, "run") as shown, _sandbox(cfg, advance_hours=advance_hours):
        defs = _load_defs()
        results = []
        with dg.DagsterInstance.get() as instance:
            for conn in cfg.connections:
                results.append((conn, _shown_sync(shown, defs, instance, conn, "full" if full else "auto")))
            # nothing new to build from when every connection failed (a warehouse that cannot be reached, say)
            synced = any(r.success for _, r in results)
            if synced:
                shown.note("mart: building (dbt)")
            mart = (
                defs.resolve_job_def("build_mart").execute_in_process(
                    run_config=quiet({}, "WARNING" if synced or VERBOSE else "CRITICAL"),
                    instance=instance,
                    tags={"oppsync/trigger": "cli"},
                    raise_on_error=False,
                )
                if synced
                else None
            )
            demo = _writeback_demo(cfg, defs, instance) if cfg.sandbox.enabled and synced else []
    ok = _print_summary(cfg, results)
    print("\nmart: " + _mart_line(cfg, mart, sum(1 for _, r in results if not r.success)))
    if demo:
        print("\nrevenue write-back, dry run (sandbox example rows; `oppsync writeback --connection NAME` writes):")
        for name, result in demo:
            _print_writeback_brief(cfg, name, result)
    if cfg.warehouse.backend == "duckdb":
        print(f"warehouse: {Path(cfg.warehouse.url.split(':///', 1)[1]).resolve()}")
    else:
        print(f"warehouse: {_redact_url(cfg.warehouse.url)}")
    print(f"dagster runs: {os.environ['DAGSTER_HOME']} (make dev to browse)  total {time.monotonic() - t0:.1f}s")
    return 0 if ok and mart is not None and mart.success else 1


def _mart_line(cfg: OppsyncConfig, mart, failed: int) -> str:
    """What became of the mart: "built" only when it was (after a refusal it is built from the data synced
    before, and says so)."""
    if mart is None:
        return "not rebuilt: every connection failed (see above)"
    if not mart.success:
        return f"FAILED: {_one_line(_step_error(mart))}"
    rows = _mart_rows(cfg)
    return (
        "built"
        + (f", marts.outcomes has {rows} rows" if rows is not None else "")
        + (f" (without new data from {failed} failed connection(s))" if failed else "")
    )


def _print_writeback_brief(cfg: OppsyncConfig, connection: str, result) -> None:
    """A write-back dry run in one line (the fields, not their values): `make run` shows that it would write,
    `oppsync writeback --dry-run` shows every value."""
    from sqlalchemy import text

    from oppsync_pipeline.lib.warehouse.engine import make_engine, transaction

    with transaction(make_engine(cfg.warehouse.url, cfg.warehouse.duckdb)) as c:
        rows = c.execute(
            text("SELECT opportunity_id, field, status FROM oppsync.writeback_log WHERE run_id = :r ORDER BY log_id"),
            {"r": result.run_id},
        ).fetchall()
    crm = cfg.connection(connection).crm
    if not rows:
        print(f"{connection} ({crm}): write-back failed before any row: {_step_error(result)}")
        return
    per_status: dict[str, set[str]] = {}
    for r in rows:
        per_status.setdefault(r.status, set()).add(r.opportunity_id)
    fields = list(dict.fromkeys(r.field for r in rows if r.field))
    shown = ", ".join(fields[:4]) + (f" and {len(fields) - 4} more" if len(fields) > 4 else "")
    counts = ", ".join(f"{len(ids)} {s}" for s, ids in sorted(per_status.items()))
    print(f"{connection} ({crm}): {counts}" + (f": {shown}" if shown else ""))


@contextmanager
def _run_console(verbose: bool, command: str):
    """The syncs' progress on the terminal; dbt, GX and Dagster output in a log file (printed once) unless
    --verbose. Yields the ConsoleProgress."""
    from oppsync_pipeline.lib.progress import LOGGER_NAME, ConsoleProgress, console

    with console(verbose, STATE_DIR / "logs", command) as (terminal, log_path):
        if log_path is not None:
            print(f"log: {log_path} (dbt, Great Expectations, Dagster; --verbose prints them here)", file=terminal)
        shown = ConsoleProgress(terminal)
        progress_log = logging.getLogger(LOGGER_NAME)
        progress_log.addHandler(shown)
        try:
            yield shown
        finally:
            progress_log.removeHandler(shown)
            shown.close()


def _shown_sync(shown, defs, instance, conn, mode: str):
    shown.start(conn.name)
    try:
        return run_connection(defs, instance, conn, mode)
    finally:
        shown.finish(conn.name)


def _writeback_demo(cfg: OppsyncConfig, defs, instance) -> list:
    """On the embedded sandbox: one example revenue row per connection (never replacing a user's rows), and a
    dry-run write-back of each, so `make run` shows what the write-back would change in every CRM."""
    from datetime import UTC, datetime

    from oppsync_pipeline.lib.warehouse.engine import make_engine
    from oppsync_pipeline.lib.writeback.example import seed_example

    engine = make_engine(cfg.warehouse.url, cfg.warehouse.duckdb)
    names = [c.name for c in cfg.connections if c.writeback.enabled]
    seed_example(engine, names, datetime.now(UTC).replace(tzinfo=None), cfg.writeback.table)
    return [(name, writeback_connection(defs, instance, name, dry_run=True)) for name in names]


def _print_summary(cfg: OppsyncConfig, results) -> bool:
    """One row per connection, then one line per failed connection: what failed and its fix. Prints even when
    the warehouse cannot be read (rows from Dagster's results, the warehouse's problem said once)."""
    header = (
        "connection",
        "crm",
        "mode",
        "status",
        "fetched",
        "created",
        "updated",
        "closed",
        "deleted",
        "api_requests",
        "seconds",
    )
    rows, unreadable = _sync_run_rows(cfg, results)
    lines, failures, ok = [header], [], True
    for conn, result in results:
        row = rows.get(result.run_id)
        if row is None:
            ok = False
            status = "success" if result.success else "failed"
            lines.append((conn.name, conn.crm, "-", status, "-", "-", "-", "-", "-", "-", "-"))
            if not result.success:
                failures.append((conn.name, _step_error(result)))
            continue
        secs = (row.finished_at - row.started_at).total_seconds() if row.finished_at else 0
        values = (row.fetched, row.created, row.updated, row.closed, row.deleted, row.api_requests)
        values = tuple("-" if v is None else v for v in values)  # a failed run reconciled nothing
        lines.append((conn.name, conn.crm, row.mode, row.status, *values, f"{secs:.1f}"))
        if row.status in ("failed", "refused") or not result.success:
            ok = False
            failures.append((conn.name, row.error or _step_error(result)))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip())
    if unreadable and not any(unreadable in str(error) for _, error in failures):
        print(f"\n{unreadable}", file=sys.stderr)  # said once, unless each failed connection says it already
    for name, error in failures:
        print(f"{name}: {_one_line(error)}", file=sys.stderr)
    return ok


def _sync_run_rows(cfg: OppsyncConfig, results) -> tuple[dict, str | None]:
    """run_id -> its oppsync.sync_runs row; and why the warehouse could not be read, if it could not."""
    from sqlalchemy import bindparam, text
    from sqlalchemy.exc import DBAPIError

    from oppsync_pipeline.lib.warehouse.engine import make_engine, transaction
    from oppsync_pipeline.lib.warehouse.errors import permanent_problem

    query = text(
        "SELECT run_id, mode, status, fetched, created, updated, closed, deleted, api_requests, "
        "started_at, finished_at, error FROM oppsync.sync_runs WHERE run_id IN :runs"
    ).bindparams(bindparam("runs", expanding=True))
    try:
        with transaction(make_engine(cfg.warehouse.url, cfg.warehouse.duckdb)) as c:
            found = c.execute(query, {"runs": [r.run_id for _, r in results] or [""]}).fetchall()
        return {r.run_id: r for r in found}, None
    except DBAPIError as err:
        problem = permanent_problem(err, cfg.warehouse.url)
        first = str(err.orig or err).strip().splitlines()[0]
        return {}, str(problem) if problem else f"warehouse: could not be read ({first})"


def _one_line(message: str) -> str:
    """A failure as one line: Dagster wraps some in several (a step error, its cause)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _mart_rows(cfg: OppsyncConfig) -> int | None:
    from sqlalchemy import text

    from oppsync_pipeline.lib.warehouse.engine import make_engine, transaction

    try:
        with transaction(make_engine(cfg.warehouse.url, cfg.warehouse.duckdb)) as c:
            return c.execute(text("SELECT count(*) FROM marts.outcomes")).scalar()
    except Exception:  # noqa: BLE001 - the summary line is informative only; a missing mart is reported above
        return None


def _redact_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# -- status --------------------------------------------------------------------------------------------------------


def cmd_status(path: str | None, as_json: bool = False) -> int:
    import json
    from datetime import UTC, datetime

    from sqlalchemy.exc import SQLAlchemyError

    from oppsync_pipeline.lib.status import render_table, statuses
    from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine

    cfg = load_config(config_path(path))
    now = datetime.now(UTC).replace(tzinfo=None)
    scheduler = _scheduler_view(cfg)
    try:
        engine = make_engine(cfg.warehouse.url, cfg.warehouse.duckdb)
        ensure_schema(engine)  # a warehouse never synced has no tables yet; an older one gets its migrations
        items = statuses(cfg, engine, now, scheduler)
    except SQLAlchemyError as err:
        print(
            f"warehouse {_redact_url(cfg.warehouse.url)} cannot be read: {type(err).__name__}: {err.orig or err}",
            file=sys.stderr,
        )
        return 1
    if as_json:
        doc = {
            "generated_at": now.replace(tzinfo=UTC).isoformat(),
            "dagster": {"daemon_running": scheduler.daemon_running, "note": scheduler.note},
            "connections": [s.as_json() for s in items],
        }
        print(json.dumps(doc, indent=2))
    else:
        for line in render_table(items, now, scheduler):
            print(line)
    return 0


def _scheduler_view(cfg: OppsyncConfig):
    """What the Dagster instance knows: schedules switched off, the scheduler daemon's heartbeat, each
    connection's newest run. Never fatal: the warehouse alone answers most of the status."""
    from datetime import UTC, datetime

    from oppsync_pipeline.lib.status import SchedulerView

    home = Path(os.environ.get("DAGSTER_HOME") or STATE_DIR / "dagster").resolve()
    if not home.is_dir():
        return SchedulerView(note=f"no Dagster instance at {home} (nothing has run through Dagster here yet)")
    try:
        import dagster as dg

        from oppsync_pipeline.defs.crm.assets import key_part

        # an instance without dagster.yaml (the embedded default) warns on every open: not news for a status
        logging.getLogger("dagster").setLevel(logging.ERROR)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            stopped = {
                s.instigator_name
                for s in instance.all_instigator_state()
                if s.instigator_type.value == "SCHEDULE" and s.status.value == "STOPPED"
            }
            beat = instance.get_daemon_heartbeats().get("SCHEDULER")
            latest = {}
            for conn in cfg.connections:
                records = instance.get_run_records(
                    filters=dg.RunsFilter(tags={"oppsync/connection": conn.name}), limit=1
                )
                if records:
                    rec = records[0]
                    at = rec.end_time or rec.start_time or rec.create_timestamp.timestamp()
                    when = datetime.fromtimestamp(at, UTC).replace(tzinfo=None)
                    latest[conn.name] = (rec.dagster_run.run_id, rec.dagster_run.status.value, when)
    except Exception as err:  # noqa: BLE001 - an unreadable instance leaves the warehouse's answer standing
        return SchedulerView(note=f"the Dagster instance at {home} cannot be read ({type(err).__name__}: {err})")
    schedules = {
        c.name: (f"sync_{key_part(c.name)}" not in stopped, f"full_sync_{key_part(c.name)}" not in stopped)
        for c in cfg.connections
    }
    # the daemon beats every few seconds; two minutes without one means it is not running
    daemon = beat is not None and time.time() - beat.timestamp < 120
    return SchedulerView(schedules=schedules, daemon_running=daemon, latest_runs=latest)


# -- sandbox -------------------------------------------------------------------------------------------------------


def _sandbox(cfg: OppsyncConfig, advance_hours: float = 0.0):
    from oppsync_pipeline.sandbox.serve import sandbox_if_enabled

    return sandbox_if_enabled(cfg, advance_hours)


def cmd_sandbox_variants() -> int:
    from oppsync_pipeline.sandbox.serve import variants as sandbox_variants

    for crm, variants in sandbox_variants().items():
        print(crm)
        for name, what in variants.items():
            print(f"  {name:<20} {what}")
    return 0


def cmd_sandbox_serve(args: argparse.Namespace) -> int:
    from oppsync_pipeline.sandbox.serve import start_sandbox

    _stop_on_sigterm()
    if args.tenants:
        return _serve_tenants(args)
    if args.opportunities is None:
        args.opportunities = 2000
    t0 = time.monotonic()
    sandbox = start_sandbox(
        tuple(args.crm or ()),
        seed=args.seed,
        opportunities=args.opportunities,
        port_base=args.port_base,
        latency_ms=args.latency_ms,
        faults=args.faults,
        variants=args.variant,
        receiver_url=args.webhooks_url or None,
    )
    print(
        f"sandbox: {len(sandbox.crms)} simulators, {args.opportunities} opportunities each, ready in "
        f"{time.monotonic() - t0:.1f}s",
        flush=True,
    )
    for crm in sandbox.crms:
        print(f"  {crm:<12} {sandbox.url(crm)}", flush=True)
    if args.write_config:
        path = sandbox.write_config(Path(args.write_config))
        print(f"wrote {path} (and {path.with_suffix('.secrets.env').name})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sandbox.stop()
    return 0


def _serve_tenants(args: argparse.Namespace) -> int:
    from oppsync_pipeline.sandbox.cluster import Tenants
    from oppsync_pipeline.sandbox.serve import sandbox_anchor

    opportunities = 20 if args.opportunities is None else args.opportunities  # small tenants unless asked
    t0 = time.monotonic()
    tenants = Tenants(
        count=args.tenants,
        crms=tuple(args.crm or CRMS),
        seed=args.seed,
        opportunities=opportunities,
        port_base=args.port_base,
        latency_ms=args.latency_ms,
        anchor=sandbox_anchor(),
    ).start()
    urls = tenants.urls()
    print(
        f"sandbox: {args.tenants} tenants, {opportunities} opportunities each, on {urls[0]} .. {urls[-1]}, ready in "
        f"{time.monotonic() - t0:.1f}s",
        flush=True,
    )
    if args.write_config:
        path = tenants.write_config(Path(args.write_config), "postgresql+psycopg2://postgres@127.0.0.1:5432/oppsync")
        print(f"wrote {path} (and {path.with_suffix('.secrets.env').name}); set warehouse.url", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        tenants.stop()
    return 0


def cmd_sandbox_advance(path: str | None, hours: float) -> int:
    from oppsync_pipeline.sandbox.serve import advance

    cfg = load_config(path)
    for conn in cfg.connections:
        try:
            print(f"{conn.name}: {advance(conn.base_url, hours)}")
        except requests.RequestException as err:
            print(f"{conn.name}: not a running sandbox ({type(err).__name__})", file=sys.stderr)
    return 0


# -- dashboard ---------------------------------------------------------------------------------------------------


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Streamlit serving oppsync_pipeline/dashboard/app.py; the page reads the same oppsync.yaml."""
    cfg_file = config_path(args.config)
    load_config(cfg_file)  # a bad file fails here, with its key paths, not inside the page
    app = Path(__file__).resolve().parent / "dashboard" / "app.py"
    env = {**os.environ, "OPPSYNC_CONFIG": str(cfg_file.resolve())}
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.address",
        args.host,
        "--server.port",
        str(args.port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "minimal",
    ]
    print(f"outcomes dashboard: http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    # replaced by Streamlit, not its parent: a signal to this process (Ctrl-C, a supervisor's SIGTERM) reaches
    # the server itself, and no orphaned server outlives its command
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
