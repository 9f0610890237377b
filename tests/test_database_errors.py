"""Which database errors no retry fixes, and the fix each one prints (lib/warehouse/errors.py); where Dagster's
storage is (lib/warehouse/setup.py reads $DAGSTER_HOME/dagster.yaml as Dagster does). Pure: the Postgres
answers these classify are met for real in tests/test_init_db.py and tests/dagster/test_errors_fast.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from oppsync_pipeline.lib.warehouse.errors import permanent_problem
from oppsync_pipeline.lib.warehouse.setup import DAGSTER, dagster_database

REPO = Path(__file__).resolve().parents[1]
URL = "postgresql+psycopg2://oppsync_app@db.internal:5433/analytics"


def libpq_error(message: str) -> OperationalError:
    """An error as SQLAlchemy raises it around psycopg2's (libpq's wording, as the server sends it)."""
    return OperationalError("connect", {}, Exception(message))


@pytest.mark.parametrize(
    ("message", "problem", "fix"),
    [
        (
            'connection to server at "db.internal", port 5433 failed: FATAL:  database "analytics" does not exist',
            'database "analytics" does not exist on db.internal:5433',
            "createdb -h db.internal -p 5433 -U postgres -O oppsync_app analytics",
        ),
        ('FATAL:  role "oppsync_app" does not exist', 'role "oppsync_app" does not exist', "createuser -h db.internal"),
        (
            'FATAL:  password authentication failed for user "oppsync_app"',
            "password of role",
            "PGPASSWORD or ~/.pgpass",
        ),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.5"', "pg_hba.conf", "pg_hba.conf"),
        (
            "FATAL:  permission denied for database analytics",
            "no permission on database analytics",
            'psql -h db.internal -p 5433 -d analytics -c "GRANT CONNECT, CREATE ON DATABASE analytics TO oppsync_app"',
        ),
        (
            "permission denied for schema oppsync",
            "no permission on schema oppsync",
            "GRANT USAGE, CREATE ON SCHEMA oppsync TO oppsync_app",
        ),
    ],
)
def test_a_permanent_postgres_error_names_the_problem_and_the_command_that_fixes_it(message, problem, fix):
    found = permanent_problem(libpq_error(message), URL)
    assert found is not None and problem in found.problem and fix in found.fix, found
    assert str(found).startswith("warehouse: ") and "\n" not in str(found)


@pytest.mark.parametrize(
    "message",
    [
        'connection to server at "db.internal", port 5433 failed: Connection refused',  # restarting, or not yet up
        "server closed the connection unexpectedly",
        "could not serialize access due to concurrent update",
        'FATAL:  database "dagster" does not exist',  # another database on the same server: not this one's problem
    ],
)
def test_errors_a_retry_may_fix_are_left_to_the_retries(message):
    assert permanent_problem(libpq_error(message), URL) is None


def test_the_dagster_database_is_read_from_dagster_yaml_with_its_environment_variables(tmp_path: Path):
    (tmp_path / "dagster.yaml").write_text((REPO / "deploy/postgres/dagster.yaml").read_text())
    env = {
        "DAGSTER_PG_HOST": "db.internal",
        "DAGSTER_PG_PORT": "5433",
        "DAGSTER_PG_USER": "oppsync_app",
        "DAGSTER_PG_PASSWORD": "",  # set but empty is a value (trust authentication), as for Dagster
        "DAGSTER_PG_DB": "dagster",
    }
    db = dagster_database(str(tmp_path), env)
    assert db is not None and db.what == DAGSTER
    assert db.url == "postgresql+psycopg2://oppsync_app@db.internal:5433/dagster"
    del env["DAGSTER_PG_DB"]
    with pytest.raises(
        ValueError, match=r"storage\.postgres\.postgres_db\.db_name: environment variable DAGSTER_PG_DB"
    ):
        dagster_database(str(tmp_path), env)


def test_the_older_per_storage_form_and_the_embedded_default(tmp_path: Path):
    (tmp_path / "dagster.yaml").write_text(
        "run_storage:\n  module: dagster_postgres.run_storage\n  class: PostgresRunStorage\n"
        "  config:\n    postgres_url: postgresql://u@h:5432/runs\n"
    )
    assert dagster_database(str(tmp_path), {}).url == "postgresql+psycopg2://u@h:5432/runs"
    (tmp_path / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())  # SQLite files in DAGSTER_HOME
    assert dagster_database(str(tmp_path), {}) is None
    assert dagster_database(None, {}) is None


def test_the_extract_counts_a_database_error_no_retry_fixes_as_permanent():
    from oppsync_pipeline.lib.sync import is_permanent

    assert is_permanent(libpq_error("permission denied for schema oppsync"), URL)
    assert not is_permanent(libpq_error("server closed the connection unexpectedly"), URL)
