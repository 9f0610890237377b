"""Database errors that no retry can fix, told apart from passing ones, each with the command that fixes it.

A missing database, a refused login or a missing privilege gives the same answer in 30 seconds as now: the
first Postgres deployment of issue 20 spent 2 min 33 s per connection retrying "database does not exist". These
errors are classified here once, for the warehouse and for Dagster's own storage, and reach the user at once
(`dg.Failure(allow_retries=False)` in the assets, one line in the CLI). Anything else (a server restarting, a
dropped connection, a DuckDB file held by another process) stays retryable.

psycopg2 raises connection-time errors without a SQLSTATE, so they are recognised by libpq's message texts
(stable since PostgreSQL 9: `database "x" does not exist`, `password authentication failed for user "x"`,
`role "x" does not exist`, `no pg_hba.conf entry`, `permission denied for ...`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy.engine import make_url

ADMIN = "postgres"  # the superuser a DBA runs the fix as, in the commands we print


@dataclass(frozen=True)
class DatabaseProblem:
    """What is wrong with a database (one line, no credentials) and the command or setting that fixes it."""

    what: str  # "warehouse" or "Dagster storage"
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what}: {self.problem}; {self.fix}"


def _chain(err: BaseException) -> str:
    """The messages of an error, its DBAPI original and its causes, as one text."""
    seen, texts, e = set(), [], err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(str(e))
        orig = getattr(e, "orig", None)
        if orig is not None and id(orig) not in seen:
            texts.append(str(orig))
        e = e.__cause__ or e.__context__
    return "\n".join(texts)


def permanent_problem(err: BaseException, url: str, what: str = "warehouse") -> DatabaseProblem | None:
    """The permanent problem behind `err` for the database at `url`, or None when a retry may help."""
    text = _chain(err)
    if url.startswith("duckdb"):
        return _duckdb_problem(text, url, what)
    u = make_url(url)
    host, port, user, db = u.host or "localhost", u.port or 5432, u.username or "postgres", u.database or ""
    server = f"-h {host} -p {port}"
    missing = re.search(r'database "([^"]+)" does not exist', text)
    if missing and missing.group(1) != db:
        return None  # another database's error (the warehouse's and Dagster's may share a server)
    if missing:
        return DatabaseProblem(
            what,
            f'database "{db}" does not exist on {host}:{port}',
            f"create it: createdb {server} -U {ADMIN} -O {user} {db} (or `oppsync init-db`, which creates it when "
            f"{user} may create databases)",
        )
    if re.search(r'role "[^"]+" does not exist', text):
        return DatabaseProblem(
            what,
            f'role "{user}" does not exist on {host}:{port}',
            f"create it: createuser {server} -U {ADMIN} --pwprompt {user}",
        )
    if "password authentication failed" in text or "no password supplied" in text:
        return DatabaseProblem(
            what,
            f'the password of role "{user}" was refused by {host}:{port}',
            "set the right one in PGPASSWORD or ~/.pgpass (the warehouse URL), or DAGSTER_PG_PASSWORD (Dagster)",
        )
    if "no pg_hba.conf entry" in text:
        return DatabaseProblem(
            what,
            f'{host}:{port} does not accept role "{user}" from this host (pg_hba.conf)',
            f"add a line for database {db}, user {user} to the server's pg_hba.conf and reload it",
        )
    denied = re.search(r"permission denied for (database|schema|table|relation|sequence) \"?([\w.]+)\"?", text)
    if denied:
        kind, name = denied.groups()
        grant = {
            "database": f"GRANT CONNECT, CREATE ON DATABASE {name} TO {user}",
            "schema": f"GRANT USAGE, CREATE ON SCHEMA {name} TO {user}",
        }.get(kind, f"GRANT SELECT, INSERT, UPDATE, DELETE ON {name} TO {user}")
        return DatabaseProblem(
            what,
            f'role "{user}" has no permission on {kind} {name}',
            f'run as {ADMIN}: psql {server} -d {db} -c "{grant}"',
        )
    if "permission denied" in text or "must be owner" in text:
        return DatabaseProblem(
            what,
            f'role "{user}" lacks a privilege in database {db}',
            f'run as {ADMIN}: psql {server} -d {db} -c "ALTER DATABASE {db} OWNER TO {user}"',
        )
    return None


def _duckdb_problem(text: str, url: str, what: str) -> DatabaseProblem | None:
    path = url.split(":///", 1)[1] if ":///" in url else url
    if "Permission denied" in text or "Read-only file system" in text:
        return DatabaseProblem(
            what,
            f"the DuckDB file {path} cannot be written",
            "make its folder writable, or set warehouse.url elsewhere",
        )
    return None
