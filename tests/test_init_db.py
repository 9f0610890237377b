"""`oppsync init-db` and `config check` against the real Postgres server, with fresh role and database names:
what is missing is said per database with the command that fixes it, and running that command verbatim fixes
it. And the README's Postgres section, run as written (its fenced blocks parsed from README.md, so the two
cannot drift apart): role, databases, instance, init-db, config check, a first sync, on a server with nothing
of ours on it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from oppsync_pipeline import cli
from oppsync_pipeline.sandbox.cluster import crm_module, env_var
from tests.conftest import PG_ADMIN_URL
from tests.sandbox.test_serve_cli import free_port_base

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ADMIN = make_url(PG_ADMIN_URL)
HOST, PORT = ADMIN.host or "127.0.0.1", str(ADMIN.port or 5432)


def admin_sql(*statements: str, database: str | None = None) -> list:
    engine = create_engine(ADMIN.set(database=database or ADMIN.database), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as c:
            return [
                c.execute(text(s)).fetchall() if s.lstrip().upper().startswith("SELECT") else c.execute(text(s))
                for s in statements
            ]
    finally:
        engine.dispose()


@pytest.fixture
def names(pg_url: str) -> Iterator[dict[str, str]]:
    """Fresh role and database names (pg_url: the Postgres marker, and a server that answers); dropped after."""
    suffix = uuid.uuid4().hex[:10]
    fresh = {"role": f"oppsync_app_{suffix}", "warehouse": f"oppsync_wh_{suffix}", "dagster": f"oppsync_dg_{suffix}"}
    yield fresh
    admin_sql(
        f'DROP DATABASE IF EXISTS "{fresh["warehouse"]}" WITH (FORCE)',
        f'DROP DATABASE IF EXISTS "{fresh["dagster"]}" WITH (FORCE)',
        f'DROP ROLE IF EXISTS "{fresh["role"]}"',
    )


def sandbox_config(path: Path, warehouse: dict, connection: str = "acme-salesforce") -> Path:
    """oppsync.yaml: one Salesforce connection served by the built-in sandbox on a free port, `warehouse` as given."""
    creds = crm_module("salesforce").SANDBOX_CREDENTIALS
    port = free_port_base(1)
    (path.parent / "secrets.env").write_text("".join(f"{env_var(connection, k)}={v}\n" for k, v in creds.items()))
    cfg = {
        "warehouse": warehouse,
        "secrets_file": "secrets.env",
        "sandbox": {"enabled": True, "seed": 5, "opportunities": 30},
        "connections": [
            {
                "name": connection,
                "crm": "salesforce",
                "base_url": f"http://127.0.0.1:{port}",
                "credentials": {k: "${" + env_var(connection, k) + "}" for k in creds},
            }
        ],
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def instance_env(monkeypatch: pytest.MonkeyPatch, home: Path, names: dict[str, str]) -> None:
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "deploy/postgres/dagster.yaml", home / "dagster.yaml")
    for key, value in {
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": HOST,
        "DAGSTER_PG_PORT": PORT,
        "DAGSTER_PG_USER": names["role"],
        "DAGSTER_PG_PASSWORD": "",
        "DAGSTER_PG_DB": names["dagster"],
    }.items():
        monkeypatch.setenv(key, value)


def fixes(output: str) -> list[str]:
    """The commands init-db printed: `createdb ...` up to its aside, or `psql ... -c "..."`."""
    return re.findall(r"(createdb [^()]+?)(?: \(or|$)|(psql .+? -c \"[^\"]+\")", output, re.M)


def test_init_db_says_what_is_missing_and_the_printed_commands_fix_it(
    names: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    if not shutil.which("createdb") or not shutil.which("psql"):
        pytest.skip("PostgreSQL's client programs (createdb, psql) are not on PATH")
    role, wh, dg_db = names["role"], names["warehouse"], names["dagster"]
    admin_sql(f'CREATE ROLE "{role}" LOGIN')  # no CREATEDB: init-db cannot create the databases itself
    url = f"postgresql+psycopg2://{role}@{HOST}:{PORT}/{wh}"
    config = sandbox_config(tmp_path / "oppsync.yaml", {"url": url})
    instance_env(monkeypatch, tmp_path / "dagster", names)

    assert cli.main(["--config", str(config), "config", "check"]) == 2
    checked = capsys.readouterr().err
    assert (
        "OK" not in checked and f'database "{wh}" does not exist' in checked and f'"{dg_db}" does not exist' in checked
    )

    assert cli.main(["--config", str(config), "init-db"]) == 3
    out = capsys.readouterr().out
    commands = [a or b for a, b in fixes(out)]
    assert commands == [
        f"createdb -h {HOST} -p {PORT} -U postgres -O {role} {wh}",
        f"createdb -h {HOST} -p {PORT} -U postgres -O {role} {dg_db}",
    ], out
    subprocess.run(commands[0], shell=True, check=True)  # verbatim, as a DBA would
    admin_sql(f'CREATE DATABASE "{dg_db}"')  # Dagster's, owned by postgres: the role may not create tables in it

    assert cli.main(["--config", str(config), "init-db"]) == 3
    out = capsys.readouterr().out
    assert out.startswith(
        f"warehouse: ready (postgresql+psycopg2://{role}@{HOST}:{PORT}/{wh}); schema oppsync migrated"
    )
    commands = [a or b for a, b in fixes(out)]
    assert commands == [f'psql -h {HOST} -p {PORT} -d {dg_db} -c "GRANT USAGE, CREATE ON SCHEMA public TO {role}"'], out
    subprocess.run(commands[0].replace("psql ", "psql -U postgres ", 1), shell=True, check=True, capture_output=True)

    assert cli.main(["--config", str(config), "init-db"]) == 0
    out = capsys.readouterr().out
    assert (
        f"Dagster storage: ready (postgresql+psycopg2://{role}@{HOST}:{PORT}/{dg_db}); Dagster's tables in place" in out
    )
    assert cli.main(["--config", str(config), "config", "check"]) == 0
    assert admin_sql("SELECT count(*) FROM information_schema.tables WHERE table_name = 'runs'", database=dg_db)[0][0][
        0
    ]
    assert admin_sql("SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'oppsync'", database=wh)[0][
        0
    ][0]


def test_init_db_creates_both_databases_when_the_role_may(
    names: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    role, wh = names["role"], names["warehouse"]
    admin_sql(f'CREATE ROLE "{role}" LOGIN CREATEDB')
    config = sandbox_config(tmp_path / "oppsync.yaml", {"url": f"postgresql+psycopg2://{role}@{HOST}:{PORT}/{wh}"})
    instance_env(monkeypatch, tmp_path / "dagster", names)
    assert cli.main(["--config", str(config), "init-db"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("warehouse: created") and out[1].startswith("Dagster storage: created"), out


def readme_postgres_section() -> tuple[str, dict]:
    """The shell block and the oppsync.yaml excerpt of README.md's "Deploying with Postgres"."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("\n## Deploying with Postgres\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    shell = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    excerpt = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    return shell, excerpt


