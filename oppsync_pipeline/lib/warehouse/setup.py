"""The two databases a deployment needs, checked or created: the warehouse (`warehouse.url`) and Dagster's own
storage (`storage.postgres` of `$DAGSTER_HOME/dagster.yaml`, as in deploy/postgres/dagster.yaml).

`oppsync config check` only checks (read-only); `oppsync init-db` also creates what is missing when the
configured role may (a database: CREATEDB; the warehouse's `oppsync` schema: migrated), and otherwise prints
the `createdb` / `GRANT` a DBA runs. Each problem is one line naming the database and its fix (errors.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from oppsync_pipeline.lib.warehouse.errors import DatabaseProblem, permanent_problem

CONNECT_TIMEOUT = 5  # seconds: a server that does not answer is reported, not waited on
WAREHOUSE, DAGSTER = "warehouse", "Dagster storage"
_LEGACY_STORAGES = ("run_storage", "event_log_storage", "schedule_storage")


@dataclass(frozen=True)
class Database:
    what: str  # WAREHOUSE or DAGSTER
    url: str  # SQLAlchemy URL, driver named
    where: str  # the setting it comes from, for messages


def dagster_database(dagster_home: str | None, environ: Mapping[str, str] | None = None) -> Database | None:
    """The Postgres database of Dagster's storage in `dagster_home`/dagster.yaml; None when Dagster keeps its
    storage in SQLite files there (the embedded default). Raises ValueError naming an unset variable."""
    environ = os.environ if environ is None else environ
    path = Path(dagster_home or "") / "dagster.yaml"
    if not dagster_home or not path.is_file():
        return None
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    where, pg = f"{path}: storage.postgres", (doc.get("storage") or {}).get("postgres")
    if pg is None:  # the older per-storage form: run_storage: {module: dagster_postgres..., config: {...}}
        for key in _LEGACY_STORAGES:
            entry = doc.get(key) or {}
            if "postgres" in str(entry.get("module", "")):
                where, pg = f"{path}: {key}.config", entry.get("config") or {}
                break
    if pg is None:
        return None
    if pg.get("postgres_url"):
        url = _resolved(pg["postgres_url"], f"{where}.postgres_url", environ)
        scheme = url.split("://", 1)[0]
        return Database(DAGSTER, url if "+" in scheme else url.replace("://", "+psycopg2://", 1), where)
    db = {k: _resolved(v, f"{where}.postgres_db.{k}", environ) for k, v in (pg.get("postgres_db") or {}).items()}
    user, password = quote(str(db.get("username", ""))), db.get("password")
    userinfo = f"{user}:{quote(str(password))}" if password else user
    scheme = db.get("scheme", "postgresql+psycopg2")
    scheme = scheme if "+" in scheme else f"{scheme}+psycopg2"
    url = f"{scheme}://{userinfo}@{db.get('hostname', '')}:{db.get('port', 5432)}/{db.get('db_name', '')}"
    if db.get("params"):
        url += "?" + urlencode(db["params"], quote_via=quote)
    return Database(DAGSTER, url, where)


def _resolved(value: Any, key: str, environ: Mapping[str, str]) -> Any:
    """A dagster.yaml value: literal, or `{env: NAME}` read from the environment (as Dagster reads it)."""
    if isinstance(value, dict) and set(value) == {"env"}:
        name = value["env"]
        if name not in environ:  # set but empty is a value (an empty password under trust authentication)
            raise ValueError(f"{key}: environment variable {name} is not set; export {name}=...")
        return environ[name]
    return value


def check_database(db: Database) -> DatabaseProblem | None:
    """None when `db` accepts a connection and its role may create what oppsync and Dagster create there."""
    if db.url.startswith("duckdb"):
        return _check_duckdb(db)
    engine = create_engine(db.url, connect_args={"connect_timeout": CONNECT_TIMEOUT})
    try:
        with engine.connect() as c:
            return _missing_privilege(c, db)
    except DBAPIError as err:
        return permanent_problem(err, db.url, db.what) or _unreachable(err, db)
    finally:
        engine.dispose()


def _missing_privilege(c: Any, db: Database) -> DatabaseProblem | None:
    """The warehouse creates schemas (oppsync; dbt's staging, intermediate, marts); Dagster creates tables in
    `public`, which PostgreSQL 15+ no longer lets every role do."""
    u = make_url(db.url)
    user, name = u.username or "postgres", u.database
    server = f"-h {u.host or 'localhost'} -p {u.port or 5432}"
    if db.what == WAREHOUSE:
        has = c.execute(text("SELECT has_database_privilege(current_database(), 'CREATE')")).scalar()
        grant = f"GRANT CREATE ON DATABASE {name} TO {user}"
        lacks = "may not create schemas in it"
    else:
        has = c.execute(text("SELECT has_schema_privilege('public', 'CREATE')")).scalar()
        grant = f"GRANT USAGE, CREATE ON SCHEMA public TO {user}"
        lacks = "may not create tables in its schema public"
    if has:
        return None
    return DatabaseProblem(db.what, f'role "{user}" {lacks}', f'run as postgres: psql {server} -d {name} -c "{grant}"')


def _unreachable(err: DBAPIError, db: Database) -> DatabaseProblem:
    u = make_url(db.url)
    first = str(err.orig if err.orig is not None else err).strip().splitlines()[0]
    return DatabaseProblem(
        db.what,
        f"no answer from {u.host}:{u.port or 5432} ({first})",
        f"check that the server runs and the host and port in {db.where} are right",
    )


def _check_duckdb(db: Database) -> DatabaseProblem | None:
    path = Path(db.url.split(":///", 1)[1])
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return DatabaseProblem(db.what, f"{path} cannot be written", "make its folder writable or change " + db.where)
    return None


@dataclass(frozen=True)
class Step:
    database: Database
    done: str | None  # what init-db did or found ("ready", "created"), or None when a problem is left
    problem: DatabaseProblem | None = None

    def __str__(self) -> str:
        return f"{self.database.what}: {self.done}" if self.problem is None else f"{self.problem}"


def create_database(db: Database) -> Step:
    """Create `db` when it does not exist and its role may create databases (connects to the server's
    `postgres` database as that role); else the problem with the `createdb` to run."""
    problem = check_database(db)
    if problem is None or "does not exist" not in problem.problem or not problem.problem.startswith("database"):
        return Step(db, "ready" if problem is None else None, problem)
    u = make_url(db.url)
    admin = create_engine(
        u.set(database="postgres"), isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": CONNECT_TIMEOUT}
    )
    try:
        with admin.connect() as c:
            if not c.execute(
                text("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
            ).scalar():
                return Step(db, None, problem)
            quoted = c.dialect.identifier_preparer.quote(u.database)
            c.execute(text(f"CREATE DATABASE {quoted}"))  # a name from the configuration, quoted as an identifier
    except DBAPIError:
        return Step(db, None, problem)  # the server refused: the createdb of the problem is what to run
    finally:
        admin.dispose()
    after = check_database(db)
    return Step(db, "created" if after is None else None, after)