def test_the_readme_postgres_section_works_as_written(names: dict[str, str], tmp_path: Path):
    if not shutil.which("createdb") or not shutil.which("psql"):
        pytest.skip("PostgreSQL's client programs (createdb, psql) are not on PATH")
    shell, excerpt = readme_postgres_section()
    fresh = {"oppsync_app": names["role"], "oppsync_warehouse": names["warehouse"], "oppsync_dagster": names["dagster"]}
    fresh |= {"127.0.0.1": HOST, "5432": PORT}  # the test server (OPPSYNC_TEST_PG_URL)
    pattern = re.compile("|".join(re.escape(k) for k in sorted(fresh, key=len, reverse=True)))

    def renamed(s: str) -> str:
        return pattern.sub(lambda m: fresh[m.group(0)], s)

    sandbox_config(tmp_path / "oppsync.yaml", yaml.safe_load(renamed(yaml.safe_dump(excerpt)))["warehouse"])
    (tmp_path / "deploy").symlink_to(REPO / "deploy")  # the commands run in the repository's folder
    # a fresh shell: nothing of ours in the environment but the installed `oppsync` (and this worktree's code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DAGSTER_", "OPPSYNC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        ["bash", "-eu", "-c", renamed(shell)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warehouse: ready" in done.stdout and "Dagster storage: ready" in done.stdout, done.stdout
    assert re.search(r"acme-salesforce\s+salesforce\s+full\s+success", done.stdout), done.stdout
    assert admin_sql("SELECT count(*) FROM runs", database=names["dagster"])[0][0][0] == 1
    synced = admin_sql("SELECT count(*) FROM oppsync.opportunities", database=names["warehouse"])[0][0][0]
    assert synced == 30
